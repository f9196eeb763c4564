"""The map step never raises for one record, and refuses over-long texts before tokenizing."""

import numpy as np
import pytest

from gamma_mod_jax.data import pipeline as P
from gamma_mod_jax.data import sources as S
from gamma_mod_jax.data.tokenizer import build_word_tokenizer

WORDS = "what is the colour of circle square red blue a and ?"


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (the kind of LLaMA-3 / GPT-2), trained on a few words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel()
    core.train_from_iterator([WORDS] * 4, trainers.BpeTrainer(vocab_size=300,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    return build_word_tokenizer([WORDS], str(tmp_path_factory.mktemp("tok") / "t"))


def _random_text(rng, n):
    alphabet = list("abcdefghij klmnop  qrstuvwxyz?.\n\t") + ["é", "日", "colour", "circle", " the "]
    return "".join(rng.choice(alphabet, size=n))


@pytest.mark.parametrize("which", ["bpe", "word"])
def test_token_lower_bound_never_exceeds_the_real_count(which, bpe_tokenizer, word_tokenizer):
    tokenizer = bpe_tokenizer if which == "bpe" else word_tokenizer
    bound = P.min_token_count(tokenizer)
    rng = np.random.default_rng(0)
    checked = 0
    for n in (1, 10, 100, 1000, 3000):
        for _ in range(5):
            text = _random_text(rng, n)
            real = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            assert bound([text]) <= real, (which, n, bound([text]), real)
            checked += bound([text]) > 0
    assert checked > 10  # the bound is not trivially zero


class _NoTokenizing:
    """The BPE tokenizer's vocabulary and model, but tokenizing fails the test."""

    def __init__(self, inner):
        self.backend_tokenizer = inner.backend_tokenizer
        self.get_vocab = inner.get_vocab

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized a text the length check should have refused")


def test_a_10_mb_text_is_refused_before_tokenizing(bpe_tokenizer):
    encoder = P.ExampleEncoder(tokenizer=_NoTokenizing(bpe_tokenizer), image_size=16, max_len=2048)
    record = {"id": "huge", "image": None,
              "conversations": [{"from": "human", "value": "q " * 5_000_000}, {"from": "gpt", "value": "a"}]}
    out = encoder(record)
    assert out["_skip"] == S.OVER_LONG and out["_id"] == "huge", out
    assert "not tokenized" in out["_message"]


def test_the_length_index_refuses_a_10_mb_text_before_tokenizing(bpe_tokenizer):
    """The batch plan measures every record before training: the same character bound
    applies there (truncation "drop"), and a record that breaks the measuring is a
    counted skip, not a crash."""
    record = {"id": "huge", "image": None,
              "conversations": [{"from": "human", "value": "q " * 5_000_000}, {"from": "gpt", "value": "a"}]}
    length, problem = P.record_text_length(record, _NoTokenizing(bpe_tokenizer), drop_over=2048)
    assert length == -1 and problem[0] == S.OVER_LONG and "not tokenized" in problem[1]
    odd = {"id": "odd", "image": None, "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]}
    lengths, _, ids, problems = P._index_range([record, odd], _NoTokenizing(bpe_tokenizer), 0, 2, "vicuna_v1",
                                               -200, False, 2048)
    assert list(lengths) == [-1, -1] and ids == ["huge", "odd"]
    assert problems[0][0] == S.OVER_LONG and problems[1][0] == S.MALFORMED, problems


def test_any_exception_encoding_a_record_is_a_counted_skip_with_its_id(word_tokenizer):
    encoder = P.ExampleEncoder(tokenizer=word_tokenizer, image_size=16, max_len=64)
    assert encoder({"id": "no-turns", "image": None})["_skip"] == S.MALFORMED  # KeyError inside
    out = encoder({"id": "bad-turn", "image": None, "conversations": [{"from": "human", "value": None},
                                                                      {"from": "gpt", "value": "a"}]})
    assert out["_skip"] == S.MALFORMED and out["_id"] == "bad-turn" and "AttributeError" in out["_message"]
    good = encoder({"id": "ok", "image": None, "conversations": [{"from": "human", "value": "what is red ?"},
                                                                 {"from": "gpt", "value": "a circle"}]})
    assert "_skip" not in good and good["_id"] == "ok"
