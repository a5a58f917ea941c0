"""The one global step of prepare, over light per-row records only.

Workers process their input ranges and write, per range, an *index part*: one small row per
input row (key, content hashes, label, size, staged entry name — or the reject). `PlanFn`
reads all index parts (Arrow, ~200 bytes per row), then decides in one place, in plain code:
duplicate ids and exact duplicates, the label map, the leak-free split, the tokenizer's text
sample (and trains it), and the shard of every sample. It writes `rejects.parquet`, one
*plan part* per shard (the rows that shard holds) and a summary for the final step; shard
writers then stream each shard's payloads from the staging store.

Why files and not Beam shuffles of the records: Beam's local runner keeps every shuffled or
side-input PCollection in memory as decoded Python objects (~1 KB per record and shuffle),
and the Dask runner mishandles side inputs and global combines (README, Limits). Here
nothing per row crosses the runner; the pipeline is a straight line of per-range,
global and per-shard steps.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import json
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from mmprep.config import PrepareConfig
from mmprep.labels import build_label_map
from mmprep.records import REASONS, Reject, printable
from mmprep.shards import shard_indices, shard_name
from mmprep.split import Split, split_arrays
from pipelines.files import arrow_bytes, join, put, read_table, table_bytes

INDEX_SCHEMA = pa.schema(
    [
        ("order", pa.int64()),
        ("source", pa.string()),
        ("id", pa.string()),
        ("key", pa.string()),
        ("label", pa.string()),
        ("entry", pa.string()),
        ("signature", pa.string()),
        ("link_image", pa.string()),
        ("link_audio", pa.string()),
        ("link_text", pa.string()),
        ("link_video", pa.string()),
        ("phash", pa.int64()),  # the 64-bit perceptual hash, two's complement
        ("vphash", pa.int64()),  # the video's, the same way
        ("text", pa.string()),
        ("size", pa.int64()),
        ("stage", pa.string()),  # set for a reject
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
PLAN_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("order", pa.int64()),
        ("entry", pa.string()),
        ("label_id", pa.int32()),
        ("group", pa.string()),
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
_LINKS = (("image", "link_image"), ("audio", "link_audio"), ("text", "link_text"), ("video", "link_video"))


def _signed(phash: int | None) -> int | None:
    return None if phash is None else phash - (1 << 64) if phash >= 1 << 63 else phash


def index_row(record) -> dict[str, Any]:
    """A kept row (`steps.Kept`) or a Reject → one index row."""
    if isinstance(record, Reject):
        row = record.row()
        return {"order": record.order, "source": row["source"], "id": row["id"], "stage": record.stage,
                "reason": record.reason, "detail": row["detail"]}
    links = dict(record.links)
    return {
        "order": record.order,
        "source": printable(record.source),
        "id": record.id,
        "key": record.key,
        "label": record.label,
        "entry": record.entry,
        "signature": record.signature,
        **{column: links.get(modality) for modality, column in _LINKS},
        "phash": _signed(record.phash),
        "vphash": _signed(record.vphash),
        "text": record.text,
        "size": record.size,
    }


def _first_per(table: pa.Table, column: str) -> pa.Array:
    """Boolean mask: the row is the first (lowest `order`) of its value in `column`."""
    firsts = table.group_by(column, use_threads=False).aggregate([("order", "min")])
    return pc.is_in(table["order"], value_set=firsts["order_min"])


def _duplicates(table: pa.Table, mask: pa.Array, column: str, reason: str, detail: str) -> tuple[pa.Table, list[dict]]:
    """Split `table` by `mask` (firsts) and turn the others into rejects naming their first."""
    firsts, others = table.filter(mask), table.filter(pc.invert(mask))
    if others.num_rows == 0:
        return firsts, []
    lookup = pa.table({"_k": firsts[column], "first_id": firsts["id"], "first_source": firsts["source"]})
    mine = pa.table({"order": others["order"], "id": others["id"], "source": others["source"], "_k": others[column]})
    joined = mine.join(lookup, "_k", use_threads=False)
    stage = REASONS[reason][0]
    rejects = [
        {"order": r["order"], "id": r["id"], "source": r["source"], "stage": stage, "reason": reason,
         "detail": f"{detail} {r['first_source']}", "duplicate_of": r["first_id"]}
        for r in joined.to_pylist()
    ]
    return firsts, rejects


class PlanFn(beam.DoFn):
    """All index parts → rejects.parquet, tokenizer, one plan part per shard, a summary.

    Emits one (shard name, split) task per shard."""

    def __init__(self, out: str, work: str, cfg: PrepareConfig) -> None:
        self.out, self.work, self.cfg = out, work, cfg

    def process(self, summaries: list[dict]):

        cfg = self.cfg
        parts = sorted(s["part"] for s in summaries)
        table = pa.concat_tables([read_table(p, INDEX_SCHEMA) for p in parts]) if parts else INDEX_SCHEMA.empty_table()
        input_rows = table.num_rows
        # rows that could not be parsed have no id to deduplicate on; every step below keeps
        # the lowest `order`, so the table needs no sorting (and each step drops its input:
        # the peak memory of this step is about two copies of the index)
        unparsed = pc.fill_null(pc.and_(pc.is_valid(table["reason"]), pc.equal(table["stage"], "read")), False)
        rejects = _reject_rows(table.filter(unparsed))
        parsed = table.filter(pc.invert(unparsed))
        del table, unparsed
        release_memory()
        # a row rejected for its own reason (a missing file, say) keeps no id: a later row with
        # the same id is then the one kept, not a duplicate of a row that is not in the dataset
        failed = pc.is_valid(parsed["reason"])
        rejects += _reject_rows(parsed.filter(failed))
        usable = parsed.filter(pc.invert(failed)).drop_columns(["stage", "reason", "detail"])
        del parsed, failed
        release_memory()
        kept, dup_ids = _duplicates(usable, _first_per(usable, "id"), "id", "duplicate_id", "id already used by")
        del usable
        release_memory()
        kept, dups = _duplicates(kept, _first_per(kept, "signature"), "signature", "duplicate", "same content as")
        kept = kept.drop_columns(["signature"])
        rejects += dup_ids + dups
        for reason in ("duplicate_id", "duplicate"):
            Metrics.counter("rejects", reason).inc(sum(r["reason"] == reason for r in rejects))
        put(join(self.out, "rejects.parquet"), table_bytes(_sorted_rejects(rejects), REJECTS_SCHEMA))

        labels = build_label_map([x for x in pc.unique(kept["label"]).to_pylist() if x is not None], cfg.label)
        kept = kept.sort_by("key")
        release_memory()
        keys = kept["key"].combine_chunks()
        # columns, not a Python object per sample: this step's memory is what limits the corpus
        # size on one machine (README "Prepare at scale")
        split = _split(kept, keys, cfg)
        release_memory()
        model = self._tokenizer(kept, keys, split)
        put(join(self.work, "tokenizer.model"), model, durable=False)
        index = np.asarray(shard_indices(split.codes, kept["size"].to_numpy(), cfg.shard), dtype=np.int64)
        # shards sorted by name: split name, then index (the index has a fixed width)
        rank = np.argsort(np.argsort(np.array(split.names)))
        plan = (
            kept.select(["key", "id", "source", "order", "entry"])
            .append_column("label_id", pc.index_in(kept["label"], value_set=pa.array(labels, pa.string())).cast(pa.int32()))
            .append_column("group", keys.take(pa.array(split.roots)))
            .append_column("_split", pa.array(rank[split.codes].astype(np.int8)))
            .append_column("_shard", pa.array(index))
        )
        del kept, keys, index
        release_memory()
        plan = plan.sort_by([("_split", "ascending"), ("_shard", "ascending"), ("key", "ascending")])
        codes, shard = plan["_split"].to_numpy(), plan["_shard"].to_numpy()
        names = [split.names[i] for i in np.argsort(rank)]  # by rank
        starts = [0, *(np.flatnonzero((codes[1:] != codes[:-1]) | (shard[1:] != shard[:-1])) + 1).tolist(), len(shard)] if len(shard) else []
        plan = plan.drop_columns(["_split", "_shard"])
        tasks = []
        for start, end in itertools.pairwise(starts):
            name = shard_name(names[codes[start]], int(shard[start]))
            rows = plan.slice(start, end - start).cast(PLAN_SCHEMA)  # key order
            put(join(self.work, "plan", f"{name}.parquet"), arrow_bytes(rows), durable=False)
            tasks.append((name, name.split("-")[0]))
        del codes, shard, plan
        summary = {
            "input_rows": input_rows,
            "labels": labels,
            "groups": split.groups,
            "ignored_links": split.ignored_links,
            "rejected": len(rejects),
            "rejects": dict(sorted(_count(r["reason"] for r in rejects).items())),
            "rejects_by_stage": dict(sorted(_count(r["stage"] for r in rejects).items())),
            "shards": [name for name, _ in tasks],
        }
        put(join(self.work, "plan.json"), json.dumps(summary, sort_keys=True).encode(), durable=False)
        yield from sorted(tasks)

    def _tokenizer(self, kept: pa.Table, keys: pa.Array, split: Split) -> bytes:
        """SentencePiece on a bounded, salted-hash-chosen sample of the train split's texts."""
        from mmprep.tokenizer import train_tokenizer

        salt, n = self.cfg.split_salt, self.cfg.text.tokenizer_sample
        texts = kept["text"].combine_chunks()
        train = split.names.index("train") if "train" in split.names else -1
        candidates = np.flatnonzero((split.codes == train) & texts.is_valid().to_numpy(zero_copy_only=False))

        def scored():
            for start in range(0, len(candidates), 4096):  # a few keys as Python strings at a time
                chunk = candidates[start : start + 4096]
                for i, k in zip(chunk.tolist(), keys.take(pa.array(chunk)).to_pylist(), strict=True):
                    yield int.from_bytes(hashlib.sha256(f"{salt}|{k}".encode()).digest()[:8], "big"), i

        chosen = heapq.nsmallest(n, scored())
        return train_tokenizer([texts[i].as_py() for _, i in chosen], self.cfg.text)


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _hex64(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A column of 16-digit hex hashes (or nulls) → (their uint64 values, valid mask), with no
    Python object per row."""
    arr = column.combine_chunks()
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    fixed = pc.fill_null(arr, "0" * 16).cast(pa.binary(16))  # an error if a hash is not 16 characters
    digits = _HEX[np.frombuffer(fixed.buffers()[1], np.uint8, count=16 * len(fixed), offset=16 * fixed.offset).reshape(-1, 16)]
    if (digits > 15).any():
        raise ValueError("an index part holds a content link that is not a 16-digit hex hash")
    values = np.zeros(len(arr), dtype=np.uint64)
    for j in range(16):
        values = (values << np.uint64(4)) | digits[:, j].astype(np.uint64)
    return values, valid


def _split(kept: pa.Table, keys: pa.Array, cfg: PrepareConfig) -> Split:
    labels = pc.fill_null(kept["label"], "").combine_chunks()
    names = sorted(pc.unique(labels).to_pylist())
    codes = pc.index_in(labels, value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False).astype(np.int64)
    links = {m: (*_hex64(kept[column]), None) for m, column in _LINKS}
    phashes = {}
    for modality, column in (("image", "phash"), ("video", "vphash")):
        arr = kept[column].combine_chunks()
        phashes[modality] = (pc.fill_null(arr, 0).to_numpy().view(np.uint64), arr.is_valid().to_numpy(zero_copy_only=False))
    return split_arrays(lambda i: keys[i].as_py(), codes, len(names), links, phashes, cfg)


def release_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim). Each step of the plan
    frees the Arrow buffers of the step before, but glibc keeps freed memory mapped, so every
    step's transient peak added up to the process's resident size: 1.8 KB per row at 16k rows,
    1.1 KB with this between the steps (benchmarks/prepare_bench.py)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def _reject_rows(table: pa.Table) -> list[dict]:
    return [{**r, "duplicate_of": None} for r in table.select(["order", "id", "source", "stage", "reason", "detail"]).to_pylist()]


def _sorted_rejects(rejects: list[dict]) -> list[dict]:
    rows = sorted(rejects, key=lambda r: (r["order"], r["reason"], r["source"]))
    return [{k: r[k] for k in REJECTS_SCHEMA.names} for r in rows]


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts
