"""The global batch plan: every process gets its rows of the same global batches, at the
length of the whole global batch; the order depends on the seed and the global batch
size only; the iterator state moves between process counts; the padding efficiency and
the length index (cached beside the data) are right."""

import json
import os

import numpy as np
import pytest

from gamma_mod_jax.data import pipeline as P
from gamma_mod_jax.data import sources as S
from gamma_mod_jax.data.conversation import encode_conversation, move_image_to_front
from gamma_mod_jax.data.tokenizer import load_tokenizer
from tests.data import varied_llava

IMAGE_SIZE = 16
GLOBAL = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("varied")
    path, image_dir, tokenizer_dir = varied_llava.write_varied_llava(str(root))
    with open(path) as f:
        records = {r["id"]: r for r in json.load(f)}
    tokenizer = load_tokenizer(tokenizer_dir)
    # text lengths by an independent route: the conversation encoder on each record
    lengths = {rid: len(encode_conversation(move_image_to_front(r)["conversations"], tokenizer,
                                            has_image="image" in r)["input_ids"]) for rid, r in records.items()}
    return dict(path=path, image_dir=image_dir, tokenizer=tokenizer, records=records, lengths=lengths, root=root)


def _cfg(data, **overrides):
    c = P.data_config_defaults()
    c.update(json_path=data["path"], image_dir=data["image_dir"], buckets=varied_llava.BUCKETS, batch_size=GLOBAL,
             read_threads=1, move_image_to_front=True)
    with c.ignore_type():
        c.update(overrides)
    return c


def _iterators(data, count, seed=0, **overrides):
    return [P.make_train_iterator(_cfg(data, batch_size=GLOBAL // count, **overrides), tokenizer=data["tokenizer"],
                                  image_size=IMAGE_SIZE, seed=seed, process_index=p, process_count=count)
            for p in range(count)]


def _global_batches(iterators, n):
    """n global batches: (text length, ids in row order, rows concatenated in process order)."""
    out = []
    for _ in range(n):
        parts = [next(it) for it in iterators]
        lengths = {b["input_ids"].shape[1] for b in parts}
        assert len(lengths) == 1, lengths  # every process at the same length
        assert len({b["input_ids"].shape[0] for b in parts}) == 1
        ids = [i for it in iterators for i in it.last_ids]
        out.append((lengths.pop(), ids, {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}))
    return out


def test_the_same_global_batches_on_1_2_4_and_8_processes(data):
    reference = _global_batches(_iterators(data, 1, num_epochs=2), 12)
    for count in (2, 4, 8):
        got = _global_batches(_iterators(data, count, num_epochs=2), 12)
        assert [(t, sorted(ids)) for t, ids, _ in got] == [(t, sorted(ids)) for t, ids, _ in reference]
        for (_, ids, batch), (_, ref_ids, ref) in zip(got, reference):
            # rows of the same record are equal wherever they sit (a row that fails to encode
            # becomes a padding row after its process's real rows)
            for k in ("input_ids", "labels", "token_types", "attention_mask", "pixel_values"):
                mine = {rid: batch[k][[j for j, v in enumerate(batch["valid"]) if v][n]] for n, rid in enumerate(ids)}
                theirs = {rid: ref[k][n] for n, rid in enumerate(ref_ids)}
                for rid in ids:
                    np.testing.assert_array_equal(mine[rid], theirs[rid], err_msg=f"{k} {rid} on {count}")
    lengths = [t for t, _, _ in reference]
    assert len(set(lengths)) >= 3
    for t, ids, _ in reference:  # the smallest bucket holding the global batch's longest example
        assert t == P.pick_bucket(max(data["lengths"][i] for i in ids), varied_llava.BUCKETS)


def test_order_from_the_seed_every_epoch_reshuffled_and_covered(data):
    one = _global_batches(_iterators(data, 1, num_epochs=2), 12)
    again = _global_batches(_iterators(data, 1, num_epochs=2), 12)
    other = _global_batches(_iterators(data, 1, seed=1, num_epochs=2), 12)
    assert [ids for _, ids, _ in one] == [ids for _, ids, _ in again] != [ids for _, ids, _ in other]
    epochs = [sorted(i for _, ids, _ in one[e * 6:(e + 1) * 6] for i in ids) for e in range(2)]
    usable = sorted(set(data["records"]) - {varied_llava.CORRUPT_ID})
    assert epochs[0] == epochs[1] == usable
    assert [ids for _, ids, _ in one[:6]] != [ids for _, ids, _ in one[6:]]


def test_padding_efficiency_is_real_over_computed_text_tokens(data):
    it = _iterators(data, 1)[0]
    real = computed = 0
    for _ in range(5):
        batch = next(it)
        ids = it.last_ids
        stats = it.stats()
        # the plan counts the undecodable image's row with its text length: it was planned
        planned = ids + ([varied_llava.CORRUPT_ID] if len(ids) < GLOBAL else [])
        real += sum(data["lengths"][i] for i in planned)
        computed += GLOBAL * batch["input_ids"].shape[1]
        assert stats["length"] == batch["input_ids"].shape[1]
        assert stats["padding_efficiency"] == pytest.approx(real / computed, rel=1e-12)
    assert stats["global_batches"] == 5


def test_state_of_two_processes_continues_on_one_and_on_four(data):
    full = _global_batches(_iterators(data, 1), 6)
    two = _iterators(data, 2)
    _global_batches(two, 2)
    states = [json.loads(json.dumps(it.get_state())) for it in two]
    assert states[0]["pipeline"] == states[1]["pipeline"]  # the position is global
    for count in (1, 4):
        fresh = _iterators(data, count)
        for it in fresh:
            it.set_state(states[0])
        assert [(t, ids) for t, ids, _ in _global_batches(fresh, 4)] == [(t, ids) for t, ids, _ in full[2:]]
        assert fresh[0].stats()["padding_efficiency"] == pytest.approx(_efficiency_after(data, 6), rel=1e-12)


def _efficiency_after(data, n):
    it = _iterators(data, 1)[0]
    for _ in range(n):
        next(it)
    return it.stats()["padding_efficiency"]


def test_global_batch_size_keeps_the_plan_whatever_batch_size(data):
    a = _global_batches(_iterators(data, 1), 3)
    b = [P.make_train_iterator(_cfg(data, batch_size=99, global_batch_size=GLOBAL), tokenizer=data["tokenizer"],
                               image_size=IMAGE_SIZE, seed=0, process_index=p, process_count=2) for p in range(2)]
    assert [(t, ids) for t, ids, _ in _global_batches(b, 3)] == [(t, ids) for t, ids, _ in a]
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        P.make_train_iterator(_cfg(data, global_batch_size=GLOBAL), tokenizer=data["tokenizer"],
                              image_size=IMAGE_SIZE, process_index=0, process_count=3)


def test_group_by_modality_batches_are_all_image_or_all_text(data):
    plan = P.make_batch_plan(_cfg(data, group_by_modality=True, num_epochs=1, drop_remainder=False),
                             tokenizer=data["tokenizer"])
    rows, lengths = plan.batches(0, len(plan))
    has_image = {rid: "image" in r for rid, r in data["records"].items()}
    kinds = [{has_image[plan.ids[i]] for i in batch if i >= 0} for batch in rows]
    assert all(len(k) == 1 for k in kinds[:-1]) and {True} in kinds and {False} in kinds
    assert sorted(i for batch in rows for i in batch if i >= 0) == list(range(len(data["records"])))
    n_image = sum(has_image.values())
    assert len(rows) == n_image // GLOBAL + (len(has_image) - n_image) // GLOBAL + 1  # the remainders merged


def test_length_index_is_cached_beside_the_data_and_a_stale_one_is_refused(data, tmp_path, monkeypatch):
    cfg = P._cfg(_cfg(data))
    source = P.make_source(cfg)
    cached = P._length_index_path(cfg, source, len(source), data["tokenizer"])
    assert os.path.dirname(cached) == os.path.dirname(data["path"]) and os.path.isfile(cached)  # earlier tests

    def no_building(*args, **kwargs):  # reading the cache must not tokenise again
        raise AssertionError("the length index was built again")

    monkeypatch.setattr(P, "build_length_index", no_building)
    index = P.length_index(source, len(source), data["tokenizer"], cfg)
    assert [index.lengths[i] for i in range(len(source))] == [data["lengths"][f"v{i}"] for i in range(len(source))]
    monkeypatch.undo()
    # another folder via data.length_index_dir; a tampered index is refused with a clear error
    cfg2 = P._cfg(_cfg(data, length_index_dir=str(tmp_path)))
    path = P._length_index_path(cfg2, source, len(source), data["tokenizer"])
    P.length_index(source, len(source), data["tokenizer"], cfg2)
    with np.load(path) as f:
        saved = dict(f)
    saved["lengths"] = saved["lengths"] - 1
    np.savez(path, **saved)
    it = P.make_train_iterator(cfg2, tokenizer=data["tokenizer"], image_size=IMAGE_SIZE, process_index=0,
                               process_count=1)
    with pytest.raises(RuntimeError, match="the index is stale"):
        next(it)


def test_bad_records_left_out_by_the_plan_or_padded(data, tmp_path):
    records = list(data["records"].values())[:16]
    records[3] = {"id": "gone", "image": "missing.png", "conversations": records[0]["conversations"]}
    records[5] = {"id": "silent", "conversations": [{"from": "human", "value": "what ?"}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    cfg = _cfg(data, json_path=str(path), batch_size=4, num_epochs=1)
    its = [P.make_train_iterator(cfg, image_size=IMAGE_SIZE, tokenizer=data["tokenizer"], process_index=p,
                                 process_count=2) for p in range(2)]
    batches = _global_batches(its, 1)
    with pytest.raises(StopIteration):  # 14 usable records: one global batch of 8
        next(its[0])
    plan = P.make_batch_plan(cfg, tokenizer=data["tokenizer"], process_count=2)
    planned = [plan.ids[i] for i in plan.batch(0)[0]]
    assert len(planned) == GLOBAL and not {"gone", "silent"} & set(planned)
    assert batches[0][1] == [i for i in planned if i != varied_llava.CORRUPT_ID]  # its row would be padding
    for it in its:  # left out by the plan: counted by every process, in its first batch
        counts = P.pipeline_stats(it)["counts"]
        assert counts[S.MISSING_IMAGE] == 1 and counts[S.NO_ASSISTANT_TURN] == 1


def test_padding_waste_launcher_on_the_assumed_distribution(capsys):
    from gamma_mod_jax.data import length_stats
    from launch import padding_waste

    padding_waste.main(["--config", "configs/train.py:llava_hr_7b_mod0.34", "--global-batch", "32"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lengths, has_image = length_stats.sample_lengths(length_stats.MIX665K, max_length=2496)
    assert result["records"] == len(lengths) == sum(c[1] for c in length_stats.MIX665K)
    assert result["mean_text_length"] == pytest.approx(float(lengths.mean())) and 300 < lengths.mean() < 420
    # one bucket: every position of every row is computed (up to the < 2 batches left over)
    one = result["one_bucket"]
    assert one["batches"] == {"2496": len(lengths) // 32 - 1} or one["batches"] == {"2496": len(lengths) // 32}
    assert one["text"] == pytest.approx(lengths.mean() / 2496, rel=1e-3)
    llm = (lengths + has_image * 1023).mean() / (2496 + 1023)
    assert one["llm"] == pytest.approx(llm, rel=1e-3)
    assert result["buckets"]["llm"] > one["llm"] + 0.15 and result["buckets"]["lengths"][-1] == 2496


def test_plain_order_is_grains_global_shuffle_of_the_records(data):
    """With every record usable, the plan's stream is `MapDataset.shuffle(seed).repeat()` of
    the source (the order of the earlier per-process pipeline on one process), batches
    spanning the epoch boundary."""
    import grain

    records = [r for r in data["records"].values() if r["id"] != varied_llava.CORRUPT_ID]
    source = S.RecordListSource(records, image_dir=data["image_dir"])
    cfg = _cfg(data, batch_size=5, num_epochs=2, shuffle_seed=11)
    plan = P.make_batch_plan(cfg, tokenizer=data["tokenizer"], source=source)
    want = [r["id"] for r in grain.MapDataset.source(source).shuffle(seed=11).repeat(2)]
    rows, _ = plan.batches(0, len(plan))
    assert len(plan) == len(want) // 5 and [plan.ids[i] for i in rows.ravel()] == want[: len(plan) * 5]


@pytest.mark.slow  # ~30 s: two spawned processes import the tokenizer stack
def test_length_index_built_in_worker_processes_is_the_same(data):
    cfg = P._cfg(_cfg(data))
    source = P.make_source(cfg)
    here = P.build_length_index(source, len(source), data["tokenizer"], cfg)
    pooled = P.build_length_index(source, len(source), data["tokenizer"], cfg, workers=2)
    np.testing.assert_array_equal(pooled.lengths, here.lengths)
    np.testing.assert_array_equal(pooled.has_image, here.has_image)
    assert pooled.ids == here.ids and pooled.problems == here.problems
    assert [here.lengths[i] for i in range(len(source))] == [data["lengths"][f"v{i}"] for i in range(len(source))]
