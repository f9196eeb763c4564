"""vicuna_v1 encoding: labels, token types, BadRecord cases, the image-first rewrite,
truncation, generation prompts, tokenizers (word-level and a LLaMA-style sentencepiece
model trained here), and the move_image_to_front command."""

import json
import os
import random
import re

import numpy as np
import pytest

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.data.conversation import (IGNORE_INDEX, IMAGE_TOKEN_INDEX, VICUNA_V1_SYSTEM, BadRecord,
                                             encode_conversation, encode_prompt, move_image_to_front, truncate)
from gamma_mod_jax.data.tokenizer import build_word_tokenizer, load_tokenizer


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


RECORDS = {  # name: (conversations, has_image)
    "image_first": (turns("<image>\nWhat color is the cat?", "The cat is red."), True),
    "image_last": (turns("What color is the cat?\n<image>", "Red."), True),
    "image_middle": (turns("Look at <image> and tell me: how many dogs are there?", "There are 2 dogs."), True),
    "multi_turn": (turns("<image>\nWhat is in this image?", "Two people sitting on a bench.",
                         "Where is the bench?", "The bench is near a tree,\nin the park.",
                         "Is it sunny?", "Yes"), True),
    "text_only": (turns("How many legs does a dog have?", "A dog has 4 legs.",
                        "And a bird?", "Two."), False),
}
ALL_TEXT = [VICUNA_V1_SYSTEM, "USER: ASSISTANT:"] + [t["value"].replace("<image>", " ")
                                                      for conv, _ in RECORDS.values() for t in conv]


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    return build_word_tokenizer(ALL_TEXT, str(tmp_path_factory.mktemp("word_tok")))


def _sp_corpus():
    rng = random.Random(0)
    words = " ".join(ALL_TEXT).split()
    sents = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(300)]
    return sents + ALL_TEXT * 5


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A tiny LLaMA-style sentencepiece model (BPE, byte fallback, identity normalisation,
    <unk> = 0, <s> = 1, </s> = 2), trained here on generated sentences."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp_model")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sp_corpus()), model_prefix=str(d / "tokenizer"), vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    os.remove(d / "tokenizer.vocab")
    return d


def _sp_tokenizer(sp_dir, tmp_path_factory, legacy):
    """Vicuna's directory layout: tokenizer.model + tokenizer_config.json (no pad token)."""
    d = tmp_path_factory.mktemp(f"vicuna_like_{legacy}")
    (d / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": legacy,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "model_max_length": 4096, "padding_side": "right", "clean_up_tokenization_spaces": False}))
    return load_tokenizer(str(d))


@pytest.fixture(scope="module")
def sp_legacy(sp_dir, tmp_path_factory):
    return _sp_tokenizer(sp_dir, tmp_path_factory, True)


@pytest.fixture(scope="module")
def sp_tok(sp_dir, tmp_path_factory):
    return _sp_tokenizer(sp_dir, tmp_path_factory, False)


@pytest.fixture(params=["word", "sp_legacy", "sp"])
def tok(request):
    return request.getfixturevalue({"word": "word_tok", "sp_legacy": "sp_legacy", "sp": "sp_tok"}[request.param])


def is_sp(tokenizer):
    return type(tokenizer).__name__ == "LlamaTokenizer"


def same_text(tokenizer, decoded, expected):
    """Sentencepiece decodes exactly; the word-level tokenizer joins tokens with spaces."""
    if is_sp(tokenizer):
        return decoded == expected
    return "".join(decoded.split()) == "".join(expected.split())


def runs(values):
    """[(value, start, stop)] of maximal runs of equal values."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((int(values[start]), start, i))
            start = i
    return out


# --------------------------------------------------------------------------- labels / types


@pytest.mark.parametrize("name", list(RECORDS))
def test_labels_are_exactly_the_answers(tok, name):
    conv, has_image = RECORDS[name]
    enc = encode_conversation(conv, tok, has_image=has_image)
    ids, labels, types = enc["input_ids"], enc["labels"], enc["token_types"]
    assert ids.dtype == labels.dtype == types.dtype == np.int32
    assert ids.shape == labels.shape == types.shape and ids.ndim == 1
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == int(has_image)
    assert ids[0] == tok.bos_token_id and (ids[1:] != tok.bos_token_id).all()
    learned = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[learned], ids[learned])
    np.testing.assert_array_equal(learned, types == tt.ANSWER)
    answer_runs = [(a, b) for v, a, b in runs(learned.astype(int)) if v]
    answers = [t["value"] for t in conv if t["from"] == "gpt"]
    assert len(answer_runs) == len(answers)
    for (a, b), answer in zip(answer_runs, answers):
        assert ids[b - 1] == tok.eos_token_id
        decoded = tok.decode(ids[a:b].tolist(), skip_special_tokens=False)
        assert same_text(tok, decoded, answer + "</s>"), (decoded, answer)
    # what is not learned is everything else of the prompt
    assert (ids[~learned] != tok.eos_token_id).all()


@pytest.mark.parametrize("name", list(RECORDS))
def test_token_types_per_segment(tok, name):
    conv, has_image = RECORDS[name]
    enc = encode_conversation(conv, tok, has_image=has_image)
    ids, types = enc["input_ids"], enc["token_types"]
    segments = runs(types)
    kinds = [k for k, _, _ in segments]
    humans = [t["value"] for t in conv if t["from"] == "human"]
    first = humans[0]
    if first.startswith("<image>"):
        head = [tt.SYSTEM, tt.IMAGE, tt.QUESTION]
    elif "<image>" in first:
        head = [tt.SYSTEM, tt.QUESTION, tt.IMAGE, tt.QUESTION]
    else:
        head = [tt.SYSTEM, tt.QUESTION]
    assert kinds == head + [tt.ANSWER] + [tt.QUESTION, tt.ANSWER] * (len(humans) - 1)

    def text(a, b):
        return tok.decode([i for i in ids[a:b].tolist() if i != IMAGE_TOKEN_INDEX], skip_special_tokens=False)

    # SYSTEM: BOS + system prompt + the first role tag, nothing of the user's message
    _, a, b = segments[0]
    assert a == 0 and ids[0] == tok.bos_token_id
    assert same_text(tok, "".join(text(a, b).split()), "".join(("<s>" + VICUNA_V1_SYSTEM + " USER:").split()))
    # QUESTION runs: the user's message, the role tags and separators around it
    questions = [(a, b) for k, a, b in segments if k == tt.QUESTION]
    n_first = head.count(tt.QUESTION)  # two runs when the image splits the first message
    first_q = "".join(text(a, b) for a, b in questions[:n_first])
    assert "".join(first_q.split()) == "".join((first.replace("<image>", "") + " ASSISTANT:").split())
    assert len(questions) == n_first + len(humans) - 1
    for (a, b), question in zip(questions[n_first:], humans[1:]):
        assert "".join(text(a, b).split()) == "".join(("USER: " + question + " ASSISTANT:").split())


def test_system_prefix_is_llava_first_chunk(sp_tok, sp_legacy, word_tok):
    """Image first (the official data): the SYSTEM tokens are exactly what LLaVA puts
    before the image (the first chunk, BOS included; 35 tokens with Vicuna's tokenizer)."""
    conv, _ = RECORDS["image_first"]
    for tokenizer in (sp_tok, sp_legacy, word_tok):
        enc = encode_conversation(conv, tokenizer, has_image=True)
        first_chunk = tokenizer(VICUNA_V1_SYSTEM + " USER: ").input_ids
        n_system = int((enc["token_types"] == tt.SYSTEM).sum())
        assert n_system == len(first_chunk)
        np.testing.assert_array_equal(enc["input_ids"][:n_system], first_chunk)
        assert enc["input_ids"][n_system] == IMAGE_TOKEN_INDEX
        assert (enc["token_types"][:n_system] == tt.SYSTEM).all()


def test_text_only_record(tok):
    conv, _ = RECORDS["text_only"]
    enc = encode_conversation(conv, tok, has_image=False)
    assert (enc["input_ids"] != IMAGE_TOKEN_INDEX).all()
    assert tt.IMAGE not in enc["token_types"]
    # one chunk: exactly LLaVA's plain tokenizer(prompt)
    prompt = (VICUNA_V1_SYSTEM + " USER: " + conv[0]["value"] + " ASSISTANT: " + conv[1]["value"] + "</s>"
              + "USER: " + conv[2]["value"] + " ASSISTANT: " + conv[3]["value"] + "</s>")
    np.testing.assert_array_equal(enc["input_ids"], tok(prompt).input_ids)


def test_custom_image_token_index(word_tok):
    conv, _ = RECORDS["image_first"]
    enc = encode_conversation(conv, word_tok, has_image=True, image_token_index=-7)
    assert int((enc["input_ids"] == -7).sum()) == 1 and IMAGE_TOKEN_INDEX not in enc["input_ids"]
    assert enc["labels"][enc["input_ids"] == -7] == IGNORE_INDEX


# --------------------------------------------------------------------------- the LLaVA reference


def llava_tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    """LLaVA's chunk-by-chunk tokenisation, re-written for the test."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    out, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        out.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            out.append(image_token_index)
        out.extend(chunk[offset:])
    return out


def llava_hr_preprocess_v1(conv, tokenizer, has_image):
    """LLaVA-HR's preprocess_v1 label arithmetic (no legacy adjustment), re-written."""
    prompt = VICUNA_V1_SYSTEM + " "
    for i, t in enumerate(conv):
        prompt += ("USER" if i % 2 == 0 else "ASSISTANT") + ": " + t["value"] + (" " if i % 2 == 0 else "</s>")

    def n_tokens(text):
        return len(llava_tokenizer_image_token(text, tokenizer)) if has_image else len(tokenizer(text).input_ids)

    ids = llava_tokenizer_image_token(prompt, tokenizer) if has_image else tokenizer(prompt).input_ids
    target = np.array(ids)
    cur = 1
    target[:cur] = IGNORE_INDEX
    sep = " ASSISTANT: "
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len, instruction_len = n_tokens(rou), n_tokens(parts[0]) - 2
        target[cur:cur + instruction_len] = IGNORE_INDEX
        cur += round_len
    target[cur:] = IGNORE_INDEX
    assert cur == len(ids), "tokenization mismatch in the reference"
    return np.array(ids), target


@pytest.mark.parametrize("name", list(RECORDS))
def test_matches_llava_preprocess_v1(sp_legacy, name):
    """With a legacy LLaMA sentencepiece tokenizer (where LLaVA's length arithmetic holds),
    input_ids and labels equal LLaVA-HR's."""
    conv, has_image = RECORDS[name]
    ids, labels = llava_hr_preprocess_v1(conv, sp_legacy, has_image)
    enc = encode_conversation(conv, sp_legacy, has_image=has_image)
    np.testing.assert_array_equal(enc["input_ids"], ids)
    np.testing.assert_array_equal(enc["labels"], labels)


@pytest.mark.parametrize("name", ["multi_turn", "image_first", "text_only"])
def test_sentencepiece_ids_match_raw_sentencepiece(sp_dir, sp_legacy, name):
    """The transformers tokenizer reproduces the sentencepiece model (legacy slow-tokenizer
    rules: special tokens split the text, each piece is encoded with the dummy prefix).
    Not for records whose text after the image starts with a space ("... <image> and"):
    there sentencepiece adds its dummy "▁" in front of the space and transformers' fast
    LLaMA tokenizer does not (a property of the tokenizer, documented in conversation.py)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    conv, has_image = RECORDS[name]
    prompt = VICUNA_V1_SYSTEM + " "
    for i, t in enumerate(conv):
        prompt += ("USER" if i % 2 == 0 else "ASSISTANT") + ": " + t["value"] + (" " if i % 2 == 0 else "</s>")
    expected = [1]
    for c, chunk in enumerate(prompt.split("<image>")):
        if c:
            expected.append(IMAGE_TOKEN_INDEX)
        for piece in re.split("(</s>)", chunk):
            expected += [2] if piece == "</s>" else (sp.encode(piece) if piece else [])
    enc = encode_conversation(conv, sp_legacy, has_image=has_image)
    np.testing.assert_array_equal(enc["input_ids"], expected)


# --------------------------------------------------------------------------- bad records


BAD = {
    "empty list": ([], False, "no conversation turns"),
    "not a list": ("hello", False, "no conversation turns"),
    "not a mapping": (["hi", "there"], False, "mapping"),
    "no assistant turn": (turns("<image>\nhi"), True, "no assistant turn"),
    "starts with gpt": ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], False, "alternate"),
    "not alternating": ([{"from": "human", "value": "q"}, {"from": "human", "value": "q2"},
                         {"from": "gpt", "value": "a"}], False, "alternate"),
    "unknown speaker": ([{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}], False, "speaker"),
    "ends with user": (turns("q", "a", "q2"), False, "ends with a user turn"),
    "two images": (turns("<image>\n<image>\nq", "a"), True, "2 <image>"),
    "images in two turns": (turns("<image>\nq", "a", "<image>\nq2", "a2"), True, "2 <image>"),
    "image in answer": (turns("<image>\nq", "a <image>"), True, "assistant turn"),
    "image without has_image": (turns("<image>\nq", "a"), False, "without an image"),
    "has_image without image": (turns("q", "a"), True, "no <image>"),
    "empty question": (turns("", "a"), False, "empty"),
    "blank answer": (turns("q", "  \n "), False, "empty"),
    "image-only answer": (turns("<image>", ""), True, "empty"),
    "value not a string": (turns("q", None), False, "not a string"),
    "separator in text": (turns("q</s>", "a"), False, "separator"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records(word_tok, case):
    conv, has_image, message = BAD[case]
    with pytest.raises(BadRecord, match=re.escape(message)):
        encode_conversation(conv, word_tok, has_image=has_image)


def test_image_only_question_is_fine(word_tok):
    enc = encode_conversation(turns("<image>", "A red cat."), word_tok, has_image=True)
    assert [k for k, _, _ in runs(enc["token_types"])] == [tt.SYSTEM, tt.IMAGE, tt.QUESTION, tt.ANSWER]


def test_needs_a_fast_tokenizer():
    with pytest.raises(TypeError, match="not a fast tokenizer"):
        encode_conversation(turns("q", "a"), object(), has_image=False)


def test_unknown_template(word_tok):
    with pytest.raises(ValueError, match="unknown conversation template"):
        encode_conversation(turns("q", "a"), word_tok, has_image=False, template="llama_2")


def test_token_spanning_two_segments_is_a_bad_record(tmp_path):
    """A tokenizer without pre-tokenisation makes one token of a whole chunk: refused."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    raw = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    with pytest.raises(BadRecord, match="tokenization mismatch"):
        encode_conversation(turns("q", "a"), raw, has_image=False)


# --------------------------------------------------------------------------- image first


def test_move_image_to_front():
    record = {"id": "x", "image": "a.jpg", "conversations": turns("What is this?\n<image>", "A cat.",
                                                                  "Sure?", "Yes.")}
    frozen = json.dumps(record)
    out = move_image_to_front(record)
    assert json.dumps(record) == frozen  # the input is untouched
    assert out["conversations"][0]["value"] == "<image>\nWhat is this?"
    assert out["conversations"][1:] == record["conversations"][1:]
    assert out["id"] == "x" and out["image"] == "a.jpg"
    assert out is not record and out["conversations"] is not record["conversations"]
    # already first, in the middle, without the newline, text only: unchanged
    for value in ("<image>\nWhat?", "Look at <image> now", "What?<image>", "What?"):
        rec = {"conversations": turns(value, "a")}
        assert move_image_to_front(rec) == rec
    assert move_image_to_front({"id": 3}) == {"id": 3}


def test_image_first_encoding_after_rewrite(word_tok):
    conv, _ = RECORDS["image_last"]
    moved = move_image_to_front({"conversations": conv})["conversations"]
    enc = encode_conversation(moved, word_tok, has_image=True)
    first = runs(enc["token_types"])
    assert [k for k, _, _ in first][:3] == [tt.SYSTEM, tt.IMAGE, tt.QUESTION]


# --------------------------------------------------------------------------- truncation


@pytest.fixture
def multi(word_tok):
    conv, _ = RECORDS["multi_turn"]
    return encode_conversation(conv, word_tok, has_image=True)


def test_truncate_drop(multi):
    n = multi["input_ids"].size
    out, cut = truncate(multi, n, "drop")
    assert not cut and all(np.array_equal(out[k], multi[k]) for k in multi)
    with pytest.raises(BadRecord, match=f"over-long: {n} > {n - 1}"):
        truncate(multi, n - 1, "drop")
    # the image counted as the model's tokens (spliced length)
    out, cut = truncate(multi, n + 9, "drop", num_image_tokens=10)
    assert not cut
    with pytest.raises(BadRecord, match=f"over-long: {n + 9} > {n + 8}"):
        truncate(multi, n + 8, "drop", num_image_tokens=10)


def test_truncate_right(multi):
    n = multi["input_ids"].size
    out, cut = truncate(multi, n - 3, "truncate_right")
    assert cut
    for k in multi:
        np.testing.assert_array_equal(out[k], multi[k][:n - 3])
    out, cut = truncate(multi, n + 8, "truncate_right", num_image_tokens=10)
    assert cut and out["input_ids"].size == n - 1
    out, cut = truncate(multi, n, "truncate_right")
    assert not cut and out["input_ids"].size == n
    # other per-example arrays ride along untouched
    extra = dict(multi, pixel_values=np.zeros((n, n, 3), np.float32))
    out, cut = truncate(extra, n - 1, "truncate_right")
    assert cut and out["pixel_values"].shape == (n, n, 3) and out["labels"].size == n - 1


def test_truncate_right_never_cuts_the_image(multi):
    p = int(np.flatnonzero(multi["input_ids"] == IMAGE_TOKEN_INDEX)[0])
    with pytest.raises(BadRecord, match="cut the image"):
        truncate(multi, p, "truncate_right")
    with pytest.raises(BadRecord, match="cut the image"):  # 1 + 99 image tokens do not fit
        truncate(multi, p + 50, "truncate_right", num_image_tokens=100)
    # up to the image and one token more: nothing to learn left
    with pytest.raises(BadRecord, match="no answer token"):
        truncate(multi, p + 2, "truncate_right")


def test_truncate_arguments(multi):
    with pytest.raises(ValueError, match="unknown truncation policy"):
        truncate(multi, 10, "truncate_left")
    with pytest.raises(ValueError, match="max_len"):
        truncate(multi, 0, "drop")


# --------------------------------------------------------------------------- generation prompts


@pytest.mark.parametrize("name", ["image_first", "image_last", "image_middle", "text_only"])
def test_prompt_is_a_prefix_of_the_conversation(tok, name):
    conv, has_image = RECORDS[name]
    single = conv[:2]
    enc = encode_conversation(single, tok, has_image=has_image)
    prompt = encode_prompt(single[0]["value"], tok, has_image=has_image)
    assert set(prompt) == {"input_ids", "token_types"}
    n = prompt["input_ids"].size
    np.testing.assert_array_equal(enc["input_ids"][:n], prompt["input_ids"])
    np.testing.assert_array_equal(enc["token_types"][:n], prompt["token_types"])
    assert (enc["token_types"][n:] == tt.ANSWER).all() and n < enc["input_ids"].size
    assert tt.ANSWER not in prompt["token_types"]


def test_prompt_puts_the_image_in_front(tok):
    with_tag = encode_prompt("<image>\nWhat color is the cat?", tok, has_image=True)
    without = encode_prompt("What color is the cat?", tok, has_image=True)
    np.testing.assert_array_equal(with_tag["input_ids"], without["input_ids"])
    with pytest.raises(BadRecord):
        encode_prompt("<image>\nWhat?", tok, has_image=False)
    with pytest.raises(BadRecord):
        encode_prompt("  ", tok, has_image=False)


# --------------------------------------------------------------------------- tokenizers


def test_word_tokenizer_layout(word_tok):
    assert word_tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (word_tok.unk_token_id, word_tok.bos_token_id, word_tok.eos_token_id, word_tok.pad_token_id) == (0, 1, 2, 0)
    ids = word_tok("USER: the cat's red?</s>").input_ids
    assert word_tok.convert_ids_to_tokens(ids) == ["<s>", "USER", ":", "the", "cat", "'", "s", "red", "?", "</s>"]
    assert word_tok("zebra").input_ids == [1, 0]  # unknown word -> <unk>
    again = load_tokenizer(word_tok.name_or_path)  # the saved directory loads back the same
    assert again("USER: the cat").input_ids == word_tok("USER: the cat").input_ids


def test_sentencepiece_tokenizer_settings(sp_tok, sp_legacy):
    for tokenizer, legacy in ((sp_tok, False), (sp_legacy, True)):
        assert is_sp(tokenizer) and tokenizer.is_fast and tokenizer.legacy is legacy
        assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id == 0  # LLaVA: pad = unk
        assert tokenizer.padding_side == "right"
        assert tokenizer("a cat").input_ids[0] == 1 and tokenizer("a cat").input_ids[-1] != 2


def test_load_tokenizer_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=re.escape(missing)):
        load_tokenizer(missing)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        load_tokenizer(str(broken))


# --------------------------------------------------------------------------- the command


def test_move_image_to_front_command(tmp_path, capsys):
    from launch.move_image_to_front import main

    records = [{"id": 1, "conversations": turns("What?\n<image>", "A cat.")},
               {"id": 2, "conversations": turns("<image>\nWhat?", "A dog.")},
               {"id": 3, "conversations": turns("Text only?", "Yes.")}]
    src, dst = tmp_path / "in.json", tmp_path / "out" / "out.json"
    src.write_text(json.dumps(records))
    assert main(["--data", str(src), "--out", str(dst)]) == 0
    assert "in 1 of 3 records" in capsys.readouterr().out
    out = json.loads(dst.read_text())
    assert out == [move_image_to_front(r) for r in records]
    assert out[0]["conversations"][0]["value"] == "<image>\nWhat?"
    assert sorted(os.listdir(dst.parent)) == ["out.json"]  # no temporary file left

    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,')
    assert main(["--data", str(bad), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid JSON" in err
    assert not (tmp_path / "x.json").exists()
    bad.write_text('{"id": 1}')
    assert main(["--data", str(bad), "--out", str(tmp_path / "x.json")]) == 2
    assert "expected a JSON list" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.json")]) == 2
    assert "missing.json: file not found" in capsys.readouterr().err
