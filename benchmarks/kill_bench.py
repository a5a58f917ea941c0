"""kill -9 at a random moment, then run again: the same bytes, no debris (run by hand; the
README states the result; tests/pipelines/test_kill.py runs a few trials).

    python benchmarks/kill_bench.py --trials 20 --samples 300

One reference run writes the demo corpus's dataset. Each trial starts `mmprep prepare` (two
Beam workers, sharing one cache across all trials, as users' runs do), kills the driver with
SIGKILL after a random share of the reference run's time, runs prepare again to the end and
checks: every output file byte-identical to the reference, no temporary files in the output
or the cache, no work directory left, no process of the killed run still alive.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MM = [sys.executable, "-m", "mmprep.cli"]

from pipelines.reaper import descendants, proc_stat  # noqa: E402


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def prepare(manifest: Path, out: Path, cache: Path, params: Path) -> list[str]:
    return [*MM, "prepare", "--input", str(manifest), "--output", str(out), "--params", str(params), "--workers", "2",
            "--cache", str(cache)]


def debris(out: Path, cache: Path) -> list[str]:
    left = [str(p) for p in out.rglob("*.tmp-*")] + [str(p) for p in cache.rglob("*.tmp-*")]
    left += [str(p) for p in cache.rglob(".run-*.lock")]
    if (out / ".mmprep-work").exists():
        left.append(str(out / ".mmprep-work"))
    return left


def trial(manifest: Path, out: Path, cache: Path, params: Path, at: float, reference: dict[str, str]) -> dict:
    proc = subprocess.Popen(prepare(manifest, out, cache, params), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(at)
    family = list(descendants(proc.pid))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(proc_stat(p) for p in family):
        time.sleep(0.2)
    lingering = [p for p in family if proc_stat(p)]
    for p in lingering:
        os.kill(p, signal.SIGKILL)
    done = subprocess.run(prepare(manifest, out, cache, params), capture_output=True, text=True)
    same = done.returncode == 0 and digests(out) == reference
    return {"killed_at": at, "rerun_ok": done.returncode == 0, "identical": same, "debris": debris(out, cache),
            "lingering": lingering, "stderr": done.stderr[-500:] if done.returncode else ""}


def setup(tmp: Path, samples: int, params: Path) -> tuple[Path, dict[str, str], float]:
    subprocess.run([*MM, "demo-corpus", str(tmp / "corpus"), "--samples", str(samples), "--params", str(params)],
                   check=True, capture_output=True)
    started = time.monotonic()
    subprocess.run(prepare(tmp / "corpus" / "manifest.jsonl", tmp / "reference", tmp / "ref-cache", params),
                   check=True, capture_output=True)
    return tmp / "corpus" / "manifest.jsonl", digests(tmp / "reference"), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = parser.parse_args()
    r = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        manifest, reference, seconds = setup(tmp, args.samples, Path(args.params))
        print(f"reference run: {seconds:.1f}s, {len(reference)} files")
        bad = 0
        for i in range(args.trials):
            res = trial(manifest, tmp / "out", tmp / "cache", Path(args.params), r.uniform(0.05, 1.0) * seconds, reference)
            ok = res["identical"] and not res["debris"] and not res["lingering"]
            bad += not ok
            print(f"trial {i + 1:2d}: killed at {res['killed_at']:5.2f}s → rerun {'identical' if res['identical'] else 'DIFFERENT'}, "
                  f"debris {len(res['debris'])}, lingering processes {len(res['lingering'])}{'' if ok else '  ' + str(res)}", flush=True)
        print(f"\n{args.trials - bad}/{args.trials} trials: identical bytes, no debris, no lingering process")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
