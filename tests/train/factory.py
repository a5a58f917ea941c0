"""A tiny prepared dataset written straight in the shard format (no Beam), with a task that
needs every modality: label = 4*(bright half of the image) + 2*(mel band) + (token A or B)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmprep.shards import sample_members, shard_name, write_shard

SIZE, BINS, FRAMES, TOKENS, VOCAB = 32, 16, 20, 8, 40


def _sample(rng: np.random.Generator, label: int) -> dict:
    import cv2

    a, b, c = label >> 2 & 1, label >> 1 & 1, label & 1
    img = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
    img[:, a * SIZE // 2 : (a + 1) * SIZE // 2] += 150
    mel = rng.normal(-60, 3, (BINS, FRAMES))
    mel[b * BINS // 2 : (b + 1) * BINS // 2] += 40
    tokens = rng.integers(4, VOCAB, size=int(rng.integers(3, TOKENS + 1))).astype(np.int32)
    tokens[int(rng.integers(0, len(tokens)))] = 2 + c
    tokens[tokens == 3 - c] = 4
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    return {"jpg": jpg, "mel": mel.astype(np.float16), "tokens": tokens}


def write_tiny_dataset(out: Path, per_split: dict[str, int] | None = None, shards: dict[str, int] | None = None,
                       seed: int = 0, missing: dict[str, float] | None = None, poison: str | None = None,
                       unlabeled: tuple[str, ...] = ()) -> Path:
    """`missing`: share of samples without each modality ("image"/"audio"/"text"; 1.0 = absent
    from the dataset, no feature entry in dataset.json); `poison`: a key whose mel holds inf;
    `unlabeled`: splits whose samples have no label (no .cls member)."""
    per_split = per_split or {"train": 384, "val": 64, "test": 64}
    missing = missing or {}
    shards = shards or {"train": 3, "val": 1, "test": 1}
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    splits, infos, rows = {}, {}, []
    for split, n in per_split.items():
        samples = []
        for i in range(n):
            label = int(rng.integers(0, 8))
            s = _sample(rng, label)
            key = f"{split}-{i:05d}"
            gone = {m for m in ("image", "audio", "text") if rng.random() < missing.get(m, 0.0)}
            if len(gone) == 3:
                gone.discard("image" if missing.get("image", 0.0) < 1.0 else "audio" if missing.get("audio", 0.0) < 1.0 else "text")
            if key == poison:
                s["mel"][0, 0] = np.inf
            samples.append((key, sample_members(key, meta={"id": key}, jpg=None if "image" in gone else s["jpg"],
                                                mel=None if "audio" in gone else s["mel"],
                                                tokens=None if "text" in gone else s["tokens"],
                                                label_id=None if split in unlabeled else label)))
        names = []
        for k in range(shards[split]):
            name = shard_name(split, k)
            sha, size = write_shard(str(out / name), samples[k :: shards[split]])
            infos[name] = {"sha256": sha, "samples": len(samples[k :: shards[split]]), "bytes": size}
            rows += [{"key": key, "split": split, "shard": name} for key, _ in samples[k :: shards[split]]]
            names.append(name)
        splits[split] = {"samples": n, "shards": names}
    spec = {
        "format": "mmprep-dataset/1",
        "labels": [f"c{i}" for i in range(8)],
        "features": {
            "image": {"member": "jpg", "size": SIZE, "channels": 3, "mean": [0.3] * 3, "std": [0.3] * 3},
            "audio": {"member": "mel.npy", "kind": "logmel", "bins": BINS, "frames": FRAMES, "mean": [-50.0] * BINS, "std": [15.0] * BINS},
            "text": {"member": "tokens.npy", "max_tokens": TOKENS, "vocab_size": VOCAB, "pad_id": 0, "tokenizer": "tokenizer.model"},
        },
        "splits": splits,
        "shards": infos,
        "params": {"prepare": {"image": {"size": SIZE}, "audio": {"n_mels": BINS, "n_mfcc": BINS}, "text": {"max_tokens": TOKENS}}},
    }
    for m, member in (("image", "image"), ("audio", "audio"), ("text", "text")):
        if missing.get(m, 0.0) >= 1.0:
            del spec["features"][member]
    (out / "dataset.json").write_text(json.dumps(spec))
    pq.write_table(pa.Table.from_pylist(rows), out / "manifest.parquet")
    return out
