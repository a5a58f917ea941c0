"""Writing the prepared dataset: shards, manifest/rejects tables, tokenizer, dataset.json (last)."""

from __future__ import annotations

import hashlib
import io
import platform
import posixpath
from collections import Counter
from importlib import metadata
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from mmprep.config import PrepareConfig, to_dict
from mmprep.records import Reject
from mmprep.shards import SPLITS, dumps_json, shard_name, tar_bytes, write_atomic

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("key", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("label", pa.string()),
        ("label_id", pa.int32()),
        ("has_image", pa.bool_()),
        ("has_audio", pa.bool_()),
        ("has_text", pa.bool_()),
        ("source", pa.string()),
        ("image_sha256", pa.string()),
        ("audio_sha256", pa.string()),
        ("text_sha256", pa.string()),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("duplicate_of", pa.string()),
    ]
)
VERSIONED = ("mmprep", "apache-beam", "numpy", "opencv-python-headless", "librosa", "soundfile", "sentencepiece", "pyarrow")


def put(path: str, data: bytes) -> None:
    """Atomic write: a local temp file + rename, or create-then-rename on other filesystems."""
    if FileSystems.get_scheme(path) in (None, "file"):
        write_atomic(path, data)
        return
    tmp = f"{path}.tmp"
    with FileSystems.create(tmp) as f:
        f.write(data)
    FileSystems.rename([tmp], [path])


def join(out: str, name: str) -> str:
    return FileSystems.join(out, name) if FileSystems.get_scheme(out) else posixpath.join(out, name)


def shard_key(item: tuple, shard_of: dict[str, int]) -> tuple[str, tuple]:
    split, key = item[0], item[1]
    return f"{split}|{shard_of[key]}", item


class WriteShardFn(beam.DoFn):
    """One (split, shard) group → one tar, written atomically; emits manifest rows + shard info."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.written = Metrics.counter("write", "shards")

    def process(self, element: tuple[str, list[tuple]]):
        group, items = element
        split, index = group.split("|")
        name = shard_name(split, int(index))
        data = tar_bytes((key, members) for _, key, members, _, _ in items)
        put(join(self.out, name), data)
        self.written.inc()
        rows = [{**row, "shard": name} for _, _, _, row, _ in items]
        info = {"name": name, "split": split, "samples": len(items), "bytes": len(data)}
        info["sha256"] = hashlib.sha256(data).hexdigest()
        yield info, rows


def table_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


class FinalizeFn(beam.DoFn):
    """Tables, tokenizer and dataset.json once every shard is written; dataset.json last.

    Over prepare.max_reject_ratio, dataset.json is NOT written: the driver reports it."""

    def __init__(self, out: str, cfg: PrepareConfig) -> None:
        self.out, self.cfg = out, cfg

    def process(self, _, shards, rejects, input_rows, labels, model, image_stats, audio_stats, split_info):
        shards = sorted(shards, key=lambda s: s[0]["name"])
        manifest = sorted((r for _, rows in shards for r in rows), key=lambda r: (r["split"], r["key"]))
        rejects = sorted(rejects, key=lambda r: (r.order, r.reason, r.source))
        put(join(self.out, "manifest.parquet"), table_bytes(manifest, MANIFEST_SCHEMA))
        put(join(self.out, "rejects.parquet"), table_bytes([r.row() for r in rejects], REJECTS_SCHEMA))
        put(join(self.out, "tokenizer.model"), model)
        _remove_stale_shards(self.out, {info["name"] for info, _ in shards})
        counts = _counts(manifest, rejects, input_rows)
        if counts["reject_ratio"] > self.cfg.max_reject_ratio:
            return
        dataset = {
            "format": "mmprep-dataset/1",
            "labels": labels,
            "features": _features(self.cfg, manifest, image_stats, audio_stats, model),
            "splits": _splits(shards),
            "shards": {i["name"]: {k: i[k] for k in ("sha256", "samples", "bytes")} for i, _ in shards},
            "counts": {**counts, "groups": split_info["groups"]},
            "ignored_links": split_info["ignored_links"],
            "params": {"prepare": to_dict(self.cfg)},
            "versions": versions(),
        }
        put(join(self.out, "dataset.json"), dumps_json(dataset) + b"\n")
        yield dataset["counts"]


def _remove_stale_shards(out: str, keep: set[str]) -> None:
    """Shards of an earlier run with other params must not sit beside this run's."""
    for meta in FileSystems.match([join(out, "*.tar")])[0].metadata_list:
        if posixpath.basename(meta.path) not in keep:
            FileSystems.delete([meta.path])


def _counts(manifest: list[dict], rejects: list[Reject], input_rows: int) -> dict[str, Any]:
    splits = Counter(r["split"] for r in manifest)
    labels: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for r in manifest:
        labels[r["split"]][r["label"] if r["label"] is not None else "<unlabeled>"] += 1
    modalities = {
        s: {m: sum(1 for r in manifest if r["split"] == s and r[f"has_{m}"]) for m in ("image", "audio", "text")}
        for s in SPLITS
    }
    return {
        "input_rows": input_rows,
        "kept": len(manifest),
        "rejected": len(rejects),
        "reject_ratio": round(len(rejects) / input_rows, 6) if input_rows else 0.0,
        "splits": {s: splits.get(s, 0) for s in SPLITS},
        "labels": {s: dict(sorted(c.items())) for s, c in labels.items()},
        "modalities": modalities,
        "rejects": dict(sorted(Counter(r.reason for r in rejects).items())),
        "rejects_by_stage": dict(sorted(Counter(r.stage for r in rejects).items())),
    }


def _splits(shards: list[tuple[dict, list]]) -> dict[str, Any]:
    out: dict[str, Any] = {s: {"samples": 0, "shards": []} for s in SPLITS}
    for info, _ in shards:
        out[info["split"]]["samples"] += info["samples"]
        out[info["split"]]["shards"].append(info["name"])
    return out


def _features(cfg: PrepareConfig, manifest: list[dict], image_stats, audio_stats, model: bytes) -> dict[str, Any]:
    from mmprep.tokenizer import Tokenizer

    features: dict[str, Any] = {}
    if any(r["has_image"] for r in manifest):
        features["image"] = {
            "member": "jpg",
            "size": cfg.image.size,
            "channels": 3,
            "mean": image_stats["mean"],
            "std": image_stats["std"],
        }
    if any(r["has_audio"] for r in manifest):
        a = cfg.audio
        frames = 1 + int(round(a.clip_seconds * a.sample_rate)) // a.hop_length if a.clip_seconds > 0 else None
        features["audio"] = {
            "member": "mel.npy",
            "kind": a.feature,
            "bins": a.n_mels if a.feature == "logmel" else a.n_mfcc,
            "frames": frames,
            "sample_rate": a.sample_rate,
            "n_fft": a.n_fft,
            "hop_length": a.hop_length,
            "mean": audio_stats["mean"],
            "std": audio_stats["std"],
        }
    if any(r["has_text"] for r in manifest):
        tok = Tokenizer.from_bytes(model)
        features["text"] = {
            "member": "tokens.npy",
            "max_tokens": cfg.text.max_tokens,
            "vocab_size": tok.vocab_size,
            "pad_id": tok.pad_id,
            "tokenizer": "tokenizer.model",
        }
    return features
