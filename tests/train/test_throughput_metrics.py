"""Model FLOPs per step (hand count), MFU in the metrics, and updates that read nothing back
from the devices between log steps (jax's transfer guard inside every update)."""

import jax
import numpy as np
import pytest

from gamma_mod_jax import api as gm
from gamma_mod_jax.mod.flops import train_step_flops
from gamma_mod_jax.train import trainer as trainer_lib
from gamma_mod_jax.train.metrics import peak_bf16_flops, read_metrics
from tests.train.test_trainer import ForwardingIterator, synthetic_iterator, tiny_config


def test_train_step_flops_match_a_hand_count():
    """configs/llava15_7b.py:tiny,mod: LLM h 64, f 128, 4 layers (1, 2 MoD), vocab 256; CLIP
    32 wide, MLP 64, 3 layers used (select -2 of 4), 4 patches of 14 px + CLS; 4 image tokens,
    2 system tokens: int(0.5 x 6) = 3 tokens skip each MoD layer.
    Batch 2 x 10 text tokens -> 10 - 1 + 4 = 13 positions, MoD layers at 10.
      decoder layer 8sh^2 + 4s^2h + 6shf = 81920 s + 256 s^2: 1,108,224 (13), 844,800 (10)
      LLM 2 x 1,108,224 + 2 x 844,800 = 3,906,048;  LM head 2 x 13 x 64 x 256 = 425,984
      CLIP patches 2 x 4 x 3 x 196 x 32 = 150,528; layers 3 x (8x5x32^2 + 4x25x32 + 4x5x32x64) = 255,360
      projector 2 x 4 x (32 x 64 + 64^2) = 49,152
      forward per row 4,787,072; x 2 rows x 3 (forward + backward) = 28,722,432
      remat 'full' recomputes the decoder: + 2 x 3,906,048"""
    cfg = gm.model_config("configs/llava15_7b.py:tiny,mod")
    flops = train_step_flops(cfg, batch_size=2, text_len=10, remat="full")
    exact = lambda n: pytest.approx(n, rel=1e-12)  # the counter sums components in TFLOPs
    assert flops["forward"] == exact(2 * 4_787_072)
    assert flops["model"] == exact(28_722_432)
    assert flops["hardware"] == exact(28_722_432 + 2 * 3_906_048)
    assert train_step_flops(cfg, 2, 10, remat="none")["hardware"] == exact(28_722_432)
    dense = gm.model_config("configs/llava15_7b.py:tiny")  # the 2 MoD layers at all 13 positions
    assert train_step_flops(dense, 2, 10)["model"] == exact(28_722_432 + 3 * 2 * 2 * (1_108_224 - 844_800))


def test_peak_table_by_device_kind_and_none_on_cpu():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("TPU v5 lite") == 197e12 and peak_bf16_flops("TPU v5p") == 459e12
    assert peak_bf16_flops("TPU v4") == 275e12 and peak_bf16_flops("TPU v6 lite") == 918e12
    assert peak_bf16_flops("cpu") is None
    said = []
    assert trainer_lib._peak_flops(tiny_config().train, said.append) is None
    assert len(said) == 1 and "train.peak_flops_per_device" in said[0]


def recording_uint8_iterator(events):
    """The synthetic data with uint8 pixels (normalised on the device); every draw is an event."""
    make_inner = synthetic_iterator(2)

    def make(config, model_cfg):
        inner = make_inner(config, model_cfg)

        class Recording(ForwardingIterator):
            def __next__(self):
                events.append("draw")
                batch = dict(next(self.inner))
                rng = np.random.default_rng(int(batch["input_ids"].sum()))
                batch["pixel_values"] = rng.integers(0, 256, batch["pixel_values"].shape, dtype=np.uint8)
                return batch

        return Recording(inner)
    return make


def test_updates_read_nothing_back_and_the_metrics_report_mfu(tmp_path, monkeypatch):
    """4 updates of 2 micro-batches, logs at 2 and 4, a checkpoint at 4. Device values reach
    the host through the trainer's readers (_host_value, _all_processes; spied here); jax's
    transfer guard, on around every update, enforces it on GPU / TPU (CPU arrays are host
    memory: jax does not guard them). Reads may follow only the 5th draw (update 2 done,
    update 3's first batch drawn ahead) and the 8th (the last), never come between draws."""
    events = []
    for name in ("_host_value", "_all_processes"):
        real = getattr(trainer_lib, name)
        monkeypatch.setattr(trainer_lib, name, lambda *a, real=real: events.append("read") or real(*a))
    config = tiny_config(num_steps=4, log_every=2, checkpoint_every=4, peak_flops_per_device=1e12)
    config.optim.accumulation_steps = 2
    out = trainer_lib.train(config, str(tmp_path), make_data_iterator=recording_uint8_iterator(events),
                            log=lambda *_: None)
    assert out["status"] == "finished" and out["step"] == 4
    draws_before_reads = sorted({events[:i].count("draw") for i, e in enumerate(events) if e == "read"})
    assert events.count("draw") == 8 and draws_before_reads == [5, 8], events
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    cfg = gm.model_config(config.model)
    per_update = 2 * train_step_flops(cfg, 2, 24, config.train.remat)["model"]  # synthetic rows: 24 tokens
    for r in records:
        assert r["finite"] is True and np.isfinite(r["loss"])
        assert r["model_tflops_per_device"] == pytest.approx(per_update / r["step_time"] / 1e12, rel=1e-6)
        assert r["mfu"] == pytest.approx(r["model_tflops_per_device"] * 1e12 / 1e12, rel=1e-9)


def test_the_update_guard_refuses_reads_where_jax_guards_them():
    """What train.guard_host_transfers puts around an update (and takes off at log steps)."""
    guard = trainer_lib._update_guard(tiny_config().train)
    with guard():
        assert jax.config.jax_transfer_guard_device_to_host == "disallow"
        with trainer_lib._host_reads():
            assert jax.config.jax_transfer_guard_device_to_host == "allow"
    config = tiny_config(guard_host_transfers=False).train
    with trainer_lib._update_guard(config)():
        assert jax.config.jax_transfer_guard_device_to_host in (None, "allow")
