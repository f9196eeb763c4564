"""Tokenizers: load a local one (LLaVA's settings), or build a tiny word-level one.

`load_tokenizer(path)` reads a local Hugging Face tokenizer directory (Vicuna's
`tokenizer.model` + `tokenizer_config.json`, or a `tokenizer.json`), fast where possible
(`encode_conversation` needs character offsets), right padding, and, as LLaVA does for
vicuna_v1, the unk token (id 0 for LLaMA) as the pad token when the tokenizer has none.

`build_word_tokenizer(words, directory)` makes a LLaMA-shaped word-level tokenizer
(<unk> = 0, <s> = 1, </s> = 2, BOS added in front, no EOS) for tests and the easy-VQA
demo, so neither needs a download.
"""

from __future__ import annotations

import os
from typing import Iterable, List

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in LLaMA
# Always in the vocabulary: the vicuna_v1 template's words and common punctuation.
PUNCTUATION = tuple(".,?!:;'\"()-/")


def load_tokenizer(path: str, *, padding_side: str = "right"):
    """The tokenizer in local directory `path` (transformers.AutoTokenizer, fast where
    possible, no network). ValueError naming `path` when it is missing or cannot be read."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: tokenizer directory not found")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True)
    except Exception as e:  # missing files, a corrupt tokenizer.json or sentencepiece model, ...
        raise ValueError(f"{path}: cannot load a tokenizer from this directory ({type(e).__name__}: {e})") from e
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = padding_side
    return tokenizer


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    # whitespace splits words, every punctuation character is a token of its own:
    # "USER:" -> "USER" ":", "questions." -> "questions" ".", "user's" -> "user" "'" "s"
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                    pre_tokenizers.Punctuation(behavior="isolated")])


def word_vocabulary(words: Iterable[str]) -> List[str]:
    """The vocabulary `build_word_tokenizer` makes: the special tokens, the vicuna_v1
    template's words, punctuation, then the words (or texts) given, split as the tokenizer
    splits text; first occurrence order, no duplicates."""
    from gamma_mod_jax.data.conversation import ROLES, VICUNA_V1_SYSTEM

    pre = _pre_tokenizer()
    vocab = dict.fromkeys(SPECIAL_TOKENS)
    texts = [VICUNA_V1_SYSTEM, " ".join(ROLES), " ".join(PUNCTUATION)]
    for text in texts + list(words):
        if not isinstance(text, str):
            raise TypeError(f"words must be strings, got {type(text).__name__}")
        for piece, _ in pre.pre_tokenize_str(text):
            if piece not in SPECIAL_TOKENS and piece != "<image>":
                vocab.setdefault(piece)
    return list(vocab)


def build_word_tokenizer(words: Iterable[str], directory: str):
    """Build a word-level tokenizer over `words` (single words or whole texts), save it
    in `directory` (created if needed) and return it as loaded by `load_tokenizer`.

    Unknown words map to <unk> (0); "</s>" in text is the EOS special token; encoding
    puts <s> (1) in front and nothing at the end, as LLaMA's tokenizer does. Character
    offsets are exact, so `encode_conversation` types and labels tokens correctly."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(word_vocabulary(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = _pre_tokenizer()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>", padding_side="right")
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return load_tokenizer(directory)
