"""File helpers over Beam's FileSystems (local paths and URIs alike): joining, atomic writes,
whole-file reads, Parquet tables as bytes."""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems


def join(*parts: str) -> str:
    """Path join for local paths and URIs alike."""
    return FileSystems.join(*parts) if FileSystems.get_scheme(parts[0]) else posixpath.join(*parts)


def is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


@contextlib.contextmanager
def atomic_stream(path: str, durable: bool = True, tag: str = ""):
    """A writable file that appears at `path` only when the block completes (local: a temp
    sibling + rename, fsync'ed first when `durable`; other filesystems: create, then rename).
    The temporary name is `PATH.tmp-TAG…`: a run tags its own, so a later run can sweep the
    leftovers of one that was killed (`staging.sweep_dead_runs`)."""
    tmp = f"{path}.tmp-{tag}{uuid.uuid4().hex[:12]}"
    if is_local(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                yield f
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with FileSystems.create(tmp) as f:
        yield f
    FileSystems.rename([tmp], [path])


def put(path: str, data: bytes, durable: bool = True, tag: str = "") -> None:
    with atomic_stream(path, durable, tag) as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


def arrow_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def table_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    return arrow_bytes(pa.Table.from_pylist(rows, schema=schema))


def read_table(path: str, schema: pa.Schema) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(path)), schema=schema)
