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


def test_a_local_worker_exits_at_once_after_teardown_but_keeps_a_failure_status():
    import subprocess
    import sys

    # what a Beam worker process of a local multi-process run does when it shuts down: a DoFn's
    # teardown calls exit_fast_when_done(); exit handlers registered before it are skipped
    code = (
        "import atexit, os, sys\n"
        "atexit.register(lambda: print('finalized the slow way'))\n"
        "from pipelines import reaper\n"
        "os.environ[reaper.MARK] = (str(os.getpid()) if sys.argv[1] == 'driver' else '1') + ':0'\n"
        "reaper.exit_fast_when_done()\n"
        "if sys.argv[2] == 'raise':\n"
        "    raise ValueError('the worker failed')\n"
    )

    def run(who: str, how: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, who, how], capture_output=True, text=True, cwd=ROOT, timeout=60)

    worker = run("worker", "ok")
    assert worker.returncode == 0 and "slow way" not in worker.stdout
    failed = run("worker", "raise")  # an error still ends the process as usual, with its status
    assert failed.returncode == 1 and "the worker failed" in failed.stderr and "slow way" in failed.stdout
    driver = run("driver", "ok")  # the driver itself (and an in-process worker) finalizes as usual
    assert driver.returncode == 0 and "slow way" in driver.stdout
