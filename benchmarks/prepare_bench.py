"""Prepare throughput and memory on the demo corpus (run by hand; results go in the README).

    python benchmarks/prepare_bench.py --samples 2000 --workers 1 2

For each worker count: wall time, rows/s, and the peak RSS of the driver plus its
worker processes (sampled every 0.2 s with psutil if installed, else /proc).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_tree(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total


def measure(cmd: list[str]) -> tuple[float, int]:
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, rss_tree(proc.pid))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = proc.wait()
    thread.join()
    if code != 0:
        raise SystemExit(f"command failed ({code}): {' '.join(cmd)}")
    return time.monotonic() - started, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        mm = [sys.executable, "-m", "mmprep.cli"]
        seconds, _ = measure([*mm, "demo-corpus", str(corpus), "--samples", str(args.samples)])
        rows = sum(1 for line in (corpus / "manifest.jsonl").read_bytes().splitlines() if line.strip())
        print(f"demo-corpus: {rows} rows in {seconds:.1f}s")
        for workers in args.workers:
            out = Path(tmp) / f"out{workers}"
            cmd = [*mm, "prepare", "--input", str(corpus / "manifest.jsonl"), "--output", str(out),
                   "--params", str(ROOT / "params.yaml"), "--workers", str(workers)]
            seconds, peak = measure(cmd)
            print(f"prepare --workers {workers}: {seconds:.1f}s, {rows / seconds:.0f} rows/s, peak RSS {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
