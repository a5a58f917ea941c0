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
