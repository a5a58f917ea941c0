"""Loader throughput without a model: how many samples/s the training stream can feed.

    python benchmarks/loader_bench.py --synthetic 20000 --workers 0 1 2
    python benchmarks/loader_bench.py --data data/prepared --batch-size 64 --workers 0 2

For each worker count, times whole epochs of the exact training stream (shard shuffle,
pickle-free decode, shuffle buffer, collate) after a warm-up epoch. A GPU step is fed
without waiting when this number is well above the model's own samples/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_bench import synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a prepared dataset directory")
    parser.add_argument("--synthetic", type=int, default=20000, help="else write N synthetic train samples")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    args = parser.parse_args()
    from train import data as D

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(synthetic(Path(tmp) / "data", args.synthetic))
        spec = D.load_spec(data)
        urls, shapes = D.shard_urls(data, spec, "train"), D.Shapes.from_spec(spec)
        batches = D.batches_per_epoch(spec, "train", args.batch_size, 1)
        for workers in args.workers:
            seconds, samples = 0.0, 0
            for epoch in range(args.epochs + 1):
                stream = D.TrainStream(urls, shapes, args.batch_size, batches, 0, epoch, index=spec["shards"])
                started = time.perf_counter()
                n = sum(len(b["label"]) for b in D.loader(stream, workers, epoch, pin=False))
                if epoch:
                    seconds, samples = seconds + time.perf_counter() - started, samples + n
            print(json.dumps({"workers": workers, "batch_size": args.batch_size, "samples_per_s": round(samples / seconds),
                              "per_worker": round(samples / seconds / max(1, workers))}))


if __name__ == "__main__":
    main()
