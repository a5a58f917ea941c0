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
from mmprep.split import split_columns
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


def _unsigned(phash: int | None) -> int | None:
    return None if phash is None else phash + (1 << 64) if phash < 0 else phash


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
        firsts, dup_ids = _duplicates(parsed, _first_per(parsed, "id"), "id", "duplicate_id", "id already used by")
        del parsed
        failed = pc.is_valid(firsts["reason"])
        rejects += _reject_rows(firsts.filter(failed))
        kept = firsts.filter(pc.invert(failed)).drop_columns(["stage", "reason", "detail"])
        del firsts, failed
        kept, dups = _duplicates(kept, _first_per(kept, "signature"), "signature", "duplicate", "same content as")
        kept = kept.drop_columns(["signature"])
        rejects += dup_ids + dups
        for reason in ("duplicate_id", "duplicate"):
            Metrics.counter("rejects", reason).inc(sum(r["reason"] == reason for r in rejects))
        put(join(self.out, "rejects.parquet"), table_bytes(_sorted_rejects(rejects), REJECTS_SCHEMA))

        labels = build_label_map([x for x in pc.unique(kept["label"]).to_pylist() if x is not None], cfg.label)
        kept = kept.sort_by("key")
        keys = kept["key"].to_pylist()
        split = _split(kept, keys, cfg)
        splits, group_of, split.splits, split.keys, split.group_of = split.splits, split.group_of, [], [], []
        model = self._tokenizer(kept, keys, splits)
        put(join(self.work, "tokenizer.model"), model, durable=False)
        index = shard_indices(splits, kept["size"].to_pylist(), cfg.shard)
        label_id = {label: i for i, label in enumerate(labels)}
        names = [shard_name(s, i) for s, i in zip(splits, index, strict=True)]
        del keys, splits, index
        plan = (
            kept.select(["key", "id", "source", "order", "entry"])
            .append_column("label_id", pa.array([label_id.get(x) for x in kept["label"].to_pylist()], pa.int32()))
            .append_column("group", pa.array(group_of, pa.string()))
            .append_column("shard", pa.array(names, pa.string()))
        )
        del names, kept, group_of
        plan = plan.sort_by([("shard", "ascending"), ("key", "ascending")])
        shard = plan["shard"].to_numpy(zero_copy_only=False)
        starts = [0, *(np.flatnonzero(shard[1:] != shard[:-1]) + 1).tolist(), len(shard)] if len(shard) else []
        tasks = []
        for start, end in itertools.pairwise(starts):
            name = str(shard[start])
            rows = plan.slice(start, end - start).drop_columns(["shard"]).cast(PLAN_SCHEMA)  # key order
            put(join(self.work, "plan", f"{name}.parquet"), arrow_bytes(rows), durable=False)
            tasks.append((name, name.split("-")[0]))
        del shard, plan
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

    def _tokenizer(self, kept: pa.Table, keys: list[str], splits: list[str]) -> bytes:
        """SentencePiece on a bounded, salted-hash-chosen sample of the train split's texts."""
        from mmprep.tokenizer import train_tokenizer

        salt, n = self.cfg.split_salt, self.cfg.text.tokenizer_sample
        texts = kept["text"].combine_chunks()
        chosen = heapq.nsmallest(
            n,
            (
                (int.from_bytes(hashlib.sha256(f"{salt}|{k}".encode()).digest()[:8], "big"), i)
                for i, (k, s) in enumerate(zip(keys, splits, strict=True))
                if s == "train" and texts[i].is_valid
            ),
        )
        return train_tokenizer([texts[i].as_py() for _, i in chosen], self.cfg.text)


def _split(kept: pa.Table, keys: list[str], cfg: PrepareConfig):
    links = {m: [None if v is None else int(v, 16) for v in kept[column].to_pylist()] for m, column in _LINKS}
    phashes = {m: [_unsigned(ph) for ph in kept[column].to_pylist()] for m, column in (("image", "phash"), ("video", "vphash"))}
    return split_columns(keys, kept["label"].to_pylist(), links, phashes, cfg)


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
