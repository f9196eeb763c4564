"""The Grain training pipeline: batches, buckets, determinism, sharding, checkpoints,
bad records, TFDS sources and evaluation prompts (tiny local data, word tokenizer)."""

import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from gamma_mod_jax import token_types as tt
from gamma_mod_jax.data import pipeline as P
from gamma_mod_jax.data import sources as S
from gamma_mod_jax.data.conversation import encode_conversation, move_image_to_front
from gamma_mod_jax.data.image import load_image, preprocess_image
from gamma_mod_jax.data.tokenizer import build_word_tokenizer

IMAGE_SIZE = 16
BUCKETS = (64, 128)
WORDS = "what is the color of shape describe it red green blue circle square triangle and word ? . ,"
LONG_ANSWER = " ".join(["word"] * 45)        # ~100 tokens in all: the 128 bucket
OVER_LONG_ANSWER = " ".join(["word"] * 150)  # > 128 tokens
BAD = {  # id -> reason it is skipped for
    "bad-missing": S.MISSING_IMAGE, "bad-corrupt": S.UNREADABLE_IMAGE, "bad-noanswer": S.NO_ASSISTANT_TURN,
    "bad-long": S.OVER_LONG, "line 9": S.BAD_JSON,
}


def _good_record(i):
    kind = i % 4
    answer = LONG_ANSWER if i in (5, 10) else ["red", "circle", "square", "blue"][kind]
    if kind == 0:  # text only
        return {"id": f"r{i}", "conversations": [{"from": "human", "value": "what is the color of red ?"},
                                                  {"from": "gpt", "value": answer}]}
    if kind == 1:  # image first
        human = "<image>\nwhat is the shape ?"
    elif kind == 2:  # image last (move_image_to_front moves it)
        human = "what is the shape ?\n<image>"
    else:  # two rounds
        return {"id": f"r{i}", "image": f"img{i}.png",
                "conversations": [{"from": "human", "value": "<image>\nwhat is the color ?"},
                                  {"from": "gpt", "value": answer},
                                  {"from": "human", "value": "and the shape ?"},
                                  {"from": "gpt", "value": "triangle"}]}
    return {"id": f"r{i}", "image": f"img{i}.png",
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}


def _bad_lines():
    ask = {"from": "human", "value": "<image>\nwhat is the shape ?"}
    return {
        2: json.dumps({"id": "bad-missing", "image": "does_not_exist.png",
                       "conversations": [ask, {"from": "gpt", "value": "circle"}]}),
        5: json.dumps({"id": "bad-corrupt", "image": "corrupt.png",
                       "conversations": [ask, {"from": "gpt", "value": "circle"}]}),
        9: "{this line is not json",
        13: json.dumps({"id": "bad-noanswer", "image": "img1.png", "conversations": [ask]}),
        16: json.dumps({"id": "bad-long", "image": "img1.png",
                        "conversations": [ask, {"from": "gpt", "value": OVER_LONG_ANSWER}]}),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 good records (text-only, image first / last, two rounds, two long ones) and one
    bad record of every kind, as JSON lines; images 8x6 PNGs; a word tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    image_dir = root / "images"
    image_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(image_dir / f"img{i}.png")
    (image_dir / "corrupt.png").write_bytes(b"this is not a png file")
    good = [_good_record(i) for i in range(12)]
    bad = _bad_lines()
    lines, it = [], iter(good)
    for lineno in range(1, len(good) + len(bad) + 1):
        lines.append(bad[lineno] if lineno in bad else json.dumps(next(it)))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    tokenizer = build_word_tokenizer([WORDS], str(root / "tokenizer"))
    records = {r["id"]: r for r in good}
    return types.SimpleNamespace(root=root, path=str(path), image_dir=str(image_dir), tokenizer=tokenizer,
                                 records=records, good_ids=sorted(records), bad=BAD)


def _cfg(corpus, **overrides):
    c = P.data_config_defaults()
    c.source = "llava_json"
    c.json_path = corpus.path
    c.image_dir = corpus.image_dir
    c.buckets = BUCKETS
    c.batch_size = 3
    c.read_threads = 1
    for k, v in overrides.items():
        with c.ignore_type():
            c[k] = v
    return c


def _iterator(corpus, seed=0, process_index=0, process_count=1, **overrides):
    return P.make_train_iterator(_cfg(corpus, **overrides), tokenizer=corpus.tokenizer, image_size=IMAGE_SIZE,
                                 seed=seed, process_index=process_index, process_count=process_count)


def _take(it, n):
    out = []
    for _ in range(n):
        batch = next(it)
        out.append((list(it.last_ids), batch))
    return out


def _epoch(it):
    out = []
    for batch in it:
        out.append((list(it.last_ids), batch))
    return out


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for (ids_a, batch_a), (ids_b, batch_b) in zip(a, b):
        assert ids_a == ids_b
        assert batch_a.keys() == batch_b.keys()
        for k in batch_a:
            np.testing.assert_array_equal(batch_a[k], batch_b[k], err_msg=k)


def _expected_row(corpus, rid, move_front=False):
    record = dict(corpus.records[rid])
    if move_front:
        record = move_image_to_front(record)
    enc = encode_conversation(record["conversations"], corpus.tokenizer, has_image="image" in record)
    pixels = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    if "image" in record:
        pixels = preprocess_image(load_image(os.path.join(corpus.image_dir, record["image"])), IMAGE_SIZE)
    return enc, pixels


def test_batch_shapes_and_bucket_choice(corpus):
    batches = _epoch(_iterator(corpus, num_epochs=1, drop_remainder=False))
    seen_t = set()
    for ids, b in batches:
        t = b["input_ids"].shape[1]
        seen_t.add(t)
        assert t in BUCKETS
        assert b["input_ids"].dtype == np.int32 and b["pixel_values"].dtype == np.float32
        for key in ("attention_mask", "labels", "token_types"):
            assert b[key].shape == (3, t) and b[key].dtype == np.int32
        assert b["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert b["valid"].shape == (3,) and b["valid"].dtype == np.int32
        longest = int(b["attention_mask"].sum(1).max())
        assert t == P.pick_bucket(longest, BUCKETS)  # the smallest bucket that fits
    assert seen_t == set(BUCKETS)
    assert sorted(i for ids, _ in batches for i in ids) == corpus.good_ids


@pytest.mark.parametrize("move_front", [False, True])
def test_rows_carry_encoding_through_padding(corpus, move_front):
    batches = _epoch(_iterator(corpus, num_epochs=1, drop_remainder=False, move_image_to_front=move_front))
    assert sum(len(ids) for ids, _ in batches) == 12  # 12 good records, 4 batches of 3
    for ids, b in batches:
        for row, rid in enumerate(ids):
            enc, pixels = _expected_row(corpus, rid, move_front)
            n = len(enc["input_ids"])
            np.testing.assert_array_equal(b["input_ids"][row, :n], enc["input_ids"])
            np.testing.assert_array_equal(b["labels"][row, :n], enc["labels"])
            np.testing.assert_array_equal(b["token_types"][row, :n], enc["token_types"])
            assert b["attention_mask"][row, :n].all() and not b["attention_mask"][row, n:].any()
            assert (b["input_ids"][row, n:] == 0).all()
            assert (b["labels"][row, n:] == P.IGNORE_INDEX).all()
            assert (b["token_types"][row, n:] == tt.PADDING).all()
            np.testing.assert_allclose(b["pixel_values"][row], pixels)
            assert b["valid"][row] == 1
            if "image" in corpus.records[rid]:
                assert (b["input_ids"][row] == P.IMAGE_TOKEN_INDEX).sum() == 1
                if move_front:  # right after BOS, the system prompt and "USER:"
                    types_before = b["token_types"][row, :np.argmax(b["input_ids"][row] == P.IMAGE_TOKEN_INDEX)]
                    assert (types_before == tt.SYSTEM).all()
            else:
                assert not (b["input_ids"][row] == P.IMAGE_TOKEN_INDEX).any()
                assert not b["pixel_values"][row].any()


def test_filler_rows_only_at_the_end_without_drop_remainder(corpus):
    # 13 records enter the plan (12 good + bad-corrupt, whose image fails only when decoded:
    # a padding row), in batches of 5, 5 and 3 + 2 filler rows
    batches = _epoch(_iterator(corpus, num_epochs=1, drop_remainder=False, batch_size=5))
    valid = [b["valid"] for _, b in batches]
    assert len(batches) == 3 and sum(int(v.sum()) for v in valid) == 12
    for (ids, b), v in zip(batches, valid):
        n = int(v.sum())
        assert (v[:n] == 1).all() and len(ids) == n  # padding rows follow the real ones
        assert (b["labels"][n:] == P.IGNORE_INDEX).all() and not b["attention_mask"][n:].any()
        assert (b["token_types"][n:] == tt.PADDING).all() and not b["pixel_values"][n:].any()
    assert int(valid[-1].sum()) <= 3 and [int(v.sum()) for v in valid].count(5) >= 1
    kept = _epoch(_iterator(corpus, num_epochs=1, drop_remainder=True, batch_size=5))
    assert len(kept) == 2 and sum(int(b["valid"].sum()) for _, b in kept) in (9, 10)


def test_same_seed_same_batches_other_seed_other_order(corpus):
    a = _take(_iterator(corpus, seed=3), 8)
    b = _take(_iterator(corpus, seed=3), 8)
    _assert_same_batches(a, b)
    c = _take(_iterator(corpus, seed=4), 8)
    assert [ids for ids, _ in a] != [ids for ids, _ in c]
    # shuffle_seed in the config wins over the seed argument
    d = _take(_iterator(corpus, seed=99, shuffle_seed=3), 8)
    _assert_same_batches(a, d)
    # every epoch is reshuffled: epoch 2 is not epoch 1 again
    two = _epoch(_iterator(corpus, seed=3, num_epochs=2, batch_size=13))  # 12 good + bad-corrupt
    assert len(two) == 2 and sorted(two[0][0]) == sorted(two[1][0]) == corpus.good_ids
    assert two[0][0] != two[1][0]


def test_per_process_shards_are_disjoint_and_cover_the_epoch(corpus):
    seen, skipped = [], []
    for index in range(2):
        it = _iterator(corpus, process_index=index, process_count=2, num_epochs=1, drop_remainder=False,
                       batch_size=2)
        ids = [i for ids, _ in _epoch(it) for i in ids]
        seen.append(set(ids))
        assert len(ids) == len(set(ids))
        skipped.append({i for ids in P.pipeline_stats(it)["ids"].values() for i in ids})
    assert not seen[0] & seen[1]
    assert sorted(seen[0] | seen[1]) == corpus.good_ids
    # records left out by the plan are counted by every process; the corrupt image by its owner
    assert skipped[0] & skipped[1] == set(BAD) - {"bad-corrupt"} and skipped[0] | skipped[1] == set(BAD)
    with pytest.raises(ValueError, match="process_index"):
        _iterator(corpus, process_index=2, process_count=2)


def _resume_check(corpus, **overrides):
    """k batches, state, more batches; a fresh iterator restored from the (JSON
    round-tripped) state continues identically, bad-record statistics included."""
    it = _iterator(corpus, seed=7, **overrides)
    try:
        _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        stats_at_save = P.pipeline_stats(it)
        rest = _take(it, 5)
        stats_end = P.pipeline_stats(it)
    finally:
        it.close()
    fresh = _iterator(corpus, seed=7, **overrides)
    try:
        fresh.set_state(state)
        assert P.pipeline_stats(fresh) == stats_at_save
        _assert_same_batches(_take(fresh, 5), rest)
        assert P.pipeline_stats(fresh) == stats_end
    finally:
        fresh.close()
    assert stats_end["skipped"] > stats_at_save["skipped"] > 0  # bad records met before and after the save
    return rest


def test_checkpoint_resume_in_process(corpus):
    _resume_check(corpus)


def test_checkpoint_resume_with_a_worker_process(corpus):
    # One worker sees the whole stream in the same order: the same batches as in-process.
    rest_worker = _resume_check(corpus, worker_count=1)
    rest_local = _take(_iterator(corpus, seed=7), 8)[3:]
    _assert_same_batches(rest_worker, rest_local)


def test_orbax_checkpoint_manager_round_trip(corpus, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = _iterator(corpus, seed=11)
    _take(it, 2)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    rest = _take(it, 4)
    fresh = _iterator(corpus, seed=11)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same_batches(_take(fresh, 4), rest)
    assert P.pipeline_stats(fresh) == P.pipeline_stats(it)


def test_bad_records_of_every_kind_are_skipped_and_counted(corpus):
    it = _iterator(corpus, num_epochs=1, drop_remainder=False)
    ids = [i for ids, _ in _epoch(it) for i in ids]
    assert sorted(ids) == corpus.good_ids
    stats = P.pipeline_stats(it)
    assert stats["skipped"] == len(BAD) and stats["truncated"] == 0
    assert stats["counts"] == {reason: 1 for reason in BAD.values()}
    assert {rid: reason for reason, rids in stats["ids"].items() for rid in rids} == BAD
    assert "does_not_exist.png" in stats["examples"][S.MISSING_IMAGE]
    assert "corrupt.png" in stats["examples"][S.UNREADABLE_IMAGE]
    # counted again in every epoch that meets them; the ids stay listed once
    it2 = _iterator(corpus, num_epochs=2, drop_remainder=False, batch_size=12)
    _epoch(it2)
    stats2 = P.pipeline_stats(it2)
    assert stats2["counts"] == {reason: 2 for reason in BAD.values()}
    assert stats2["ids"] == stats["ids"]


def test_truncate_right_keeps_and_counts_over_long_examples(corpus):
    it = _iterator(corpus, num_epochs=1, drop_remainder=False, truncation="truncate_right")
    batches = _epoch(it)
    stats = P.pipeline_stats(it)
    assert stats["truncated"] == 1 and stats["ids"][S.TRUNCATED] == ["bad-long"]
    assert S.OVER_LONG not in stats["counts"] and stats["skipped"] == len(BAD) - 1
    for ids, b in batches:
        if "bad-long" in ids:
            row = ids.index("bad-long")
            assert b["input_ids"].shape[1] == BUCKETS[-1] and b["attention_mask"][row].all()
            assert (b["labels"][row] != P.IGNORE_INDEX).any()
            break
    else:
        raise AssertionError("the truncated example is missing")


def test_only_bad_records_raise_instead_of_spinning(corpus, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(_bad_lines().values()) + "\n")
    cfg = _cfg(corpus, json_path=str(path), max_consecutive_skips=20, drop_remainder=False)
    it = P.make_train_iterator(cfg, tokenizer=corpus.tokenizer, image_size=IMAGE_SIZE, seed=0,
                               process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="bad records in a row"):  # bad-corrupt, epoch after epoch
        _take(it, 30)
    # no usable record at all: said at once
    path.write_text("\n".join(v for k, v in _bad_lines().items() if k != 5) + "\n")
    it = P.make_train_iterator(cfg, tokenizer=corpus.tokenizer, image_size=IMAGE_SIZE, seed=0,
                               process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="0 usable records of 4, fewer than one global batch of 3"):
        next(it)
    # a finite run simply ends
    it = P.make_train_iterator(_cfg(corpus, json_path=str(path), num_epochs=1), tokenizer=corpus.tokenizer,
                               image_size=IMAGE_SIZE, seed=0, process_index=0, process_count=1)
    assert _epoch(it) == []


def test_tfds_llava_build_reads_back_as_the_json_source(corpus, tmp_path):
    from gamma_mod_jax.data.tfds_builders import build_llava_tfds

    build_llava_tfds(corpus.path, corpus.image_dir, str(tmp_path / "tfds"))
    kw = dict(num_epochs=1, drop_remainder=False, seed=5)
    it_json = _iterator(corpus, **kw)
    it_tfds = _iterator(corpus, source="tfds", tfds_name="llava_conversations",
                        tfds_data_dir=str(tmp_path / "tfds"), json_path=None, image_dir=None, **kw)
    from_json, from_tfds = _epoch(it_json), _epoch(it_tfds)
    _assert_same_batches(from_json, from_tfds)
    assert P.pipeline_stats(it_json)["counts"] == P.pipeline_stats(it_tfds)["counts"]
    assert P.pipeline_stats(it_json)["ids"] == P.pipeline_stats(it_tfds)["ids"]


@pytest.fixture(scope="module")
def easy_vqa_tokenizer(tmp_path_factory):
    from gamma_mod_jax.data.easy_vqa import easy_vqa_vocabulary
    return build_word_tokenizer(easy_vqa_vocabulary(), str(tmp_path_factory.mktemp("evqa_tok")))


def test_tfds_easy_vqa_build_reads_back_as_the_package(easy_vqa_tokenizer, tmp_path):
    from gamma_mod_jax.data.tfds_builders import build_easy_vqa_tfds

    build_easy_vqa_tfds(str(tmp_path / "tfds"), max_examples=24)

    def run(**kw):
        cfg = P.data_config_defaults()
        cfg.buckets, cfg.batch_size, cfg.num_epochs, cfg.read_threads = BUCKETS, 4, 1, 1
        cfg.max_records = 24
        for k, v in kw.items():
            cfg[k] = v
        it = P.make_train_iterator(cfg, tokenizer=easy_vqa_tokenizer, image_size=IMAGE_SIZE, seed=1,
                                   process_index=0, process_count=1)
        return _epoch(it), P.pipeline_stats(it)

    for split in ("train", "test"):
        package, stats_p = run(source="easy_vqa", split=split)
        via_tfds, stats_t = run(source="tfds", tfds_name="easy_vqa", tfds_data_dir=str(tmp_path / "tfds"),
                                split=split)
        assert len(package) == 6 and stats_p["skipped"] == 0
        _assert_same_batches(package, via_tfds)
        assert stats_t == stats_p
        b = package[0][1]
        assert (b["input_ids"] == P.IMAGE_TOKEN_INDEX).sum() == 4 and b["pixel_values"].any()
        assert not ((b["input_ids"] == 0) & (b["attention_mask"] == 1)).any()  # no unknown words


def test_eval_examples_easy_vqa(easy_vqa_tokenizer):
    from gamma_mod_jax.data.easy_vqa import EASY_VQA_ANSWERS, easy_vqa_records

    cfg = P.data_config_defaults()
    cfg.source, cfg.split = "easy_vqa", "test"
    examples = list(P.make_eval_examples(cfg, tokenizer=easy_vqa_tokenizer, image_size=IMAGE_SIZE, limit=5))
    records = easy_vqa_records("test", limit=5)
    assert [e["id"] for e in examples] == [r["id"] for r in records]
    for e, r in zip(examples, records):
        assert e["answer"] == r["conversations"][1]["value"] and e["answer"] in EASY_VQA_ANSWERS
        assert e["question"] == r["conversations"][0]["value"].replace("<image>\n", "")
        full = encode_conversation(r["conversations"], easy_vqa_tokenizer, has_image=True)
        n = len(e["input_ids"])
        np.testing.assert_array_equal(e["input_ids"], full["input_ids"][:n])  # the prompt is a prefix
        np.testing.assert_array_equal(e["token_types"], full["token_types"][:n])
        assert easy_vqa_tokenizer.convert_ids_to_tokens(e["input_ids"][-2:].tolist()) == ["ASSISTANT", ":"]
        np.testing.assert_allclose(e["pixel_values"], preprocess_image(load_image(r["image"]), IMAGE_SIZE))
    batch = P.collate_prompts(examples[:3], batch_size=4, buckets=BUCKETS)
    assert batch["input_ids"].shape == (4, 64) and batch["pixel_values"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["valid"].tolist() == [1, 1, 1, 0] and batch["attention_mask"][3].sum() == 1


def test_eval_examples_skip_and_count_bad_records(corpus):
    log = P.BadRecordLog()
    examples = list(P.make_eval_examples(_cfg(corpus), tokenizer=corpus.tokenizer, image_size=IMAGE_SIZE,
                                         bad_records=log))
    assert sorted(e["id"] for e in examples) == sorted(corpus.good_ids + ["bad-long"])  # its prompt is short
    assert log.summary()["ids"] == {S.BAD_JSON: ["line 9"], S.MISSING_IMAGE: ["bad-missing"],
                                    S.NO_ASSISTANT_TURN: ["bad-noanswer"], S.UNREADABLE_IMAGE: ["bad-corrupt"]}


def test_config_errors(corpus):
    with pytest.raises(ValueError, match="unknown data config field"):
        P.make_train_iterator({"json_pth": "x"}, tokenizer=corpus.tokenizer, image_size=8)
    with pytest.raises(ValueError, match="data.source"):
        P.make_train_iterator({"source": "csv"}, tokenizer=corpus.tokenizer, image_size=8)
    with pytest.raises(ValueError, match="buckets"):
        _iterator(corpus, buckets=(128, 64))
    with pytest.raises(ValueError, match="truncation"):
        _iterator(corpus, truncation="left")
    with pytest.raises(ValueError, match="json_path"):
        _iterator(corpus, json_path=None)
    with pytest.raises(ValueError, match="image size"):
        P.make_train_iterator(_cfg(corpus), tokenizer=corpus.tokenizer, image_size=None, process_index=0,
                              process_count=1)


def test_iterator_from_a_training_config(corpus):
    import ml_collections

    config = ml_collections.ConfigDict()
    config.seed = 7
    # "" and 0 mean "not set", as configs/train.py writes them
    config.data = ml_collections.ConfigDict(dict(
        source="llava_json", json_path=corpus.path, image_dir=corpus.image_dir, tfds_name="", tfds_data_dir="",
        tokenizer_path="", buckets=BUCKETS, truncation="drop", image_size=0, batch_size=3, shuffle_seed=7,
        num_epochs=None, worker_count=0, drop_remainder=True))
    model_cfg = types.SimpleNamespace(input_image_size=IMAGE_SIZE, image_token_index=-200,
                                      llm=types.SimpleNamespace(pad_token_id=0))
    it = P.make_train_iterator_from_config(config, model_cfg, tokenizer=corpus.tokenizer, process_index=0,
                                           process_count=1)
    _assert_same_batches(_take(it, 6), _take(_iterator(corpus, seed=7), 6))
    stats = it.stats()  # flat numbers for the trainer's metric log
    assert stats["skipped"] == sum(v for k, v in stats.items() if k.startswith("skipped_")) > 0
    assert set(stats) == ({"skipped", "truncated", "global_batches", "length", "padding_efficiency"}
                          | {f"skipped_{r}" for r in S.SKIP_REASONS})


def test_default_sharding_is_the_jax_process(corpus):
    import jax

    assert (jax.process_index(), jax.process_count()) == (0, 1)
    it = P.make_train_iterator(_cfg(corpus), tokenizer=corpus.tokenizer, image_size=IMAGE_SIZE, seed=2)
    _assert_same_batches(_take(it, 3), _take(_iterator(corpus, seed=2), 3))


@pytest.mark.slow
def test_two_worker_processes_resume_and_cover_the_epoch(corpus):
    _resume_check(corpus, worker_count=2)
    it = _iterator(corpus, worker_count=2, num_epochs=1, drop_remainder=False, batch_size=2)
    try:
        batches = _epoch(it)
        ids = [i for ids, _ in batches for i in ids]
        assert sorted(ids) == corpus.good_ids
        assert P.pipeline_stats(it)["counts"] == {reason: 1 for reason in BAD.values()}
    finally:
        it.close()
    # each worker encodes whole global batches of the plan: the batches do not depend on worker_count
    _assert_same_batches(batches, _epoch(_iterator(corpus, num_epochs=1, drop_remainder=False, batch_size=2)))


@pytest.mark.parametrize("turns", [1, 4])
def test_easy_vqa_multi_turn_records_use_every_question_once_with_its_own_image(easy_vqa_tokenizer, turns):
    import easy_vqa

    from gamma_mod_jax.data.easy_vqa import easy_vqa_records

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    records = easy_vqa_records("test", questions_per_conversation=turns)
    seen = []
    for r in records:
        indices = [int(i) for i in r["id"].rsplit("/", 1)[1].split("+")]
        turns_ = r["conversations"]
        assert 1 <= len(indices) <= turns and len(turns_) == 2 * len(indices)
        assert all(paths[image_ids[i]] == r["image"] for i in indices)  # one image per conversation
        assert turns_[0]["value"] == "<image>\n" + questions[indices[0]]
        for k, i in enumerate(indices):
            assert turns_[2 * k]["value"].replace("<image>\n", "") == questions[i]
            assert turns_[2 * k + 1] == {"from": "gpt", "value": answers[i]}
        seen += indices
    assert sorted(seen) == list(range(len(questions)))
    if turns > 1:
        assert len(records) < len(questions) / 2
        # Through the pipeline: every answer of a conversation is supervised.
        cfg = P.data_config_defaults()
        cfg.update(source="easy_vqa", split="test", easy_vqa_turns=turns, buckets=(128,), batch_size=4)
        batch = next(P.make_train_iterator(cfg, tokenizer=easy_vqa_tokenizer, image_size=IMAGE_SIZE, seed=0))
        from gamma_mod_jax.data.easy_vqa import EASY_VQA_ANSWERS

        for row in range(4):
            words = easy_vqa_tokenizer.convert_ids_to_tokens([int(t) for t in batch["labels"][row] if t >= 0])
            asked = easy_vqa_tokenizer.convert_ids_to_tokens([int(t) for t in batch["input_ids"][row] if t >= 0])
            assert words[1::2] == ["</s>"] * asked.count("ASSISTANT")
            assert set(words[0::2]) <= set(EASY_VQA_ANSWERS) and len(words) == 2 * asked.count("ASSISTANT")
    with pytest.raises(ValueError, match="questions_per_conversation"):
        easy_vqa_records("test", questions_per_conversation=0)
