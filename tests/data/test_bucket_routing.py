"""γ-MoD routing does not depend on the bucket an example lands in: capacity is computed
from the routable prefix (image + system tokens), a trace-time constant, and with the
official routing (padding always kept) padding never competes for a skip. The same
examples collated at two bucket lengths by the pipeline's `collate` get the same kept /
skipped decision on every real token of every MoD layer and the same logits there; only
padding positions (and the routing loss, which averages over them) differ.

(With the non-official `skip_padding_first=True`, padding absorbs the skips first, so an
example that nearly fills a small bucket is routed differently in a larger one.)"""

import json

import jax
import numpy as np
import pytest

from gamma_mod_jax import api as gm
from gamma_mod_jax.data import pipeline as P
from gamma_mod_jax.data.tokenizer import load_tokenizer
from tests.data import varied_llava


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path, image_dir, tokenizer_dir = varied_llava.write_varied_llava(str(tmp_path_factory.mktemp("routing")), n=12)
    with open(path) as f:
        records = [r for r in json.load(f) if r["id"] != varied_llava.CORRUPT_ID][:4]
    encoder = P.ExampleEncoder(tokenizer=load_tokenizer(tokenizer_dir), image_size=28, max_len=96,
                               move_image_to_front=True)
    out = []
    for r in records:
        if "image" in r:
            r = dict(r, image=f"{image_dir}/{r['image']}")
        out.append(encoder(r))
    assert all("_skip" not in e for e in out)
    return out


def test_routing_and_logits_on_real_tokens_do_not_change_with_the_bucket(examples):
    config = gm.load_config("configs/llava15_7b.py:tiny,mod=0.9")  # 5 of the 6 routable tokens skip
    model = gm.build_model(config, seed=0)
    n_img = model.config.num_image_tokens
    rng = np.random.default_rng(0)
    outs = {}
    for length in (64, 96):
        batch = P.collate(examples, batch_size=len(examples), image_size=28, length=length)
        # distinct random pixels per example, the same at both lengths
        batch["pixel_values"] = rng.standard_normal(batch["pixel_values"].shape).astype(np.float32) if not outs else \
            outs[64][1]["pixel_values"]
        out = jax.jit(lambda ids, mask, px, types: model(ids, mask, px, token_types=types))(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["token_types"])
        outs[length] = (out, batch)
    short, long_ = outs[64][0], outs[96][0]
    real = np.asarray(short.attention_mask, bool)            # [b, L64] real spliced positions
    L = real.shape[1]
    assert L == 64 - 1 + n_img and long_.attention_mask.shape[1] == 96 - 1 + n_img
    assert not np.asarray(long_.attention_mask)[:, L:].any()
    sel_short = np.asarray(short.mod_aux["selected"])        # [n_mod, b, L]
    sel_long = np.asarray(long_.mod_aux["selected"])[:, :, :L]
    assert sel_short.shape[0] >= 1
    skipped = (~sel_short.astype(bool) & real[None]).sum()
    assert skipped > 0  # the routing does skip real tokens here
    np.testing.assert_array_equal(sel_short[:, real], sel_long[:, real])
    logits_short = np.asarray(short.logits)[real]
    logits_long = np.asarray(long_.logits)[:, :L][real]
    np.testing.assert_allclose(logits_long, logits_short, rtol=1e-5, atol=1e-5 * np.abs(logits_short).max())
