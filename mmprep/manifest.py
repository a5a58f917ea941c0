"""Turning input rows (manifest lines/rows, Hugging Face Parquet rows, directory listings, WebDataset samples) into RawRow records.

Pure functions over already-read data: the pipeline does the I/O through Beam's
FileSystems so paths can be local or cloud URIs. A row that cannot be parsed is a
Reject with a reason, never an exception.
"""

from __future__ import annotations

import csv
import json
import math
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from mmprep.records import REASONS, RawRow, RecordError, Reject, has_surrogates, printable, stable_detail

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".avif"}
# every container libsndfile reads by content (the extension only sorts files in a directory layout)
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64",
              ".m4a", ".aac", ".wma", ".ac3", ".amr"}  # the last five through FFmpeg (audio.decode_audio)
TEXT_EXTS = {".txt"}
# containers FFmpeg (PyAV) reads by content; the extension only sorts files in a directory layout
VIDEO_EXTS = {".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv", ".flv", ".wmv"}
MODALITY_COLUMNS = ("image", "audio", "text", "video")
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
    if isinstance(value, bytes | bytearray):  # a binary column (an image's bytes): its size, not its repr
        return f"<{len(value)} bytes>"
    if depth >= MAX_DEPTH and isinstance(value, dict | list | tuple):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        return {printable(str(k)): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    return printable(str(value))


def parse_record(obj: dict[str, Any], source: str, order: int, base: str, empty_is_missing: bool = False) -> RawRow | Reject:
    """A row as a dict (from JSON, CSV or parquet) → RawRow, or a reject. An empty text is a
    declared empty caption (a `text_empty` reject later), except with `empty_is_missing` (CSV,
    where an empty cell is the only way to leave a field out): then the row has no text."""
    raw_id = obj.get("id")
    if _is_null(raw_id):
        return read_reject(source, order, "missing_id", "the row's 'id' is empty" if raw_id == "" else "the row has no 'id'")
    if isinstance(raw_id, str) and not raw_id.strip():
        return read_reject(source, order, "missing_id", "the row's 'id' is only white space")
    try:
        sample_id = _scalar_str(raw_id)
    except TypeError as err:
        return read_reject(source, order, "bad_field", f"'id' must be a UTF-8 string, got {err}", printable(raw_id) if isinstance(raw_id, str) else None)
    fields: dict[str, str | None] = {}
    for name in ("image", "audio", "text", "video", "label"):
        value = obj.get(name)
        if _is_null(value):
            fields[name] = None
        elif isinstance(value, str) and name != "text" and has_surrogates(value):
            return read_reject(source, order, "bad_field", f"'{name}' is not valid UTF-8", sample_id)
        elif isinstance(value, str) or (name == "label" and isinstance(value, int) and not isinstance(value, bool)):
            fields[name] = str(value)
        elif name == "label" and isinstance(value, float) and value.is_integer():
            fields[name] = str(int(value))  # 3.0: an integer label column with nulls, as pandas writes it (float64)
        else:
            detail = f"'{name}' must be a string, got {type(value).__name__}"
            return read_reject(source, order, "bad_field", detail, sample_id)
    if obj.get("text") == "" and not empty_is_missing:
        fields["text"] = ""  # an empty caption was declared: the text stage rejects it as text_empty
    if all(fields[m] is None for m in MODALITY_COLUMNS):
        return read_reject(source, order, "no_modality", "no image, audio, text or video", sample_id)
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
        video=resolve_path(base, fields["video"]) if fields["video"] else None,
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
        if fields is not None and used > 1 and (capped or (width is not None and len(fields) != width) or not _strict(pending[:used])):
            problem = (
                f"a quoted field opened on this line is not closed within {CSV_RECORD_BYTES} bytes"
                if capped
                else f"a quoted field opened on this line runs over {used} lines into {len(fields)} fields, "
                f"expected {width} (an unclosed quote?)"
                if width is not None and len(fields) != width
                else f"a quoted field opened on this line runs over {used} lines and closes before other text "
                "(an unclosed quote?)"
            )
            fields, used = None, 1
        if width is None and fields:
            width = len(fields)
        size = sum(len(line) for line in pending[:used])
        del pending[:used]
        yield fields, used, size, problem


def _strict(lines: list[bytes]) -> bool:
    """Whether a record spanning several lines is well-formed CSV: every quoted field closes
    right before a delimiter or the record's end. The lenient reader used for a row would accept
    an unclosed quote that some later line's quote happens to close (`"a ... c7,,"b`), turning
    the rows in between into one field."""
    try:
        list(csv.reader((line.decode("utf-8", errors="surrogateescape") for line in lines), strict=True))
    except csv.Error:
        return False
    return True


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
        kind = kind_of(ext.lower())
        groups.setdefault(stem, {}).setdefault(kind, []).append(path)
    for stem in sorted(groups):
        yield stem, {k: sorted(v) for k, v in sorted(groups[stem].items())}


def kind_of(ext: str) -> str:
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in TEXT_EXTS:
        return "text"
    if ext in VIDEO_EXTS:
        return "video"
    return "other"


def directory_row(stem: str, files: dict[str, list[str]], order: int, source: str) -> RawRow | Reject:
    """One stem group → RawRow. `SRC/<label>/<stem>.<ext>` gives the label (ImageFolder)."""
    for kind in MODALITY_COLUMNS:
        if len(files.get(kind, [])) > 1:
            names = ", ".join(posixpath.basename(p) for p in files[kind])
            return read_reject(source, order, "bad_field", f"several {kind} files for one sample: {names}", stem)
    if not any(kind in files for kind in MODALITY_COLUMNS):
        names = ", ".join(posixpath.basename(p) for p in files.get("other", []))
        return read_reject(source, order, "no_modality", f"no image, audio, text or video file of a supported type ({names})", stem)
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
        video=files.get("video", [None])[0],
        label=label,
        # files of no supported type beside the sample are not dropped silently: the metadata names them
        extra={"ignored_files": [posixpath.basename(p) for p in files["other"]]} if files.get("other") else {},
    )


# --- Parquet as Hugging Face `datasets` writes it -------------------------------------------

HF_MEDIA_TYPES = {"image": "Image", "audio": "Audio", "video": "Video"}


@dataclass(frozen=True)
class HFSpec:
    """How a Hugging Face Parquet file maps onto the manifest columns: which column holds each
    medium (a struct {bytes, path}), the ClassLabel names of the label column, and whether the
    id is derived ("<file>:<row>", the file having no `id` column)."""

    media: tuple[tuple[str, str], ...] = ()  # (modality, column)
    label: str | None = None  # the label column
    names: tuple[str, ...] | None = None  # its ClassLabel names: an int label is an index into them
    derive_id: bool = False


def hf_spec(columns: dict[str, bool], metadata: bytes | None) -> HFSpec | None:
    """The spec of a Parquet file written by `datasets` (schema metadata key b"huggingface", or
    image/audio columns that are {bytes, path} structs); None for a plain manifest. `columns`
    maps each column name to whether it is such a struct."""
    features: dict[str, Any] = {}
    if metadata:
        try:
            info = json.loads(metadata)
            found = info.get("info", {}).get("features", {}) if isinstance(info, dict) else {}
            features = found if isinstance(found, dict) else {}
        except (ValueError, AttributeError):
            features = {}

    def typed(name: str) -> list[str]:
        return [c for c in columns if isinstance(features.get(c), dict) and features[c].get("_type") == name]

    if not metadata and not any(columns.get(m) for m in HF_MEDIA_TYPES):
        return None
    media = []
    for modality, type_name in HF_MEDIA_TYPES.items():
        candidates = [modality] if modality in columns else typed(type_name)
        if len(candidates) == 1:  # a column named after the modality, else the one column of its type
            media.append((modality, candidates[0]))
    labels = ["label"] if "label" in columns else typed("ClassLabel")
    label = labels[0] if len(labels) == 1 else None
    feature = features.get(label) if label else None
    names = None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
        names = tuple(str(n) for n in feature["names"])
    return HFSpec(media=tuple(media), label=label, names=names, derive_id="id" not in columns)


def hf_record(obj: dict[str, Any], source: str, order: int, base: str, spec: HFSpec) -> RawRow | Reject:
    """A row of a Hugging Face Parquet file → RawRow (embedded media in `media`) or a reject.

    A medium is a struct {bytes, path}: its bytes when set (the path is then only its name),
    else the path read like a manifest path; a null struct declares no such modality. An int
    label of a ClassLabel column is its name (-1, `datasets`' "no label", is unlabeled)."""
    obj = dict(obj)
    sample_id = obj.get("id") if not spec.derive_id else source
    sample_id = sample_id if isinstance(sample_id, str) else None
    if spec.derive_id:
        obj["id"] = source
    media: dict[str, bytes] = {}
    shown: dict[str, str] = {}
    for modality, column in spec.media:
        value = obj.pop(column, None)
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is not None and not isinstance(data, bytes):
                return read_reject(source, order, "bad_field", f"'{column}' bytes must be binary, got {type(data).__name__}", sample_id)
            if path is not None and not isinstance(path, str):
                return read_reject(source, order, "bad_field", f"'{column}' path must be a string, got {type(path).__name__}", sample_id)
            if data is not None:
                media[modality] = data
                shown[modality] = f"{source}:{column}" + (f" ({printable(path)})" if path else "")
                value = shown[modality]  # parse_record sees a declared modality; the display name is put back below
            elif path:
                value = path  # read from disk like a manifest path (relative to the Parquet file's folder)
            else:
                return read_reject(source, order, "bad_field", f"'{column}' has neither bytes nor a path", sample_id)
        obj[modality] = value
    if spec.label is not None:
        value = obj.pop(spec.label, None)
        if spec.names is not None and isinstance(value, int) and not isinstance(value, bool):
            if value == -1:
                value = None
            elif 0 <= value < len(spec.names):
                value = spec.names[value]
            else:
                detail = f"'{spec.label}' {value} is not a class of its ClassLabel ({len(spec.names)} names)"
                return read_reject(source, order, "bad_field", detail, sample_id)
        obj["label"] = value
    row = parse_record(obj, source, order, base)
    if isinstance(row, Reject) or not media:
        return row
    return replace(row, media=media, **shown)


# --- WebDataset tars ---------------------------------------------------------------------------

LABEL_FIELDS = ("cls", "label")
MAX_LABEL_BYTES = 4096  # a label member is a class name or index, read whole


def split_member(name: str) -> tuple[str, str] | None:
    """(key, field) of a tar member by the WebDataset convention: the key is the member path up
    to the first dot of its basename (`a/b.seg.png` → `a/b`, `seg.png`). None for a member that
    is no part of any sample: hidden (a component starting with a dot, as in the directory
    layout), or with an absolute or `..` path (never resolved: skipped)."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or not parts or any(p.startswith(".") for p in parts):
        return None
    key, dot, field_name = parts[-1].partition(".")
    return "/".join([*parts[:-1], key]), field_name.lower() if dot else ""


def member_kind(field_name: str) -> str:
    """A member's role by its whole field (`jpg` is an image; `seg.png` is another field)."""
    kind = kind_of("." + field_name)
    return "label" if kind == "other" and field_name in LABEL_FIELDS else kind


def webdataset_row(key: str, members: list[tuple[str, str, Any]], source: str, order: int, tar: str) -> RawRow | Reject:
    """One WebDataset sample → RawRow. `members`: (member name, kind, content) in tar order, where
    content is the bytes read, a RecordError (not read: too large), or None for a member that is
    never read: of no supported field, or not a regular file (its kind then says which, e.g.
    "symlink"). Like the directory layout: one file per modality, others listed in `ignored_files`."""
    if has_surrogates(key):
        return read_reject(source, order, "bad_field", "the member name is not valid UTF-8", printable(key))
    by_kind: dict[str, list[tuple[str, Any]]] = {}
    ignored: list[str] = []
    for name, kind, content in members:
        if kind in (*MODALITY_COLUMNS, "label"):
            by_kind.setdefault(kind, []).append((name, content))
        else:
            base = printable(posixpath.basename(name))
            ignored.append(base if kind == "other" else f"{base} ({kind}, not followed)")
    for kind in (*MODALITY_COLUMNS, "label"):
        if len(by_kind.get(kind, [])) > 1:
            names = ", ".join(printable(posixpath.basename(n)) for n, _ in by_kind[kind])
            return read_reject(source, order, "bad_field", f"several {kind} files for one sample: {names}", key)
    if not any(kind in by_kind for kind in MODALITY_COLUMNS):
        names = ", ".join([*(printable(posixpath.basename(n)) for n, _ in by_kind.get("label", [])), *ignored])
        return read_reject(source, order, "no_modality", f"no image, audio, text or video member of a supported type ({names})", key)
    label = None
    if "label" in by_kind:
        name, content = by_kind["label"][0]
        if not isinstance(content, bytes):
            return read_reject(source, order, "bad_field", f"label member {printable(name)} is over {MAX_LABEL_BYTES} bytes", key)
        label = content.decode("utf-8", errors="surrogateescape").strip() or None
        if label is not None and has_surrogates(label):
            return read_reject(source, order, "bad_field", f"label member {printable(name)} is not valid UTF-8", key)
    shown = {kind: f"{tar}:{printable(by_kind[kind][0][0])}" for kind in MODALITY_COLUMNS if kind in by_kind}
    media: dict[str, bytes | RecordError] = {kind: by_kind[kind][0][1] for kind in shown}
    return RawRow(
        source=source,
        order=order,
        id=key,
        image=shown.get("image"),
        audio=shown.get("audio"),
        text_path=shown.get("text"),
        video=shown.get("video"),
        label=label,
        extra={"ignored_files": ignored} if ignored else {},
        media=media,
    )


def read_local(path: str, max_bytes: int) -> bytes | RecordError:
    """A local media file, read whole but bounded: a huge file costs at most max_bytes of memory
    (`file_too_large`). Opened non-blocking and refused unless a regular file: opening a FIFO
    for reading would wait for a writer forever (`unreadable_file`, as a socket, device or
    directory). The read asks for the file's size + 1, not max_bytes + 1 (that would allocate
    max_bytes first: ~50 µs a file at 256 MB); a file that grew since, or reports no size
    (/proc), is read on up to the bound."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            info = os.fstat(fd)  # before open(): it refuses a directory with a message naming the fd number
            if not stat.S_ISREG(info.st_mode):
                return RecordError("unreadable_file", f"{path}: not a regular file (a {_file_kind(info.st_mode)})")
            with open(fd, "rb", closefd=False) as f:
                data = f.read(min(info.st_size, max_bytes) + 1)
                if len(data) > info.st_size:
                    data += f.read(max_bytes + 1 - len(data))
        finally:
            os.close(fd)
    except FileNotFoundError:
        return RecordError("missing_file", path)
    except (OSError, ValueError) as err:
        return RecordError("unreadable_file", f"{path}: {err}")
    return checked_bytes(path, data, max_bytes)


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "socket" if stat.S_ISSOCK(mode) else "special file"


def checked_bytes(path: str, data: bytes, max_bytes: int) -> bytes | RecordError:
    """A media file's bytes, or its reject: `empty_file`, `file_too_large`."""
    if not data:
        return RecordError("empty_file", path)
    if len(data) > max_bytes:
        return RecordError("file_too_large", f"{path}: more than max_file_bytes={max_bytes}")
    return data
