"""Reading a raw corpus (manifest, directory layout, WebDataset tars, Parquet files) through Beam's FileSystems."""

from __future__ import annotations

import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from mmprep.manifest import (
    MANIFEST_SUFFIXES,
    MAX_LABEL_BYTES,
    MODALITY_COLUMNS,
    checked_bytes,
    csv_records,
    directory_row,
    group_directory,
    hf_record,
    hf_spec,
    kind_of,
    member_kind,
    parse_jsonl_line,
    parse_record,
    read_local,
    read_reject,
    split_member,
    webdataset_row,
)
from mmprep.records import RawRow, RecordError, Reject


class InputError(ValueError):
    """--input is unusable (missing, empty, unknown format); the message is one line."""


def resolve_input(src: str) -> tuple[str, str]:
    """(kind, src): "manifest" (a .jsonl/.csv/.parquet file; a folder holding one manifest.*
    uses it), "webdataset" (a .tar, a folder of .tar files, a comma-separated list or brace
    pattern of them), "parquet" (a folder, list or pattern of several .parquet files) or
    "directory" (media files grouped by stem)."""
    src = src.rstrip("/") or "/"
    listed = _listed_kind(src)
    if listed:
        return listed, src
    if src.endswith(MANIFEST_SUFFIXES):
        if not FileSystems.exists(src):
            raise InputError(f"--input {src}: no such manifest file")
        return "manifest", src
    if src.lower().endswith(TAR_SUFFIXES):  # a compressed tar too: it is one reject, not "no files below it"
        if not FileSystems.exists(src):
            raise InputError(f"--input {src}: no such tar file")
        return "webdataset", src
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
    return _directory_kind(src, [m.path for m in matches]), src


LISTED = {".tar": "webdataset", ".parquet": "parquet"}
# a gzip-compressed tar is read as a tar so that it is one reject (mmprep reads uncompressed tars
# only), never dropped from a folder or a list without a word
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _listed(path: str) -> str | None:
    """"webdataset"/"parquet" by a file's name, else None."""
    name = path.lower()
    return "webdataset" if name.endswith(TAR_SUFFIXES) else LISTED.get(posixpath.splitext(name)[1])


def _listed_kind(src: str) -> str | None:
    """"webdataset"/"parquet" for a comma-separated list or brace pattern of .tar (.parquet)
    files, all of which must exist; None for anything else (a path that merely holds a comma)."""
    if ("," not in src and "{" not in src) or FileSystems.exists(src):
        return None
    paths = expand_paths(src)
    kinds = {_listed(p) for p in paths}
    if len(kinds) != 1 or None in kinds:
        return None
    missing = [p for p in paths if not FileSystems.exists(p)]
    if missing:
        raise InputError(f"--input {src}: no such file {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return kinds.pop()


def _directory_kind(src: str, paths: list[str]) -> str:
    """A folder of .tar files (resp. .parquet files) and no media files is a WebDataset (a
    Parquet dataset, e.g. a Hugging Face repository's data/); anything else a directory layout."""
    rel = [p[len(src) + 1 :] for p in paths if p.startswith(src + "/")]
    rel = [r for r in rel if not any(part.startswith(".") for part in r.split("/"))]
    exts = {posixpath.splitext(r)[1].lower() for r in rel}
    if any(kind_of(e) != "other" for e in exts):
        return "directory"
    found = {_listed(r) for r in rel} - {None}
    return found.pop() if len(found) == 1 else "directory"


def expand_paths(src: str) -> list[str]:
    """A comma-separated list of paths, each a brace pattern as webdataset's `braceexpand`
    reads it: `shards-{000..009}.tar` (numbers keep the bounds' zero padding), `{a,b}`."""
    return [path for part in _split_top(src, ",") if part for path in _braces(part)]


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "{") - (ch == "}" and depth > 0)
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?")


def _braces(pattern: str) -> list[str]:
    start = pattern.find("{")
    depth = 0
    for end in range(max(start, 0), len(pattern)):
        depth += (pattern[end] == "{") - (pattern[end] == "}")
        if start >= 0 and depth == 0:
            break
    else:
        return [pattern]  # no (closed) brace: a plain path
    head, inner, tails = pattern[:start], pattern[start + 1 : end], _braces(pattern[end + 1 :])
    numbers = _RANGE.fullmatch(inner)
    if numbers:
        lo, hi, step = int(numbers[1]), int(numbers[2]), abs(int(numbers[3] or 1)) or 1
        width = max(len(numbers[1]), len(numbers[2])) if numbers[1].lstrip("-").startswith("0") or numbers[2].lstrip("-").startswith("0") else 0
        items = [f"{n:0{width}d}" for n in range(lo, hi + (1 if hi >= lo else -1), step if hi >= lo else -step)]
    else:
        alternatives = _split_top(inner, ",")
        if len(alternatives) == 1:
            return [head + "{" + x + "}" + t for x in _braces(inner) for t in tails]
        items = [x for alt in alternatives for x in _braces(alt)]
    return [head + x + t for x in items for t in tails]


def input_files(src: str, suffix: str | tuple[str, ...]) -> list[tuple[str, str]]:
    """(path, name) of each file of a WebDataset/Parquet input, in input order: a list or
    pattern as given, a single file, or a folder's files sorted (hidden ones skipped). `name`
    is what `source` shows: the path below the folder, else the base name (the path where
    base names repeat)."""
    if ("," in src or "{" in src) and not FileSystems.exists(src):
        paths = expand_paths(src)
    elif src.lower().endswith(suffix):
        return [(src, posixpath.basename(src))]
    else:
        found = sorted(m.path for m in FileSystems.match([f"{src}/**"])[0].metadata_list)
        rel = [(p, p[len(src) + 1 :]) for p in found if p.startswith(src + "/") and p.lower().endswith(suffix)]
        return [(p, r) for p, r in rel if not any(part.startswith(".") for part in r.split("/"))]
    names = [posixpath.basename(p) for p in paths]
    return list(zip(paths, names if len(set(names)) == len(names) else paths, strict=True))


class Range(NamedTuple):
    """A slice of the input that one worker reads on its own.

    jsonl/csv: bytes [start, stop) holding whole rows; parquet: row groups [start, stop) (`rows`:
    the file's name in `source`); directory: the stem groups in `rows`; webdataset: the `Segment`s
    in `rows` (tar byte ranges, maybe of several tars). `line` is the 1-based number of the first
    line/row/sample (for `source`), `order` the global input position of the first row."""

    kind: str
    path: str
    start: int
    stop: int
    line: int
    order: int
    rows: tuple = ()  # directory: ((stem, files), ...); csv: the header; parquet: (name,); webdataset: segments


class Segment(NamedTuple):
    """Samples of one tar: those whose first member's header lies in bytes [start, stop), or
    (`damage` set) the one reject standing for where the tar is truncated or corrupt."""

    path: str
    name: str  # the tar's name in `source`
    start: int
    stop: int
    line: int  # 1-based number of the first sample in the tar
    order: int
    count: int  # samples (rows) in the segment
    damage: str = ""


class Plan(NamedTuple):
    ranges: list[Range]
    rows: int  # rows in the input (lines for JSONL: blank ones are skipped on reading)


PLAN_UNIT = 32  # rows per planned piece; pieces are then merged into ranges
MIN_RANGES = 64  # enough ranges to balance workers and report progress on small inputs
MAX_RANGE_ROWS = 1024
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
    elif kind == "webdataset":
        plan = _plan_webdataset(src, PLAN_UNIT)
    elif kind == "parquet":
        plan = _plan_parquets(src)
    elif src.endswith(".jsonl"):
        plan = _plan_jsonl(src, PLAN_UNIT)
    elif src.endswith(".csv"):
        plan = _plan_csv(src, PLAN_UNIT)
    else:
        plan = _plan_parquet(src)
    # a power of two: appending rows to a manifest keeps every earlier range as it was (until the
    # input doubles), so a rerun reuses those ranges whole (steps.range_key)
    per = min(MAX_RANGE_ROWS, 1 << max(0, -(-plan.rows // MIN_RANGES) - 1).bit_length())
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
    `order`; a Parquet piece is a row group and is never cut). Pieces of different files merge
    only for a WebDataset (a range lists its tar segments)."""
    runs: list[list[Range]] = []
    for piece in pieces:
        if runs and piece.order - runs[-1][0].order < per and (piece.kind == "webdataset" or piece.path == runs[-1][0].path):
            runs[-1].append(piece)
        else:
            runs.append([piece])
    merged = []
    for run in runs:
        first = run[0]
        rows = tuple(r for piece in run for r in piece.rows) if first.kind in ("directory", "webdataset") else first.rows
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
        if "id" not in header:  # every row would be a missing_id reject
            shown = ", ".join(repr(h) for h in header[:6]) + (", …" if len(header) > 6 else "")
            other = next((sep for sep in (";", "\t", "|") if len(header) == 1 and sep in header[0]), None)
            hint = f" (one column holding {other!r}: mmprep reads comma-separated CSV)" if other else ""
            raise InputError(f"--input {path}: the header has no 'id' column (it has {shown}){hint}")
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


def _plan_parquet(path: str, name: str | None = None, first: int = 0) -> Plan:
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
        ranges.append(Range("parquet", path, group, group + 1, row + 1, first + row, (name,) if name else ()))
        row += n
    return Plan(ranges, row)


def _plan_parquets(src: str) -> Plan:
    """Several Parquet files (a folder, list or pattern): each cut at its row groups."""
    ranges, rows = [], 0
    for path, name in input_files(src, ".parquet"):
        plan = _plan_parquet(path, name, rows)
        ranges += plan.ranges
        rows += plan.rows
    return Plan(ranges, rows)


def _plan_webdataset(src: str, per: int) -> Plan:
    """Pieces of `per` samples per tar, found by walking the member headers (tarfile seeks over
    the data); a truncated or corrupt tar adds one row, its damage."""
    ranges, rows = [], 0
    for path, name in input_files(src, TAR_SUFFIXES):
        for seg in _plan_tar(path, name, rows, per):
            ranges.append(Range("webdataset", path, seg.start, seg.stop, seg.line, seg.order, (seg,)))
            rows += seg.count
    return Plan(ranges, rows)


class _Damage(Exception):
    """Where a tar is damaged; `lost`: the header offset of the sample it cuts (else `offset`)."""

    def __init__(self, offset: int, detail: str, lost: int | None = None) -> None:
        super().__init__(detail)
        self.offset, self.detail, self.lost = offset, detail, offset if lost is None else lost


# what a hostile tar can make tarfile raise while reading headers
_TAR_ERRORS = (tarfile.TarError, OSError, ValueError, EOFError, UnicodeError, OverflowError, KeyError)
Member = tuple[str, str, Any]  # (member name, kind, content) as `webdataset_row` takes them


def _tar_samples(f, name: str, start: int, stop: int, load: Callable | None = None,
                 seen: dict | None = None) -> Iterator[tuple[str, int, list[Member]]]:
    """The samples of the tar open in `f` whose first member's header is in [start, stop):
    (key, header offset, members). Consecutive members of one key form a sample (WebDataset
    convention); directories, hidden members and absolute or `..` paths are skipped; `load`
    (tar, member, kind) reads a member's content (None: nothing is read). Damage (a truncated
    member, a corrupt header, trailing garbage, not a tar) raises _Damage: the sample being read
    is then lost, the ones yielded before are whole. `seen` gets the global pax headers met."""
    f.seek(start)
    if start == 0 and f.read(2) == b"\x1f\x8b":
        raise _Damage(0, f"{name}: a gzip-compressed tar (mmprep reads uncompressed tars only: gunzip it)")
    f.seek(start)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except _TAR_ERRORS as err:
        raise _Damage(start, f"{name}: not a readable tar at byte {start}: {err}") from None
    key, first, members, last, in_sample = None, 0, [], None, False
    while True:
        try:
            info = tar.next()
            problem = None if info is not None else _end_problem(f, tar.offset)
        except _TAR_ERRORS as err:
            info, problem = None, str(err) or type(err).__name__
        if problem is not None:
            cut = last is not None and not _whole(f, last)  # the last member's data runs past the end
            at = last.offset if cut else tar.offset
            detail = f"{name}: truncated or corrupt tar at byte {at}: {problem}"
            if cut and in_sample:
                raise _Damage(at, detail, first)  # the sample being read lost (part of) a member
            if members:
                yield key, first, members  # whole: what may have followed it is the damage
            raise _Damage(at, detail)
        if seen is not None:
            seen.update(tar.pax_headers)
        tar.members.clear()  # tarfile keeps every header it read: not for a million-member shard
        if info is None or info.offset >= stop:
            break
        last, in_sample = info, False
        split = None if info.isdir() else split_member(info.name)
        if split is None:
            continue
        if split[0] != key:
            if members:
                yield key, first, members
            key, first, members = split[0], info.offset, []
        kind = member_kind(split[1]) if info.isreg() else _special(info)
        members.append((info.name, kind, load(tar, info, kind) if load else None))
        in_sample = True
    if members:
        yield key, first, members


def _end_problem(f, offset: int) -> str | None:
    """Where tarfile found no next header: the end of the archive (zero blocks, or the end of
    the file), else what is wrong there."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return None if block.count(0) == len(block) else "not a tar header"


def _whole(f, info: tarfile.TarInfo) -> bool:
    """Whether a member's data lies within the file."""
    if not info.isreg() or info.size == 0:
        return True
    f.seek(info.offset_data + info.size - 1)
    return f.read(1) != b""


def _special(info: tarfile.TarInfo) -> str:
    """The kind of a member that is not a regular file: never followed, never read."""
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    return "device" if info.isdev() else "special file"


_END = 1 << 62  # a segment that runs to the end of its tar


def _plan_tar(path: str, name: str, order: int, per: int) -> list[Segment]:
    segments: list[Segment] = []
    count, piece_start, piece_first, seen = 0, 0, 0, {}
    with _open(path) as f:
        if not f.read(1):
            return []  # an empty file: an empty tar
        try:
            for _, offset, _ in _tar_samples(f, name, 0, _END, seen=seen):
                if count % per == 0 and count:
                    segments.append(Segment(path, name, piece_start, offset, piece_first + 1, order + piece_first, count - piece_first))
                    piece_start, piece_first = offset, count
                count += 1
            end, damage = _END, ""
        except _Damage as err:
            end, damage = err.lost, err.detail
        if count > piece_first:
            segments.append(Segment(path, name, piece_start, end, piece_first + 1, order + piece_first, count - piece_first))
        if seen and segments:  # global pax headers apply from where they stand: read the tar from its start
            segments = [segments[0]._replace(stop=end, count=count)]
        if damage:
            # the sample being read when the damage was met is lost (its members may be cut): one reject
            segments.append(Segment(path, name, end, end, count + 1, order + count, 1, damage))
    return segments


def _plan_directory(src: str, per: int) -> Plan:
    if "://" in src:
        paths = [m.path for m in FileSystems.match([f"{src}/**"])[0].metadata_list]
    else:  # the walk Beam's local match makes, less its size check, which drops a symlink to nothing (a missing_file reject)
        paths = [os.path.join(root, name) for root, _, names in os.walk(src) for name in names]
    groups = list(group_directory(paths, src))
    ranges = [
        Range("directory", src, i, i + len(groups[i : i + per]), i + 1, i, tuple(groups[i : i + per]))
        for i in range(0, len(groups), per)
    ]
    return Plan(ranges, len(groups))


def read_range(rng: Range, max_bytes: int | None = None) -> Iterator[RawRow | Reject]:
    """The rows of one range, each a RawRow or (unparseable) a Reject. `max_bytes`
    (prepare.max_file_bytes) bounds what is read of a tar member: a larger one is left unread."""
    name, base = posixpath.basename(rng.path), posixpath.dirname(rng.path)
    if rng.kind == "webdataset":
        yield from _read_webdataset(rng, max_bytes)
        return
    if rng.kind == "directory":
        for i, (stem, files) in enumerate(rng.rows):
            first = next(iter(files.values()))[0]
            yield directory_row(stem, files, rng.order + i, first[len(rng.path) + 1 :])
        return
    if rng.kind == "parquet":
        yield from _read_parquet(rng, rng.rows[0] if rng.rows else name, base)
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
                yield parse_record(dict(zip(header, fields, strict=True)), source, order, base, empty_is_missing=True)
            order += 1


MEDIA_BATCH = 64  # rows per batch of a Parquet file with embedded media (binary columns)


def _read_parquet(rng: Range, name: str, base: str) -> Iterator[RawRow | Reject]:
    """Rows of row groups [start, stop). A Hugging Face file (`hf_spec`) has its media
    embedded: read in small batches, so a row group's images are not all in memory at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(rng.path) as f:
        table = pq.ParquetFile(f, buffer_size=1 << 20)
        schema = table.schema_arrow
        spec = hf_spec({fld.name: _media_struct(fld.type) for fld in schema}, (schema.metadata or {}).get(b"huggingface"))
        binary = any(pa.types.is_binary(t) or pa.types.is_large_binary(t) for t in _leaf_types(schema))
        order, line = rng.order, rng.line
        for batch in table.iter_batches(batch_size=MEDIA_BATCH if binary else 4096, row_groups=list(range(rng.start, rng.stop))):
            for record in batch.to_pylist():
                source = f"{name}:{line}"
                yield parse_record(record, source, order, base) if spec is None else hf_record(record, source, order, base, spec)
                order, line = order + 1, line + 1


def _media_struct(t) -> bool:
    """An Image/Audio column as `datasets` writes it: struct<bytes: binary, path: string>."""
    import pyarrow as pa

    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}


def _leaf_types(schema) -> Iterator:
    import pyarrow as pa

    todo = [fld.type for fld in schema]
    while todo:
        t = todo.pop()
        if pa.types.is_struct(t):
            todo += [t.field(i).type for i in range(t.num_fields)]
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            todo.append(t.value_type)
        else:
            yield t


def _read_webdataset(rng: Range, max_bytes: int | None) -> Iterator[RawRow | Reject]:
    """The samples of a range's tar segments; consecutive segments of one tar are read in one go."""
    merged: list[Segment] = []
    for seg in rng.rows:
        last = merged[-1] if merged else None
        if last and not last.damage and not seg.damage and (last.path, last.stop) == (seg.path, seg.start):
            merged[-1] = last._replace(stop=seg.stop, count=last.count + seg.count)
        else:
            merged.append(seg)
    for seg in merged:
        if seg.damage:
            yield read_reject(f"{seg.name}:{seg.line}", seg.order, "malformed_row", seg.damage)
        else:
            yield from _read_segment(seg, max_bytes)


def _read_segment(seg: Segment, max_bytes: int | None) -> Iterator[RawRow | Reject]:
    """A segment's samples; should the tar have changed since it was planned (fewer samples, new
    damage), each planned sample not read is a reject, so every planned row is accounted for."""

    def load(tar: tarfile.TarFile, info: tarfile.TarInfo, kind: str) -> bytes | RecordError | None:
        cap = MAX_LABEL_BYTES if kind == "label" else max_bytes
        if kind not in (*MODALITY_COLUMNS, "label"):
            return None  # other fields (.json, .pyd, .pkl …) are never read, let alone unpickled
        if cap is not None and info.size > cap:
            return RecordError("file_too_large", f"{seg.name}:{info.name}: more than max_file_bytes={cap}") if kind != "label" else None
        with tar.extractfile(info) as member:
            return member.read(info.size)

    done, problem = 0, "fewer samples than when the input was planned"
    try:
        with _open(seg.path) as f:
            for key, _, members in _tar_samples(f, seg.name, seg.start, seg.stop, load):
                if done == seg.count:
                    break
                yield webdataset_row(key, members, f"{seg.name}:{seg.line + done}", seg.order + done, seg.name)
                done += 1
    except _Damage as err:
        problem = err.detail
    except _TAR_ERRORS as err:
        problem = f"{seg.name}: {err}"
    for i in range(done, seg.count):
        yield read_reject(f"{seg.name}:{seg.line + i}", seg.order + i, "malformed_row", f"the tar changed after planning: {problem}")


def load_media(row: RawRow, max_bytes: int) -> dict[str, bytes | str | RecordError]:
    """Read each declared modality's bytes (local path or URI; those carried in `row.media` as
    they are, under the same checks) or the error met doing so."""
    loaded: dict[str, bytes | str | RecordError] = {}
    for modality, path in row.media_paths():
        if modality in row.media:  # carried in the row (embedded in the input): `path` only names it
            data = row.media[modality]
            loaded[modality] = data if isinstance(data, RecordError) else checked_bytes(path or modality, data, max_bytes)
        elif path is not None:
            loaded[modality] = _read_bytes(path, max_bytes)
    if row.text is not None:
        loaded["text"] = row.text
    return loaded


def _read_bytes(path: str, max_bytes: int) -> bytes | RecordError:
    """`exists` + a bounded read: no glob semantics ("photo [1].jpg" is a name, not a
    pattern) and a huge file costs at most max_bytes of memory. Local paths are opened
    directly (Beam's FileSystems costs ~100 µs per file there); URIs go through it (a
    `file://` URI is a local path: Beam has no filesystem for that scheme)."""
    if path.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(path)
        if parts.netloc not in ("", "localhost"):
            return RecordError("unreadable_file", f"{path}: a file:// URI of another host")
        path = unquote(parts.path)
    if "://" not in path:
        return read_local(path, max_bytes)
    try:
        if not FileSystems.exists(path):
            return RecordError("missing_file", path)
        with FileSystems.open(path, compression_type="uncompressed") as f:
            data = f.read(max_bytes + 1)
    except (OSError, ValueError, beam.io.filesystem.BeamIOError) as err:
        return RecordError("unreadable_file", f"{path}: {err}")
    return checked_bytes(path, data, max_bytes)
