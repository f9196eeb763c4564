"""LLaVA conversations -> token ids, labels and token types (the vicuna_v1 template).

A record's `conversations` is LLaVA's list `[{"from": "human" | "gpt", "value": str}, ...]`.
It is rendered exactly as LLaVA's `Conversation.get_prompt()` renders the vicuna_v1
template (separator style TWO, sep " ", sep2 "</s>"):

    {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...

and tokenised as LLaVA's `tokenizer_image_token` does: the prompt is split at "<image>",
every chunk is tokenised on its own with the tokenizer's special tokens, the BOS the
tokenizer puts in front of every chunk is kept only for the first one, and the image
placeholder id (-200) goes between the chunks. A text-only prompt is one chunk, which is
what LLaVA's plain `tokenizer(prompt)` gives.

Labels and token types: LLaVA's `preprocess_v1` finds the answers by token-length
arithmetic on re-tokenised pieces of the prompt: a round is len(tokens(round)) long (its
BOS standing in for the "</s>" the split removed), its instruction len(tokens("... ASSISTANT: "))
- 2 (the BOS, and the lone "▁" a sentencepiece tokenizer makes of the trailing space);
newer LLaVA versions (not LLaVA-HR's train.py) subtract 1 more per later round for
non-legacy tokenizers. That arithmetic is only right for some tokenizers (a word-level
tokenizer makes no "▁" token, so it would unmask the ":"), and LLaVA masks the whole record
when its count disagrees with the sequence length. We do not reproduce the arithmetic; we
reproduce its intended result exactly, for any fast tokenizer: every character of the
rendered prompt gets a type, every token (by the tokenizer's character offsets) the type
of its first non-whitespace character; a token of whitespace alone takes the type of the
next non-whitespace character of its chunk (sentencepiece's "▁" belongs to the word after
it), or of its own first character at the end of a chunk (the "▁" before the image); the
BOS is SYSTEM. Labels are the ids of the ANSWER tokens, -100 elsewhere. An answer's tokens
are those of " {answer}</s>": with sentencepiece the space before the answer is part of its
first token ("▁word", or a lone "▁" before a word the vocabulary splits), labelled, as in
LLaVA; the closing "</s>" is labelled, as in LLaVA, so the model learns to stop. With a
LLaMA sentencepiece tokenizer this equals LLaVA-HR's preprocess_v1 wherever its arithmetic
holds (tests/data/test_conversation.py checks it against a re-implementation). A token
whose non-whitespace characters carry two types (never seen with LLaMA-style or word-level
tokenizers, whose tokens start at whitespace or special tokens) raises BadRecord rather
than guessing, the counterpart of LLaVA's "tokenization mismatch".

The tokenizer itself: transformers 5 has only fast (`tokenizers`) LLaMA tokenizers. They
equal the sentencepiece model LLaVA's slow tokenizer ran, except that for text starting
with a space sentencepiece still adds its dummy "▁" and the fast one does not; in LLaVA's
chunking that only happens to the chunk after an image followed by a space (image in the
middle or at the end of a message), never in image-first records.

Where the image goes: LLaVA-HR's own preprocess_multimodal moves "<image>" to the front of
its message ("<image>\\n" + the rest, stripped) before this step for every record; the
official γ-MoD data rewrite (`move_image_to_front`) does so for a trailing "\\n<image>".
`encode_conversation` keeps the image where the record has it.

Token types (gamma_mod_jax.token_types):
  SYSTEM    BOS, the system prompt, the separator " " after it and the first turn's role tag
            "USER: " (everything before the first user message's content). The official
            γ-MoD code routes a hard-coded prefix of 35 text tokens + 1024 image tokens,
            relying on the data being rewritten so the image comes first
            (`move_image_to_front`): those 35 are the text tokens in front of the image,
            BOS + system prompt + " USER: " with the Vicuna tokenizer (LLaVA's first chunk;
            the test checks SYSTEM = that chunk). Typing them SYSTEM
            makes type-based routing (README: "routing comes from token types") route the
            same tokens as the official code, with the image anywhere in the turn.
  IMAGE     the placeholder (-200).
  QUESTION  user messages (any text around the image, e.g. its "\\n"), the role tags of
            later turns ("USER: ", " ASSISTANT: ") and the separator " " after a user
            message.
  ANSWER    assistant messages and their closing "</s>": exactly the labelled tokens.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.token_types import IGNORE_INDEX, IMAGE_TOKEN_INDEX

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = ("USER", "ASSISTANT")             # vicuna_v1 roles for "human" and "gpt"
SEP = " "                                 # after the system prompt and after a user message
SEP2 = "</s>"                             # after an assistant message
DEFAULT_IMAGE_TOKEN = "<image>"
TEMPLATES = ("vicuna_v1",)
TRUNCATION_POLICIES = ("drop", "truncate_right")
_SPEAKERS = ("human", "gpt")

Encoded = Dict[str, np.ndarray]


class BadRecord(ValueError):
    """A record the data pipeline skips (and counts): malformed, over-long, image missing."""


# --------------------------------------------------------------------------- rendering


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}: expected one of {TEMPLATES}")


def _validate(conversations, has_image: bool) -> None:
    """BadRecord unless `conversations` is human, gpt, human, gpt, ... with non-empty string
    values, "<image>" exactly once (in a user turn) when has_image and never otherwise."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise BadRecord("no conversation turns")
    images = 0
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise BadRecord(f"turn {i} is not a {{'from', 'value'}} mapping")
        speaker, value = turn["from"], turn["value"]
        if speaker not in _SPEAKERS:
            raise BadRecord(f"turn {i}: unknown speaker {speaker!r} (expected 'human' or 'gpt')")
        if speaker != _SPEAKERS[i % 2]:
            raise BadRecord(f"turn {i} is from {speaker!r}: roles must alternate starting with 'human'")
        if not isinstance(value, str):
            raise BadRecord(f"turn {i}: value is {type(value).__name__}, not a string")
        if not value.strip():
            raise BadRecord(f"turn {i} ({speaker}) is empty")
        if SEP2 in value:
            raise BadRecord(f"turn {i} ({speaker}) contains the separator {SEP2!r}")
        n = value.count(DEFAULT_IMAGE_TOKEN)
        if n and speaker == "gpt":
            raise BadRecord(f"turn {i}: {DEFAULT_IMAGE_TOKEN} in an assistant turn")
        images += n
    if len(conversations) < 2:
        raise BadRecord("no assistant turn")
    if len(conversations) % 2:
        raise BadRecord("the conversation ends with a user turn (no answer to learn)")
    if images > 1:
        raise BadRecord(f"{images} {DEFAULT_IMAGE_TOKEN} placeholders (at most one image per record)")
    if has_image and images == 0:
        raise BadRecord(f"has_image but no {DEFAULT_IMAGE_TOKEN} placeholder in the conversation")
    if not has_image and images:
        raise BadRecord(f"{DEFAULT_IMAGE_TOKEN} placeholder in a record without an image")


def _render(messages: Sequence[str], *, open_answer: bool) -> Tuple[str, np.ndarray]:
    """The vicuna_v1 prompt of alternating user / assistant `messages` and the token type of
    each of its characters. open_answer: end with a bare "ASSISTANT:" (generation prompt)."""
    pieces: List[Tuple[str, int]] = [(VICUNA_V1_SYSTEM, tt.SYSTEM), (SEP, tt.SYSTEM)]
    for i, message in enumerate(messages):
        if i % 2 == 0:  # user turn
            pieces.append((ROLES[0] + ": ", tt.SYSTEM if i == 0 else tt.QUESTION))
            pieces.append((message, tt.QUESTION))
            pieces.append((SEP, tt.QUESTION))
        else:
            pieces.append((ROLES[1] + ": ", tt.QUESTION))
            pieces.append((message, tt.ANSWER))
            pieces.append((SEP2, tt.ANSWER))
    if open_answer:
        pieces.append((ROLES[1] + ":", tt.QUESTION))
    prompt = "".join(text for text, _ in pieces)
    types = np.concatenate([np.full(len(text), kind, np.int8) for text, kind in pieces])
    return prompt, types


# --------------------------------------------------------------------------- tokenising


def _tokenise(prompt: str, char_types: np.ndarray, tokenizer, image_token_index: int) -> Encoded:
    """tokenizer_image_token on `prompt`, with a token type per token (see module doc)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: token types and labels "
                        "come from character offsets (load tokenizers with load_tokenizer)")
    length = len(prompt)
    is_text = np.fromiter((not c.isspace() for c in prompt), bool, length)
    # next_text[i]: first non-whitespace position >= i; last_text[i]: last one < i (-1 if none)
    positions = np.arange(length)
    next_text = np.minimum.accumulate(np.where(is_text, positions, length)[::-1])[::-1]
    next_text = np.append(next_text, length)
    last_text = np.concatenate([[-1], np.maximum.accumulate(np.where(is_text, positions, -1))])

    ids: List[np.ndarray] = []
    types: List[np.ndarray] = []
    bos = tokenizer.bos_token_id
    strip_bos = False
    start = 0
    chunks = prompt.split(DEFAULT_IMAGE_TOKEN)
    for c, chunk in enumerate(chunks):
        end = start + len(chunk)
        enc = tokenizer(chunk, add_special_tokens=True, return_offsets_mapping=True)
        chunk_ids = np.asarray(enc["input_ids"], np.int64)
        offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2) + start
        if c == 0:
            strip_bos = bos is not None and chunk_ids.size > 0 and chunk_ids[0] == bos
        elif strip_bos and chunk_ids.size > 0 and chunk_ids[0] == bos:
            chunk_ids, offsets = chunk_ids[1:], offsets[1:]
        chunk_types = _token_types(chunk_ids, offsets, start, end, char_types, next_text, last_text, tokenizer)
        if c == 0 and strip_bos:
            chunk_types[0] = tt.SYSTEM  # the one BOS
        if c > 0:
            ids.append(np.asarray([image_token_index], np.int64))
            types.append(np.asarray([tt.IMAGE], np.int8))
        ids.append(chunk_ids)
        types.append(chunk_types)
        start = end + len(DEFAULT_IMAGE_TOKEN)
    input_ids = np.concatenate(ids).astype(np.int32)
    token_types = np.concatenate(types).astype(np.int32)
    return {"input_ids": input_ids, "token_types": token_types}


def _token_types(ids, offsets, start, end, char_types, next_text, last_text, tokenizer) -> np.ndarray:
    """Type of each token of one chunk [start, end): that of its first non-whitespace
    character; for a whitespace-only token, that of the next non-whitespace character in
    the chunk, or of its own first character when none follows; tokens with an empty span
    (special tokens the tokenizer adds) take the type of the character at their position
    (the last of the chunk at its end)."""
    if ids.size == 0:
        return np.empty(0, np.int8)
    s, e = offsets[:, 0], offsets[:, 1]
    empty = e <= s
    last_char = max(start, end - 1)
    anchor = np.where(empty, np.clip(s, start, last_char), s)
    first = next_text[anchor]
    has_text = ~empty & (first < e)
    # whitespace belongs to the text that follows it in the chunk (sentencepiece's "▁")
    pick = np.where(has_text | (~empty & (first < end)), first, anchor)
    if end == start:  # an empty chunk: only special tokens, typed by the character before
        pick = np.full_like(pick, max(start - 1, 0))
    types = char_types[np.clip(pick, 0, len(char_types) - 1)]
    # a token whose non-whitespace characters have two types cannot be labelled honestly
    last = last_text[np.clip(e, 0, len(last_text) - 1)]
    mixed = has_text & (char_types[np.clip(last, 0, len(char_types) - 1)] != types)
    if mixed.any():
        i = int(np.argmax(mixed))
        piece = tokenizer.convert_ids_to_tokens(int(ids[i]))
        raise BadRecord(f"tokenization mismatch: token {piece!r} at characters {int(s[i])}:{int(e[i])} "
                        f"spans two segments of the prompt")
    return types.astype(np.int8)


# --------------------------------------------------------------------------- public API


def encode_conversation(conversations, tokenizer, *, has_image: bool, image_token_index: int = IMAGE_TOKEN_INDEX,
                        template: str = "vicuna_v1") -> Encoded:
    """One LLaVA conversation -> int32 arrays `input_ids`, `labels`, `token_types` (same length,
    unpadded). `input_ids` hold `image_token_index` where "<image>" was; labels are the ids of
    the assistant answers (with their "</s>") and -100 elsewhere. BadRecord for records the
    pipeline should skip (see `_validate`). The image stays where the record has it; apply
    `move_image_to_front` first for the official γ-MoD data."""
    _check_template(template)
    _validate(conversations, has_image)
    prompt, char_types = _render([turn["value"] for turn in conversations], open_answer=False)
    encoded = _tokenise(prompt, char_types, tokenizer, image_token_index)
    answer = encoded["token_types"] == tt.ANSWER
    encoded["labels"] = np.where(answer, encoded["input_ids"], IGNORE_INDEX).astype(np.int32)
    return {k: encoded[k] for k in ("input_ids", "labels", "token_types")}


def encode_prompt(question: str, tokenizer, *, has_image: bool, image_token_index: int = IMAGE_TOKEN_INDEX,
                  template: str = "vicuna_v1") -> Encoded:
    """The generation prompt "{system} USER: {question} ASSISTANT:" -> int32 `input_ids` and
    `token_types`. With has_image and no "<image>" in `question`, "<image>\\n" is put in front
    (as LLaVA's evaluation scripts do); "<image>" without has_image is a BadRecord. For a
    single-turn record whose user message is `question`, the result is a prefix of
    `encode_conversation`'s arrays."""
    _check_template(template)
    if not isinstance(question, str) or not question.strip():
        raise BadRecord("empty question")
    if has_image and DEFAULT_IMAGE_TOKEN not in question:
        question = DEFAULT_IMAGE_TOKEN + "\n" + question
    n = question.count(DEFAULT_IMAGE_TOKEN)
    if n > 1:
        raise BadRecord(f"{n} {DEFAULT_IMAGE_TOKEN} placeholders (at most one image per prompt)")
    if n and not has_image:
        raise BadRecord(f"{DEFAULT_IMAGE_TOKEN} placeholder in a prompt without an image")
    if SEP2 in question:
        raise BadRecord(f"the question contains the separator {SEP2!r}")
    prompt, char_types = _render([question], open_answer=True)
    return _tokenise(prompt, char_types, tokenizer, image_token_index)


def move_image_to_front(record: Mapping) -> dict:
    """The official γ-MoD data rewrite (its modify_data_config.py): in every turn whose value
    ends with "\\n<image>", that suffix is removed and "<image>\\n" put in front. Returns a new
    record (the input is not modified); anything else is copied unchanged."""
    out = dict(record)
    conversations = record.get("conversations")
    if isinstance(conversations, list):
        suffix, prefix = "\n" + DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_TOKEN + "\n"
        turns = []
        for turn in conversations:
            if isinstance(turn, Mapping):
                turn = dict(turn)
                value = turn.get("value")
                if isinstance(value, str) and value.endswith(suffix):
                    turn["value"] = prefix + value[:-len(suffix)]
            turns.append(turn)
        out["conversations"] = turns
    return out


def truncate(encoded: Mapping[str, np.ndarray], max_len: int, policy: str, *,
             image_token_index: int = IMAGE_TOKEN_INDEX, num_image_tokens: int = 1) -> Tuple[Encoded, bool]:
    """Enforce a length budget: returns (arrays, truncated).

    The length counts the image placeholder as `num_image_tokens` tokens (1: the text
    length; the model's image token count: the spliced length LLaVA truncates to
    model_max_length). policy "drop": BadRecord "over-long: N > max_len" when over budget;
    "truncate_right": cut every array to the budget, BadRecord when that would cut the image
    placeholder or leave no answer token to learn from."""
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation policy {policy!r}: expected one of {TRUNCATION_POLICIES}")
    if int(max_len) < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    if int(num_image_tokens) < 1:
        raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}")
    max_len, extra = int(max_len), int(num_image_tokens) - 1
    ids = np.asarray(encoded["input_ids"])
    placeholders = np.flatnonzero(ids == image_token_index)
    length = ids.size + extra * placeholders.size
    out = {k: np.asarray(v) for k, v in encoded.items()}
    if length <= max_len:
        return out, False
    if policy == "drop":
        raise BadRecord(f"over-long: {length} > {max_len}")
    # position i in the text is position i + extra * (placeholders before i) when spliced
    keep = max_len if not placeholders.size else _text_budget(max_len, placeholders, extra)
    if placeholders.size and placeholders[-1] >= keep:
        raise BadRecord(f"over-long: {length} > {max_len} and truncating would cut the image")
    out = {k: (v[:keep] if v.ndim == 1 and v.shape[0] == ids.size else v) for k, v in out.items()}  # per-token arrays
    if "labels" in out and not (out["labels"] != IGNORE_INDEX).any():
        raise BadRecord(f"over-long: {length} > {max_len} and truncating leaves no answer token")
    return out, True


def _text_budget(max_len: int, placeholders: np.ndarray, extra: int) -> int:
    """How many text positions fit in `max_len` spliced positions (placeholders count
    1 + extra, and one is kept only whole)."""
    keep, used = 0, 0
    for p in placeholders:
        room = max_len - used
        if p - keep >= room:            # the budget ends before this placeholder
            return keep + room
        used += p - keep                # text before it
        keep = p
        if used + 1 + extra > max_len:  # the whole image does not fit
            return keep
        used += 1 + extra
        keep += 1
    return keep + (max_len - used)
