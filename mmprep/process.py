"""One input row → a clean, normalized Sample with features, or a Reject.

The pipeline reads the media bytes (through Beam's FileSystems) and hands them in;
everything here is pure and the same function serves inference (`mmprep predict`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmprep.config import PrepareConfig
from mmprep.labels import resolve_label
from mmprep.records import MODALITIES, RawRow, RecordError, Reject, Sample, make_key, reject

# What a loader hands over per modality: the bytes, or the RecordError met reading them.
Loaded = dict[str, "bytes | str | RecordError"]


@dataclass
class _Parts:
    jpg: bytes | None = None
    mel: Any = None
    text: str | None = None
    phash: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)


def limit_threads() -> None:
    """One thread per worker process for BLAS/OpenMP and OpenCV: Beam runs one worker per
    core, and numerical libraries' own threads then only contend with each other."""
    import cv2
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    cv2.setNumThreads(1)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image(data: bytes, cfg: PrepareConfig, parts: _Parts) -> None:
    from mmprep.image import process_image

    result = process_image(data, cfg.image)
    parts.jpg, parts.phash = result.jpg, result.phash
    parts.hashes["image"] = _sha256(data)
    parts.meta["image"] = {**result.meta, "sha256": parts.hashes["image"]}


def _audio(data: bytes, cfg: PrepareConfig, parts: _Parts) -> None:
    from mmprep.audio import process_audio

    result = process_audio(data, cfg.audio)
    parts.mel = result.features
    parts.hashes["audio"] = _sha256(data)
    parts.meta["audio"] = {**result.meta, "sha256": parts.hashes["audio"]}


def _text(value: bytes | str, cfg: PrepareConfig, parts: _Parts) -> None:
    from mmprep.text import decode_text, normalize_text, text_link_key

    text, truncated = normalize_text(decode_text(value), cfg.text.max_chars)
    parts.text = text
    parts.hashes["text"] = _sha256(text.encode("utf-8"))
    parts.hashes["text_link"] = text_link_key(text)
    parts.meta["text"] = {"chars": len(text), "truncated": truncated, "sha256": parts.hashes["text"]}


_HANDLERS: dict[str, Callable[[Any, PrepareConfig, _Parts], None]] = {
    "image": _image,
    "audio": _audio,
    "text": _text,
}


def declared_modalities(row: RawRow) -> list[str]:
    present = {"image": row.image, "audio": row.audio, "text": row.text if row.text is not None else row.text_path}
    return [m for m in MODALITIES if present[m] is not None]


def process_row(row: RawRow, loaded: Loaded, cfg: PrepareConfig) -> Sample | Reject:
    """Decode, validate, normalize and featurize every declared modality, then label.

    With on_bad_modality == "reject" the first unusable modality rejects the row; with
    "drop" it is left out (and noted in the metadata) as long as another one survives.
    """
    parts = _Parts()
    dropped: dict[str, str] = {}
    for modality in declared_modalities(row):
        value = loaded.get(modality)
        try:
            if isinstance(value, RecordError):
                raise value
            if value is None:
                raise RecordError("missing_file", f"no {modality} content was loaded")
            _HANDLERS[modality](value, cfg, parts)
        except RecordError as err:
            if cfg.on_bad_modality == "reject":
                return reject(row, RecordError(err.reason, f"{modality}: {err.detail}"))
            dropped[modality] = err.reason
    if dropped and not (parts.jpg is not None or parts.mel is not None or parts.text is not None):
        detail = ", ".join(f"{m}: {r}" for m, r in sorted(dropped.items()))
        return reject(row, RecordError("no_usable_modality", detail))
    try:
        label, how = resolve_label(row.label, parts.text, cfg.label)
    except RecordError as err:
        return reject(row, err)
    meta = {
        "id": row.id,
        "label": label,
        "label_source": how,
        "source": row.source,
        **parts.meta,
        "extra": row.extra,
    }
    if dropped:
        meta["dropped"] = dropped
    return Sample(
        id=row.id,
        key=make_key(row.id),
        source=row.source,
        order=row.order,
        label=label,
        jpg=parts.jpg,
        mel=parts.mel,
        text=parts.text,
        meta=meta,
        hashes=parts.hashes,
        phash=parts.phash,
    )
