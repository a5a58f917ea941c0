"""Beam DoFns and CombineFns of the prepare pipeline. Each composes pure mmprep functions."""

from __future__ import annotations

import hashlib
import heapq
import itertools
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from mmprep.config import PrepareConfig
from mmprep.process import process_row
from mmprep.records import RawRow, RecordError, Reject, Sample, reject
from mmprep.shards import member_bytes, sample_members
from mmprep.split import LinkInfo
from pipelines.progress import WorkerCount
from pipelines.read import Range, load_media, read_range
from pipelines.staging import Store


def counted(rej: Reject) -> Reject:
    Metrics.counter("rejects", rej.reason).inc()
    return rej


def is_reject(element: object) -> bool:
    return isinstance(element, Reject)


def is_kept(element: object) -> bool:
    return not isinstance(element, Reject)


def is_read_reject(element: object) -> bool:
    """A row that could not be parsed (no RawRow, so no id to deduplicate on)."""
    return isinstance(element, Reject) and element.stage == "read"


def is_parsed(element: object) -> bool:
    return not is_read_reject(element)


class Separate(beam.PTransform):
    """A DoFn whose output mixes records and rejects → (records, rejects), split by type.

    Not tagged outputs (`with_outputs`): Beam 2.77's DaskRunner drops output tags and would
    deliver the rejects into the main output."""

    def __init__(self, fn: beam.DoFn) -> None:
        super().__init__()
        self.fn = fn

    def expand(self, pcoll):
        mixed = pcoll | "Apply" >> beam.ParDo(self.fn)
        return mixed | "Kept" >> beam.Filter(is_kept), mixed | "Rejected" >> beam.Filter(is_reject)


class Kept(NamedTuple):
    """What crosses shuffles, combiners and side inputs for a kept row: a few hundred bytes.
    The heavy payload (JPEG, features, text) waits in the staging store under `entry`."""

    key: str
    id: str
    order: int
    source: str
    label: str | None
    entry: str  # staging store entry name
    signature: str  # same iff every modality has the same content (exact duplicates)
    links: tuple[tuple[str, str], ...]  # (modality, content hash prefix) that tie samples to one split
    phash: int | None
    has_text: bool
    size: int  # upper bound of the bytes the sample adds to a shard


LABEL_ID_BOUND = 999_999  # label ids are below this (its digits bound a .cls/.json member's size)


def shard_meta(s: Sample, split: str, label_id: int | None, tokens: int | None) -> dict:
    """The `<key>.json` member of a sample."""
    meta = {**s.meta, "key": s.key, "split": split, "label_id": label_id}
    if tokens is not None:
        meta["text"] = {**meta["text"], "tokens": tokens}
    return meta


def size_bound(s: Sample, max_tokens: int) -> int:
    """Bytes the sample will add to a tar, at most: the token array and the label id at
    their largest, the split name at its longest."""
    tokens = np.zeros(max_tokens, dtype=np.int32) if s.text is not None else None
    label_id = LABEL_ID_BOUND if s.label is not None else None
    meta = shard_meta(s, "train", label_id, max_tokens if s.text is not None else None)
    members = sample_members(s.key, meta=meta, jpg=s.jpg, mel=s.mel, tokens=tokens, text=s.text, label_id=label_id)
    return member_bytes(members)


def light(s: Sample, entry: str, max_tokens: int) -> Kept:
    links = tuple((m, s.hashes[name][:32]) for m, name in (("image", "image"), ("audio", "audio"), ("text", "text_link")) if name in s.hashes)
    signature = s.content_signature[:32]
    return Kept(s.key, s.id, s.order, s.source, s.label, entry, signature, links, s.phash, s.text is not None, size_bound(s, max_tokens))


def limit_threads() -> None:
    """One thread per worker process for BLAS/OpenMP and OpenCV: Beam runs one worker per
    core, and numerical libraries' own threads then only contend with each other."""
    import cv2
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    cv2.setNumThreads(1)


class ProcessRangeFn(beam.DoFn):
    """Read one input range; for each row, load its media (FileSystems), then reuse its
    staged entry or decode/clean/normalize/featurize/label it and stage the result.

    Emits a light `Kept` record or a Reject per row; the payload stays in the store."""

    def __init__(self, cfg: PrepareConfig, store: str, reuse: bool, progress: str | None = None, total: int = 0) -> None:
        self.cfg, self.store_root, self.reuse = cfg, store, reuse
        self.progress_dir, self.total = progress, total
        self.rows = Metrics.counter("read", "rows")
        self.kept = Metrics.counter("process", "kept")
        self.reused = Metrics.counter("process", "reused")

    def setup(self) -> None:
        from mmprep.staged import context_digest

        limit_threads()
        self.store = Store(self.store_root)
        self.context = context_digest(self.cfg)
        self.progress = WorkerCount(self.progress_dir, self.total)

    def process(self, rng: Range):
        for row in read_range(rng):
            self.rows.inc()
            result = row if isinstance(row, Reject) else self.process_row(row)
            self.progress.add()
            if isinstance(result, Reject):
                yield counted(result)
            else:
                self.kept.inc()
                yield result

    def finish_bundle(self) -> None:
        self.progress.flush()

    def process_row(self, row: RawRow) -> Kept | Reject:
        from mmprep import staged

        loaded = load_media(row, self.cfg.max_file_bytes)
        name = None
        if not any(isinstance(v, RecordError) for v in loaded.values()):
            media = {m: hashlib.sha256(v).hexdigest() for m, v in loaded.items() if isinstance(v, bytes)}
            name = staged.entry_name(self.context, row, media)
            data = self.store.get(name) if self.reuse else None
            if data is not None:
                try:
                    result = staged.decode(data, row.id, row.source, row.order)
                except (ValueError, KeyError):
                    result = None  # torn or foreign: process again, overwrite below
                if result is not None:
                    self.reused.inc()
                    return result if isinstance(result, Reject) else light(result, name, self.cfg.text.max_tokens)
        try:
            result = process_row(row, loaded, self.cfg)
        except Exception as err:  # noqa: BLE001 - one exotic file must not stop a million-row job:
            # it becomes a counted, visible reject (and the run fails past max_reject_ratio); not cached
            return reject(row, RecordError("processing_error", f"{type(err).__name__}: {err}"))
        if name is None:  # a load error (missing file …): nothing to stage, nothing to reuse
            return result
        self.store.put(name, staged.encode(result))
        return result if isinstance(result, Reject) else light(result, name, self.cfg.text.max_tokens)


def by_id(record: Kept | Reject) -> tuple[str, Kept | Reject]:
    return record.id, record


class KeepFirstFn(beam.DoFn):
    """Records grouped on a key (an id, a content signature): the first in input order is
    kept, the others become rejects pointing at it (`duplicate_of`)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail

    def process(self, element: tuple[str, list[Kept | Reject]]):
        _, records = element
        first, *others = sorted(records, key=lambda r: r.order)
        yield first
        for record in others:
            err = RecordError(self.reason, f"{self.detail} {first.source}")
            yield counted(reject(record, err, duplicate_of=first.id))


def by_signature(kept: Kept) -> tuple[str, Kept]:
    return kept.signature, kept


def label_of(kept: Kept) -> list[str]:
    return [kept.label] if kept.label is not None else []


def link_info(kept: Kept) -> LinkInfo:
    return LinkInfo(key=kept.key, label=kept.label, links=kept.links, phash=kept.phash)


def split_of(result) -> dict[str, str]:
    return result.split_of


def split_report(result) -> dict:
    return {"groups": result.groups, "ignored_links": result.ignored_links}


def with_split(kept: Kept, split_of: dict[str, str]) -> tuple[str, Kept]:
    return split_of[kept.key], kept


def is_train(item: tuple[str, Kept]) -> bool:
    return item[0] == "train"


def size_of(item: tuple[str, Kept]) -> tuple[str, str, int]:
    split, kept = item
    return split, kept.key, kept.size


def train_text(item: tuple[str, Kept], salt: str) -> list[tuple[str, str]]:
    """Train rows with text keyed by a salted digest: the smallest K form a bounded, unbiased sample."""
    kept = item[1]
    if not kept.has_text:
        return []
    return [(hashlib.sha256(f"{salt}|{kept.key}".encode()).hexdigest(), kept.entry)]


class SmallestFn(beam.CombineFn):
    """The n smallest elements, sorted (what `beam.combiners.Top.Smallest` gives): a plain
    CombineFn, because Top's per-bundle pre-combining gave another sample on Beam 2.77's DaskRunner."""

    def __init__(self, n: int) -> None:
        self.n = n

    def create_accumulator(self) -> list:
        return []

    def add_input(self, acc: list, element) -> list:
        acc.append(element)
        return heapq.nsmallest(self.n, acc) if len(acc) >= 2 * self.n else acc  # bounded memory

    def merge_accumulators(self, accumulators) -> list:
        return heapq.nsmallest(self.n, itertools.chain.from_iterable(accumulators))

    def extract_output(self, acc: list) -> list:
        return heapq.nsmallest(self.n, acc)


def read_staged(store: Store, kept: Kept) -> Sample:
    """A kept row's payload back from the store; a missing entry is a clear error."""
    from mmprep import staged

    data = store.get(kept.entry)
    if data is None:
        raise OSError(f"staged entry {store.path(kept.entry)} of {kept.source} vanished during the run "
                      "(was the cache directory cleared?); run prepare again")
    sample = staged.decode(data, kept.id, kept.source, kept.order)
    if not isinstance(sample, Sample):
        raise OSError(f"staged entry {store.path(kept.entry)} does not hold a kept sample")
    return sample


class TrainTokenizerFn(beam.DoFn):
    """The SentencePiece model from the sampled train texts (read back from the store)."""

    def __init__(self, cfg: PrepareConfig, store: str) -> None:
        self.cfg, self.store_root = cfg, store

    def process(self, sample: list[tuple[str, str]]):
        from mmprep import staged
        from mmprep.tokenizer import train_tokenizer

        store = Store(self.store_root)
        texts = []
        for _, entry in sample:
            data = store.get(entry)
            if data is None:
                raise OSError(f"staged entry {store.path(entry)} vanished during the run; run prepare again")
            texts.append(staged.decode(data, "", "", 0).text)
        yield train_tokenizer(texts, self.cfg.text)
