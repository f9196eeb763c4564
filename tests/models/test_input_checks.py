"""Misuse of the model's public entry points gets an error naming the argument, its
shape or value and what was expected, instead of a cryptic XLA error or a silently
wrong splice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gamma_mod_jax import api as gm

IMG = -200


@pytest.fixture(scope="module")
def model():
    return gm.build_model("llava15_7b:tiny")


def good_batch(rng, cfg, b=2, t=8):
    ids = rng.integers(3, cfg.llm.vocab_size, size=(b, t)).astype(np.int32)
    ids[:, 1] = IMG
    size = cfg.input_image_size
    return ids, np.ones((b, t), np.int32), rng.standard_normal((b, size, size, 3)).astype(np.float32)


def test_nchw_pixels_are_named_with_the_expected_layout(model, rng):
    ids, mask, pixels = good_batch(rng, model.config)
    with pytest.raises(ValueError, match=r"pixel_values: expected \[batch, \d+, \d+, 3\].*NCHW"):
        model(ids, mask, np.transpose(pixels, (0, 3, 1, 2)))
    # At trace time too (shapes are static), before any XLA error.
    with pytest.raises(ValueError, match="NCHW"):
        jax.jit(lambda p: model(ids, mask, p).logits)(jnp.transpose(pixels, (0, 3, 1, 2)))


def test_wrong_image_size_and_batch_are_named(model, rng):
    ids, mask, pixels = good_batch(rng, model.config)
    with pytest.raises(ValueError, match="input_image_size"):
        model(ids, mask, pixels[:, :-2, :-2])
    with pytest.raises(ValueError, match=r"pixel_values: expected"):
        model(ids, mask, pixels[:1])
    with pytest.raises(ValueError, match=r"attention_mask: expected the shape of input_ids \(2, 8\), got \(2, 7\)"):
        model(ids, mask[:, :-1], pixels)


def test_two_placeholders_and_expanded_image_tokens_are_refused(model, rng):
    ids, mask, pixels = good_batch(rng, model.config)
    ids[1, 4] = IMG
    with pytest.raises(ValueError, match=r"example 1 holds 2 image placeholders"):
        model(ids, mask, pixels)
    # transformers-style: the image id repeated once per image feature.
    expanded = np.concatenate([np.full((2, 5), IMG, np.int32), ids[:, 2:]], axis=1)
    with pytest.raises(ValueError, match=r"example 0 holds 5 image placeholders"):
        gm.generate(model, {"input_ids": expanded, "attention_mask": np.ones_like(expanded),
                            "pixel_values": pixels}, max_new_tokens=2, eos_id=2)


def test_ids_outside_the_vocabulary_are_named_padding_is_not_checked(model, rng):
    ids, mask, pixels = good_batch(rng, model.config)
    vocab = model.config.llm.vocab_size
    ids[0, 5] = vocab
    with pytest.raises(ValueError, match=rf"example 0, position 5 holds id {vocab}, outside the vocabulary"):
        gm.generate(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels},
                    max_new_tokens=2, eos_id=2)
    # The same id under padding is never read: accepted.
    mask[0, 5:] = 0
    out = gm.generate(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels},
                      max_new_tokens=2, eos_id=2)
    assert out.shape == (2, 2)
