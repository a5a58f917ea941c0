"""Streaming loader over mmprep shards: webdataset for the tar stream, our own pickle-free decoding.

Every dimension and statistic comes from dataset.json. The stream for (seed, epoch) is a
pure function of its arguments, so a resumed run replays it exactly, and every DDP rank
yields the same number of batches (no hang on uneven shards).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from mmprep.image import decode_strip as strip_frames
from mmprep.shards import TarDamage, load_npy, parse_dataset_json, tar_entries

if TYPE_CHECKING:
    import datasets

ALLOWED = {"jpg", "mel.npy", "tokens.npy", "txt", "cls", "json", "video.jpg"}
MODALITIES = ("image", "audio", "text", "video")


class ShardError(OSError):
    """A shard is unreadable, truncated, or holds a member we refuse to decode."""


def is_remote(location: str) -> bool:
    """A URL webdataset's gopen streams (http(s)://, gs://, s3:// via curl/gsutil/aws, pipe:)."""
    return location.startswith("pipe:") or ("://" in location and not location.startswith("file://"))


def data_path(data_dir: str, name: str) -> str:
    if is_remote(data_dir):
        return data_dir.rstrip("/") + "/" + name
    return os.path.join(data_dir.removeprefix("file://"), name)


def read_bytes(data_dir: str, name: str) -> bytes:
    """One small file of a prepared dataset (dataset.json, tokenizer.model), local or remote."""
    path = data_path(data_dir, name)
    if not is_remote(data_dir):
        with open(path, "rb") as f:
            return f.read()
    try:
        with wds.gopen(path) as stream:
            return stream.read()
    except Exception as err:  # gopen reports a failed curl/pipe as OSError("(cmd...): exit N ...")
        status = re.search(r"\): exit (\d+)", str(err))
        tool = "curl" if path.startswith(("http://", "https://")) else "the fetch command"
        reason = f"{tool} exit status {status.group(1)}" if status else f"{type(err).__name__}: {err}"
        raise FileNotFoundError(f"{path}: cannot fetch ({reason})") from err


def load_spec(data_dir: str) -> dict[str, Any]:
    path = data_path(data_dir, "dataset.json")
    if not is_remote(data_dir) and not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --data must be a directory written by `mmprep prepare`")
    return parse_dataset_json(read_bytes(data_dir, "dataset.json"), path)


def shard_urls(data_dir: str, spec: dict[str, Any], split: str) -> list[str]:
    return [data_path(data_dir, name) for name in spec["splits"][split]["shards"]]


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members (bytes) → arrays. Anything outside the shard format is refused, unread."""
    fields = {k for k in raw if not k.startswith("__")}
    foreign = fields - ALLOWED
    if foreign:
        raise ShardError(f"{raw.get('__url__', '?')}: refusing member(s) {sorted(foreign)} of sample {raw.get('__key__')!r}")
    out: dict[str, Any] = {"key": raw["__key__"], "shard": str(raw.get("__url__", "?")).rsplit("/", 1)[-1]}
    try:
        if "jpg" in raw:
            out["image"] = _rgb_chw(raw["jpg"])
        if "mel.npy" in raw:
            out["audio"] = load_npy(raw["mel.npy"]).astype(np.float32)
        if "tokens.npy" in raw:
            out["text"] = load_npy(raw["tokens.npy"]).astype(np.int64)
        if "video.jpg" in raw:
            out["video"] = decode_strip(raw["video.jpg"])
        out["label"] = int(raw["cls"]) if "cls" in raw else -1
    except ValueError as err:
        raise ShardError(f"{raw.get('__url__', '?')}: sample {raw['__key__']!r}: {err}") from err
    return out


def _rgb_chw(jpg: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("bad JPEG")
    return np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC → RGB CHW


def decode_strip(jpg: bytes) -> np.ndarray:
    """A video member (its T frames of S×S stacked vertically in one JPEG) → uint8 [T, 3, S, S].
    The frames are square, so the width gives S; collate checks T and S against dataset.json."""
    return np.ascontiguousarray(strip_frames(jpg).transpose(0, 3, 1, 2))


def _raise(exn: Exception) -> bool:
    """webdataset handler: never warn-and-continue."""
    raise ShardError(f"unreadable shard data: {exn}") from exn


def tar_members(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """Regular-file members of a tar stream as webdataset's {fname, data, __url__} dicts
    (`mmprep.shards.tar_entries`: checksummed headers, truncation an error)."""
    try:
        for name, data in tar_entries(stream, url):
            yield {"fname": name, "data": data, "__url__": url}
    except TarDamage as err:
        raise ShardError(str(err)) from None


def read_shards(urls: list[str], index: dict[str, dict] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of the given shards in order, raw members only (no default decoders).

    Shards are opened with webdataset's gopen (local paths, file:, http(s):, pipe:) and
    grouped into samples by webdataset's key rules. `index` is dataset.json's "shards"
    table: a local shard whose size differs, any shard that yields a different number of
    samples than recorded, or whose bytes (read to the end as they stream by) do not have
    the recorded sha256, raises ShardError naming it — a flipped byte in a label is an
    error, not a silently wrong sample."""
    for url in urls:
        yield from read_shard(url, index)


def read_shard(url: str, index: dict[str, dict] | None = None, span: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
    """One shard's samples (see `read_shards`); with `span=(lo, hi)` only the samples at
    positions lo ≤ i < hi are decoded and yielded, the shard is still read to its end and checked."""
    info = (index or {}).get(url.rsplit("/", 1)[-1])
    if info and not is_remote(url) and os.path.exists(url) and os.path.getsize(url) != info["bytes"]:
        raise ShardError(f"{url}: {os.path.getsize(url)} bytes but dataset.json records {info['bytes']} (truncated or replaced)")
    lo, hi = span or (0, None)
    count = 0
    try:
        stream = wds.gopen(url)
    except Exception as err:
        raise ShardError(f"{url}: cannot open shard ({type(err).__name__}: {err})") from err
    with stream:
        hashed = _Hashed(stream)
        try:
            for raw in group_by_keys(tar_members(hashed, url), handler=_raise):
                if lo <= count and (hi is None or count < hi):
                    yield decode_sample(raw)
                count += 1
            hashed.drain()
        except ShardError:
            raise
        except (ValueError, OSError, EOFError) as err:  # garbage in a header, a failing read
            raise ShardError(f"{url}: corrupt shard ({type(err).__name__}: {err})") from err
    if info and count != info["samples"]:
        raise ShardError(f"{url}: truncated shard, {count} of {info['samples']} samples")
    if info and "sha256" in info and hashed.sha.hexdigest() != info["sha256"]:
        raise ShardError(f"{url}: corrupted shard (sha256 differs from dataset.json; `mmprep verify` checks them all)")


class _Hashed:
    """A stream that hashes what is read through it."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.sha = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass(frozen=True)
class Shapes:
    image_size: int
    bins: int
    frames: int | None
    max_tokens: int
    pad_id: int
    video_frames: int
    video_size: int

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Shapes:
        f = spec["features"]
        return cls(
            image_size=f.get("image", {}).get("size", 1),
            bins=f.get("audio", {}).get("bins", 1),
            frames=f.get("audio", {}).get("frames"),
            max_tokens=f.get("text", {}).get("max_tokens", 1),
            pad_id=f.get("text", {}).get("pad_id", 0),
            video_frames=f.get("video", {}).get("frames", 1),
            video_size=f.get("video", {}).get("size", 1),
        )


def collate(samples: list[dict[str, Any]], shapes: Shapes) -> dict[str, Any]:
    """Pad to a batch; a missing modality is zeros with present[:, m] == False. Spectrograms of
    variable length (no `frames`) are padded to the batch's longest, and `audio_frames` (int64
    [B]) gives each row's own length.
    `keys` and `shards` (lists of str) say where each sample came from, for error messages."""
    n = len(samples)
    frames = shapes.frames or max([s["audio"].shape[1] for s in samples if "audio" in s] or [1])
    tokens = max([len(s["text"]) for s in samples if "text" in s] or [1])
    image = np.zeros((n, 3, shapes.image_size, shapes.image_size), np.uint8)  # numpy fills are ~5x cheaper
    audio = np.zeros((n, shapes.bins, frames), np.float32)
    text = np.full((n, tokens), shapes.pad_id, np.int64)
    video = np.zeros((n, shapes.video_frames, 3, shapes.video_size, shapes.video_size), np.uint8)
    present = np.zeros((n, len(MODALITIES)), bool)
    for i, s in enumerate(samples):
        if "image" in s:
            image[i] = s["image"]
            present[i, 0] = True
        if "audio" in s:
            mel = s["audio"][:, :frames]
            audio[i, :, : mel.shape[1]] = mel
            present[i, 1] = True
        if "text" in s and len(s["text"]):
            text[i, : len(s["text"])] = s["text"]
            present[i, 2] = True
        if "video" in s:
            if s["video"].shape != video.shape[1:]:
                raise ShardError(f"{s.get('shard', '?')}: sample {s.get('key')!r}: video of {s['video'].shape[0]} frames of "
                                 f"{s['video'].shape[-1]} pixels, dataset.json says {shapes.video_frames} of {shapes.video_size}")
            video[i] = s["video"]
            present[i, 3] = True
    label = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    arrays = {"image": image, "audio": audio, "text": text, "video": video, "present": present}
    if shapes.frames is None:  # variable-length spectrograms (clip_seconds 0): each row's own, for the encoder's mask
        arrays["audio_frames"] = np.array([min(s["audio"].shape[1], frames) if "audio" in s else 1 for s in samples], np.int64)
    origin = {"keys": [s.get("key", "?") for s in samples], "shards": [s.get("shard", "?") for s in samples]}
    return {**{k: torch.from_numpy(v) for k, v in arrays.items()}, "label": label, **origin}


def to_device(batch: dict[str, Any], device: torch.device, non_blocking: bool = False) -> dict[str, Any]:
    """Tensors to the device; the origin lists stay as they are."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class TrainStream(IterableDataset):
    """Exactly `batches` batches per rank per epoch, deterministic in (seed, epoch, rank).

    An epoch is one pass over the split: the shards are put in a seeded order, the sample
    sequence starts at a seeded offset (wrapping around), and each (rank, loader worker) slot
    takes its own contiguous run of it, as long as its share of the epoch's batches — no sample
    twice in an epoch, fewer than one global batch left out, other samples in every epoch. A slot reads the shards its
    run touches (those at its edges are shared: both slots read them, each decodes only its
    samples) and shuffles its run with a buffer of `buffer` samples that empties when the run
    ends. Without `index` (dataset.json's shard table: the sample counts) a slot gets whole
    shards and cycles them until its quota is met.
    `skip`: leave out the epoch's first `skip` batches (read, not collated), so a resumed
    epoch yields exactly what the uninterrupted one would from there on."""

    def __init__(self, urls: list[str], shapes: Shapes, batch_size: int, batches: int, seed: int, epoch: int,
                 rank: int = 0, world: int = 1, buffer: int = 1000, index: dict[str, dict] | None = None,
                 skip: int = 0) -> None:
        self.urls, self.shapes, self.batch_size, self.batches = urls, shapes, batch_size, batches
        self.seed, self.epoch, self.rank, self.world, self.buffer = seed, epoch, rank, world, buffer
        self.index, self.skip = index, skip

    def _slot(self) -> tuple[int, int, int, int, int]:
        """(slot, slots, batches, skipped, batches of the slots before it) of this loader worker.

        The DataLoader takes batches round-robin from workers 0, 1, …, so worker w makes the
        epoch's batches w, w + workers, …. Resuming at batch `skip`, worker w plays worker
        (w + skip) % workers: the first batch out is then batch `skip`, and the order holds."""
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        wid = (wid + self.skip) % workers

        def share(w: int) -> int:
            return self.batches // workers + (w < self.batches % workers)

        before = self.rank * self.batches + sum(share(w) for w in range(wid))
        skipped = self.skip // workers + (wid < self.skip % workers)
        return self.rank * workers + wid, self.world * workers, share(wid), skipped, before

    def _counts(self) -> list[int] | None:
        names = [url.rsplit("/", 1)[-1] for url in self.urls]
        if not self.index or any(name not in self.index for name in names):
            return None
        return [int(self.index[name]["samples"]) for name in names]

    def _run(self, counts: list[int], start: int, length: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        """The samples at positions start … start + length of the epoch's sample sequence
        (the shards in `rng`'s order, each in its own order, `counts` samples each); past the
        split's end it goes on from its start (the sequence is cyclic)."""
        order = list(range(len(self.urls)))
        rng.shuffle(order)
        total = sum(counts)
        while length > 0:
            begin = 0
            for i in order:
                lo, hi = max(start - begin, 0), min(start + length - begin, counts[i])
                if lo < hi:
                    yield from read_shard(self.urls[i], self.index, (lo, hi))
                begin += counts[i]
            length -= max(0, min(total, start + length) - start)
            start = max(0, start - total)

    def _cycled(self, slot: int, slots: int, rng: random.Random) -> Iterator[dict[str, Any]]:
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
        slot, slots, mine, skipped, before = self._slot()
        rng = random.Random(f"{self.seed}|{self.epoch}|{slot}")
        order_rng = random.Random(f"{self.seed}|{self.epoch}")
        counts = self._counts()
        exact = counts is not None
        if exact:
            total = sum(counts)
            if total == 0:
                raise ShardError("the split's shards hold no samples")
            # the epoch's sequence starts at a seeded offset: the samples it leaves out (fewer than one
            # global batch) differ from epoch to epoch, also when the split is one shard
            shift = random.Random(f"{self.seed}|{self.epoch}|start").randrange(total)
            stream = self._run(counts, (shift + before * self.batch_size) % total, mine * self.batch_size, order_rng)
        else:
            stream = self._cycled(slot, slots, order_rng)
        batch: list[dict[str, Any]] = []
        done = 0
        samples = _shuffled(stream, rng, max(1, self.buffer), self.batch_size)
        while done < mine:
            batch.append(next(samples))
            if len(batch) == self.batch_size:
                if done >= skipped:
                    yield collate(batch, self.shapes)
                batch, done = [], done + 1
        if exact:
            for _ in samples:  # nothing is left: the run's last shard is read to its end (its sha256 checked)
                pass


def _shuffled(stream: Iterator[dict[str, Any]], rng: random.Random, size: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """webdataset's shuffle: start once `min(size, batch_size)` samples are in, then grow the
    buffer by one extra sample per draw up to `size`, so an epoch's first batch needs no full
    buffer; when the stream ends the buffer is drawn empty."""
    initial = min(size, batch_size)
    buffer: list[dict[str, Any]] = []
    for sample in stream:
        buffer.append(sample)
        if len(buffer) < size:
            extra = next(stream, None)
            if extra is not None:
                buffer.append(extra)
        if len(buffer) >= initial:
            yield buffer.pop(rng.randrange(len(buffer)))
    while buffer:
        yield buffer.pop(rng.randrange(len(buffer)))


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
    """Same on every rank: drop the last partial global batch. A split with fewer samples than
    one global batch is an error: filling the batch would repeat samples within it."""
    samples = spec["splits"][split]["samples"]
    if samples < batch_size * world:
        raise ValueError(f"batch_size {batch_size}{f' x {world} ranks' if world > 1 else ''} is more than the {samples} samples "
                         f"of the {split} split: one batch would hold samples twice; use a smaller batch_size")
    return samples // (batch_size * world)


def loader(dataset: IterableDataset, num_workers: int, seed: int, pin: bool) -> DataLoader:
    """Batches are built inside the dataset; a private generator keeps the global RNG untouched."""
    extra = {"prefetch_factor": 4} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin,
                      generator=torch.Generator().manual_seed(seed), **extra)


def make_loader(data_dir: str, split: str = "train", *, batch_size: int = 64, epoch: int = 0, seed: int = 0,
                rank: int = 0, world: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000,
                skip_batches: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of a prepared dataset for your own PyTorch loop, exactly as `mmprep train` gets them.

    Each batch is a dict: `image` uint8 [B, 3, S, S] (RGB), `audio` float32 [B, bins, frames]
    (log-mel/MFCC, unnormalized), `text` int64 [B, T] (pad `pad_id`), `video` uint8
    [B, frames, 3, size, size] (RGB frames in time order), `present` bool [B, 4] (image, audio,
    text, video: a missing modality is zeros with False), `label` int64 [B] (-1: unlabeled),
    `keys`/`shards` (lists of str). dataset.json has the sizes and statistics.

    "train": `batches_per_epoch(spec, "train", batch_size, world)` full batches per rank,
    shuffled as a pure function of the arguments (num_workers included); call it once per
    epoch with that epoch, on each DDP rank with its rank. `skip_batches=k` resumes an epoch
    after k batches: it yields the batches k, k+1, … an uninterrupted epoch yields (with the
    same arguments otherwise); the skipped ones are read but not collated.
    Any other split ("val", "test"): every sample once, in shard order, the last batch short
    (on whatever rank calls it; at most one loader worker, so nothing is read twice).

        for epoch in range(epochs):
            for batch in make_loader(OUT, batch_size=64, epoch=epoch, seed=0):
                loss = step(to_device(batch, device))
    """
    spec = load_spec(data_dir)
    if split not in spec["splits"]:
        raise ValueError(f"{data_dir}: no split {split!r} (dataset.json has {sorted(spec['splits'])})")
    shapes, urls, index = Shapes.from_spec(spec), shard_urls(data_dir, spec, split), spec.get("shards")
    if split != "train":
        if skip_batches:
            raise ValueError("skip_batches resumes a training epoch; an evaluation split is read whole")
        return loader(EvalStream(urls, shapes, batch_size, index), min(num_workers, 1), seed + epoch, pin=pin_memory)
    if not urls:
        raise ValueError(f"{data_dir}: the train split has no shards")
    batches = batches_per_epoch(spec, split, batch_size, world)
    if not 0 <= skip_batches <= batches:
        raise ValueError(f"skip_batches={skip_batches}: an epoch has {batches} batches per rank")
    stream = TrainStream(urls, shapes, batch_size, batches, seed, epoch, rank, world, shuffle_buffer, index, skip=skip_batches)
    return loader(stream, num_workers, seed + epoch, pin=pin_memory)


def hf_features(data_dir: str) -> datasets.Features:
    """Column types for Hugging Face: `load_dataset("webdataset", data_files=…, features=hf_features(OUT))`.

    Without them, the webdataset builder infers columns from the first 5 samples of one shard:
    it refuses shards whose samples differ in members (a sample lacking a modality or a label)
    and drops metadata keys those 5 samples lack. These come from dataset.json instead: `jpg`
    an Image, `mel.npy` [bins][frames] and `tokens.npy` lists (arrays in the numpy/torch
    formats), `txt` a str, `video.jpg` an Image of the strip (the frames stacked vertically),
    `cls` a ClassLabel of the dataset's label names, `json` the whole metadata as a dict; a
    member a sample lacks is None. Needs `pip install datasets` (>=4.7)."""
    import datasets

    spec = load_spec(data_dir)
    value, seq = datasets.Value, datasets.List
    present = spec["features"]
    columns: dict[str, Any] = {
        "cls": datasets.ClassLabel(names=spec["labels"]) if spec["labels"] else value("int64"),
        "jpg": datasets.Image() if "image" in present else None,
        "json": datasets.Json(),
        "mel.npy": seq(seq(value("float16"))) if "audio" in present else None,
        "tokens.npy": seq(value("int32")) if "text" in present else None,
        "txt": value("string") if "text" in present else None,
        "video.jpg": datasets.Image() if "video" in present else None,
        "__key__": value("string"),
        "__url__": value("string"),
    }
    return datasets.Features({k: v for k, v in columns.items() if v is not None})
