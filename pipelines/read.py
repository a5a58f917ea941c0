"""Reading a raw corpus (manifest or directory layout) through Beam's FileSystems."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from mmprep.manifest import (
    MANIFEST_SUFFIXES,
    csv_records,
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


class Range(NamedTuple):
    """A slice of the input that one worker reads on its own.

    jsonl/csv: bytes [start, stop) holding whole rows; parquet: row groups [start, stop);
    directory: the stem groups in `rows`. `line` is the 1-based number of the first
    line/row (for `source`), `order` the global input position of the first row."""

    kind: str
    path: str
    start: int
    stop: int
    line: int
    order: int
    rows: tuple = ()  # directory: ((stem, files), ...); csv: the header


class Plan(NamedTuple):
    ranges: list[Range]
    rows: int  # rows in the input (lines for JSONL: blank ones are skipped on reading)


PLAN_UNIT = 32  # rows per planned piece; pieces are then merged into ranges
MIN_RANGES = 64  # enough ranges to balance workers and report progress on small inputs
MAX_RANGE_ROWS = 1000
_BLOCK = 1 << 24


def _open(path: str):
    return FileSystems.open(path, compression_type="uncompressed")


def plan_input(kind: str, src: str) -> Plan:
    """Cut the input into ranges (at least MIN_RANGES where there are rows enough, at most
    MAX_RANGE_ROWS rows each), reading only what is needed to find row boundaries:
    newlines for JSONL, records for CSV, metadata for Parquet, the listing for a directory."""
    if kind == "manifest" and src.endswith((".jsonl", ".csv")):
        _check_encoding(src)
    if kind == "directory":
        plan = _plan_directory(src, PLAN_UNIT)
    elif src.endswith(".jsonl"):
        plan = _plan_jsonl(src, PLAN_UNIT)
    elif src.endswith(".csv"):
        plan = _plan_csv(src, PLAN_UNIT)
    else:
        plan = _plan_parquet(src)
    per = min(MAX_RANGE_ROWS, max(1, -(-plan.rows // MIN_RANGES)))
    return Plan(_coalesce(plan.ranges, per), plan.rows)


_WIDE = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _check_encoding(path: str) -> None:
    """A text manifest must be UTF-8 (invalid bytes in a field are that row's reject); one in
    UTF-16/32 would be every row a reject, so it is a one-line error before any work."""
    with _open(path) as f:
        head = f.read(4096)
    wide = next((name for bom, name in _WIDE.items() if head.startswith(bom)), None)
    if wide is None and head.count(0) > len(head) // 4:
        wide = "UTF-16/32 or binary"
    if wide:
        raise InputError(f"--input {path}: the manifest looks {wide}-encoded; convert it to UTF-8")


def _coalesce(pieces: list[Range], per: int) -> list[Range]:
    """Merge consecutive pieces into ranges of about `per` rows (a piece's rows start at its
    `order`; a Parquet piece is a row group and is never cut)."""
    runs: list[list[Range]] = []
    for piece in pieces:
        if runs and piece.order - runs[-1][0].order < per:
            runs[-1].append(piece)
        else:
            runs.append([piece])
    merged = []
    for run in runs:
        first = run[0]
        rows = tuple(r for piece in run for r in piece.rows) if first.kind == "directory" else first.rows
        merged.append(first._replace(stop=run[-1].stop, rows=rows))
    return merged


def _plan_jsonl(path: str, per: int) -> Plan:
    ranges: list[Range] = []
    start, line, lines, size, last = 0, 1, 0, 0, b""
    with _open(path) as f:
        while block := f.read(_BLOCK):
            ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            # newline number lines+i+1 closes a range when it is a multiple of `per`
            for i in range((-lines - 1) % per, len(ends), per):
                end = size + int(ends[i]) + 1
                ranges.append(Range("jsonl", path, start, end, line, line - 1))
                start, line = end, line + per
            lines, size, last = lines + len(ends), size + len(block), block[-1:]
    if size > start:  # the rest, possibly without a final newline
        ranges.append(Range("jsonl", path, start, size, line, line - 1))
    return Plan(ranges, lines + (last not in (b"", b"\n")))


def _csv_start(f) -> int:
    """Where a CSV's first record starts: after a UTF-8 byte order mark, if any."""
    return 3 if f.read(3) == b"\xef\xbb\xbf" else 0


def _plan_csv(path: str, per: int) -> Plan:
    """Ranges at record boundaries (`csv_records`: quoted newlines kept together, an
    unclosed quote costs one line); the header is checked before any work."""
    ranges: list[Range] = []
    with _open(path) as f:
        offset = _csv_start(f)
        f.seek(offset)
        records = csv_records(f)
        header, header_lines, size = None, 0, 0
        for fields, used, nbytes, _ in records:  # the first non-blank record (blank lines before it are skipped)
            header_lines, size = header_lines + used, size + nbytes
            if fields:
                header = fields
                break
        if not header:
            return Plan([], 0)
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise InputError(f"--input {path}: column {repeated[0]!r} appears more than once in the header")
        offset += size
        start, line, first, count, lines = offset, header_lines + 1, 0, 0, header_lines
        for fields, used, size, _ in records:
            offset, lines = offset + size, lines + used
            if fields == []:
                continue  # a blank line: no row
            count += 1
            if count % per == 0:
                ranges.append(Range("csv", path, start, offset, line, first, tuple(header)))
                start, line, first = offset, lines + 1, count
        if offset > start:
            ranges.append(Range("csv", path, start, offset, line, first, tuple(header)))
    return Plan(ranges, count)


def _plan_parquet(path: str) -> Plan:
    import pyarrow.parquet as pq

    with _open(path) as f:
        parquet = pq.ParquetFile(f)
        meta, names = parquet.metadata, parquet.schema_arrow.names
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"--input {path}: column {repeated[0]!r} appears more than once")
    ranges, row = [], 0
    for group in range(meta.num_row_groups):
        n = meta.row_group(group).num_rows
        ranges.append(Range("parquet", path, group, group + 1, row + 1, row))
        row += n
    return Plan(ranges, row)


def _plan_directory(src: str, per: int) -> Plan:
    paths = [m.path for m in FileSystems.match([f"{src}/**"])[0].metadata_list]
    groups = list(group_directory(paths, src))
    ranges = [
        Range("directory", src, i, i + len(groups[i : i + per]), i + 1, i, tuple(groups[i : i + per]))
        for i in range(0, len(groups), per)
    ]
    return Plan(ranges, len(groups))


def read_range(rng: Range) -> Iterator[RawRow | Reject]:
    """The rows of one range, each a RawRow or (unparseable) a Reject."""
    name, base = posixpath.basename(rng.path), posixpath.dirname(rng.path)
    if rng.kind == "directory":
        for i, (stem, files) in enumerate(rng.rows):
            first = next(iter(files.values()))[0]
            yield directory_row(stem, files, rng.order + i, first[len(rng.path) + 1 :])
        return
    if rng.kind == "parquet":
        yield from _read_parquet(rng, name, base)
        return
    if rng.kind == "jsonl":
        with _open(rng.path) as f:
            f.seek(rng.start)
            data = f.read(rng.stop - rng.start)
        if rng.start == 0:
            data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not part of row 1
        for i, line in enumerate(data.split(b"\n")):  # "\n" only: the line numbers editors show
            if line.strip():
                yield parse_jsonl_line(line, f"{name}:{rng.line + i}", rng.order + i, base)
        return
    yield from _read_csv(rng, name, base)


def _read_csv(rng: Range, name: str, base: str) -> Iterator[RawRow | Reject]:
    header, offset, line, order = list(rng.rows), rng.start, rng.line, rng.order
    with _open(rng.path) as f:
        f.seek(rng.start)
        # the file from the range on: a record's look-ahead may pass the range's end
        for fields, used, size, problem in csv_records(f, len(header)):
            if offset >= rng.stop:
                return
            source = f"{name}:{line}"
            offset, line = offset + size, line + used
            if fields == []:
                continue
            if fields is None:
                yield read_reject(source, order, "malformed_row", problem)
            elif len(fields) != len(header):
                yield read_reject(source, order, "malformed_row", f"expected {len(header)} fields, got {len(fields)}")
            else:
                yield parse_record(dict(zip(header, fields, strict=True)), source, order, base)
            order += 1


def _read_parquet(rng: Range, name: str, base: str) -> Iterator[RawRow | Reject]:
    import pyarrow.parquet as pq

    with _open(rng.path) as f:
        table = pq.ParquetFile(f)
        order = rng.order
        for batch in table.iter_batches(batch_size=4096, row_groups=list(range(rng.start, rng.stop))):
            for record in batch.to_pylist():
                yield parse_record(record, f"{name}:{order + 1}", order, base)
                order += 1


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
    pattern) and a huge file costs at most max_bytes of memory. Local paths are opened
    directly (Beam's FileSystems costs ~100 µs per file there); URIs go through it."""
    if "://" not in path:
        try:
            with open(path, "rb") as f:
                data = _read_local(f, max_bytes)
        except FileNotFoundError:
            return RecordError("missing_file", path)
        except (OSError, ValueError) as err:
            return RecordError("unreadable_file", f"{path}: {err}")
        return _checked(path, data, max_bytes)
    try:
        if not FileSystems.exists(path):
            return RecordError("missing_file", path)
        with FileSystems.open(path, compression_type="uncompressed") as f:
            data = f.read(max_bytes + 1)
    except (OSError, ValueError, beam.io.filesystem.BeamIOError) as err:
        return RecordError("unreadable_file", f"{path}: {err}")
    return _checked(path, data, max_bytes)


def _read_local(f, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes of an open local file. Asking for the file's size (+1)
    first: read(max_bytes + 1) allocates that much before reading (~50 µs per file at the
    default 256 MB). A file that grew after fstat, or reports no size (a pipe, /proc), is read
    on up to the bound."""
    size = os.fstat(f.fileno()).st_size
    data = f.read(min(size, max_bytes) + 1)
    if len(data) > size:
        data += f.read(max_bytes + 1 - len(data))
    return data


def _checked(path: str, data: bytes, max_bytes: int) -> bytes | RecordError:
    if not data:
        return RecordError("empty_file", path)
    if len(data) > max_bytes:
        return RecordError("file_too_large", f"{path}: more than max_file_bytes={max_bytes}")
    return data
