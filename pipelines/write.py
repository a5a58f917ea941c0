"""Writing the prepared dataset: shards, manifest/rejects tables, tokenizer, dataset.json (last)."""

from __future__ import annotations

import functools
import json
import os
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
from mmprep.process import limit_threads
from mmprep.records import MODALITIES, Sample
from mmprep.shards import SPLITS, dumps_json, sample_members, shard_meta, write_tar
from pipelines.files import Publisher, atomic_stream, join, put, read_bytes, read_table, table_bytes
from pipelines.progress import driver_gone
from pipelines.staging import Store
from pipelines.steps import read_staged

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
        ("has_video", pa.bool_()),
        ("source", pa.string()),
        ("group", pa.string()),
        ("image_sha256", pa.string()),
        ("audio_sha256", pa.string()),
        ("text_sha256", pa.string()),
        ("video_sha256", pa.string()),
    ]
)
VERSIONED = ("mmprep", "apache-beam", "numpy", "opencv-python-headless", "soundfile", "soxr", "scipy", "sentencepiece", "pyarrow", "av")


WORK = ".mmprep-work"  # inside the output: parts of the tables (and staging with --no-cache); removed at the end, and
# written without fsync: a killed run's work directory is deleted by the next run, never read


def manifest_row(s: Sample, split: str, label_id: int | None, shard: str, group: str) -> dict:
    return {
        "id": s.id,
        "key": s.key,
        "split": split,
        "shard": shard,
        "label": s.label,
        "label_id": label_id,
        "has_image": s.jpg is not None,
        "has_audio": s.mel is not None,
        "has_text": s.text is not None,
        "has_video": s.video is not None,
        "source": s.source,
        "group": group,
        "image_sha256": s.hashes.get("image"),
        "audio_sha256": s.hashes.get("audio"),
        "text_sha256": s.hashes.get("text"),
        "video_sha256": s.hashes.get("video"),
    }


class WriteShardFn(beam.DoFn):
    """One shard's plan part → one tar, streamed member by member from the staging store
    (tokenized here), written atomically; its manifest rows go to a part file. Emits the
    shard's info, counts and (train) normalization moments."""

    def __init__(self, out: str, work: str, store: str, cfg: PrepareConfig) -> None:
        from pipelines.progress import driver_token

        self.out, self.work, self.store_root, self.cfg = out, work, store, cfg
        self.written = Metrics.counter("write", "shards")
        self.driver = driver_token()  # built in the driver: a shard writer stops when it dies

    def setup(self) -> None:
        from mmprep.staged import context_digest

        limit_threads()
        self.store = Store(self.store_root, context_digest(self.cfg))
        self.tokenizer = None
        self.publisher = Publisher()

    def finish_bundle(self) -> None:
        self.publisher.wait()  # every shard of the bundle in place before the bundle counts as done

    def teardown(self) -> None:
        self.store.close()
        self.publisher.close()
        from pipelines.reaper import exit_fast_when_done

        exit_fast_when_done()

    def process(self, task: tuple[str, str]):
        from mmprep.stats import F16_SCALE, MomentSum
        from mmprep.tokenizer import Tokenizer
        from pipelines.plan import PLAN_SCHEMA, read_table

        if self.tokenizer is None:  # written by the plan step (not in setup: some runners set up
            # a DoFn for an empty partition before its input exists)
            self.tokenizer = Tokenizer.from_bytes(read_bytes(join(self.work, "tokenizer.model")))
        name, split = task
        plan = read_table(join(self.work, "plan", f"{name}.parquet"), PLAN_SCHEMA).to_pylist()
        a = self.cfg.audio
        totals = {"image": MomentSum(3, 1), "audio": MomentSum(a.n_mels if a.feature == "logmel" else a.n_mfcc, F16_SCALE),
                  "video": MomentSum(3, 1)}
        rows: list[dict] = []
        labels_seen: Counter = Counter()
        modalities: Counter = Counter()

        def samples():
            for i, p in enumerate(plan):  # sorted by key
                if i % 256 == 0 and driver_gone(self.driver):
                    os._exit(3)  # an orphan of a killed run: its output would only be debris
                s = read_staged(self.store, p["entry"], p["id"], p["source"], p["order"])
                label_id = p["label_id"]
                tokens = self.tokenizer.encode(s.text, self.cfg.text.max_tokens) if s.text is not None else None
                meta = shard_meta(s, split, label_id, int(tokens.shape[0]) if tokens is not None else None)
                rows.append(manifest_row(s, split, label_id, name, p["group"]))
                labels_seen[s.label if s.label is not None else "<unlabeled>"] += 1
                for m, data in (("image", s.jpg), ("audio", s.mel), ("text", s.text), ("video", s.video)):
                    modalities[m] += data is not None
                if split == "train":
                    for modality, (count, _, parts) in s.stats.items():
                        totals[modality].add(count, parts)
                yield s.key, sample_members(s.key, meta=meta, jpg=s.jpg, mel=s.mel, tokens=tokens, text=s.text, label_id=label_id,
                                            video=s.video)

        with atomic_stream(join(self.out, name), publisher=self.publisher) as f:
            sha, size = write_tar(f, samples())
        put(join(self.work, "parts", f"manifest-{name}.parquet"), table_bytes(rows, MANIFEST_SCHEMA), durable=False)
        self.written.inc()
        yield {
            "name": name,
            "split": split,
            "samples": len(rows),
            "bytes": size,
            "sha256": sha,
            "labels": dict(labels_seen),
            "modalities": dict(modalities),
            "image_moments": totals["image"].moments(),
            "audio_moments": totals["audio"].moments(),
            "video_moments": totals["video"].moments(),
        }


def concat_parts(parts: list[str], schema: pa.Schema, path: str) -> None:
    """Part files → one Parquet file, one row group per part, streamed part by part."""
    with atomic_stream(path) as f:
        writer = pq.ParquetWriter(f, schema, compression="zstd")
        for part in parts:
            writer.write_table(read_table(part, schema))
        if not parts:
            writer.write_table(schema.empty_table())
        writer.close()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


class FinalizeFn(beam.DoFn):
    """manifest.parquet, tokenizer.model and dataset.json once every shard is written;
    dataset.json last. Over prepare.max_reject_ratio, dataset.json is NOT written: the
    driver reports it."""

    def __init__(self, out: str, work: str, cfg: PrepareConfig) -> None:
        self.out, self.work, self.cfg = out, work, cfg

    def process(self, shards: list[dict]):
        from mmprep.stats import Moments

        plan = json.loads(read_bytes(join(self.work, "plan.json")))
        shards = sorted(shards, key=lambda s: s["name"])  # test-…, train-…, val-…: (split, key) order
        parts = [join(self.work, "parts", f"manifest-{s['name']}.parquet") for s in shards]
        concat_parts(parts, MANIFEST_SCHEMA, join(self.out, "manifest.parquet"))
        model = read_bytes(join(self.work, "tokenizer.model"))
        put(join(self.out, "tokenizer.model"), model)
        _remove_stale_shards(self.out, {s["name"] for s in shards})
        counts = _counts(shards, plan)
        if counts["reject_ratio"] > self.cfg.max_reject_ratio:
            return
        train = [s for s in shards if s["split"] == "train"]
        stats = {}
        a = self.cfg.audio
        for modality, dims in (("image", 3), ("audio", a.n_mels if a.feature == "logmel" else a.n_mfcc), ("video", 3)):
            merged = functools.reduce(Moments.merge, (s[f"{modality}_moments"] for s in train), Moments.empty(dims))
            mean, std = merged.mean_std(1.0 if modality == "audio" else 255.0)  # pixels on the [0, 1] scale
            stats[modality] = {"mean": mean, "std": std}
        dataset = {
            "format": "mmprep-dataset/1",
            "labels": plan["labels"],
            "features": _features(self.cfg, counts, stats, model),
            "splits": _splits(shards),
            "shards": {s["name"]: {k: s[k] for k in ("sha256", "samples", "bytes")} for s in shards},
            "counts": {**counts, "groups": plan["groups"]},
            "ignored_links": plan["ignored_links"],
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


def _counts(shards: list[dict], plan: dict) -> dict[str, Any]:
    kept = sum(s["samples"] for s in shards)
    input_rows, rejected = plan["input_rows"], plan["rejected"]
    labels: dict[str, Counter] = {s: Counter() for s in SPLITS}
    modalities = {s: dict.fromkeys(MODALITIES, 0) for s in SPLITS}
    for s in shards:
        labels[s["split"]].update(s["labels"])
        for m, n in s["modalities"].items():
            modalities[s["split"]][m] += n
    return {
        "input_rows": input_rows,
        "kept": kept,
        "rejected": rejected,
        "reject_ratio": round(rejected / input_rows, 6) if input_rows else 0.0,
        "splits": {split: sum(s["samples"] for s in shards if s["split"] == split) for split in SPLITS},
        "labels": {s: dict(sorted(c.items())) for s, c in labels.items()},
        "modalities": modalities,
        "rejects": plan["rejects"],
        "rejects_by_stage": plan["rejects_by_stage"],
    }


def _splits(shards: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {s: {"samples": 0, "shards": []} for s in SPLITS}
    for info in shards:
        out[info["split"]]["samples"] += info["samples"]
        out[info["split"]]["shards"].append(info["name"])
    return out


def _features(cfg: PrepareConfig, counts: dict, stats: dict, model: bytes) -> dict[str, Any]:
    from mmprep.tokenizer import Tokenizer

    present = {m: any(counts["modalities"][s][m] for s in SPLITS) for m in MODALITIES}
    features: dict[str, Any] = {}
    if present["image"]:
        features["image"] = {"member": "jpg", "size": cfg.image.size, "channels": 3, **stats["image"]}
    if present["audio"]:
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
            **stats["audio"],
        }
    if present["text"]:
        tok = Tokenizer.from_bytes(model)
        features["text"] = {
            "member": "tokens.npy",
            "max_tokens": cfg.text.max_tokens,
            "vocab_size": tok.vocab_size,
            "pad_id": tok.pad_id,
            "tokenizer": "tokenizer.model",
        }
    if present["video"]:
        v = cfg.video
        features["video"] = {"member": "video.jpg", "frames": v.frames, "size": v.size, "channels": 3, **stats["video"]}
    return features
