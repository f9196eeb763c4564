"""Logical axes of every parameter, the rules table, the divisibility fallback, mesh
sizes and distributed start-up options: in-process, no devices needed."""

import logging

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from gamma_mod_jax import api as gm
from gamma_mod_jax.config_file import load_config
from gamma_mod_jax.parallel import distributed, sharding
from gamma_mod_jax.parallel.logical import DEFAULT_RULES, param_logical_axes, rules_dict
from gamma_mod_jax.parallel.mesh import mesh_shape
from gamma_mod_jax.parallel.sharding import logical_to_spec, param_specs, path_string


def mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))


def abstract_params(recipe):
    from flax import nnx

    config = load_config(f"configs/train.py:{recipe}")
    return nnx.state(gm.abstract_model(gm.model_config(config.model)), nnx.Param)


@pytest.mark.parametrize("recipe", ["llava15_7b_mod0.3,tiny", "llava_hr_7b_mod0.5,tiny"])
def test_every_parameter_has_logical_axes_and_matrices_are_sharded(recipe):
    params = abstract_params(recipe)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_string(path)
        axes = param_logical_axes(name, len(leaf.shape))
        assert axes is not None, name
        if len(leaf.shape) == 1:
            assert axes == ("norm",), name  # vectors replicated
        elif "router" not in axes:  # [d, 2] / [d, 1] gates: FSDP shards d, or (vision gate) they are tiny
            assert set(axes) & {"embed", "vision_embed", "conv_out"}, (name, axes)  # FSDP shards every matrix


def test_llm_parameters_follow_the_rules():
    specs = {path_string(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        param_specs(abstract_params("llava15_7b_mod0.3,tiny"), mesh(2, 2, 2)), is_leaf=lambda x: isinstance(x, P))[0]}
    assert specs["llm/layers/0/self_attn/q_proj/kernel"] == P("fsdp", "tensor")
    assert specs["llm/layers/0/self_attn/o_proj/kernel"] == P("tensor", "fsdp")
    assert specs["llm/layers/0/mlp/up_proj/kernel"] == P("fsdp", "tensor")
    assert specs["llm/layers/0/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    assert specs["llm/embed_tokens/embedding"] == P("tensor", "fsdp")
    assert specs["llm/lm_head/kernel"] == P("fsdp", "tensor")
    assert specs["llm/router/kernel"] == P("fsdp")
    assert specs["llm/norm/scale"] == P()
    assert specs["vision/clip/encoder/layers/0/mlp/fc1/kernel"] == P("fsdp", "tensor")


def test_indivisible_dimension_falls_back_to_replication_logged_once(caplog):
    sharding._LOGGED.clear()
    with caplog.at_level(logging.WARNING):
        # 5 CLIP positions over fsdp=2: replicated; the 32-wide dim is sharded
        assert logical_to_spec(("vision_positions", "vision_embed"), (5, 32), mesh(1, 2, 1), DEFAULT_RULES) == P(
            None, "fsdp")
        for _ in range(3):
            assert logical_to_spec(("vocab", "embed"), (30, 64), mesh(1, 2, 4), DEFAULT_RULES) == P(None, "fsdp")
    messages = [r.getMessage() for r in caplog.records if "not divisible" in r.getMessage()]
    assert len(messages) == 1 and "'vocab' of size 30" in messages[0]
    # the batch over data x fsdp; 6 examples on 4 ways: replicated
    assert logical_to_spec(("batch", None), (8, 24), mesh(2, 2, 2), DEFAULT_RULES) == P(("data", "fsdp"))
    assert logical_to_spec(("batch", None), (6, 24), mesh(2, 2, 2), DEFAULT_RULES) == P()


def test_rules_table_is_the_config_and_a_mesh_axis_is_used_once():
    rules = dict(DEFAULT_RULES, embed=None, mlp=("fsdp", "tensor"))
    spec = logical_to_spec(("embed", "mlp"), (64, 128), mesh(1, 2, 4), tuple(rules.items()))
    assert spec == P(None, ("fsdp", "tensor"))
    # both dims want fsdp: the second gets what is left
    assert logical_to_spec(("embed", "embed"), (64, 64), mesh(1, 2, 1), DEFAULT_RULES) == P("fsdp")
    with pytest.raises(ValueError, match="twice"):
        rules_dict((("embed", "fsdp"), ("embed", None)))
    with pytest.raises(ValueError, match="lacks"):
        logical_to_spec(("embed",), (64,), mesh(1, 2, 1), (("embed", "model"),))
    config = load_config("configs/train.py:llava15_7b_mod0.3,tiny")
    assert tuple(config.sharding_rules) == DEFAULT_RULES and config.parallelism == "pjit"
    assert dict(config.mesh) == {"data": -1, "fsdp": 1, "tensor": 1}


def test_mesh_sizes():
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh_shape(None, 4) == {"data": 4, "fsdp": 1, "tensor": 1}
    assert mesh_shape({"data": 1, "fsdp": -1, "tensor": 4}, 8) == {"data": 1, "fsdp": 2, "tensor": 4}
    with pytest.raises(ValueError, match="not divisible"):
        mesh_shape({"data": -1, "tensor": 3}, 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="unknown"):
        mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="at most one"):
        mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_distributed_start_up_options(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
                "SLURM_STEP_NODELIST", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.initialize() is False  # nothing configured: single process
    assert distributed.initialize("127.0.0.1:1234", 1, 0) is False  # one process: nothing to join
    with pytest.raises(ValueError, match="needs all of"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(ValueError, match="not in"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node1")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert distributed.initialize() is False  # a one-task step stays single-process
