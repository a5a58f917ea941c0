"""A generated motion task in the shard format: clips of a square drifting left or right.

The square wraps around the frame's edges, so in every frame its position is uniform whatever
the direction: any single frame is uninformative, only the change between frames tells the label."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from mmprep.shards import sample_members, shard_name, write_shard

LABELS = ["left", "right"]


def clip(rng: np.random.Generator, label: int, frames: int, size: int) -> np.ndarray:
    """uint8 [frames, size, size, 3] RGB: noise, and a bright square moving 1-2 pixels a frame."""
    side = size // 4
    speed = int(rng.integers(1, 3)) * (1 if label == 1 else -1)
    x, y = int(rng.integers(0, size)), int(rng.integers(0, size - side))
    colour = rng.integers(150, 256, 3)
    out = rng.integers(0, 60, (frames, size, size, 3)).astype(np.uint8)
    for t in range(frames):
        cols = (x + speed * t + np.arange(side)) % size
        out[t, y : y + side][:, cols] = colour
    return out


def strip_jpeg(frames: np.ndarray) -> bytes:
    """The shard member: the frames stacked vertically in one JPEG (cv2 wants BGR)."""
    return cv2.imencode(".jpg", np.ascontiguousarray(frames.reshape(-1, *frames.shape[2:])[:, :, ::-1]))[1].tobytes()


def write_motion_dataset(out: Path, per_split: dict[str, int] | None = None, frames: int = 8, size: int = 16,
                         seed: int = 0, keep: slice | None = None, video_share: float = 1.0) -> Path:
    """`keep`: the frames of each clip that go into the strip (slice(3, 4): one frame only, the
    single-frame baseline on the very same clips); `video_share`: rows with a clip, the others
    have a label-free image of noise only."""
    per_split = per_split or {"train": 512, "val": 64, "test": 128}
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    kept = len(range(frames)[keep or slice(None)])
    splits, infos, pixels = {}, {}, []
    for split, n in per_split.items():
        samples = []
        for i in range(n):
            label, key = int(rng.integers(0, 2)), f"{split}-{i:05d}"
            frames_ = clip(rng, label, frames, size)[keep or slice(None)]
            noise = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
            video = rng.random() < video_share
            if split == "train" and video:
                pixels.append(frames_.reshape(-1, 3))
            meta = {"id": key, **({"video": {"times": [t / 10 for t in range(kept)], "width": size, "height": size,
                                             "duration": frames / 10}} if video else {})}
            samples.append((key, sample_members(key, meta=meta, label_id=label, video=strip_jpeg(frames_) if video else None,
                                                jpg=None if video else cv2.imencode(".jpg", noise)[1].tobytes())))
        name = shard_name(split, 0)
        sha, nbytes = write_shard(str(out / name), samples)
        infos[name] = {"sha256": sha, "samples": n, "bytes": nbytes}
        splits[split] = {"samples": n, "shards": [name]}
    rgb = np.concatenate(pixels) / 255.0
    features = {"video": {"member": "video.jpg", "frames": kept, "size": size, "mean": rgb.mean(0).tolist(),
                          "std": rgb.std(0).tolist()}}
    if video_share < 1.0:
        features["image"] = {"member": "jpg", "size": size, "channels": 3, "mean": [0.5] * 3, "std": [0.29] * 3}
    spec = {"format": "mmprep-dataset/1", "labels": LABELS, "features": features, "splits": splits, "shards": infos,
            "params": {"prepare": {"image": {"size": size}, "video": {"frames": kept, "size": size}}}}
    (out / "dataset.json").write_text(json.dumps(spec))
    return out
