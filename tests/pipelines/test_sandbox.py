"""One row's processing in a child process: a slow file is a `timeout` reject, a hungry one
`out_of_memory`, a crash `processing_error` — and the next row is processed as usual."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import cv2
import numpy as np
import pytest

from mmprep import staged
from mmprep.config import PrepareConfig
from mmprep.records import RawRow, RecordError
from pipelines.sandbox import Sandbox

ROW = RawRow(source="m.jsonl:1", order=0, id="r", image="/x.png", label="a")


def png(h: int, w: int, channels: int = 3) -> bytes:
    rng = np.random.default_rng(h)
    return cv2.imencode(".png", rng.integers(0, 255, (h, w, channels), dtype=np.uint8))[1].tobytes()


def ok(sandbox: Sandbox) -> bool:
    partial = sandbox.run(ROW, {"image": png(64, 80)}, "n" * 32)
    data = staged.complete(partial, "n" * 32, "r", ROW.source, 0, sandbox.cfg.text.max_tokens)  # as the worker does
    found = staged.peek(data, "n" * 32, "r", ROW.source, 0, sandbox.cfg.text.max_tokens)
    return isinstance(found, tuple) and found[0].startswith("r-")


@pytest.fixture
def big_png() -> bytes:
    return png(3000, 4000, 4)  # 12 MP with alpha: ~0.2 s and ~200 MB to decode and composite


def test_a_slow_row_is_a_timeout_and_the_next_row_is_fine(big_png):
    sandbox = Sandbox(replace(PrepareConfig(), row_timeout=0.002))
    try:
        err = sandbox.run(ROW, {"image": big_png}, "n" * 32)
        assert isinstance(err, RecordError) and err.reason == "timeout" and "row_timeout=0.002s" in err.detail
        sandbox.cfg = replace(sandbox.cfg, row_timeout=60)
        assert ok(sandbox)  # a fresh child took over
    finally:
        sandbox.close()


def test_a_row_needing_more_memory_than_allowed_is_out_of_memory(big_png):
    sandbox = Sandbox(replace(PrepareConfig(), row_memory_mb=50))
    try:
        data = sandbox.run(ROW, {"image": big_png}, "n" * 32)
        found = staged.peek(data, "n" * 32, "r", ROW.source, 0, sandbox.cfg.text.max_tokens)
        assert found.reason == "out_of_memory" and "row_memory_mb=50" in found.detail
        assert ok(sandbox)  # the same child goes on
    finally:
        sandbox.close()


def test_a_crashing_decoder_costs_one_row(big_png):
    """The child killed mid-row (what a segfault or the kernel's OOM killer does)."""
    sandbox = Sandbox(replace(PrepareConfig(), row_timeout=60))
    try:
        assert ok(sandbox)
        child = sandbox.proc
        threading.Thread(target=lambda: (time.sleep(0.02), child.kill()), daemon=True).start()
        err = sandbox.run(ROW, {"image": big_png * 1}, "n" * 32)
        assert isinstance(err, RecordError) and err.reason == "processing_error" and "SIGKILL" in err.detail
        assert ok(sandbox)
    finally:
        sandbox.close()
