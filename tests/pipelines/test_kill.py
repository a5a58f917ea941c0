"""kill -9 of a running prepare, then a rerun: identical bytes, no temporary files, no work
directory, no process left behind (benchmarks/kill_bench.py runs 20 trials)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("kill_bench", ROOT / "benchmarks" / "kill_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun(tmp_path):
    bench = _bench()
    params = ROOT / "params.yaml"
    manifest, reference, seconds = bench.setup(tmp_path, 150, params)
    rng = random.Random(7)
    for share in (0.15, rng.uniform(0.3, 0.6), 0.85):
        res = bench.trial(manifest, tmp_path / "out", tmp_path / "cache", params, share * seconds, reference)
        assert res["rerun_ok"] and res["identical"], res
        assert res["debris"] == [] and res["lingering"] == [], res
