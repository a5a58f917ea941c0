"""Manifest rows and directory layouts → RawRow records or rejects with reasons."""

import json

from mmprep.manifest import directory_row, group_directory, parse_jsonl_line, parse_record
from mmprep.records import RawRow, Reject


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def test_paths_resolve_against_the_manifest_folder():
    row = parse_jsonl_line(line({"id": "a", "image": "m/a.png", "audio": "/abs/a.wav", "text": "hi"}), "m.jsonl:1", 0, "/data")
    assert isinstance(row, RawRow)
    assert (row.image, row.audio, row.text) == ("/data/m/a.png", "/abs/a.wav", "hi")
    uri = parse_record({"id": "b", "image": "gs://bucket/b.jpg"}, "m.jsonl:2", 1, "/data")
    assert uri.image == "gs://bucket/b.jpg"


def test_malformed_and_wrong_typed_rows_are_rejects():
    broken = parse_jsonl_line(b'{"id": "x", "image": ', "m.jsonl:3", 2, "")
    assert isinstance(broken, Reject) and broken.reason == "malformed_row" and broken.id is None
    not_object = parse_jsonl_line(b"[1, 2]", "m.jsonl:4", 3, "")
    assert not_object.reason == "malformed_row"
    wrong = parse_record({"id": "y", "image": 5}, "m.jsonl:5", 4, "")
    assert wrong.reason == "bad_field" and wrong.id == "y"
    nested = parse_record({"id": {"a": 1}, "text": "t"}, "m.jsonl:6", 5, "")
    assert nested.reason == "bad_field"
    assert parse_record({"text": "t"}, "m.jsonl:7", 6, "").reason == "missing_id"
    empty, blank = parse_record({"id": "", "text": "t"}, "m.jsonl:9", 8, ""), parse_record({"id": " \t ", "text": "t"}, "m.jsonl:10", 9, "")
    assert (empty.reason, empty.detail) == ("missing_id", "the row's 'id' is empty")
    assert (blank.reason, blank.detail) == ("missing_id", "the row's 'id' is only white space")
    assert parse_record({"id": "z", "label": "cat"}, "m.jsonl:8", 7, "").reason == "no_modality"


def test_integer_ids_and_labels_become_strings_and_extras_are_kept():
    row = parse_record({"id": 7, "text": "t", "label": 3, "lang": "en", "score": float("nan")}, "m.csv:2", 0, "")
    assert (row.id, row.label) == ("7", "3")
    assert row.extra == {"lang": "en", "score": None}


def test_invalid_utf8_inside_a_line_survives_for_the_text_stage():
    raw = b'{"id": "u", "text": "bad \xff\xfe here"}'
    row = parse_jsonl_line(raw, "m.jsonl:9", 0, "")
    assert isinstance(row, RawRow)
    assert "\udcff" in row.text  # surrogate-escaped: the text stage rejects it as text_not_utf8


def test_empty_text_is_declared_not_absent():
    row = parse_record({"id": "e", "text": ""}, "m.jsonl:1", 0, "")
    assert isinstance(row, RawRow) and row.text == ""


def test_directory_groups_by_stem_and_labels_from_the_folder():
    paths = [
        "/c/cat/001.jpg", "/c/cat/001.wav", "/c/cat/001.txt", "/c/dog/002.png",
        "/c/.hidden/x.jpg", "/c/loose.wav", "/c/cat/003.csv",
    ]
    groups = dict(group_directory(paths, "/c"))
    assert sorted(groups) == ["cat/001", "cat/003", "dog/002", "loose"]
    row = directory_row("cat/001", groups["cat/001"], 0, "cat/001.jpg")
    assert (row.id, row.label, row.image, row.audio, row.text_path) == (
        "cat/001", "cat", "/c/cat/001.jpg", "/c/cat/001.wav", "/c/cat/001.txt",
    )
    assert directory_row("loose", groups["loose"], 1, "loose.wav").label is None
    assert directory_row("cat/003", groups["cat/003"], 2, "cat/003.csv").reason == "no_modality"
    two = directory_row("d/1", {"image": ["/c/d/1.jpg", "/c/d/1.png"]}, 3, "d/1.jpg")
    assert two.reason == "bad_field" and "several image files" in two.detail


def test_an_integral_float_label_is_that_integer_and_invisible_characters_do_not_make_a_class():
    from mmprep.config import LabelConfig
    from mmprep.labels import resolve_label

    rows = [parse_record({"id": "a", "text": "t", "label": v}, "m:1", 0, ".") for v in (3.0, 3, "3")]
    assert [r.label for r in rows] == ["3", "3", "3"]  # pandas writes an int column with nulls as float64
    assert isinstance(parse_record({"id": "a", "text": "t", "label": 2.5}, "m:1", 0, "."), Reject)
    assert parse_record({"id": "a", "text": "t", "label": float("nan")}, "m:1", 0, ".").label is None
    cfg = LabelConfig()
    assert {resolve_label(x, None, cfg)[0] for x in ("Cat", "cat\u200b", " cat ", "\u202acat\u202c", "CAT\u00ad")} == {"cat"}
    assert resolve_label("big\tcat", None, cfg)[0] == "big cat"  # a tab is a space, not dropped


def test_a_directory_named_as_a_media_file_is_a_stable_unreadable_file(tmp_path):
    """The detail must not name the file descriptor (open() on a directory's fd says
    "[Errno 21] Is a directory: 7"): it would differ between workers and runs."""
    from mmprep.manifest import read_local
    from mmprep.records import RecordError

    (tmp_path / "d.png").mkdir()
    held = [open(tmp_path / f"f{i}", "w") for i in range(3)]  # other fd numbers than the second call's
    try:
        first = read_local(str(tmp_path / "d.png"), 1000)
    finally:
        for f in held:
            f.close()
    second = read_local(str(tmp_path / "d.png"), 1000)
    assert isinstance(first, RecordError) and first.reason == "unreadable_file"
    assert first.detail == second.detail == f"{tmp_path / 'd.png'}: not a regular file (a directory)"
