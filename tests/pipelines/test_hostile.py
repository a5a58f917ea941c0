"""Hostile input and leak-free splits, through the real Beam pipeline."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
import yaml

from mmprep.shards import iter_shard
from pipelines.prepare import main as prepare_main

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def png(rng: np.random.Generator, h: int = 80, w: int = 96) -> bytes:
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 3, (0, 0, 255), -1)
    return cv2.imencode(".png", img)[1].tobytes()


def wav(rng: np.random.Generator, seconds: float = 0.8, sr: int = 22050, nan: bool = False) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    y = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    if nan:
        y[100] = np.nan
    buf = io.BytesIO()
    sf.write(buf, y, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + b"\x00" * 64


def write_manifest(folder: Path, lines: list[bytes]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def params_with(tmp_path: Path, **prepare: object) -> Path:
    """params.yaml with some `prepare` keys changed (small corpora need a looser link cap)."""
    data = yaml.safe_load(PARAMS.read_text())
    data["prepare"].update(prepare)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def prepare(manifest: Path, out: Path, params: Path = PARAMS) -> tuple[list[dict], list[dict], dict]:
    assert prepare_main(["--input", str(manifest), "--output", str(out), "--params", str(params)]) == 0
    manifest_rows = pq.read_table(out / "manifest.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    return manifest_rows, rejects, json.loads((out / "dataset.json").read_text())


def j(**obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def test_hostile_corpus_finishes_and_accounts_for_every_row(tmp_path):
    rng = np.random.default_rng(0)
    media = tmp_path / "m"
    media.mkdir()
    (media / "ok.png").write_bytes(png(rng))
    (media / "ok.wav").write_bytes(wav(rng))
    (media / "bomb.png").write_bytes(bomb_png())
    (media / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>not an image</body></html>")
    (media / "zero.png").write_bytes(b"")
    (media / "zero.wav").write_bytes(b"")
    (media / "nan.wav").write_bytes(wav(rng, nan=True))
    (media / "trunc.png").write_bytes(png(rng)[:300])
    (media / "photo [1] *.png").write_bytes(png(np.random.default_rng(9)))
    lines = [
        j(id="good/1", image="m/ok.png", audio="m/ok.wav", text="a fine sample", label="a"),
        j(id="brackets", image="m/photo [1] *.png", label="b"),
        j(id="../../etc/passwd", image="m/ok.png", text="path traversal id", label="b"),
        j(id="with space 和 中文", audio="m/ok.wav", text="spaces and CJK", label="a"),
        j(id="bomb", image="m/bomb.png", label="a"),
        j(id="html", image="m/page.jpg", label="a"),
        j(id="zero-img", image="m/zero.png", label="a"),
        j(id="zero-wav", audio="m/zero.wav", label="a"),
        j(id="nan", audio="m/nan.wav", label="a"),
        j(id="trunc", image="m/trunc.png", label="a"),
        b'{"id": "utf8", "text": "bad \xff\xfe bytes", "label": "a"}',
        j(id="good/1", text="a duplicate id", label="a"),
        b'{"id": "broken", "image": ',
        j(id=42, text=["not", "a", "string"], label="a"),
        j(id="typed", image=12, label="a"),
        j(id="missing", image="m/does-not-exist.png", label="a"),
        j(id="nothing", label="a"),
        j(text="no id at all"),
        j(id="blank", text="   \t  ", label="a"),
        b"[1, 2, 3]",
        b'{"id": "bad-\xff-id", "text": "fine text", "label": "a"}',
        b'{"id": "badlabel", "text": "fine text", "label": "l\xfe"}',
        b'{"id": "badextra", "text": "extra column", "label": "a", "note": "n\xff"}',
        j(id="second", image="m/does-not-exist.png", label="a"),  # its id goes to the next row, which is kept
        j(id="second", text="the first usable row with this id", label="a"),
    ]
    params = params_with(tmp_path, max_reject_ratio=1.0)  # a corpus that is mostly hostile on purpose
    manifest, rejects, ds = prepare(write_manifest(tmp_path, lines), tmp_path / "out", params)
    assert len(manifest) + len(rejects) == len(lines)
    reasons = {(r["id"], r["reason"]) for r in rejects}
    expected = {
        ("bomb", "image_too_large"),
        ("html", "image_undecodable"),
        ("zero-img", "empty_file"),
        ("zero-wav", "empty_file"),
        ("nan", "audio_nonfinite"),
        ("trunc", "image_undecodable"),
        ("utf8", "text_not_utf8"),
        ("good/1", "duplicate_id"),
        (None, "malformed_row"),
        ("42", "bad_field"),
        ("typed", "bad_field"),
        ("missing", "missing_file"),
        ("nothing", "no_modality"),
        (None, "missing_id"),
        ("blank", "text_empty"),
        ("bad-\\xff-id", "bad_field"),
        ("badlabel", "bad_field"),
    }
    assert expected <= reasons, expected - reasons
    kept = {r["id"]: r for r in manifest}
    assert set(kept) == {"good/1", "../../etc/passwd", "with space 和 中文", "badextra", "brackets", "second"}
    assert kept["second"]["source"] == f"manifest.jsonl:{len(lines)}" and ("second", "missing_file") in reasons
    meta = json.loads(next(m for m in _members(tmp_path / "out") if m[0] == kept["badextra"]["key"])[1]["json"])
    assert meta["extra"] == {"note": "n\\xff"}  # carried through, made printable
    assert all(set(r["key"]) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") for r in manifest)
    dup = next(r for r in rejects if r["reason"] == "duplicate_id")
    assert dup["duplicate_of"] == "good/1" and dup["source"] == "manifest.jsonl:12"
    assert ds["counts"]["rejects"]["malformed_row"] == 2


def _members(out: Path):
    from mmprep.shards import iter_shard

    for shard in sorted(out.glob("*.tar")):
        yield from iter_shard(str(shard))


def test_too_many_rejects_fail_the_run_with_a_clear_message(tmp_path, capsys):
    lines = [j(id=f"r{i}", image="nope.png") for i in range(5)] + [j(id="ok", text="fine", label="a")]
    out = tmp_path / "out"
    code = prepare_main(["--input", str(write_manifest(tmp_path, lines)), "--output", str(out), "--params", str(PARAMS)])
    assert code == 1
    assert "exceeds prepare.max_reject_ratio=0.5" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (out / "dataset.json").exists()  # the directory never looks complete
    assert pq.read_table(out / "rejects.parquet").num_rows == 5


def test_one_image_under_several_captions_and_a_resized_copy_share_a_split(tmp_path):
    rng = np.random.default_rng(1)
    media = tmp_path / "m"
    media.mkdir()
    lines = []
    for i in range(60):
        (media / f"{i}.png").write_bytes(png(np.random.default_rng(100 + i)))
        lines.append(j(id=f"s{i}", image=f"m/{i}.png", text=f"caption number {i} about things", label="ab"[i % 2]))
    shared = png(rng, 120, 160)
    (media / "shared.png").write_bytes(shared)
    img = cv2.imdecode(np.frombuffer(shared, np.uint8), cv2.IMREAD_COLOR)
    small = cv2.resize(img, (80, 60), interpolation=cv2.INTER_AREA)
    (media / "shared-small.jpg").write_bytes(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    group = [f"dup{i}" for i in range(6)]
    for i, gid in enumerate(group[:5]):
        lines.append(j(id=gid, image="m/shared.png", text=f"a different caption {i}", label="ab"[i % 2]))
    lines.append(j(id=group[5], image="m/shared-small.jpg", text="the resized copy", label="a"))
    params = params_with(tmp_path, max_link_share=0.2)  # 6 of 66 samples share one image
    manifest, rejects, _ = prepare(write_manifest(tmp_path, lines), tmp_path / "out", params)
    assert not rejects
    splits = {r["id"]: r["split"] for r in manifest}
    assert len({splits[g] for g in group}) == 1
    assert len(set(splits.values())) == 3  # the rest still spreads over train/val/test


def test_directory_layout_with_label_folders(tmp_path):
    rng = np.random.default_rng(2)
    for label in ("cat", "dog"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(4):
            stem = tmp_path / "src" / label / f"{label}_{i}"
            stem.with_suffix(".png").write_bytes(png(np.random.default_rng(10 * (label == "dog") + i)))
            stem.with_suffix(".wav").write_bytes(wav(rng))
            stem.with_suffix(".txt").write_bytes(f"a {label} number {i}".encode())
    (tmp_path / "src" / "cat" / "bad.txt").write_bytes(b"\xff\xfe")
    # an AIFF instead of a WAV, a file of no supported type beside a sample, and one alone
    aiff = tmp_path / "src" / "dog" / "dog_3.aiff"
    tmp_wav = tmp_path / "src" / "dog" / "dog_3.wav"
    data, rate = sf.read(io.BytesIO(tmp_wav.read_bytes()))
    sf.write(aiff, data, rate, format="AIFF")
    tmp_wav.unlink()
    (tmp_path / "src" / "dog" / "dog_2.svg").write_text("<svg/>")
    (tmp_path / "src" / "dog" / "logo.svg").write_text("<svg/>")
    out = tmp_path / "out"
    assert prepare_main(["--input", str(tmp_path / "src"), "--output", str(out), "--params", str(PARAMS)]) == 0
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert len(manifest) == 8 and {r["label"] for r in manifest} == {"cat", "dog"}
    assert all(r["has_image"] and r["has_audio"] and r["has_text"] for r in manifest)
    assert [(r["id"], r["reason"]) for r in rejects] == [("cat/bad", "text_not_utf8"), ("dog/logo", "no_modality")]
    assert "logo.svg" in rejects[1]["detail"]
    metas = {}
    for shard in out.glob("*.tar"):
        for _, members in iter_shard(str(shard)):
            meta = json.loads(members["json"])
            metas[meta["id"]] = meta
    assert metas["dog/dog_2"]["extra"]["ignored_files"] == ["dog_2.svg"]
    assert "ignored_files" not in metas["dog/dog_1"].get("extra", {})


def test_csv_and_parquet_manifests_give_the_same_dataset_as_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pqw

    rng = np.random.default_rng(4)
    (tmp_path / "m").mkdir()
    rows = []
    for i in range(12):
        (tmp_path / "m" / f"{i}.png").write_bytes(png(np.random.default_rng(50 + i)))
        (tmp_path / "m" / f"{i}.wav").write_bytes(wav(rng))
        rows.append({"id": f"r{i}", "image": f"m/{i}.png", "audio": f"m/{i}.wav", "text": f"caption, number {i}", "label": "ab"[i % 2]})
    rows[3]["image"] = "m/missing.png"
    del rows[5]["text"]  # no caption: a key left out, a null, an empty CSV cell — the row is kept without text
    write_manifest(tmp_path, [j(**r) for r in rows])
    pacsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "manifest.csv")
    pqw.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    results = {}
    for suffix in ("jsonl", "csv", "parquet"):
        manifest, rejects, ds = prepare(tmp_path / f"manifest.{suffix}", tmp_path / f"out-{suffix}")
        results[suffix] = (sorted((r["id"], r["split"], r["label"]) for r in manifest), [(r["id"], r["reason"]) for r in rejects])
        shards = sorted(p.name for p in (tmp_path / f"out-{suffix}").glob("*.tar"))
        assert shards == sorted(n for s in ds["splits"].values() for n in s["shards"])
    assert results["csv"] == results["jsonl"] == results["parquet"]
    assert results["csv"][1] == [("r3", "missing_file")]
    assert "r5" in {i for i, _, _ in results["csv"][0]}


def test_broken_csv_rows_are_rejects(tmp_path):
    (tmp_path / "manifest.csv").write_text('id,text,label\na,"first caption",x\nb,"too",many,fields\nc,"third caption",y\n')
    manifest, rejects, _ = prepare(tmp_path / "manifest.csv", tmp_path / "out", params_with(tmp_path, max_reject_ratio=0.5))
    assert sorted(r["id"] for r in manifest) == ["a", "c"]
    assert [(r["source"], r["reason"]) for r in rejects] == [("manifest.csv:3", "malformed_row")]


def test_files_over_max_file_bytes_are_refused_unread(tmp_path):
    (tmp_path / "big.png").write_bytes(png(np.random.default_rng(3), 200, 200))
    (tmp_path / "small.txt").write_text("x")
    lines = [j(id="big", image="big.png", label="a"), j(id="ok", text="a caption", label="a")]
    params = params_with(tmp_path, max_file_bytes=5000)
    manifest, rejects, _ = prepare(write_manifest(tmp_path, lines), tmp_path / "out", params)
    assert [r["id"] for r in manifest] == ["ok"]
    assert [(r["id"], r["reason"]) for r in rejects] == [("big", "file_too_large")]


def test_rows_that_broke_the_job_or_vanished_are_each_one_reject(tmp_path):
    """A JSON value nested 100k deep, a repeated key, an extra key of invalid UTF-8, a BOM on
    line 1: the job finishes, every line is kept or rejected with a reason."""
    lines = [
        b"\xef\xbb\xbf" + j(id="bom", text="first row after a byte order mark", label="a"),
        b'{"id": "deep", "text": "x", "label": "a", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"id": "deep32", "text": "x", "label": "a", "meta": ' + b"[" * 40 + b"]" * 40 + b"}",
        b'{"id": "twice", "text": "one caption", "text": "another", "label": "a"}',
        b'{"id": "badkey", "text": "fine caption", "label": "a", "n\xffame": 1}',
        j(id="ok", text="an ordinary caption", label="b"),
    ]
    manifest, rejects, ds = prepare(write_manifest(tmp_path, lines), tmp_path / "out", params_with(tmp_path, max_reject_ratio=0.9))
    assert sorted(r["id"] for r in manifest) == ["badkey", "bom", "ok"]
    got = {r["source"]: (r["reason"], r["detail"]) for r in rejects}
    assert got["manifest.jsonl:2"] == ("malformed_row", "not valid JSON: nested too deeply")
    assert got["manifest.jsonl:3"][0] == "bad_field" and "nested deeper than 32" in got["manifest.jsonl:3"][1]
    assert got["manifest.jsonl:4"][0] == "malformed_row" and "'text' appears more than once" in got["manifest.jsonl:4"][1]
    assert ds["counts"]["input_rows"] == len(lines) == len(manifest) + len(rejects)
    key = next(r["key"] for r in manifest if r["id"] == "badkey")
    shard = next(r["shard"] for r in manifest if r["id"] == "badkey")
    meta = next(json.loads(m["json"]) for k, m in iter_shard(str(tmp_path / "out" / shard)) if k == key)
    assert meta["extra"]["n\\xffame"] == 1  # the key survives, escaped, not lost


def test_csv_long_fields_and_unclosed_quotes_lose_no_row(tmp_path):
    long = "y" * 300_000  # past the csv module's default field limit (131,072)
    text = (
        "id,text,label\n"
        f"a,{long},x\n"
        'b,"an unclosed quote,x\n'  # would swallow every row after it
        'c,"a caption\nover two lines",y\n'
        "\n"
        "d,plain caption,y\n"
        'e,"ends the file unclosed,x\n'
    )
    (tmp_path / "manifest.csv").write_text(text)
    manifest, rejects, ds = prepare(tmp_path / "manifest.csv", tmp_path / "out", params_with(tmp_path, max_reject_ratio=0.9))
    assert sorted(r["id"] for r in manifest) == ["a", "c", "d"]
    assert [(r["source"], r["reason"]) for r in rejects] == [("manifest.csv:3", "malformed_row"), ("manifest.csv:8", "malformed_row")]
    assert "unclosed quote" in rejects[0]["detail"]
    assert ds["counts"]["input_rows"] == 5


def test_an_unclosed_quote_that_a_later_quote_happens_to_close_loses_no_row(tmp_path):
    """The quote opened on b's line is closed by c's `"` (into the header's width): the lenient
    csv reader would make b's text of b, c's line and d's line, and c and d would be gone."""
    text = (
        "id,text,label\n"
        'b,"an unclosed quote,x\n'
        "c,plain caption,y\n"
        'd,"a ""quoted"" caption",x\n'
        "e,last,y\n"
    )
    (tmp_path / "manifest.csv").write_text(text)
    manifest, rejects, ds = prepare(tmp_path / "manifest.csv", tmp_path / "out", params_with(tmp_path, max_reject_ratio=0.9))
    assert sorted(r["id"] for r in manifest) == ["c", "d", "e"]
    assert [(r["source"], r["reason"]) for r in rejects] == [("manifest.csv:2", "malformed_row")]
    assert "unclosed quote" in rejects[0]["detail"]
    assert ds["counts"]["input_rows"] == 4


def test_repeated_columns_are_a_one_line_error_before_any_work(tmp_path, capsys):
    import pyarrow as pa

    (tmp_path / "manifest.csv").write_text("id,text,text,label\na,one,two,x\n")
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["one"]), pa.array(["two"])], names=["id", "text", "text"])
    pq.write_table(table, tmp_path / "manifest.parquet")
    for name in ("manifest.csv", "manifest.parquet"):
        code = prepare_main(["--input", str(tmp_path / name), "--output", str(tmp_path / f"out-{name}"), "--params", str(PARAMS)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("mmprep prepare: error: --input") and "'text' appears more than once" in err[-1]
        assert not (tmp_path / f"out-{name}" / "dataset.json").exists()


def test_an_unwritable_output_is_one_line_before_any_work(tmp_path, capsys):
    import os

    (tmp_path / "manifest.jsonl").write_bytes(j(id="a", text="a caption", label="x") + b"\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions
        locked.chmod(0o700)
        locked.rmdir()
        locked.write_text("a file where the output directory should be")
    code = prepare_main(["--input", str(tmp_path / "manifest.jsonl"), "--output", str(locked / "out"), "--params", str(PARAMS)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"mmprep prepare: error: --output {locked / 'out'}: not a writable directory")


def test_a_write_failure_mid_run_is_one_line_and_publishes_nothing(tmp_path, capsys, monkeypatch):
    """A full disk while shards are written (simulated in the in-process runner): one line
    naming the error and the step, exit 1, no dataset.json, no temporary files left."""
    import pipelines.write as write

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write, "write_tar", full)
    lines = [j(id=f"r{i}", text=f"caption number {i}", label="ab"[i % 2]) for i in range(20)]
    out = tmp_path / "out"
    code = prepare_main(["--input", str(write_manifest(tmp_path, lines)), "--output", str(out), "--params", str(PARAMS)])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 1 and len(err) == 1, err
    assert "No space left on device" in err[0] and "WriteShards" in err[0] and "Traceback" not in err[0]
    assert not (out / "dataset.json").exists() and not list(out.glob("*.tmp-*"))


def test_a_manifest_in_utf16_is_a_one_line_error(tmp_path, capsys):
    text = '{"id": "a", "text": "a caption", "label": "x"}\n'
    for name, data in (("manifest.jsonl", text.encode("utf-16")), ("other.csv", "id,text,label\na,cap,x\n".encode("utf-16-be"))):
        (tmp_path / name).write_bytes(data)
        code = prepare_main(["--input", str(tmp_path / name), "--output", str(tmp_path / "out"), "--params", str(PARAMS)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "encoded; convert it to UTF-8" in err[-1] and err[-1].startswith("mmprep prepare: error: --input")


def test_a_fifo_a_dangling_symlink_and_a_directory_as_media_are_rejects_not_hangs(tmp_path):
    import os

    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    for i in range(4):
        (src / f"c{i}.png").write_bytes(png(np.random.default_rng(i)))
    os.mkfifo(src / "pipe.png")  # opening it for reading would wait for a writer forever
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "dir.png").mkdir()
    manifest = write_manifest(tmp_path, [j(id="fifo", image=str(src / "pipe.png")), j(id="dir", image=str(tmp_path / "dir.png")),
                                         j(id="ok", image=str(src / "c0.png"))])
    for given, expected in ((src.parent, {"cat/pipe": "unreadable_file", "cat/gone": "missing_file"}),
                            (manifest, {"fifo": "unreadable_file", "dir": "unreadable_file"})):
        _, rejects, dataset = prepare(given, tmp_path / f"out-{given.name}", params_with(tmp_path, max_reject_ratio=0.9))
        assert {r["id"]: r["reason"] for r in rejects} == expected
        assert dataset["counts"]["input_rows"] == dataset["counts"]["kept"] + len(expected)
        assert any("not a regular file (a FIFO)" in r["detail"] for r in rejects)


def test_an_output_that_is_holds_or_sits_in_the_input_is_refused_before_any_work(tmp_path, capsys):
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    for i in range(3):
        (src / f"c{i}.png").write_bytes(png(np.random.default_rng(i)))
    (tmp_path / "lists").mkdir()
    manifest = write_manifest(tmp_path / "lists", [j(id=f"r{i}", image=str(src / f"c{i}.png"), label="cat") for i in range(3)])
    for given, out, word in ((src.parent, src.parent / "out", "is inside"), (src.parent, src.parent, "is"),
                             (manifest, tmp_path / "lists", "holds"), (manifest, tmp_path, "holds"),
                             (tmp_path / "lists", tmp_path / "lists" / "out", "is inside")):  # the folder holding the manifest
        assert prepare_main(["--input", str(given), "--output", str(out), "--params", str(PARAMS)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--output {out} {word} the input" in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["src", "cat", "c0.png", "c1.png", "c2.png", "lists",
                                                                   "manifest.jsonl"])  # nothing written anywhere


def test_an_unknown_runner_is_one_line_and_leaves_the_output_as_it_was(tmp_path, capsys):
    manifest = write_manifest(tmp_path, [j(id=f"r{i}", text=f"caption number {i}", label="x") for i in range(4)])
    out = tmp_path / "out"
    prepare(manifest, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert prepare_main(["--input", str(manifest), "--output", str(out), "--params", str(PARAMS), "--runner", "FnApiRuner"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmprep prepare: error: --runner FnApiRuner: Unexpected pipeline runner"), err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_csv_without_an_id_column_and_cache_with_no_cache_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "semi.csv").write_text("id;text;label\na;a caption;x\n")
    (tmp_path / "noid.csv").write_text("name,text\na,a caption\n")
    for name, expected in (("semi.csv", "the header has no 'id' column (it has 'id;text;label') (one column holding ';'"),
                           ("noid.csv", "the header has no 'id' column (it has 'name', 'text')")):
        assert prepare_main(["--input", str(tmp_path / name), "--output", str(tmp_path / "out"), "--params", str(PARAMS)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert prepare_main(["--input", str(tmp_path / "noid.csv"), "--output", str(tmp_path / "out"), "--no-cache", "--cache",
                         str(tmp_path / "c")]) == 2
    assert "--cache and --no-cache exclude each other" in capsys.readouterr().err


def test_a_file_uri_is_read_as_the_local_path_it_names(tmp_path):
    from urllib.parse import quote

    (tmp_path / "a photo.png").write_bytes(png(np.random.default_rng(1)))
    manifest = write_manifest(tmp_path, [j(id="uri", image="file://" + quote(str(tmp_path / "a photo.png")), label="x"),
                                         j(id="host", image="file://elsewhere/a.png", text="a caption", label="x"),
                                         j(id="plain", image=str(tmp_path / "a photo.png"), text="another caption", label="x")])
    rows, rejects, _ = prepare(manifest, tmp_path / "out", params_with(tmp_path, max_reject_ratio=0.9))
    assert {r["id"]: r["reason"] for r in rejects} == {"host": "unreadable_file"}
    by_id = {r["id"]: r for r in rows}
    assert by_id["uri"]["image_sha256"] == by_id["plain"]["image_sha256"] is not None
