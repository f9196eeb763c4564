"""Record sources: LLaVA JSON / JSON lines, easy-VQA from the package, TFDS builds."""

import importlib.util
import json
import os
import pickle
import sys

import pytest

from gamma_mod_jax.data import sources as S

RECORDS = [
    {"id": "a", "image": "x/1.png", "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                                        {"from": "gpt", "value": "a cat"}]},
    {"id": 7, "conversations": [{"from": "human", "value": "héllo — ünïcode ✓"}, {"from": "gpt", "value": "日本語"}]},
    {"image": "/abs/2.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "r"}]},
]


def _write_json(path, obj, indent=None):
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False), encoding="utf-8")
    return str(path)


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("indent", [None, 2])
def test_json_list_and_json_lines_give_the_same_records(tmp_path, indent):
    listed = S.LlavaJsonSource(_write_json(tmp_path / "d.json", RECORDS, indent), "/imgs")
    lines = S.LlavaJsonSource(_write_lines(tmp_path / "d.jsonl", [json.dumps(r, ensure_ascii=False) for r in RECORDS]),
                              "/imgs")
    assert (listed.format, lines.format) == ("json", "jsonl")
    assert len(listed) == len(lines) == 3
    for i in range(2):
        assert listed[i]["conversations"] == lines[i]["conversations"] == RECORDS[i]["conversations"]
    assert listed[2]["error"] == lines[2]["error"]  # /abs/2.png leaves /imgs
    assert [listed[i]["id"] for i in range(3)] == ["a", "7", "#2"]
    assert [lines[i]["id"] for i in range(3)] == ["a", "7", "line 3"]  # no id: the line number
    assert listed[0]["image"] == os.path.join("/imgs", "x/1.png")
    assert listed[1]["image"] is None  # text only
    assert listed[2]["error"][0] == S.IMAGE_OUTSIDE_DIR  # an absolute path outside /imgs
    with pytest.raises(IndexError):
        listed[3]


def test_bad_json_lines_become_bad_records(tmp_path):
    good = json.dumps(RECORDS[0])
    src = S.LlavaJsonSource(_write_lines(tmp_path / "d.jsonl", [good, "", "{oops", "   ", good, "[1, 2"]), None)
    assert len(src) == 4  # blank lines are not records
    assert src[1]["id"] == "line 3" and src[1]["error"][0] == S.BAD_JSON
    assert "line 3" in src[1]["error"][1] and "d.jsonl" in src[1]["error"][1]
    assert src[3]["id"] == "line 6" and src[3]["error"][0] == S.BAD_JSON
    assert "error" not in src[0] and "error" not in src[2]


def test_malformed_records_are_flagged_not_raised(tmp_path):
    items = [
        [1, 2],
        {"id": "multi", "image": ["a.png", "b.png"], "conversations": RECORDS[0]["conversations"]},
        {"id": "noconv", "image": "a.png"},
        {"id": "badturn", "conversations": [{"from": "human"}]},
        {"id": "empty", "conversations": []},
    ]
    src = S.LlavaJsonSource(_write_json(tmp_path / "d.json", items), None)
    got = [(src[i]["id"], src[i]["error"][0]) for i in range(len(src))]
    assert got == [("#0", S.MALFORMED), ("multi", S.MALFORMED), ("noconv", S.MALFORMED),
                   ("badturn", S.MALFORMED), ("empty", S.MALFORMED)]
    assert "several images" in src[1]["error"][1]


@pytest.mark.parametrize("content, match", [
    ("", "empty"),
    ("  \n\n ", "empty"),
    ("[]", "no records"),
    ('[{"id": 1}, {"id": 2,}]', r"not a valid JSON list.*line 1"),
    ('[{"id": 1}\n\n{"id": 2}]', r"not a valid JSON list.*line 3"),
    ('{\n  "id": 1,\n  "conversations": []\n}', "no line holds a JSON record"),
    ("not json at all\nnor this", "no line holds a JSON record"),
])
def test_unusable_files_raise_naming_the_file(tmp_path, content, match):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        S.LlavaJsonSource(str(path), None)
    assert str(path) in str(err.value)


def test_missing_file_raises_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        S.LlavaJsonSource(str(tmp_path / "nope.json"), None)


def test_source_pickles_small_and_reads_after_unpickling(tmp_path):
    records = RECORDS * 200
    src = S.LlavaJsonSource(_write_json(tmp_path / "d.json", records), "/imgs")
    src[0]  # opens the file
    blob = pickle.dumps(src)
    assert len(blob) < os.path.getsize(tmp_path / "d.json")  # offsets, not the records
    copy = pickle.loads(blob)
    assert [copy[i] for i in (0, 1, 599)] == [src[i] for i in (0, 1, 599)]


def test_record_list_source():
    src = S.RecordListSource(RECORDS, image_dir="/imgs", name="mem", allow_paths_outside_image_dir=True)
    assert len(src) == 3 and src[0]["image"] == "/imgs/x/1.png" and src[2]["id"] == "#2"
    assert src[2]["image"] == "/abs/2.png"  # allowed: absolute paths stay
    src[0]["id"] = "changed"
    assert src[0]["id"] == "a"  # callers get copies


def test_easy_vqa_records_and_vocabulary():
    import easy_vqa as pkg

    from gamma_mod_jax.data.easy_vqa import EASY_VQA_ANSWERS, easy_vqa_records, easy_vqa_vocabulary

    assert list(EASY_VQA_ANSWERS) == pkg.get_answers()
    questions, answers, image_ids = pkg.get_test_questions()
    records = easy_vqa_records("test")
    assert len(records) == len(questions)
    for i in (0, 1, len(records) - 1):
        r = records[i]
        assert r["id"] == f"easy_vqa/test/{i}" and os.path.isfile(r["image"])
        assert r["image"].endswith(f"{image_ids[i]}.png")
        assert r["conversations"] == [{"from": "human", "value": "<image>\n" + questions[i]},
                                      {"from": "gpt", "value": answers[i]}]
    assert len(easy_vqa_records("train", limit=10)) == 10
    vocab = easy_vqa_vocabulary()
    assert set(EASY_VQA_ANSWERS) <= set(vocab) and {"what", "shape", "?", "USER", "ASSISTANT", ":"} <= set(vocab)
    with pytest.raises(ValueError, match="split"):
        easy_vqa_records("validation")


def test_tfds_builds_and_reads_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds

    from gamma_mod_jax.data.easy_vqa import easy_vqa_records
    from gamma_mod_jax.data.tfds_builders import build_easy_vqa_tfds, build_llava_tfds

    tf_missing = importlib.util.find_spec("tensorflow") is None
    image_dir = tmp_path / "images"
    (image_dir / "x").mkdir(parents=True)
    (image_dir / "x" / "1.png").write_bytes(b"\x89PNG fake bytes")
    lines = [json.dumps(RECORDS[0]), "{bad", json.dumps(RECORDS[1], ensure_ascii=False),
             json.dumps({"id": "gone", "image": "missing.png", "conversations": RECORDS[0]["conversations"]})]
    path = _write_lines(tmp_path / "d.jsonl", lines)
    build_llava_tfds(path, str(image_dir), str(tmp_path / "llava"))
    build_easy_vqa_tfds(str(tmp_path / "evqa"), max_examples=5)
    if tf_missing:
        assert "tensorflow" not in sys.modules

    # plain tfds.data_source reads it (ArrayRecord), in the source order
    raw = tfds.data_source("llava_conversations", split="train", data_dir=str(tmp_path / "llava"), download=False)
    assert [raw[i]["id"] for i in range(len(raw))] == [b"a", b"line 2", b"7", b"gone"]
    assert raw[0]["image"].tobytes() == b"\x89PNG fake bytes" and raw[0]["image_path"] == b"x/1.png"

    json_src = S.LlavaJsonSource(path, str(image_dir))
    tfds_src = S.TfdsSource("llava_conversations", split="train", data_dir=str(tmp_path / "llava"))
    assert len(tfds_src) == len(json_src) == 4
    for i in range(4):
        a, b = json_src[i], tfds_src[i]
        assert (a["id"], a["conversations"], a.get("error", (None,))[0]) == \
               (b["id"], b["conversations"], b.get("error", (None,))[0])
    assert tfds_src[3]["image_bytes"].size == 0  # missing at build time: skipped as missing_image later
    assert tfds_src[1]["error"][0] == S.BAD_JSON
    assert pickle.loads(pickle.dumps(tfds_src))[2] == tfds_src[2]

    evqa = S.TfdsSource("easy_vqa", split="test", data_dir=str(tmp_path / "evqa"))
    records = easy_vqa_records("test", limit=5)
    assert len(evqa) == 5
    for i in range(5):
        r = evqa[i]
        assert r["id"] == records[i]["id"] and r["conversations"] == records[i]["conversations"]
        with open(records[i]["image"], "rb") as f:
            assert r["image_bytes"].tobytes() == f.read()

    with pytest.raises(ValueError, match="cannot be read"):
        S.TfdsSource("easy_vqa", split="test", data_dir=str(tmp_path / "nothing"))


def test_deeply_nested_json_is_a_counted_bad_record_not_a_crash(tmp_path):
    good = json.dumps(RECORDS[0])
    lines = [good, "[" * 100_000, good, "[" * 50_000 + "]" * 50_000]  # unclosed; closed but too deep
    src = S.LlavaJsonSource(_write_lines(tmp_path / "d.jsonl", lines), None)
    assert [src[i].get("error", (None,))[0] for i in range(len(src))] == [None, S.BAD_JSON, None, S.BAD_JSON]
    assert src[1]["id"] == "line 2" and "nested too deeply" in src[1]["error"][1]
    listed = _write_raw(tmp_path / "l.json", "[" + good + ", " + "[" * 50_000 + "]" * 50_000 + "]")
    with pytest.raises(ValueError, match="nested too deeply") as err:
        S.LlavaJsonSource(str(listed), None)
    assert str(listed) in str(err.value)


def _write_raw(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_utf16_and_utf32_files_raise_naming_the_file(tmp_path, encoding):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n", encoding=encoding)
    with pytest.raises(ValueError, match="not UTF-8") as err:
        S.LlavaJsonSource(str(path), None)
    assert str(path) in str(err.value)


def test_image_paths_stay_inside_image_dir(tmp_path):
    turns = RECORDS[0]["conversations"]
    paths = ["a.png", "sub/../b.png", "../secret.png", "sub/../../secret.png", "/etc/passwd", str(tmp_path / "imgs/c.png")]
    items = [{"id": f"r{i}", "image": p, "conversations": turns} for i, p in enumerate(paths)]
    image_dir = str(tmp_path / "imgs")
    src = S.LlavaJsonSource(_write_json(tmp_path / "d.json", items), image_dir)
    got = [src[i]["image"] if "error" not in src[i] else src[i]["error"][0] for i in range(len(src))]
    assert got == [f"{image_dir}/a.png", f"{image_dir}/b.png", S.IMAGE_OUTSIDE_DIR, S.IMAGE_OUTSIDE_DIR,
                   S.IMAGE_OUTSIDE_DIR, f"{image_dir}/c.png"]
    assert "../secret.png" in src[2]["error"][1] and "allow_paths_outside_image_dir" in src[2]["error"][1]
    allowed = S.LlavaJsonSource(str(tmp_path / "d.json"), image_dir, allow_paths_outside_image_dir=True)
    assert [allowed[i]["image"] for i in range(len(allowed))] == [
        f"{image_dir}/a.png", f"{image_dir}/b.png", str(tmp_path / "secret.png"), str(tmp_path / "secret.png"),
        "/etc/passwd", f"{image_dir}/c.png"]
