"""ARank: the rank function vs numpy, attention maps vs transformers eager attention,
per-layer ARank vs a PyTorch computation of the official definition."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from gamma_mod_jax.mod.arank import attention_map_ranks, matrix_rank
from tests.models.test_llama import build_pair, right_padded, TINY


def test_matrix_rank_equals_numpy_on_known_ranks(rng):
    mats, ranks = [], []
    for r in [0, 1, 3, 7, 12]:
        a = rng.standard_normal((12, r)) @ rng.standard_normal((r, 12)) if r else np.zeros((12, 12))
        mats.append(a)
        ranks.append(r)
    got = np.asarray(matrix_rank(jnp.asarray(np.stack(mats), jnp.float32)))
    want = [np.linalg.matrix_rank(m.astype(np.float32)) for m in mats]
    assert list(got) == want == ranks


def test_matrix_rank_at_the_tolerance_boundary(rng):
    # Singular values placed just above and just below max(m, n) * eps * sigma_max.
    n = 10
    eps = np.finfo(np.float32).eps
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    mats = []
    for factor in (30.0, 0.03, 3.0, 0.3):
        sigma = np.ones(n)
        sigma[-1] = factor * n * eps
        mats.append((u * sigma) @ v.T)
    x = np.stack(mats).astype(np.float32)
    got = np.asarray(matrix_rank(jnp.asarray(x)))
    want = [np.linalg.matrix_rank(m) for m in x]
    assert list(got) == want
    assert want[0] == n and want[1] == n - 1  # the boundary is really exercised


def test_attention_maps_equal_transformers_eager(rng):
    hf, ours = build_pair(rng)
    ids, mask = right_padded(rng, [9, 6], 9, TINY["vocab_size"])
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 output_attentions=True).attentions
    _, _, aux = ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask), attention_probe=lambda p, valid: p)
    for layer, (got, want) in enumerate(zip(aux["attention_probe"], ref)):
        got, want = np.asarray(got), want.numpy()
        for b, n in enumerate(mask.sum(1)):
            np.testing.assert_allclose(got[b, :, :n, :n], want[b, :, :n, :n], atol=1e-5, err_msg=f"layer {layer}")


def official_arank_torch(attn_hss: torch.Tensor):
    """The official code's computation on one example's [h, s, s] map: tril mask, zero
    diagonal, float32 torch.linalg.matrix_rank with default tolerance, per head (the official
    code then averages over heads). Also returns, per head, whether a singular value (float64)
    lies within a factor `BAND` of the tolerance, where float32 rounding may decide either way."""
    a = attn_hss * torch.tril(torch.ones_like(attn_hss))
    a = a.clone()
    a.diagonal(dim1=-2, dim2=-1).zero_()
    a = a.float()
    ranks = np.array([torch.linalg.matrix_rank(a[h]).item() for h in range(a.shape[0])])
    sigma = torch.linalg.svdvals(a.double()).numpy()
    tol = sigma[:, :1] * a.shape[-1] * np.finfo(np.float32).eps
    near = np.any((sigma > tol / BAND) & (sigma < tol * BAND), axis=-1)
    return ranks, near


BAND = 1.25  # float32 SVDs of the same matrix differ by ~eps * sigma_max = tol / n


def test_per_layer_arank_equals_official_pytorch_computation(rng):
    """Our ranks (padded batch, per-example tolerance) equal the official PyTorch computation
    on the same attention maps cut to each example, exactly, for every head with no singular
    value within a factor BAND of the tolerance. That the maps themselves equal transformers'
    is the test above; on transformers' own maps (float32 noise of ~0.7 tol in the smallest
    singular values, measured) the per-layer ARank agrees within one head's flip."""
    hf, ours = build_pair(rng)
    ids, mask = right_padded(rng, [24, 17], 24, TINY["vocab_size"])
    probe = jax.jit(lambda i, m: ours(i, attention_mask=m, attention_probe=lambda p, v: (p, attention_map_ranks(p, v)))[2]["attention_probe"])
    maps, ranks = zip(*[(np.asarray(p), np.asarray(r)) for p, r in probe(jnp.asarray(ids), jnp.asarray(mask))])
    clear = 0
    for b, n in enumerate(mask.sum(1)):
        with torch.no_grad():  # each example alone, unpadded, as the official code runs
            att = hf(torch.tensor(ids[b:b + 1, :n], dtype=torch.long), output_attentions=True).attentions
        for layer in range(len(ranks)):
            got = ranks[layer][b]
            official, near = official_arank_torch(torch.tensor(maps[layer][b, :, :n, :n]))
            np.testing.assert_array_equal(got[~near], official[~near], err_msg=f"layer {layer}, example {b}")
            assert np.all(np.abs(got - official) <= 1), (layer, b, got, official)
            clear += (~near).sum()
            official_on_hf, _ = official_arank_torch(att[layer][0])
            assert abs(got.mean() - official_on_hf.mean()) <= 1 / len(got) + 1e-9, (layer, b, got, official_on_hf)
    assert clear >= 0.75 * len(ranks) * ranks[0].size, clear  # the exact comparison covers most heads


# --- statistics, selection, official log import, adaptation ------------------------

import pytest

from gamma_mod_jax import api as gm
from gamma_mod_jax.mod.arank import ARankAccumulator, arank_report, parse_official_log, select_dense_layers


def test_selection_keeps_the_n_highest_layers_dense():
    ranks = [9.0, 8.0, 7.5, 3.0, 2.0, 7.5, 1.0, 10.0]
    assert select_dense_layers(ranks, keep_dense=4) == (0, 1, 2, 7)  # of the tied 7.5s, layer 5 goes γ-MoD
    assert select_dense_layers(ranks, keep_dense=4, ties="stay_dense") == (0, 1, 2, 5, 7)  # ties at the cut dense
    assert select_dense_layers(ranks, keep_dense=1) == (7,)
    assert select_dense_layers(ranks, threshold=7.6) == (0, 1, 7)
    with pytest.raises(ValueError, match="between 1 and the number of layers"):
        select_dense_layers(ranks, keep_dense=9)
    with pytest.raises(ValueError, match="exactly one"):
        select_dense_layers(ranks)


def test_accumulator_statistics_and_report(rng):
    acc = ARankAccumulator(num_layers=2)
    with pytest.raises(ValueError, match="no samples"):
        acc.layer_statistics()
    a = rng.integers(1, 9, size=(3, 4)).astype(float)
    b = rng.integers(1, 9, size=(3, 4)).astype(float)
    valid = np.array([[1, 1], [1, 0], [0, 0]], bool)  # the third example is all padding
    acc.add([a, b], valid)
    acc.add([a[:1], b[:1]])
    stats = acc.layer_statistics()
    per_sample = [a[0].mean(), a[1].mean(), a[0].mean()]
    assert stats[0]["per_sample"] == pytest.approx(per_sample)
    assert stats[0]["mean"] == pytest.approx(np.mean(per_sample)) and stats[0]["std"] == pytest.approx(np.std(per_sample))
    report = arank_report(stats, keep_dense=1)
    assert report["num_samples"] == 3 and len(report["dense_layers"]) >= 1
    assert sorted(report["dense_layers"] + report["mod_layers"]) == [0, 1]


def test_parse_official_log():
    log = "\n".join(["noise", "Layer 1, Heads Avg Rank: 10.00", "Layer 2, Heads Avg Rank: 4.50",
                     "Layer 1, Heads Avg Rank: 12.00", "Layer 2, Heads Avg Rank: 5.50"])
    assert parse_official_log(log) == [11.0, 5.0]
    with pytest.raises(ValueError, match="layers \\[2\\]"):
        parse_official_log("Layer 1, Heads Avg Rank: 3\nLayer 3, Heads Avg Rank: 4", source="x.log")
    with pytest.raises(ValueError, match="no 'Layer N"):
        parse_official_log("nothing here")


def test_adapted_model_with_every_token_kept_equals_dense(rng):
    from tests.models.test_mllm import mixed_batch

    dense = gm.build_model("configs/llava_hr_7b.py:tiny", seed=3)
    gamma = gm.adapt_to_gamma_mod(dense, dict(layers=(1, 2), routing_ratio=0.0, router_weight="straight_through",
                                              system_tokens=2))
    ids, mask, pixels = mixed_batch(rng, dense.config)
    a = dense(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    b = gamma(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels))
    assert np.asarray(b.mod_aux["selected"]).all()
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already a γ-MoD"):
        gm.adapt_to_gamma_mod(gamma, dict(layers=(1,)))
