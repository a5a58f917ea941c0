"""Beam DoFns and CombineFns of the prepare pipeline. Each composes pure mmprep functions."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import sys
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from mmprep.config import PrepareConfig
from mmprep.process import process_row
from mmprep.records import RawRow, RecordError, Reject, Sample, reject
from mmprep.shards import member_bytes, sample_members
from mmprep.split import LinkInfo
from pipelines.read import load_media


def counted(rej: Reject) -> Reject:
    Metrics.counter("rejects", rej.reason).inc()
    return rej


def is_reject(element: object) -> bool:
    return isinstance(element, Reject)


def is_kept(element: object) -> bool:
    return not isinstance(element, Reject)


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


def by_id(row: RawRow) -> tuple[str, RawRow]:
    return row.id, row


class KeepFirstFn(beam.DoFn):
    """Records grouped on a key (an id, a content signature): the first in input order is
    kept, the others become rejects pointing at it (`duplicate_of`)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail

    def process(self, element: tuple[str, list[RawRow | Sample]]):
        _, records = element
        first, *others = sorted(records, key=lambda r: r.order)
        yield first
        for record in others:
            err = RecordError(self.reason, f"{self.detail} {first.source}")
            yield counted(reject(record, err, duplicate_of=first.id))


class ProcessRowFn(beam.DoFn):
    """Load the media (FileSystems), then decode/clean/normalize/featurize/label."""

    def __init__(self, cfg: PrepareConfig, progress_every: int = 200) -> None:
        self.cfg = cfg
        self.progress_every = progress_every
        self.kept = Metrics.counter("process", "kept")

    def setup(self) -> None:
        self.count, self.started = 0, time.monotonic()

    def process(self, row: RawRow):
        try:
            result = process_row(row, load_media(row, self.cfg.max_file_bytes), self.cfg)
        except Exception as err:  # noqa: BLE001 - one exotic file must not stop a million-row job:
            # it becomes a counted, visible reject (and the run fails past max_reject_ratio)
            result = reject(row, RecordError("processing_error", f"{type(err).__name__}: {err}"))
        self.count += 1
        if self.count % self.progress_every == 0:
            rate = self.count / max(time.monotonic() - self.started, 1e-9)
            print(f"[mmprep prepare] a worker has processed {self.count} rows ({rate:.0f}/s)", file=sys.stderr, flush=True)
        if isinstance(result, Reject):
            yield counted(result)
        else:
            self.kept.inc()
            yield result


def by_signature(sample: Sample) -> tuple[str, Sample]:
    return sample.content_signature, sample


def label_of(sample: Sample) -> list[str]:
    return [sample.label] if sample.label is not None else []


def link_info(sample: Sample) -> LinkInfo:
    links = []
    for modality, name in (("image", "image"), ("audio", "audio"), ("text", "text_link")):
        if name in sample.hashes:
            links.append((modality, sample.hashes[name]))
    return LinkInfo(key=sample.key, label=sample.label, links=tuple(links), phash=sample.phash)


def split_of(result) -> dict[str, str]:
    return result.split_of


def split_report(result) -> dict:
    return {"groups": result.groups, "ignored_links": result.ignored_links}


def size_of(item: tuple) -> tuple[str, str, int]:
    split, key, _, _, size = item
    return split, key, size


def with_split(sample: Sample, split_of: dict[str, str]) -> tuple[str, Sample]:
    return split_of[sample.key], sample


def is_train(item: tuple[str, Sample]) -> bool:
    return item[0] == "train"


def train_text(item: tuple[str, Sample], salt: str) -> list[tuple[str, str]]:
    """Train texts keyed by a salted digest: the smallest K form a bounded, unbiased sample."""
    text = item[1].text
    if text is None:
        return []
    return [(hashlib.sha256(f"{salt}|{item[1].key}".encode()).hexdigest(), text)]


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


class ToMembersFn(beam.DoFn):
    """Tokenize and lay out the tar members of one sample; emit its manifest row too."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg
        self._tokenizer = None
        self._model = None

    def process(self, item: tuple[str, Sample], model: bytes, labels: list[str]):
        from mmprep.tokenizer import Tokenizer

        if self._model != model:
            self._tokenizer, self._model = Tokenizer.from_bytes(model), model
        split, s = item
        tokens = None
        if s.text is not None:
            tokens = self._tokenizer.encode(s.text, self.cfg.text.max_tokens)
        label_id = labels.index(s.label) if s.label is not None else None
        meta = {**s.meta, "key": s.key, "split": split, "label_id": label_id}
        if tokens is not None:
            meta["text"] = {**meta["text"], "tokens": int(tokens.shape[0])}
        members = sample_members(s.key, meta=meta, jpg=s.jpg, mel=s.mel, tokens=tokens, text=s.text, label_id=label_id)
        row = manifest_row(s, split, label_id)
        yield split, s.key, members, row, member_bytes(members)


def manifest_row(s: Sample, split: str, label_id: int | None) -> dict:
    return {
        "id": s.id,
        "key": s.key,
        "split": split,
        "shard": None,
        "label": s.label,
        "label_id": label_id,
        "has_image": s.jpg is not None,
        "has_audio": s.mel is not None,
        "has_text": s.text is not None,
        "source": s.source,
        "image_sha256": s.hashes.get("image"),
        "audio_sha256": s.hashes.get("audio"),
        "text_sha256": s.hashes.get("text"),
    }


class MomentsFn(beam.CombineFn):
    """Exact, order-independent per-channel (image) or per-bin (audio) moments."""

    def __init__(self, modality: str, dims: int) -> None:
        self.modality, self.dims = modality, dims

    def create_accumulator(self):
        from mmprep.stats import Moments

        return Moments.empty(self.dims)

    def add_input(self, acc, item: tuple[str, Sample]):
        sample = item[1]
        if self.modality == "image" and sample.jpg is not None:
            from mmprep.image import decode_jpg

            acc.add_image(decode_jpg(sample.jpg))
        elif self.modality == "audio" and sample.mel is not None:
            acc.add_features(np.asarray(sample.mel))
        return acc

    def merge_accumulators(self, accumulators):
        from mmprep.stats import Moments

        accs = list(accumulators)
        out = accs[0]
        for acc in accs[1:]:
            out = Moments.merge(out, acc)
        return out

    def extract_output(self, acc):
        mean, std = acc.mean_std(255.0 if self.modality == "image" else 1.0)  # images on the [0, 1] scale
        return {"mean": mean, "std": std, "count": int(acc.count)}
