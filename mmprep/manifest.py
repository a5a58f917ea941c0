"""Turning input rows (manifest lines/rows, directory listings) into RawRow records.

Pure functions over already-read data: the pipeline does the I/O through Beam's
FileSystems so paths can be local or cloud URIs. A row that cannot be parsed is a
Reject with a reason, never an exception.
"""

from __future__ import annotations

import csv
import json
import math
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

from mmprep.records import REASONS, RawRow, Reject, has_surrogates, printable, stable_detail

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"}
# every container libsndfile reads by content (the extension only sorts files in a directory layout)
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64"}
TEXT_EXTS = {".txt"}
MODALITY_COLUMNS = ("image", "audio", "text")
MAX_DEPTH = 32  # nesting of an extra field's value (lists/objects); deeper is a bad_field
CSV_RECORD_BYTES = 4 << 20  # a quoted CSV field may run over several lines, up to this many bytes
csv.field_size_limit(2**31 - 1)  # a long caption on one line is a row (text is capped later), not an error


def resolve_path(base: str, path: str) -> str:
    """A manifest path relative to the manifest's folder, absolute, or a URI."""
    if "://" in path or path.startswith("/"):
        return path
    return posixpath.join(base, path) if base else path


def read_reject(source: str, order: int, reason: str, detail: str, sample_id: str | None = None) -> Reject:
    return Reject(id=sample_id, source=source, order=order, stage=REASONS[reason][0], reason=reason, detail=stable_detail(detail))


def parse_jsonl_line(line: bytes, source: str, order: int, base: str) -> RawRow | Reject:
    """One manifest line. Invalid UTF-8 inside a value survives as lone surrogates,
    so the text stage can reject exactly that field as `text_not_utf8`."""
    try:
        obj = json.loads(line.decode("utf-8", errors="surrogateescape"), object_pairs_hook=_unique_keys)
    except ValueError as err:
        return read_reject(source, order, "malformed_row", f"not valid JSON: {err}")
    except RecursionError:
        return read_reject(source, order, "malformed_row", "not valid JSON: nested too deeply")
    if not isinstance(obj, dict):
        return read_reject(source, order, "malformed_row", f"a line must be a JSON object, got {type(obj).__name__}")
    return parse_record(obj, source, order, base)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys repeat would silently keep the last value: refuse it."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {printable(repeated)!r} appears more than once")
    return obj


def _scalar_str(value: Any) -> str | None:
    """Ids and labels may arrive as integers (CSV/parquet inference); other types are bad fields."""
    if isinstance(value, str):
        if has_surrogates(value):
            raise TypeError("invalid UTF-8")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(type(value).__name__)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _json_safe(value: Any, depth: int = 0) -> Any:
    """Extra columns travel into metadata; make them JSON-safe (keys and strings valid UTF-8)
    and deterministic. Nesting past MAX_DEPTH raises ValueError."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return printable(value)
    if depth >= MAX_DEPTH and isinstance(value, dict | list | tuple):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        return {printable(str(k)): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    return printable(str(value))


def parse_record(obj: dict[str, Any], source: str, order: int, base: str) -> RawRow | Reject:
    """A row as a dict (from JSON, CSV or parquet) → RawRow, or a reject."""
    raw_id = obj.get("id")
    if _is_null(raw_id):
        return read_reject(source, order, "missing_id", "the row has no 'id'")
    try:
        sample_id = _scalar_str(raw_id)
    except TypeError as err:
        return read_reject(source, order, "bad_field", f"'id' must be a UTF-8 string, got {err}", printable(raw_id) if isinstance(raw_id, str) else None)
    fields: dict[str, str | None] = {}
    for name in ("image", "audio", "text", "label"):
        value = obj.get(name)
        if _is_null(value):
            fields[name] = None
        elif isinstance(value, str) and name != "text" and has_surrogates(value):
            return read_reject(source, order, "bad_field", f"'{name}' is not valid UTF-8", sample_id)
        elif isinstance(value, str) or (name == "label" and isinstance(value, int) and not isinstance(value, bool)):
            fields[name] = str(value)
        else:
            detail = f"'{name}' must be a string, got {type(value).__name__}"
            return read_reject(source, order, "bad_field", detail, sample_id)
    if obj.get("text") == "":
        fields["text"] = ""  # an empty caption was declared: the text stage rejects it as text_empty
    if all(fields[m] is None for m in MODALITY_COLUMNS):
        return read_reject(source, order, "no_modality", "no image, audio or text", sample_id)
    extra: dict[str, Any] = {}
    for key, value in sorted(obj.items(), key=lambda kv: str(kv[0])):
        if key in ("id", *MODALITY_COLUMNS, "label"):
            continue
        name = printable(str(key))
        try:
            extra[name] = _json_safe(value)
        except ValueError as err:
            return read_reject(source, order, "bad_field", f"extra field {name!r}: {err}", sample_id)
    return RawRow(
        source=source,
        order=order,
        id=sample_id,
        image=resolve_path(base, fields["image"]) if fields["image"] else None,
        audio=resolve_path(base, fields["audio"]) if fields["audio"] else None,
        text=fields["text"],
        label=fields["label"],
        extra=extra,
    )


def csv_records(lines: Iterable[bytes], width: int | None = None) -> Iterator[tuple[list[str] | None, int, int, str]]:
    """The records of a CSV file given as its raw lines: (fields, lines, bytes, problem).

    A quoted field may hold newlines, so one record can span lines; but a quote that is
    never closed (or closes only past CSV_RECORD_BYTES) would swallow every row after it.
    So a record spanning several lines is accepted only when its quote closes within
    CSV_RECORD_BYTES and it has `width` fields (the header's; by default the first record's);
    otherwise its first line alone is a broken record (fields None, `problem` says why) and
    parsing resumes on the next line. Blank lines give empty field lists. The result from any
    record boundary on depends only on the bytes from there, so ranges cut at boundaries read
    the same records as the whole file."""
    source = iter(lines)
    pending: list[bytes] = []  # lines read (look-ahead included) but not yet consumed
    capped = False

    def feed() -> Iterator[str]:
        nonlocal capped
        size, i = 0, 0
        while True:
            if i == len(pending):
                more = next(source, None)
                if more is None:
                    return
                pending.append(more)
            size += len(pending[i])
            if i > 0 and size > CSV_RECORD_BYTES:
                capped = True
                return
            yield pending[i].decode("utf-8", errors="surrogateescape")
            i += 1

    while True:
        if not pending:
            more = next(source, None)
            if more is None:
                return
            pending.append(more)
        capped = False
        reader = csv.reader(feed(), strict=False)
        problem = ""
        try:
            fields: list[str] | None = next(reader, [])
            used = max(reader.line_num, 1)
        except csv.Error as err:
            fields, used, problem = None, 1, f"unparseable CSV: {err}"
        if fields is not None and used > 1 and (capped or (width is not None and len(fields) != width)):
            problem = (
                f"a quoted field opened on this line is not closed within {CSV_RECORD_BYTES} bytes"
                if capped
                else f"a quoted field opened on this line runs over {used} lines into {len(fields)} fields, "
                f"expected {width} (an unclosed quote?)"
            )
            fields, used = None, 1
        if width is None and fields:
            width = len(fields)
        size = sum(len(line) for line in pending[:used])
        del pending[:used]
        yield fields, used, size, problem


def group_directory(paths: Iterable[str], root: str) -> Iterator[tuple[str, dict[str, list[str]]]]:
    """Group files under `root` by stem: yields (relative stem, {ext-kind: [paths]}), sorted.

    Hidden files (a leading dot in any component) are skipped.
    """
    root = root.rstrip("/")
    groups: dict[str, dict[str, list[str]]] = {}
    for path in paths:
        rel = path[len(root) + 1 :] if path.startswith(root + "/") else posixpath.basename(path)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        stem, ext = posixpath.splitext(rel)
        kind = _kind_of(ext.lower())
        groups.setdefault(stem, {}).setdefault(kind, []).append(path)
    for stem in sorted(groups):
        yield stem, {k: sorted(v) for k, v in sorted(groups[stem].items())}


def _kind_of(ext: str) -> str:
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in TEXT_EXTS:
        return "text"
    return "other"


def directory_row(stem: str, files: dict[str, list[str]], order: int, source: str) -> RawRow | Reject:
    """One stem group → RawRow. `SRC/<label>/<stem>.<ext>` gives the label (ImageFolder)."""
    for kind in MODALITY_COLUMNS:
        if len(files.get(kind, [])) > 1:
            names = ", ".join(posixpath.basename(p) for p in files[kind])
            return read_reject(source, order, "bad_field", f"several {kind} files for one sample: {names}", stem)
    if not any(kind in files for kind in MODALITY_COLUMNS):
        names = ", ".join(posixpath.basename(p) for p in files.get("other", []))
        return read_reject(source, order, "no_modality", f"no image, audio or text file of a supported type ({names})", stem)
    if has_surrogates(stem):
        return read_reject(source, order, "bad_field", "the file name is not valid UTF-8", printable(stem))
    parts = stem.split("/")
    label = parts[0] if len(parts) == 2 else None
    return RawRow(
        source=source,
        order=order,
        id=stem,
        image=files.get("image", [None])[0],
        audio=files.get("audio", [None])[0],
        text_path=files.get("text", [None])[0],
        label=label,
        # files of no supported type beside the sample are not dropped silently: the metadata names them
        extra={"ignored_files": [posixpath.basename(p) for p in files["other"]]} if files.get("other") else {},
    )
