"""model.scan_layers: scanned runs of layers against the Python loop on the same weights
(forward under dense, capacity and threshold routing, gradients with remat, 5 training
steps, generation, ARank), per-layer checkpoint keys and checkpoints identical either way,
the logical axes of stacked parameters, activation constraints under a mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gamma_mod_jax import api as gm
from gamma_mod_jax import token_types as tt
from gamma_mod_jax.convert.keymap import LLAMA_KEYMAP, export_state_dict, load_state_dict, param_paths
from gamma_mod_jax.mod.config import MoDConfig
from gamma_mod_jax.models.llama import Llama
from gamma_mod_jax.models.scan import layer_runs
from tests.conftest import rel_err
from tests.mod.test_mod_layer import CFG, make_batch

# 5 layers, MoD layers 2 and 3: runs of 2 dense, 2 MoD and 1 dense layer.
CFG5 = dataclasses.replace(CFG, num_hidden_layers=5)
MOD = MoDConfig(layers=(2, 3), num_routable_tokens=10, prefill_threshold=0.5,
                threshold_buckets=(0.25, 0.5, 0.75, 1.0), threshold_bucket_multiple=4)
LLAVA = "configs/llava15_7b.py:tiny,mod"  # 4 LLM layers, MoD layers 1 and 2


def test_layer_runs_split_at_every_change():
    assert layer_runs([False, False, True, True, False]) == ((0, 2, False), (2, 2, True), (4, 1, False))
    assert layer_runs([0]) == ((0, 1, 0),)
    assert layer_runs([0, 1, 0]) == ((0, 1, 0), (1, 1, 1), (2, 1, 0))


def llama_pair(rng, mod=MOD):
    """(Python-loop model, scanned model) with the same random weights (copied through
    param_paths, the per-layer view the key map uses) and a router wide enough to route."""
    loop = Llama(CFG5, mod=mod, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    if mod is not None:
        loop.router.kernel.set_value(jnp.asarray(rng.standard_normal((CFG5.hidden_size, 2)) * 0.3, jnp.float32))
    scanned = Llama(CFG5, mod=mod, scan_layers=True, rngs=nnx.Rngs(0))
    theirs = dict(param_paths(scanned))
    for path, var in param_paths(loop):
        theirs[path].set_value(np.asarray(var.get_value()))
    return loop, scanned


def test_stacked_parameters_and_the_per_layer_view(rng):
    loop, scanned = llama_pair(rng)
    assert not hasattr(scanned, "layers")
    kernel = scanned.layers_stacked[1].mlp.up_proj.kernel.get_value()
    assert kernel.shape == (2, CFG5.hidden_size, CFG5.intermediate_size)
    np.testing.assert_array_equal(kernel[1], loop.layers[3].mlp.up_proj.kernel.get_value())
    assert [p for p, _ in param_paths(loop)] == [p for p, _ in param_paths(scanned)]
    # The same seed draws the same weights scanned or not (layers are initialised one by one).
    a, b = Llama(CFG5, mod=MOD, rngs=nnx.Rngs(3)), Llama(CFG5, mod=MOD, scan_layers=True, rngs=nnx.Rngs(3))
    for (_, x), (_, y) in zip(param_paths(a), param_paths(b)):
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()))


@pytest.mark.parametrize("routing", ["dense", "capacity", "threshold"])
def test_scanned_forward_equals_the_loop(rng, routing):
    loop, scanned = llama_pair(rng, None if routing == "dense" else MOD)
    ids, mask, types = make_batch(rng)
    run = jax.jit(lambda m: m(ids, attention_mask=mask, token_types=types,
                              routing="capacity" if routing == "dense" else routing))
    (want, _, want_aux), (got, _, got_aux) = run(loop), run(scanned)
    assert rel_err(got, want) < 1e-6
    if routing != "dense":
        selected = np.asarray(want_aux["selected"])
        assert selected.shape[0] == 2 and 0 < selected[np.asarray(mask, bool)[None].repeat(2, 0)].mean() < 1
        np.testing.assert_array_equal(got_aux["selected"], selected)
        assert rel_err(got_aux["skip_ratio"], want_aux["skip_ratio"]) < 1e-6


def test_scanned_gradients_with_remat_equal_the_loop(rng):
    loop, scanned = llama_pair(rng)
    ids, mask, types = make_batch(rng)
    grads = []
    for model in (loop, scanned):
        model.remat = "full"
        graphdef = nnx.graphdef(model)
        loss = lambda s: jnp.sum(nnx.merge(graphdef, s)(ids, attention_mask=mask, token_types=types)[0] ** 2)
        grads.append(param_paths(jax.jit(jax.grad(loss))(nnx.state(model, nnx.Param))))
    for (path, want), (_, got) in zip(*grads):
        assert rel_err(got.get_value(), want.get_value()) < 1e-5, path


@pytest.mark.parametrize("routing", ["capacity", "threshold"])
def test_scanned_caches_decode_the_same_tokens(rng, routing):
    """Prefill (threshold: bucketed, capacity: capacity-sized caches) and 4 decode steps
    (threshold: lax.cond skip per MoD layer) with stacked caches per run."""
    loop, scanned = llama_pair(rng)
    ids, mask, types = make_batch(rng)
    b, s = ids.shape
    caches = scanned.init_caches(b, s, 4, routing)
    assert [c.k.shape[:2] for c in caches] == [(2, b), (2, b), (1, b)]
    assert caches[1].k.shape[3] == scanned.cache_lengths(s, 4, routing)[2]  # [count, b, kv_heads, slots, d]

    def generate(model):
        caches = model.init_caches(b, s, 4, routing)
        logits, caches, _ = model(ids, attention_mask=mask, token_types=types, caches=caches, routing=routing,
                                  last_only=True)
        tokens, all_logits = [jnp.argmax(logits[:, 0], -1)], [logits[:, 0]]
        for _ in range(3):
            logits, caches, _ = model(tokens[-1][:, None], caches=caches, token_types=jnp.full((b, 1), tt.ANSWER),
                                      routing=routing)
            tokens.append(jnp.argmax(logits[:, 0], -1))
            all_logits.append(logits[:, 0])
        return jnp.stack(tokens, 1), jnp.stack(all_logits, 1)

    (want_tokens, want), (got_tokens, got) = jax.jit(generate)(loop), jax.jit(generate)(scanned)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    assert rel_err(got, want) < 1e-6


def llava_pair(spec=LLAVA, seed=0):
    cfg = gm.model_config(spec)
    return (gm.build_model(cfg, seed=seed), gm.build_model(dataclasses.replace(cfg, scan_layers=True), seed=seed))


def llava_batch(rng, cfg, t=10):
    ids = rng.integers(3, cfg.llm.vocab_size, size=(2, t)).astype(np.int32)
    ids[:, 0] = cfg.image_token_index
    mask = np.ones((2, t), np.int32)
    mask[1, t - 3:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[:, :2] = -100
    size = cfg.input_image_size
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": rng.standard_normal((2, size, size, 3)).astype(np.float32)}


@pytest.mark.slow
def test_five_training_steps_scanned_equal_the_loop(rng):
    import optax

    from gamma_mod_jax.train.step import init_train_state, train_step

    losses = []
    for model in llava_pair():
        model.llm.remat = "full"
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = optax.adamw(1e-3)
        step = jax.jit(lambda state, batch, graphdef=graphdef, rest=rest: train_step(state, batch, graphdef=graphdef,
                                                                                   rest=rest, tx=tx))
        state, run = init_train_state(params, tx), []
        batch_rng = np.random.default_rng(7)
        for _ in range(5):
            state, metrics = step(state, llava_batch(batch_rng, model.config))
            run.append(float(metrics["loss"]))
        losses.append(run)
    assert len(set(losses[0])) == 5  # the steps change the model
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


def test_generate_gives_the_same_tokens(rng):
    """models/generate.py (one jit of prefill and the greedy while loop) on a dense model."""
    loop, scanned = llama_pair(rng, None)
    ids, mask, _ = make_batch(rng)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    want = gm.generate(loop, batch, max_new_tokens=4, eos_id=-1)
    np.testing.assert_array_equal(gm.generate(scanned, batch, max_new_tokens=4, eos_id=-1), want)


def test_arank_scanned_equals_the_loop(rng):
    """The probe sees every dense layer's own maps, in layer order; ARank values equal."""
    from gamma_mod_jax.mod.arank_run import compute_arank

    loop, scanned = llava_pair("configs/llava15_7b.py:tiny")
    batches = [{k: v for k, v in llava_batch(rng, loop.config, t=12).items() if k != "labels"}]
    want = compute_arank(loop, batches, log=lambda _: None)
    got = compute_arank(scanned, batches, log=lambda _: None)
    assert len(got) == loop.config.llm.num_hidden_layers
    assert [s["per_sample"] for s in got] == [s["per_sample"] for s in want]
    ids, mask, _ = make_batch(rng)
    maps = lambda m: m(ids, attention_mask=mask, attention_probe=lambda probs, valid: probs)[2]["attention_probe"]
    loop5, scanned5 = llama_pair(rng, None)
    want_maps, got_maps = jax.jit(maps)(loop5), jax.jit(maps)(scanned5)
    assert len(got_maps) == CFG5.num_hidden_layers
    for i, (w, g) in enumerate(zip(want_maps, got_maps)):
        assert rel_err(g, w) < 1e-6, i
        assert i == 0 or rel_err(w, want_maps[i - 1]) > 1e-2  # layers differ: the order is checked


def test_state_dict_round_trip_and_checkpoints_identical(rng, tmp_path):
    """PyTorch keys: a random state dict loads into the scanned model and exports back
    unchanged, equal to the loop model's; our checkpoints written from either model hold
    the same per-layer arrays, and each loads into the other layout."""
    from gamma_mod_jax.convert.checkpoint import load_checkpoint, save_checkpoint

    loop, scanned = llama_pair(rng)
    sd = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in export_state_dict(loop, LLAMA_KEYMAP).items()}
    assert "model.layers.3.mlp.up_proj.weight" in sd and not any("stacked" in k for k in sd)
    load_state_dict(scanned, sd, LLAMA_KEYMAP)
    load_state_dict(loop, sd, LLAMA_KEYMAP)
    back = export_state_dict(scanned, LLAMA_KEYMAP)
    assert back.keys() == sd.keys()
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key])

    m_loop, m_scan = llava_pair(LLAVA, seed=4)
    save_checkpoint(str(tmp_path / "loop"), m_loop)
    save_checkpoint(str(tmp_path / "scan"), m_scan)
    cfg = m_loop.config
    restored = {}
    for name in ("loop", "scan"):
        for scan in (False, True):
            model = load_checkpoint(str(tmp_path / name), config=dataclasses.replace(cfg, scan_layers=scan))
            assert model.llm.scan_layers == scan
            restored[name, scan] = {p: np.asarray(v.get_value()) for p, v in param_paths(model)}
    want = {p: np.asarray(v.get_value()) for p, v in param_paths(m_loop)}
    for tree in restored.values():
        assert tree.keys() == want.keys()
        for path in want:
            np.testing.assert_array_equal(tree[path], want[path])


def test_stacked_parameters_shard_like_their_layers():
    from jax.sharding import PartitionSpec as P

    from gamma_mod_jax.parallel.logical import param_logical_axes
    from gamma_mod_jax.parallel.sharding import logical_to_spec

    assert param_logical_axes("llm/layers_stacked/1/mlp/up_proj/kernel", 3) == ("layers", "embed", "mlp")
    assert param_logical_axes("llm/layers_stacked/0/input_layernorm/scale", 2) == ("layers", "norm")
    assert param_logical_axes("llm/layers_stacked/0/mlp/up_proj/kernel", 4) is None  # no per-layer rank 3
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    fake = jax.sharding.AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"))
    rules = {"embed": ("fsdp",), "mlp": ("tensor",)}
    assert logical_to_spec(("layers", "embed", "mlp"), (26, 8, 8), fake, rules) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "mlp"), (26, 8, 8), mesh, rules) == P()


CONSTRAINT_CHILD = """
import json, jax, numpy as np
from flax import nnx
from gamma_mod_jax.models.llama import Llama
from gamma_mod_jax.parallel.activations import activation_sharding
from gamma_mod_jax.parallel.mesh import make_mesh
from tests.models.test_scan_layers import CFG5, MOD
from tests.mod.test_mod_layer import make_batch
ids, mask, types = make_batch(np.random.default_rng(0), b=2)
model = Llama(CFG5, mod=MOD, scan_layers=True, rngs=nnx.Rngs(0))
run = lambda m: m(ids, attention_mask=mask, token_types=types)[0]
plain_text, plain = jax.jit(run).lower(model).as_text(), jax.jit(run)(model)
mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
with activation_sharding(mesh):  # a new function: jit's trace cache is keyed by the function
    constrained = jax.jit(lambda m: run(m))
    text, got = constrained.lower(model).as_text(), constrained(model)
err = float(np.linalg.norm(np.asarray(got) - np.asarray(plain)) / np.linalg.norm(np.asarray(plain)))
count = lambda t: t.count("sharding_constraint")  # Shardy's sdy.sharding_constraint
print("RESULT " + json.dumps({"plain": count(plain_text), "constrained": count(text),
                              "batch_split": '[{"data"}, {}, {}]' in text,
                              "heads_split": '[{"data"}, {}, {"tensor"}, {}]' in text, "rel_err": err}))
"""


def test_activation_constraints_only_under_a_mesh():
    """Outside an activation_sharding context `constrain` is the identity (no sharding op in
    the program); inside one (4 CPU devices, a child process) it pins the residual stream by
    the rules (batch over `data`, attention heads over `tensor`), and the results are unchanged."""
    import sys

    from gamma_mod_jax.parallel.activations import constrain
    from tests.parallel.helpers import child_env, result_line, run

    x = jnp.ones((2, 3, 4))
    assert constrain(x, ("batch", "length", "embed")) is x
    out = result_line(run([sys.executable, "-c", CONSTRAINT_CHILD], env=child_env(devices=4)).stdout)
    assert out["plain"] == 0 and out["constrained"] > 0 and out["batch_split"] and out["heads_split"], out
    assert out["rel_err"] < 1e-6


@pytest.mark.parametrize("spec", ["configs/llava_hr_7b.py:tiny", "configs/mgm_hd_7b.py:tiny"])
def test_scanned_vision_towers_equal_the_loop(rng, spec):
    """CLIP runs split at the MR-Adapters (LLaVA-HR) or the selected layer (MGM), ConvNeXt
    stages stacked: the same PyTorch state dict and the same forward as the loop."""
    loop, scanned = llava_pair(spec)
    assert len(scanned.vision.clip.encoder.layers_stacked) == (4 if "hr" in spec else 2)
    want_sd, got_sd = gm.export_torch_state_dict(loop), gm.export_torch_state_dict(scanned)
    assert got_sd.keys() == want_sd.keys()
    for key in want_sd:
        np.testing.assert_array_equal(got_sd[key], want_sd[key])
    batch = llava_batch(rng, loop.config)
    run = jax.jit(lambda m: m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits)
    assert rel_err(run(scanned), run(loop)) < 1e-6
