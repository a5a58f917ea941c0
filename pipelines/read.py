"""Reading a raw corpus (manifest or directory layout) through Beam's FileSystems."""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from mmprep.manifest import (
    MANIFEST_SUFFIXES,
    directory_row,
    group_directory,
    parse_jsonl_line,
    parse_record,
    read_reject,
)
from mmprep.records import RawRow, RecordError, Reject


class InputError(ValueError):
    """--input is unusable (missing, empty, unknown format); the message is one line."""


def resolve_input(src: str) -> tuple[str, str]:
    """("manifest", path) or ("directory", path); a folder holding one manifest.* uses it."""
    src = src.rstrip("/") or "/"
    if src.endswith(MANIFEST_SUFFIXES):
        if not FileSystems.exists(src):
            raise InputError(f"--input {src}: no such manifest file")
        return "manifest", src
    if not FileSystems.exists(src):
        raise InputError(f"--input {src}: no such file or directory")
    found = [f"{src}/manifest{s}" for s in MANIFEST_SUFFIXES if FileSystems.exists(f"{src}/manifest{s}")]
    if len(found) > 1:
        raise InputError(f"--input {src}: several manifests ({', '.join(found)}); pass one of them")
    if found:
        return "manifest", found[0]
    matches = FileSystems.match([f"{src}/**"])[0].metadata_list
    if not matches:
        raise InputError(f"--input {src}: not a manifest (.jsonl/.csv/.parquet) and no files below it")
    return "directory", src


def _base(path: str) -> str:
    return posixpath.dirname(path)


def read_manifest(path: str) -> Iterator[RawRow | Reject]:
    name, base = posixpath.basename(path), _base(path)
    if path.endswith(".jsonl"):
        yield from _read_jsonl(path, name, base)
    elif path.endswith(".csv"):
        yield from _read_csv(path, name, base)
    else:
        yield from _read_parquet(path, name, base)


def _read_jsonl(path: str, name: str, base: str) -> Iterator[RawRow | Reject]:
    order = 0
    with FileSystems.open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines are not rows (the contract counts non-blank lines)
            yield parse_jsonl_line(line, f"{name}:{number}", order, base)
            order += 1


def _read_csv(path: str, name: str, base: str) -> Iterator[RawRow | Reject]:
    """Python's csv module: every field stays a string, a broken row is one reject."""
    with FileSystems.open(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig", errors="surrogateescape")
    except UnicodeDecodeError as err:  # pragma: no cover - surrogateescape never raises
        raise InputError(f"--input {path}: {err}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        return
    for order, values in enumerate(reader):
        source = f"{name}:{reader.line_num}"
        if len(values) != len(header):
            detail = f"expected {len(header)} fields, got {len(values)}"
            yield read_reject(source, order, "malformed_row", detail)
            continue
        yield parse_record(dict(zip(header, values, strict=True)), source, order, base)


def _read_parquet(path: str, name: str, base: str) -> Iterator[RawRow | Reject]:
    import pyarrow.parquet as pq

    with FileSystems.open(path) as f:
        table = pq.ParquetFile(io.BytesIO(f.read()))
    order = 0
    for batch in table.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield parse_record(record, f"{name}:{order + 1}", order, base)
            order += 1


def read_directory(src: str) -> Iterator[RawRow | Reject]:
    paths = [m.path for m in FileSystems.match([f"{src}/**"])[0].metadata_list]
    for order, (stem, files) in enumerate(group_directory(paths, src)):
        first = next(iter(files.values()))[0]
        yield directory_row(stem, files, order, first[len(src) + 1 :])


class ReadRowsFn(beam.DoFn):
    """(kind, path) → RawRow elements, and a Reject for each unparseable row."""

    def __init__(self) -> None:
        self.rows = Metrics.counter("read", "rows")

    def process(self, element: tuple[str, str]):
        kind, path = element
        rows = read_manifest(path) if kind == "manifest" else read_directory(path)
        for row in rows:
            self.rows.inc()
            if isinstance(row, Reject):
                Metrics.counter("rejects", row.reason).inc()
            yield row


def load_media(row: RawRow, max_bytes: int) -> dict[str, bytes | str | RecordError]:
    """Read each declared modality's bytes (local path or URI) or the error met doing so."""
    loaded: dict[str, bytes | str | RecordError] = {}
    for modality, path in (("image", row.image), ("audio", row.audio), ("text", row.text_path)):
        if path is not None:
            loaded[modality] = _read_bytes(path, max_bytes)
    if row.text is not None:
        loaded["text"] = row.text
    return loaded


def _read_bytes(path: str, max_bytes: int) -> bytes | RecordError:
    """`exists` + a bounded read: no glob semantics ("photo [1].jpg" is a name, not a
    pattern) and a huge file costs at most max_bytes of memory."""
    try:
        if not FileSystems.exists(path):
            return RecordError("missing_file", path)
        with FileSystems.open(path, compression_type="uncompressed") as f:
            data = f.read(max_bytes + 1)
    except (OSError, ValueError, beam.io.filesystem.BeamIOError) as err:
        return RecordError("unreadable_file", f"{path}: {err}")
    if not data:
        return RecordError("empty_file", path)
    if len(data) > max_bytes:
        return RecordError("file_too_large", f"{path}: more than max_file_bytes={max_bytes}")
    return data
