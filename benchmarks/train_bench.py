"""Training throughput and data-wait share (run by hand; results go in the README).

    python benchmarks/train_bench.py --data data/prepared --batch-size 64 --workers 0
    python benchmarks/train_bench.py --synthetic 20000 --batch-size 256 --workers 8 --epochs 4   # e.g. on a GPU

--synthetic N writes N samples at the demo's feature sizes (64 px JPEG, 64x63 float16
log-mel, <= 32 tokens) straight in the shard format, so a GPU machine needs neither Beam nor
librosa. Prints samples/s and the share of step time spent waiting for data, over all
epochs after the first (warm-up: worker start, cuDNN autotune, compile).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmprep.config import load_params  # noqa: E402
from mmprep.shards import sample_members, shard_name, write_shard  # noqa: E402


def synthetic(out: Path, n: int, per_shard: int = 1000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": n, "val": max(64, n // 20), "test": 0}
    spec_splits, shards = {}, {}
    for split, count in splits.items():
        names = []
        for start in range(0, count, per_shard):
            samples = []
            for i in range(start, min(count, start + per_shard)):
                img = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
                jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
                mel = rng.normal(-40, 15, (64, 63)).astype(np.float16)
                tokens = rng.integers(2, 500, int(rng.integers(4, 33))).astype(np.int32)
                key = f"{split}{i:07d}"
                samples.append((key, sample_members(key, meta={"id": key}, jpg=jpg, mel=mel, tokens=tokens,
                                                    label_id=int(rng.integers(0, 12)))))
            name = shard_name(split, start // per_shard)
            sha, size = write_shard(str(out / name), samples)
            shards[name] = {"sha256": sha, "samples": len(samples), "bytes": size}
            names.append(name)
        spec_splits[split] = {"samples": count, "shards": names}
    spec = {
        "labels": [f"class{i}" for i in range(12)],
        "features": {
            "image": {"member": "jpg", "size": 64, "channels": 3, "mean": [0.5] * 3, "std": [0.29] * 3},
            "audio": {"member": "mel.npy", "kind": "logmel", "bins": 64, "frames": 63, "mean": [-40.0] * 64, "std": [15.0] * 64},
            "text": {"member": "tokens.npy", "max_tokens": 32, "vocab_size": 500, "pad_id": 0},
        },
        "splits": spec_splits,
        "shards": shards,
    }
    (out / "dataset.json").write_text(json.dumps(spec))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a prepared dataset directory")
    parser.add_argument("--synthetic", type=int, default=0, help="write N synthetic train samples instead")
    parser.add_argument("--synthetic-dir", help="keep the synthetic data here (reused when it exists)")
    parser.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fusion", default=None)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    import torch

    from train.recipe import train

    cfg = load_params(args.params).train
    overrides = {"epochs": args.epochs, "log_every": 50, "checkpoint_every": 10**9}
    for key, value in (("batch_size", args.batch_size), ("num_workers", args.workers), ("fusion", args.fusion)):
        if value is not None:
            overrides[key] = value
    cfg = replace(cfg, compile=args.compile, **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:
            where = Path(args.synthetic_dir or Path(tmp) / "data")
            data = str(where if (where / "dataset.json").exists() else synthetic(where, args.synthetic))
        started = time.perf_counter()
        result = train(data, str(Path(tmp) / "run"), cfg)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(json.dumps({"device": device, "batch_size": cfg.batch_size, "workers": cfg.num_workers, "fusion": cfg.fusion,
                          "compile": cfg.compile, "epochs": cfg.epochs, "samples_per_s": result["samples_per_s"],
                          "data_wait": result["data_wait"], "wall_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
