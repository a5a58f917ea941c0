"""DoFns called directly: the safety net that keeps one exotic file from stopping a job."""

from dataclasses import replace

import pipelines.steps as steps
from mmprep.config import PrepareConfig
from mmprep.records import RawRow, Reject


def test_an_unexpected_error_becomes_a_processing_error_reject(monkeypatch, tmp_path):
    def explode(row, loaded, cfg):
        raise MemoryError("decoder blew up")

    monkeypatch.setattr(steps, "process_row", explode)
    # in-process (row_timeout 0); in the child process the same rule holds (test_sandbox.py)
    cfg = replace(PrepareConfig(), row_timeout=0)
    fn = steps.ProcessRangeFn(cfg, str(tmp_path / "cache"), reuse=True, work=str(tmp_path / "work"))
    fn.setup()
    staged, results = [], [None]
    fn.process_rows([(0, *fn.look_up(RawRow(source="m.jsonl:1", order=0, id="x", text="hello")))], results, staged)
    out = results[0]
    assert isinstance(out, Reject)  # Separate routes it to the rejects by type
    assert (out.reason, out.stage, out.detail) == ("processing_error", "process", "MemoryError: decoder blew up")
    assert staged == []  # an unexpected error is never cached: the next run tries again


def _ranges_of(tmp_path, rows: int):
    import json

    from pipelines.read import plan_input

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "text": f"row number {i} says hello", "label": "a"}) + "\n" for i in range(rows)))
    return plan_input("manifest", str(manifest)).ranges


def test_every_range_is_emitted_once_whether_it_ends_in_process_or_in_finish_bundle(tmp_path):
    """A range's last batches overlap the next range: its element then comes from a later
    process() call or from finish_bundle (as a WindowedValue). Without overlap (the DaskRunner
    drops finish_bundle's output) each range comes from its own process() call."""
    from apache_beam.utils.windowed_value import WindowedValue

    ranges = _ranges_of(tmp_path, 640)
    assert len(ranges) > 2
    for overlap in (True, False):
        fn = steps.ProcessRangeFn(PrepareConfig(), str(tmp_path / "cache"), reuse=False, work=str(tmp_path / f"work-{overlap}"),
                                  overlap=overlap)
        fn.setup()
        per_call = [list(fn.process(r)) for r in ranges]
        late = list(fn.finish_bundle())
        fn.teardown()
        assert all(isinstance(w, WindowedValue) for w in late)
        emitted = [o for outs in per_call for o in outs] + [w.value for w in late]
        assert sorted(o["part"] for o in emitted) == sorted(
            str(tmp_path / f"work-{overlap}" / "index" / f"{r.order:012d}.parquet") for r in ranges)
        assert sum(o["rows"] for o in emitted) == 640
        if overlap:
            assert late and not per_call[0]  # the first range ends after process() returned
        else:
            assert not late and all(len(outs) == 1 for outs in per_call)


def test_index_links_parse_to_their_64_bit_values_without_python_objects():
    import pyarrow as pa
    import pytest

    from pipelines.plan import _hex64

    hashes = ["d6326f983b7ccf06", None, "FFFFFFFFFFFFFFFF", "0000000000000001"]
    column = pa.chunked_array([pa.array(hashes[:2]), pa.array(hashes[2:])]).slice(1)  # chunked, with an offset
    values, valid = _hex64(column)
    assert valid.tolist() == [False, True, True]
    assert values[1:].tolist() == [int(h, 16) for h in hashes[2:]]
    for bad in ("d6326f983b7ccf0g", "abc"):  # a damaged index part is an error, never a wrong link
        with pytest.raises((ValueError, pa.ArrowInvalid)):
            _hex64(pa.chunked_array([pa.array([bad])]))


def test_a_reused_range_depends_on_the_parsing_code(tmp_path, monkeypatch):
    """A whole range is reused by its bytes; what the parser made of them (rows, read rejects)
    must not outlive a change to the parsing code (mmprep/manifest.py, pipelines/read.py)."""
    from pipelines import steps
    from pipelines.read import Range

    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "t"}\n')
    rng = Range("jsonl", str(tmp_path / "m.jsonl"), 0, 25, 1, 0)
    before = steps.range_key(rng, "ctx", 32)
    monkeypatch.setattr(steps, "read_code_digest", lambda: "other parsing code")
    assert steps.range_key(rng, "ctx", 32) != before
