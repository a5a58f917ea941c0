"""The per-row result of processing, as bytes: what prepare stages (and caches) between
processing a row and writing it into a shard.

An entry is named by a digest of everything that decides its content — the row's fields,
the bytes of its media, the params that act on one row, the source of the code that processes
it and the library versions — so a rerun finds the entries of unchanged rows and processes
only new or changed rows. Where the row sits in the input (`source`, `order`) is not part of
the name: inserting rows shifts line numbers but reuses every entry; the current values are put
back on reading.

Layout (no pickle, nothing executable):
    MAGIC | u64 header length | header (ASCII JSON) | payloads | sha256 of everything before
Payloads: the JPEG, the features (.npy), the text (UTF-8), the video's frame strip (JPEG), then the normalization sums as
little-endian int64 arrays [4, dims] per modality (binary: as JSON lists of big integers they
were most of the header, parsed for every row at reuse and at writing).
A torn or corrupted entry fails the trailing digest and is treated as absent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from importlib import metadata
from typing import Any

import numpy as np

from mmprep.config import PrepareConfig, to_dict
from mmprep.records import RawRow, Reject, Sample
from mmprep.stats import F16_SCALE, feature_parts, image_parts

MAGIC = b"mmprep-staged/5\n"
FORMAT = 5
# libraries whose output bytes a processed row depends on (decoders, resampling, JPEG)
_LIBRARIES = ("mmprep", "numpy", "opencv-python-headless", "opencv-python", "soundfile", "soxr", "scipy", "av")
_PAYLOADS = ("jpg", "mel", "text", "video", "stats")


def _library_versions() -> dict[str, str]:
    found = {}
    for dist in _LIBRARIES:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def row_params(cfg: PrepareConfig) -> dict[str, Any]:
    """The params that act on one row on its own (not splits, shards or the tokenizer)."""
    return {
        "max_file_bytes": cfg.max_file_bytes,
        "on_bad_modality": cfg.on_bad_modality,
        "image": to_dict(cfg.image),
        "audio": to_dict(cfg.audio),
        "video": to_dict(cfg.video),
        "text_max_chars": cfg.text.max_chars,
        "label": to_dict(cfg.label),
    }


# mmprep's modules whose code decides an entry's bytes (a test checks that processing and staging
# a row of every modality imports no other)
ROW_CODE = ("audio", "config", "image", "labels", "process", "records", "shards", "staged", "stats", "text", "video")


@functools.cache
def code_digest(package_dir: str) -> str:
    """sha256 of the source of the ROW_CODE modules in `package_dir`: an entry made by other
    code is another entry. The version number alone does not say it (an edited or updated
    checkout keeps mmprep 0.1.0), and a cache that outlives a code change must not hand back
    rows the old code made. A module without its source (installed as bytecode only) counts as
    unchanged: its version, in `_LIBRARIES`, stands for it."""
    digest = hashlib.sha256()
    for name in ROW_CODE:
        try:
            with open(os.path.join(package_dir, f"{name}.py"), "rb") as f:
                source = f.read()
        except OSError:
            source = b""
        digest.update(name.encode() + b"\0" + hashlib.sha256(source).digest())
    return digest.hexdigest()


def context_digest(cfg: PrepareConfig) -> str:
    """Everything shared by all rows of a run that decides an entry's content: the staging
    format, the params that act on one row, the row-processing code and the libraries' versions."""
    blob = json.dumps({"format": FORMAT, "params": row_params(cfg), "libraries": _library_versions(),
                       "code": code_digest(os.path.dirname(os.path.abspath(__file__)))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_name(context: str, row: RawRow, media: dict[str, str]) -> str:
    """The entry's name: 32 hex digits of sha256(context, row fields, media digests).

    `media` maps a modality to the sha256 of the bytes that were read for it."""
    fields = {
        "id": row.id,
        "label": row.label,
        "text": row.text if isinstance(row.text, str) or row.text is None else row.text.hex(),
        "extra": row.extra,
        "modalities": ["text_file" if m == "text" else m for m, v in row.media_paths() if v],
        "media": media,
    }
    blob = json.dumps([context, fields], sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:32]


LABEL_ID_BOUND = 999_999  # label ids are below this (its digits bound a .cls/.json member's size)


def summary(s: Sample, max_tokens: int) -> dict[str, Any]:
    """What the plan step needs of a kept sample besides key/label/text/phash: its exact-
    duplicate signature, its content links (hash prefixes) and an upper bound of the bytes it
    will add to a shard (token array and label id at their largest, the longest split name)."""
    from mmprep.shards import member_bytes, sample_members, shard_meta

    tokens = np.zeros(max_tokens, dtype=np.int32) if s.text is not None else None
    label_id = LABEL_ID_BOUND if s.label is not None else None
    meta = shard_meta(s, "train", label_id, max_tokens if s.text is not None else None)
    members = sample_members(s.key, meta=meta, jpg=s.jpg, mel=s.mel, tokens=tokens, text=s.text, label_id=label_id, video=s.video)
    links = [[m, s.hashes[name][:16]] for m, name in (("image", "image"), ("audio", "audio"), ("text", "text_link"), ("video", "video"))
             if name in s.hashes]
    return {"signature": s.content_signature[:32], "links": links, "size": member_bytes(members), "max_tokens": max_tokens}


def encode(result: Sample | Reject, name: str, summ: dict[str, Any] | None = None, with_stats: bool = True) -> bytes:
    """A processed row (kept Sample or Reject, with its `summary`) → the bytes of entry `name`.
    With `with_stats=False` and no summary: a partial entry, what the row child sends (`complete`)."""
    if isinstance(result, Reject):
        header: dict[str, Any] = {"kind": "reject", "name": name, "stage": result.stage, "reason": result.reason, "detail": result.detail}
        payloads: list[bytes] = []
    else:
        from mmprep.shards import npy_bytes

        parts = {
            "jpg": result.jpg,
            "mel": npy_bytes(result.mel) if result.mel is not None else None,
            "text": result.text.encode("utf-8") if result.text is not None else None,
            "video": result.video,
        }
        meta = {k: v for k, v in result.meta.items() if k != "source"}
        parts["stats"], stats = _stats_payload(sample_stats(result) if with_stats else {})
        header = {
            "kind": "sample",
            "name": name,
            "key": result.key,
            "label": result.label,
            "meta": meta,
            "hashes": result.hashes,
            "phash": result.phash,
            "vphash": result.vphash,
            "sizes": {name: (len(data) if data is not None else None) for name, data in parts.items()},
            "stats": stats,
            "summary": summ,
        }
        payloads = [parts[name] for name in _PAYLOADS if parts[name] is not None]
    head = json.dumps(header, sort_keys=True, ensure_ascii=True).encode("ascii")
    body = b"".join([MAGIC, struct.pack("<Q", len(head)), head, *payloads])
    return body + hashlib.sha256(body).digest()


def _stats_payload(sums: dict[str, tuple[int, int, np.ndarray]]) -> tuple[bytes | None, dict[str, list[int]]]:
    """`sample_stats` → (the stats payload: int64 arrays in the header's sorted order, its header field)."""
    data = b"".join(sums[m][2].astype("<i8").tobytes() for m in sorted(sums)) or None
    return data, {m: [count, int(arr.shape[1]), scale] for m, (count, scale, arr) in sums.items()}


def complete(data: bytes, name: str, sample_id: str, source: str, order: int, max_tokens: int) -> bytes:
    """A partial entry (`encode(..., with_stats=False)`, from the row child) → the entry `encode`
    makes in one go (see `finish`). A reject is returned as it is."""
    return finish(data, name, sample_id, source, order, max_tokens)[0]


def finish(data: bytes, name: str, sample_id: str, source: str, order: int, max_tokens: int) -> tuple[bytes, Reject | tuple]:
    """A partial entry from the row child → (the entry `encode` makes in one go, its light
    record as `peek` gives it). The normalization sums (which decode the stored JPEG again) and
    the summary are made from the row's own processed output — bounded, already validated
    bytes. The child does only what untrusted media need isolation for; this bookkeeping runs
    in its parent, which with one worker would otherwise wait on it.

    The partial entry is parsed and checked once; its payloads are kept as they are (one
    slice), only the header is written again and the sums appended: byte for byte what
    `encode(decode(partial), name, summary(...))` gives, without decoding and re-encoding."""
    header, offset = _header(data)
    if header["kind"] == "reject":
        return data, _reject(header, sample_id, source, order)
    if header["summary"] is not None or header["stats"] or header["sizes"].get("stats") is not None:
        raise ValueError("not a partial entry")
    body = memoryview(data)[:-32]
    s = _sample(header, _payloads(header, offset, body), sample_id, source, order)  # no sums yet: stats {}
    stats, header["stats"] = _stats_payload(sample_stats(s))
    header["sizes"]["stats"] = len(stats) if stats is not None else None
    header["summary"] = summary(s, max_tokens)
    head = json.dumps(header, sort_keys=True, ensure_ascii=True).encode("ascii")
    out = b"".join([MAGIC, struct.pack("<Q", len(head)), head, body[offset:], stats or b""])  # the payloads as the child wrote them
    return out + hashlib.sha256(out).digest(), _light(header, sample_id, source, order, s.text)


def _header(data: bytes) -> tuple[dict, int]:
    if len(data) < len(MAGIC) + 8 + 32 or not data.startswith(MAGIC):
        raise ValueError("not a staged entry")
    if hashlib.sha256(memoryview(data)[:-32]).digest() != data[-32:]:
        raise ValueError("staged entry fails its checksum (torn or corrupted)")
    (length,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    return json.loads(data[start : start + length]), start + length


def peek(data: bytes, name: str, sample_id: str, source: str, order: int, max_tokens: int) -> Reject | tuple | None:
    """A cache hit without decoding the payloads: a Reject, or the fields of the row's light
    record (key, id, order, source, label, signature, links, phash, text, size, vphash) — None when
    the bytes are another entry's or its size bound was made for another text.max_tokens."""
    header, offset = _header(data)
    if header.get("name") != name:
        return None
    if header["kind"] == "reject":
        return _reject(header, sample_id, source, order)
    summ = header["summary"]
    if summ["max_tokens"] != max_tokens:
        return None
    sizes = header["sizes"]
    text = None
    if sizes["text"] is not None:
        start = offset + (sizes["jpg"] or 0) + (sizes["mel"] or 0)
        text = data[start : start + sizes["text"]].decode("utf-8")
    return _light(header, sample_id, source, order, text)


def _reject(header: dict, sample_id: str, source: str, order: int) -> Reject:
    return Reject(sample_id, source, order, header["stage"], header["reason"], header["detail"])


def _light(header: dict, sample_id: str, source: str, order: int, text: str | None) -> tuple:
    """A sample entry's light record fields (see `peek`), from its header and summary."""
    summ = header["summary"]
    links = tuple(tuple(link) for link in summ["links"])
    return (header["key"], sample_id, order, source, header["label"], summ["signature"], links, header["phash"], text, summ["size"],
            header["vphash"])


def decode(data: bytes, sample_id: str, source: str, order: int) -> Sample | Reject:
    """Entry bytes → the processed row, with the row's current id, source and order.

    Anything malformed or torn raises ValueError (the caller then processes the row again)."""
    header, offset = _header(data)
    if header["kind"] == "reject":
        return _reject(header, sample_id, source, order)
    return _sample(header, _payloads(header, offset, memoryview(data)[:-32]), sample_id, source, order)


def _payloads(header: dict, offset: int, body: memoryview) -> dict[str, bytes | None]:
    """A sample entry's payloads by name (None: absent), from its body after the header."""
    parts: dict[str, bytes | None] = {}
    for name in _PAYLOADS:
        size = header["sizes"][name]
        parts[name] = None if size is None else bytes(body[offset : offset + size])
        offset += size or 0
    if offset != len(body):
        raise ValueError("staged entry has a wrong length")
    return parts


def _sample(header: dict, parts: dict[str, bytes | None], sample_id: str, source: str, order: int) -> Sample:
    mel = None
    if parts["mel"] is not None:
        from mmprep.shards import load_npy

        mel = load_npy(parts["mel"])
    return Sample(
        id=sample_id,
        key=header["key"],
        source=source,
        order=order,
        label=header["label"],
        jpg=parts["jpg"],
        mel=mel,
        text=parts["text"].decode("utf-8") if parts["text"] is not None else None,
        meta={**header["meta"], "source": source},
        hashes=header["hashes"],
        phash=header["phash"],
        video=parts["video"],
        vphash=header["vphash"],
        stats=_stats(header["stats"], parts["stats"]),
    )


def sample_stats(s: Sample) -> dict[str, tuple[int, int, np.ndarray]]:
    """The sample's normalization sums, modality → (count, scale, int64 [4, dims]): pixels of
    the stored JPEG as decoded (what training reads), per mel bin over frames."""
    from mmprep.image import decode_jpg

    stats = {}
    if s.jpg is not None:
        bgr = decode_jpg(s.jpg, rgb=False)  # per-channel sums: the channels reordered, not the pixels
        stats["image"] = (int(bgr.shape[0] * bgr.shape[1]), 1, image_parts(bgr)[:, ::-1])
    if s.mel is not None:
        stats["audio"] = (int(s.mel.shape[1]), F16_SCALE, feature_parts(s.mel))
    if s.video is not None:
        bgr = decode_jpg(s.video, rgb=False)  # the frames stacked: per-channel sums over all of them
        stats["video"] = (int(bgr.shape[0] * bgr.shape[1]), 1, image_parts(bgr)[:, ::-1])
    return stats


def _stats(header: dict[str, list[int]], data: bytes | None) -> dict[str, tuple[int, int, np.ndarray]]:
    out, offset = {}, 0
    for modality, (count, dims, scale) in sorted(header.items()):
        arr = np.frombuffer(data, dtype="<i8", count=4 * dims, offset=offset).reshape(4, dims)
        out[modality] = (count, scale, arr)
        offset += 32 * dims
    if data is not None and offset != len(data):
        raise ValueError("staged entry has malformed statistics")
    return out
