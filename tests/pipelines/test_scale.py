"""Prepare at scale: input ranges read in parallel, the processed-row cache, progress."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmprep.democorpus import write_demo_corpus
from mmprep.manifest import parse_record
from pipelines import read
from pipelines.prepare import main as prepare_main
from pipelines.progress import Reporter, Window, line

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def rows_of(plan: read.Plan) -> list[tuple]:
    out = []
    for rng in plan.ranges:
        for r in read.read_range(rng):
            out.append((r.source, r.order, r.id, getattr(r, "text", None), getattr(r, "reason", None)))
    return out


def test_jsonl_ranges_cover_every_line_once_with_its_line_number(tmp_path):
    lines = [json.dumps({"id": f"r{i}", "text": f"caption {i}"}) for i in range(700)]
    lines[5] = ""  # blank lines are not rows
    lines[9] = "{broken"
    data = ("\ufeff" + "\n".join(lines)).encode()  # a BOM, and no newline after the last row
    path = tmp_path / "m.jsonl"
    path.write_bytes(data)
    plan = read.plan_input("manifest", str(path))
    assert len(plan.ranges) > 1
    got = rows_of(plan)
    expected = [(f"m.jsonl:{i + 1}", i, f"r{i}") for i in range(700) if i not in (5, 9)]
    assert [(s, o, i) for s, o, i, _, reason in got if reason is None] == expected
    assert [(s, reason) for s, _, _, _, reason in got if reason] == [("m.jsonl:10", "malformed_row")]


def test_csv_ranges_keep_quoted_newlines_and_line_numbers(tmp_path):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["id", "text", "label"])
    for i in range(300):
        writer.writerow([f"r{i}", f"line one\nline two of {i}" if i % 7 == 0 else f"caption {i}", "a"])
    path = tmp_path / "m.csv"
    path.write_text(buf.getvalue(), newline="")
    plan = read.plan_input("manifest", str(path))
    assert len(plan.ranges) > 1 and plan.rows == 300
    reference, reader = [], csv.reader(io.StringIO(buf.getvalue(), newline=""))
    header, first_line = next(reader), 2
    for order, values in enumerate(reader):  # a row's source names the line it starts on
        row = parse_record(dict(zip(header, values, strict=True)), f"m.csv:{first_line}", order, str(tmp_path))
        reference.append((row.source, row.order, row.id, row.text, None))
        first_line = reader.line_num + 1
    assert rows_of(plan) == reference


def test_parquet_ranges_follow_row_groups(tmp_path):
    table = pa.Table.from_pylist([{"id": f"r{i}", "text": f"caption {i}"} for i in range(250)])
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=10)
    plan = read.plan_input("manifest", str(path))
    assert plan.rows == 250 and 1 < len(plan.ranges) <= 25
    assert [(s, o, i) for s, o, i, _, _ in rows_of(plan)] == [(f"m.parquet:{i + 1}", i, f"r{i}") for i in range(250)]


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> tuple[Path, Path, int]:
    """A demo corpus as two manifests: its first rows, and all of them (rows appended)."""
    root = tmp_path_factory.mktemp("grown")
    write_demo_corpus(root, samples=240, seed=5)
    lines = [x for x in (root / "manifest.jsonl").read_bytes().splitlines(keepends=True) if x.strip()]
    (root / "before.jsonl").write_bytes(b"".join(lines[:220]))
    (root / "after.jsonl").write_bytes(b"".join(lines))
    return root / "before.jsonl", root / "after.jsonl", len(lines) - 220


def counters(err: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^\s+([\w.]+)\s+(\d+)$", err, re.M)}


def run(capsys, manifest: Path, out: Path, *extra: str) -> dict[str, int]:
    capsys.readouterr()
    assert prepare_main(["--input", str(manifest), "--output", str(out), "--params", str(PARAMS), *extra]) == 0
    return counters(capsys.readouterr().err)


def test_a_rerun_after_adding_rows_processes_only_them_and_writes_the_same_bytes(grown, tmp_path, capsys):
    before, after, added = grown
    cache = str(tmp_path / "cache")
    first = run(capsys, before, tmp_path / "out", "--cache", cache)
    assert first["process.processed"] > 200 and first.get("process.reused", 0) == 0
    again = run(capsys, after, tmp_path / "out", "--cache", cache)
    assert 0 < again["process.processed"] <= added  # only the new rows
    assert again["process.reused"] == first["process.processed"]
    scratch = run(capsys, after, tmp_path / "scratch", "--no-cache")
    assert scratch.get("process.reused", 0) == 0
    assert digests(tmp_path / "out") == digests(tmp_path / "scratch")
    assert not (tmp_path / "scratch" / ".mmprep-work").exists()


def test_torn_or_corrupt_cache_entries_are_processed_again(grown, tmp_path, capsys):
    before, _, _ = grown
    cache = tmp_path / "cache"
    run(capsys, before, tmp_path / "a", "--cache", str(cache))
    packs = sorted(cache.rglob("*.pack"))
    torn, flipped = packs[1], packs[3]
    def entries(pack):  # (name, offset, length) lines; "m …" lines remember media hashes
        return [line.split() for line in pack.with_suffix(".idx").read_text().splitlines() if not line.startswith("m ")]

    torn.write_bytes(torn.read_bytes()[: int(entries(torn)[-1][1]) + 100])  # a kill while writing: the last entry is cut
    first = entries(flipped)[0]
    data = bytearray(flipped.read_bytes())
    data[int(first[2]) // 2] ^= 0xFF  # a flipped bit in the pack's first entry
    flipped.write_bytes(bytes(data))
    again = run(capsys, before, tmp_path / "b", "--cache", str(cache))
    assert again["process.processed"] == 2
    assert digests(tmp_path / "b") == digests(tmp_path / "a")


def test_changed_params_reuse_nothing_they_affect(grown, tmp_path, capsys):
    before, _, _ = grown
    cache = str(tmp_path / "cache")
    run(capsys, before, tmp_path / "a", "--cache", cache)
    params = json.loads(json.dumps(__import__("yaml").safe_load(PARAMS.read_text())))
    params["prepare"]["image"]["size"] = 48
    (tmp_path / "p.yaml").write_text(json.dumps(params))
    capsys.readouterr()
    argv = ["--input", str(before), "--output", str(tmp_path / "b"), "--params", str(tmp_path / "p.yaml"), "--cache", cache]
    assert prepare_main(argv) == 0
    assert counters(capsys.readouterr().err).get("process.reused", 0) == 0
    params["prepare"]["split_salt"] = "another"  # a global param: every row is reused
    (tmp_path / "p.yaml").write_text(json.dumps(params))
    assert prepare_main([*argv[:3], str(tmp_path / "c"), *argv[4:]]) == 0
    assert counters(capsys.readouterr().err).get("process.processed", 0) == 0


def test_progress_is_a_windowed_rate_with_an_eta(tmp_path):
    w = Window(seconds=30)
    assert w.add(0.0, 0) is None
    assert w.add(10.0, 100) == pytest.approx(10)  # start-up: imports, JIT
    assert w.add(40.0, 1300) == pytest.approx(1200 / 30)  # the last 30 s only
    assert w.add(70.0, 3100) == pytest.approx(1800 / 30)
    assert line(2500, 10000, 40.0) == (
        "[mmprep prepare] processed 2,500/10,000 rows (25%), 40 rows/s over the last 30s, ETA 3m08s"
    )
    (tmp_path / "worker-1").write_text("120")
    (tmp_path / "worker-2").write_text("80")
    (tmp_path / "worker-3.tmp").write_text("999")  # being replaced: ignored
    stream = io.StringIO()
    with Reporter(str(tmp_path), 1000, every=0.05, stream=stream) as reporter:
        assert reporter.done() == 200
        import time

        time.sleep(0.3)
    assert "processed 200/1,000 rows (20%)" in stream.getvalue()


def test_a_changed_media_file_is_processed_again_and_a_touched_one_is_not(tmp_path, capsys):
    import os
    import shutil

    root = tmp_path / "corpus"
    write_demo_corpus(root, samples=60, seed=8)
    manifest = root / "manifest.jsonl"
    cache = str(tmp_path / "cache")
    run(capsys, manifest, tmp_path / "a", "--cache", cache)
    kept = pq.read_table(tmp_path / "a" / "manifest.parquet").to_pylist()
    by_id = {}
    for raw in manifest.read_bytes().splitlines():
        try:
            row = json.loads(raw)
        except ValueError:
            continue  # the demo's malformed rows
        by_id[row.get("id")] = row
    images = [by_id[r["id"]]["image"] for r in kept if r["has_image"] and by_id[r["id"]]["image"].endswith(".png")]
    touched, changed = root / images[0], root / images[1]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # same bytes, new mtime
    shutil.copyfile(root / images[2], changed)  # new bytes at the same path
    again = run(capsys, manifest, tmp_path / "b", "--cache", cache)
    assert again["process.processed"] == 1
    run(capsys, manifest, tmp_path / "scratch", "--no-cache")
    assert digests(tmp_path / "b") == digests(tmp_path / "scratch")


def test_an_empty_manifest_gives_an_empty_dataset(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n\n")
    assert prepare_main(["--input", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "out"), "--no-cache"]) == 0
    counts = json.loads((tmp_path / "out" / "dataset.json").read_text())["counts"]
    assert (counts["input_rows"], counts["kept"], counts["rejected"]) == (0, 0, 0)
    assert pq.read_table(tmp_path / "out" / "manifest.parquet").num_rows == 0


def test_an_unwritable_cache_is_a_one_line_error_before_any_work(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hello"}\n')
    (tmp_path / "file").write_text("not a directory")
    argv = ["--input", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "out"), "--cache", str(tmp_path / "file" / "c")]
    assert prepare_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmprep prepare: error: --cache ") and "not a writable directory" in err[-1]
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_a_row_kept_without_its_missing_file_is_processed_again_once_the_file_exists(tmp_path, capsys):
    """on_bad_modality: drop keeps a row whose image is missing; the cache must not keep
    serving that image-less sample after the file appears (nor a stale reject of it)."""
    import numpy as np

    from tests.pipelines.test_hostile import params_with, png, wav

    rng = np.random.default_rng(2)
    (tmp_path / "a.wav").write_bytes(wav(rng))
    (tmp_path / "b.wav").write_bytes(wav(rng))
    lines = [json.dumps({"id": "late", "image": "late.png", "audio": "a.wav", "text": "a caption", "label": "x"}),
             json.dumps({"id": "ok", "audio": "b.wav", "text": "another caption", "label": "y"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    params = params_with(tmp_path, on_bad_modality="drop")
    cache = str(tmp_path / "cache")

    def prepared(out: str) -> tuple[dict, dict[str, dict]]:
        capsys.readouterr()
        argv = ["--input", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / out), "--params", str(params), "--cache", cache]
        assert prepare_main(argv) == 0
        rows = {r["id"]: r for r in pq.read_table(tmp_path / out / "manifest.parquet").to_pylist()}
        return counters(capsys.readouterr().err), rows

    first, rows = prepared("a")
    assert (rows["late"]["has_image"], rows["late"]["has_audio"]) == (False, True)
    again, _ = prepared("b")
    assert again.get("process.processed", 0) == 0  # the same missing file: reused
    (tmp_path / "late.png").write_bytes(png(rng))
    after, rows = prepared("c")
    assert after["process.processed"] == 1 and rows["late"]["has_image"]


def test_a_rerun_reuses_whole_unchanged_ranges_and_rebuilds_the_rest(tmp_path, capsys):
    """Appending rows keeps every earlier range as it was: those are reused whole (no row
    parsed or looked up); an edited line costs its own range only, a changed pack its ranges."""
    root = tmp_path / "corpus"
    write_demo_corpus(root, samples=400, seed=3)  # with its dirt: missing files, bad rows (still missing: still reusable)
    manifest = root / "manifest.jsonl"  # one manifest that grows (its name is in every row's source)
    lines = [x for x in manifest.read_bytes().splitlines(keepends=True) if x.strip()]
    manifest.write_bytes(b"".join(lines[:380]))
    cache = str(tmp_path / "cache")
    first = run(capsys, manifest, tmp_path / "a", "--cache", cache)
    assert first.get("process.ranges_reused", 0) == 0
    manifest.write_bytes(b"".join(lines))  # 20 rows appended
    ranges = len(read.plan_input("manifest", str(manifest)).ranges)
    again = run(capsys, manifest, tmp_path / "b", "--cache", cache)
    assert ranges - 3 <= again["process.ranges_reused"] < ranges  # the last range(s) hold the new rows
    assert again["process.processed"] <= 20
    assert run(capsys, manifest, tmp_path / "b2", "--cache", cache)["process.ranges_reused"] == ranges
    run(capsys, manifest, tmp_path / "scratch-b", "--no-cache")
    edited = list(lines)
    edited[5] = edited[5].replace(b'"label": "', b'"label": "x')  # another label on row 6: its range is rebuilt
    assert edited[5] != lines[5]
    manifest.write_bytes(b"".join(edited))
    third = run(capsys, manifest, tmp_path / "c", "--cache", cache)
    assert third["process.ranges_reused"] == ranges - 1 and third["process.processed"] == 1
    run(capsys, manifest, tmp_path / "scratch-c", "--no-cache")
    for name in ("b", "b2", "c"):
        assert digests(tmp_path / name) == digests(tmp_path / f"scratch-{name[0]}")


def test_local_worker_processes_start_without_pandas(tmp_path):
    """`--workers 2` runs Beam's SDK worker through pipelines.worker (pandas blocked: ~0.5 s of
    each worker's start-up), in separate processes, with Beam's results."""
    import os

    import apache_beam as beam
    from apache_beam.testing.util import assert_that

    from pipelines.prepare import local_runner
    from pipelines.prepare import pipeline_options as options

    opts = options([], 2)
    runner = local_runner(opts)
    assert runner is not None and local_runner(options(["--runner", "PortableRunner"], 2)) is None
    assert local_runner(options([], 1)) is None  # one worker runs in this process

    driver = os.getpid()

    def check(seen):  # runs in a worker too: the driver's pid is captured
        pids = {pid for pid, _ in seen}
        assert len(seen) == 40 and driver not in pids, pids
        assert all(blocked for _, blocked in seen), seen

    probe = lambda _: (__import__("os").getpid(), "pandas" not in __import__("sys").modules)  # noqa: E731
    with beam.Pipeline(runner, options=opts) as p:
        assert_that(p | beam.Create(range(40)) | beam.Reshuffle() | beam.Map(probe), check)
