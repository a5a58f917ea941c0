"""Streaming loader over mmprep shards: webdataset for the tar stream, our own pickle-free decoding.

Every dimension and statistic comes from dataset.json. The stream for (seed, epoch) is a
pure function of its arguments, so a resumed run replays it exactly, and every DDP rank
yields the same number of batches (no hang on uneven shards).
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

ALLOWED = {"jpg", "mel.npy", "tokens.npy", "txt", "cls", "json"}
MODALITIES = ("image", "audio", "text")


class ShardError(OSError):
    """A shard is unreadable, truncated, or holds a member we refuse to decode."""


def load_spec(data_dir: str) -> dict[str, Any]:
    path = os.path.join(data_dir, "dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --data must be a directory written by `mmprep prepare`")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shard_urls(data_dir: str, spec: dict[str, Any], split: str) -> list[str]:
    return [os.path.join(data_dir, name) for name in spec["splits"][split]["shards"]]


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members (bytes) → arrays. Anything outside the shard format is refused, unread."""
    fields = {k for k in raw if not k.startswith("__")}
    foreign = fields - ALLOWED
    if foreign:
        raise ShardError(f"{raw.get('__url__', '?')}: refusing member(s) {sorted(foreign)} of sample {raw.get('__key__')!r}")
    out: dict[str, Any] = {"key": raw["__key__"]}
    if "jpg" in raw:
        img = cv2.imdecode(np.frombuffer(raw["jpg"], np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ShardError(f"{raw.get('__url__')}: bad JPEG in {raw['__key__']}")
        out["image"] = np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1))
    if "mel.npy" in raw:
        out["audio"] = np.load(io.BytesIO(raw["mel.npy"]), allow_pickle=False).astype(np.float32)
    if "tokens.npy" in raw:
        out["text"] = np.load(io.BytesIO(raw["tokens.npy"]), allow_pickle=False).astype(np.int64)
    out["label"] = int(raw["cls"]) if "cls" in raw else -1
    return out


def _raise(exn: Exception) -> bool:
    """webdataset handler: never warn-and-continue; a truncated tar is an error naming the shard."""
    raise ShardError(f"unreadable shard data: {exn}") from exn


def read_shards(urls: list[str], index: dict[str, dict] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of the given shards in order, raw members only (no default decoders).

    `index` is dataset.json's "shards" table: a local shard whose size differs, or any shard
    that yields fewer samples than recorded, raises ShardError. (tar streams end silently
    at a truncation point, so the count is what catches it.)"""
    for url in urls:
        info = (index or {}).get(os.path.basename(url))
        if info and os.path.exists(url) and os.path.getsize(url) != info["bytes"]:
            raise ShardError(f"{url}: {os.path.getsize(url)} bytes but dataset.json records {info['bytes']} (truncated or replaced)")
        ds = wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None, handler=_raise, empty_check=False)
        count = 0
        try:
            for raw in ds:
                count += 1
                yield decode_sample(raw)
        except ShardError:
            raise
        except Exception as err:  # tarfile/EOF errors from a corrupt file
            raise ShardError(f"{url}: truncated or corrupt shard ({type(err).__name__}: {err})") from err
        if info and count != info["samples"]:
            raise ShardError(f"{url}: truncated shard, {count} of {info['samples']} samples")


@dataclass(frozen=True)
class Shapes:
    image_size: int
    bins: int
    frames: int | None
    max_tokens: int
    pad_id: int

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Shapes:
        f = spec["features"]
        return cls(
            image_size=f.get("image", {}).get("size", 1),
            bins=f.get("audio", {}).get("bins", 1),
            frames=f.get("audio", {}).get("frames"),
            max_tokens=f.get("text", {}).get("max_tokens", 1),
            pad_id=f.get("text", {}).get("pad_id", 0),
        )


def collate(samples: list[dict[str, Any]], shapes: Shapes) -> dict[str, torch.Tensor]:
    """Pad to a batch; a missing modality is zeros with present[:, m] == False."""
    n = len(samples)
    frames = shapes.frames or max([s["audio"].shape[1] for s in samples if "audio" in s] or [1])
    tokens = max([len(s["text"]) for s in samples if "text" in s] or [1])
    image = torch.zeros(n, 3, shapes.image_size, shapes.image_size, dtype=torch.uint8)
    audio = torch.zeros(n, shapes.bins, frames)
    text = torch.full((n, tokens), shapes.pad_id, dtype=torch.long)
    present = torch.zeros(n, 3, dtype=torch.bool)
    for i, s in enumerate(samples):
        if "image" in s:
            image[i] = torch.from_numpy(s["image"])
            present[i, 0] = True
        if "audio" in s:
            mel = torch.from_numpy(s["audio"])[:, :frames]
            audio[i, :, : mel.shape[1]] = mel
            present[i, 1] = True
        if "text" in s and len(s["text"]):
            text[i, : len(s["text"])] = torch.from_numpy(s["text"])
            present[i, 2] = True
    label = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return {"image": image, "audio": audio, "text": text, "present": present, "label": label}


class TrainStream(IterableDataset):
    """Exactly `batches` batches per rank per epoch, deterministic in (seed, epoch, rank).

    Shards are shuffled with a seeded RNG and dealt to (rank, worker) slots; with fewer
    shards than slots every slot reads all shards and keeps every slots-th sample. A slot
    cycles its shards until its quota is met, so uneven shards never starve a rank."""

    def __init__(self, urls: list[str], shapes: Shapes, batch_size: int, batches: int, seed: int, epoch: int,
                 rank: int = 0, world: int = 1, buffer: int = 1000, index: dict[str, dict] | None = None) -> None:
        self.urls, self.shapes, self.batch_size, self.batches = urls, shapes, batch_size, batches
        self.seed, self.epoch, self.rank, self.world, self.buffer = seed, epoch, rank, world, buffer
        self.index = index

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.batches // workers + (wid < self.batches % workers)
        return self.rank * workers + wid, self.world * workers, mine

    def _samples(self, slot: int, slots: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        urls = list(self.urls)
        rng.shuffle(urls)
        while True:
            if len(urls) >= slots:
                yield from read_shards(urls[slot::slots], self.index)
            else:
                for i, s in enumerate(read_shards(urls, self.index)):
                    if i % slots == slot:
                        yield s
            rng.shuffle(urls)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        slot, slots, mine = self._slot()
        rng = random.Random(f"{self.seed}|{self.epoch}|{slot}")
        buffer: list[dict[str, Any]] = []
        batch: list[dict[str, Any]] = []
        done = 0
        stream = self._samples(slot, slots, random.Random(f"{self.seed}|{self.epoch}"))
        while done < mine:
            while len(buffer) < max(1, self.buffer):
                buffer.append(next(stream))
            batch.append(buffer.pop(rng.randrange(len(buffer))))
            if len(batch) == self.batch_size:
                yield collate(batch, self.shapes)
                batch, done = [], done + 1


class EvalStream(IterableDataset):
    """Every sample of a split once, in shard order (for validation and evaluation)."""

    def __init__(self, urls: list[str], shapes: Shapes, batch_size: int, index: dict[str, dict] | None = None) -> None:
        self.urls, self.shapes, self.batch_size, self.index = urls, shapes, batch_size, index

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batch: list[dict[str, Any]] = []
        for s in read_shards(self.urls, self.index):
            batch.append(s)
            if len(batch) == self.batch_size:
                yield collate(batch, self.shapes)
                batch = []
        if batch:
            yield collate(batch, self.shapes)


def batches_per_epoch(spec: dict[str, Any], split: str, batch_size: int, world: int) -> int:
    """Same on every rank: drop the last partial global batch."""
    return max(1, spec["splits"][split]["samples"] // (batch_size * world))


def loader(dataset: IterableDataset, num_workers: int, seed: int, pin: bool) -> DataLoader:
    """Batches are built inside the dataset; a private generator keeps the global RNG untouched."""
    extra = {"prefetch_factor": 4} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin,
                      generator=torch.Generator().manual_seed(seed), **extra)
