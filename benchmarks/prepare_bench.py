"""Prepare at scale, measured side by side in one run (by hand; the README table comes from it).

    python benchmarks/prepare_bench.py --samples 2000 --factor 8 --workers 1 2 [--video 600]

On one demo corpus of about factor·N·1.01 rows it measures
  * `mmprep prepare` (no cache) on the first N and the first factor·N rows with each worker
    count: wall time, rows/s, peak RSS of the whole process tree (driver + Beam workers),
    and the marginal peak RSS per input row, (RSS(factor·N) − RSS(N)) / ((factor−1)·N);
  * the same per-row kernels in a bare multiprocessing loop on factor·N rows (parse, load,
    decode, resize/crop, JPEG, phash, resample, log-mel, NFKC, SentencePiece, tar), one
    process per worker with single-threaded numerical libraries: prepare's share of it;
  * an incremental rerun: one manifest of factor·N rows with a cache, then the same manifest
    with 1 % more rows appended, with the same cache, against a run from scratch on all rows:
    time share and identical bytes;
  * identical bytes between worker counts;
  * with --video ROWS: prepare on a corpus of demo clips, and the decode cost of one clip
    (benchmarks/video_bench.py measures long and HD clips).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}


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


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, rss_tree(proc.pid))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return time.monotonic() - started, peak


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


# ---- the bare loop: the same kernels, no Beam -------------------------------------------

_STATE: dict = {}


def _init(params: str, model: bytes) -> None:
    from mmprep.config import load_params
    from mmprep.process import limit_threads
    from mmprep.tokenizer import Tokenizer

    limit_threads()
    _STATE["cfg"] = load_params(params).prepare
    _STATE["tok"] = Tokenizer.from_bytes(model)


def _bare_chunk(task: tuple[str, int, list[bytes], str]) -> int:
    from mmprep.manifest import parse_jsonl_line
    from mmprep.process import process_row
    from mmprep.records import Sample
    from mmprep.shards import sample_members, write_tar
    from pipelines.read import load_media

    base, first, lines, tar_path = task
    cfg, tok = _STATE["cfg"], _STATE["tok"]

    def samples():
        for i, line in enumerate(lines):
            row = parse_jsonl_line(line, f"m:{first + i}", first + i, base)
            if not hasattr(row, "image"):
                continue
            s = process_row(row, load_media(row, cfg.max_file_bytes), cfg)
            if not isinstance(s, Sample):
                continue
            tokens = tok.encode(s.text, cfg.text.max_tokens) if s.text is not None else None
            yield s.key, sample_members(s.key, meta=s.meta, jpg=s.jpg, mel=s.mel, tokens=tokens, text=s.text, label_id=0)

    with open(tar_path, "wb") as f:
        write_tar(f, samples())
    return len(lines)


def bare_loop(manifest: Path, workers: int, params: str, model: bytes, tmp: Path) -> tuple[float, float]:
    """Rows/s of the kernels alone (timed once the pool's processes have imported everything)
    and of the loop as a whole program (process start-up and imports included, as prepare's
    wall time includes its own)."""
    import multiprocessing as mp

    program = time.monotonic()
    lines = [x for x in manifest.read_bytes().splitlines() if x.strip()]
    tasks = [(str(manifest.parent), i, lines[i : i + 250], str(tmp / f"bare-{workers}-{i}.tar")) for i in range(0, len(lines), 250)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init, initargs=(params, model)) as pool:
        pool.map(_init_wait, range(workers))
        started = time.monotonic()
        done = sum(pool.imap_unordered(_bare_chunk, tasks))
        seconds = time.monotonic() - started
    return done / seconds, done / (time.monotonic() - program)


def _init_wait(_: int) -> None:
    import mmprep.audio  # noqa: F401 - imported in every worker before timing
    import mmprep.image  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="N")
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--repeat", type=int, default=2, help="interleaved repeats; the best of them is reported")
    parser.add_argument("--corpus", default=None, help="keep the generated corpus here (reused when it exists)")
    parser.add_argument("--video", type=int, default=0, help="also prepare a corpus of this many video rows (demo clips)")
    args = parser.parse_args()
    n, big = args.samples, args.samples * args.factor
    env = {**os.environ, **ONE_THREAD}
    mm = [sys.executable, "-m", "mmprep.cli"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = Path(args.corpus) if args.corpus else tmp / "corpus"
        seconds = 0.0
        if not (corpus / "manifest.jsonl").exists():
            seconds, _ = measure([*mm, "demo-corpus", str(corpus), "--samples", str(int(big * 1.01) + 1), "--params", args.params])
        lines = [x for x in (corpus / "manifest.jsonl").read_bytes().splitlines(keepends=True) if x.strip()]
        manifests = {}
        for name, count in (("small", n), ("big", big), ("grown", len(lines))):
            manifests[name] = corpus / f"{name}.jsonl"
            manifests[name].write_bytes(b"".join(lines[:count]))
        print(f"demo corpus: {len(lines)} rows in {seconds:.0f}s; N={n}, {args.factor}N={big}, grown={len(lines)}")

        def prepare(name: str, out: str, workers: int, *cache: str) -> tuple[float, int]:
            cmd = [*mm, "prepare", "--input", str(manifests[name]), "--output", str(tmp / out), "--params", args.params,
                   "--workers", str(workers), *(cache or ("--no-cache",))]
            return measure(cmd, env)

        small: dict[int, tuple[float, int]] = {}
        for workers in args.workers:
            small[workers] = prepare("small", f"small-{workers}", workers)
            print(f"prepare {n:>6} rows, {workers} worker(s): {small[workers][0]:6.1f}s, peak RSS {small[workers][1] / 2**20:6.0f} MiB", flush=True)
        model = (tmp / f"small-{args.workers[0]}" / "tokenizer.model").read_bytes()
        # the machine is shared and noisy: bare loop and prepare side by side, interleaved, best of --repeat
        runs: dict[int, list[tuple[float, int]]] = {w: [] for w in args.workers}
        bare: dict[int, list[float]] = {w: [] for w in args.workers}
        whole: dict[int, list[float]] = {w: [] for w in args.workers}
        for rep in range(args.repeat):
            for workers in args.workers:
                kernels, program = bare_loop(manifests["big"], workers, args.params, model, tmp)
                bare[workers].append(kernels)
                whole[workers].append(program)
                runs[workers].append(prepare("big", f"big-{workers}", workers))
                seconds, peak = runs[workers][-1]
                print(f"[{rep + 1}/{args.repeat}] {big} rows, {workers} worker(s): bare loop {bare[workers][-1]:6.1f} rows/s "
                      f"({whole[workers][-1]:.1f} as a program), "
                      f"prepare {big / seconds:6.1f} rows/s ({seconds:.1f}s), peak RSS {peak / 2**20:.0f} MiB", flush=True)
        results = {("small", w): small[w] for w in args.workers}
        results.update({("big", w): (min(t for t, _ in runs[w]), min(p for _, p in runs[w])) for w in args.workers})
        best_bare = {w: max(bare[w]) for w in args.workers}
        best_whole = {w: max(whole[w]) for w in args.workers}

        # one manifest that grows, as a corpus does (its name is part of every row's `source`):
        # the full run on its first factor·N rows, then a rerun once 1 % more rows are appended
        incremental: dict[int, tuple[float, float, bool]] = {}
        growing = corpus / "growing.jsonl"
        manifests["growing"] = growing
        for w in args.workers:
            cache = str(tmp / f"cache-{w}")
            growing.write_bytes(manifests["big"].read_bytes())
            prepare("growing", f"inc-{w}", w, "--cache", cache + "-full")
            growing.write_bytes(manifests["grown"].read_bytes())
            reruns, scratches = [], []
            for _ in range(args.repeat):  # each rerun starts from the cache the full run left
                shutil.rmtree(cache, ignore_errors=True)
                shutil.copytree(cache + "-full", cache)
                shutil.rmtree(tmp / f"inc-{w}", ignore_errors=True)
                reruns.append(prepare("growing", f"inc-{w}", w, "--cache", cache)[0])
                scratches.append(prepare("growing", f"scratch-{w}", w)[0])
            same = digests(tmp / f"inc-{w}") == digests(tmp / f"scratch-{w}")
            incremental[w] = (min(reruns), min(scratches), same)
            print(f"rerun after adding {len(lines) - big} rows, {w} worker(s): {min(reruns):.1f}s vs {min(scratches):.1f}s from scratch", flush=True)
        same_workers = len({tuple(digests(tmp / f"big-{x}").items()) for x in args.workers}) == 1

        print("\n| figure | value |\n|---|---|")
        for workers in args.workers:
            (_, rss_n), (t_b, rss_b) = results[("small", workers)], results[("big", workers)]
            marginal = (rss_b - rss_n) / (big - n)
            print(f"| peak RSS, {workers} worker(s): {n} → {big} rows | {rss_n / 2**20:.0f} → {rss_b / 2**20:.0f} MiB |")
            print(f"| marginal peak RSS per input row, {workers} worker(s) | {marginal / 1024:.2f} KB |")
            print(f"| rows/s at {big} rows, {workers} worker(s) | {big / t_b:.1f} |")
            print(f"| bare loop rows/s, {workers} process(es): kernels only / as a program | {best_bare[workers]:.1f} / {best_whole[workers]:.1f} |")
            print(f"| prepare ÷ bare loop, {workers} worker(s): kernels only / as a program | "
                  f"{big / t_b / best_bare[workers]:.2f} / {big / t_b / best_whole[workers]:.2f} |")
            pairs = ", ".join(f"{big / t / k:.2f}" for (t, _), k in zip(runs[workers], bare[workers], strict=True))
            print(f"| same, each repeat's adjacent pair (kernels only) | {pairs} |")
        if len(args.workers) > 1:
            lo, hi = min(args.workers), max(args.workers)
            print(f"| throughput {hi} workers ÷ {lo} | {results[('big', lo)][0] / results[('big', hi)][0]:.2f} |")
        for w, (rerun, scratch, _) in incremental.items():
            print(f"| rerun after adding {len(lines) - big} rows ÷ full run, {w} worker(s) | {rerun / scratch:.2f} ({rerun:.1f}s / {scratch:.1f}s) |")
        same_inc = all(same for _, _, same in incremental.values())
        print(f"| bytes: incremental vs scratch | {'identical' if same_inc else 'DIFFERENT'} |")
        print(f"| bytes: {' vs '.join(map(str, args.workers))} workers | {'identical' if same_workers else 'DIFFERENT'} |")
        if args.video:
            video_rows(args, tmp, mm, env)


def video_rows(args, tmp: Path, mm: list[str], env: dict) -> None:
    """Prepare on a corpus of demo clips (every clean row a video, its sound track the audio),
    and what decoding one clip costs, seeking to each sample time vs one sequential decode."""
    from dataclasses import replace

    from video_bench import timed

    from mmprep.config import load_params

    corpus = tmp / "video-corpus"
    subprocess.run([*mm, "demo-corpus", str(corpus), "--samples", str(args.video), "--video", "1.0", "--params", args.params],
                   check=True, stdout=subprocess.DEVNULL)
    for workers in args.workers:
        seconds, peak = measure([*mm, "prepare", "--input", str(corpus / "manifest.jsonl"), "--output", str(tmp / f"video-{workers}"),
                                 "--params", args.params, "--workers", str(workers), "--no-cache"], env)
        print(f"| video corpus, {args.video} rows, {workers} worker(s) | {args.video / seconds:.1f} rows/s ({seconds:.1f}s), "
              f"peak RSS {peak / 2**20:.0f} MiB |")
    cfg = load_params(args.params).prepare.video
    dirt = {d["id"] for d in json.loads((corpus / "dirt.json").read_text())}  # the hostile clips are rejects, not timings
    rows = []
    for line in (corpus / "manifest.jsonl").read_bytes().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the corpus's malformed and invalid-UTF-8 lines
            continue
    clips = [corpus / r["video"] for r in rows if "video" in r and r["id"] not in dirt][:100]
    for seek in (True, False):
        total = sum(timed(p.read_bytes(), replace(cfg, seek=seek), 2)[0] for p in clips)
        print(f"| decode a demo clip (≤ 128 px, 1-1.5 s, {cfg.frames} frames sampled), {'seeking' if seek else 'sequential'} | "
              f"{total / len(clips) * 1000:.1f} ms ({len(clips)} clips) |")


if __name__ == "__main__":
    main()
