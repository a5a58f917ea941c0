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
    video: bytes | None = None
    vphash: int | None = None
    want_track: bool = False  # the row names a video and no audio: its sound track is the audio
    track: tuple[Any, int, dict] | None = None  # that sound track (mono float32, rate, metadata), for the audio path
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


def _video(data: bytes, cfg: PrepareConfig, parts: _Parts) -> None:
    from mmprep.video import process_video

    result = process_video(data, cfg.video, want_track=parts.want_track)
    parts.video, parts.vphash = result.strip, result.phash
    parts.hashes["video"] = _sha256(data)
    meta = {k: v for k, v in result.meta.items() if k != "audio"}
    parts.meta["video"] = {**meta, "times": result.times, "sha256": parts.hashes["video"]}
    if not parts.want_track:
        return
    track = result.meta.get("audio", {})
    if result.track is not None and result.track_rate:
        parts.track = (result.track, result.track_rate, {k: v for k, v in track.items() if k != "error"})
    else:  # no sound track, or one that does not decode: the video is kept, without audio
        why = f"its sound track does not decode: {track['error']}" if "error" in track else "the clip has no sound track"
        parts.meta["video"]["audio_track"] = {"used": False, "reason": "audio_undecodable" if "error" in track else "none", "detail": why}


def _sound_track(cfg: PrepareConfig, parts: _Parts) -> None:
    """A video's sound track through the audio path (same checks, resampling, features) as the
    row's audio. A track the audio checks refuse (silent, too short) is left out, not the row:
    a silent video is still a video; its metadata says why there is no audio."""
    from mmprep.audio import process_waveform

    wave, rate, meta = parts.track
    parts.track = None
    try:
        result = process_waveform(wave, rate, {**meta, "sample_rate": rate, "source": "video"}, cfg.audio)
    except RecordError as err:
        parts.meta["video"]["audio_track"] = {"used": False, "reason": err.reason, "detail": err.detail}
        return
    parts.mel = result.features
    parts.hashes["audio"] = _sha256(wave.astype("<f4").tobytes())  # the decoded samples: re-muxed copies match
    parts.meta["audio"] = {**result.meta, "sha256": parts.hashes["audio"]}
    parts.meta["video"]["audio_track"] = {"used": True}


_HANDLERS: dict[str, Callable[[Any, PrepareConfig, _Parts], None]] = {
    "image": _image,
    "audio": _audio,
    "text": _text,
    "video": _video,
}


def declared_modalities(row: RawRow) -> list[str]:
    present = {"image": row.image, "audio": row.audio, "text": row.text if row.text is not None else row.text_path, "video": row.video}
    return [m for m in MODALITIES if present[m] is not None]


def process_row(row: RawRow, loaded: Loaded, cfg: PrepareConfig) -> Sample | Reject:
    """Decode, validate, normalize and featurize every declared modality, then label.

    With on_bad_modality == "reject" the first unusable modality rejects the row; with
    "drop" it is left out (and noted in the metadata) as long as another one survives.
    """
    parts = _Parts()
    dropped: dict[str, str] = {}
    declared = declared_modalities(row)
    parts.want_track = "video" in declared and "audio" not in declared and cfg.video.audio_track == "use"
    for modality in declared:
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
    if parts.track is not None:
        _sound_track(cfg, parts)
    if dropped and not (parts.jpg is not None or parts.mel is not None or parts.text is not None or parts.video is not None):
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
        video=parts.video,
        vphash=parts.vphash,
    )
