"""The records that flow through the prepare pipeline, and the closed list of reject reasons.

Records are frozen dataclasses (copied on change with `dataclasses.replace`);
everything a Beam stage groups on is a plain str/int so coders are deterministic.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

# The closed list of reject reasons: code -> (stage, meaning). The README documents it
# and a test keeps the two in sync.
REASONS: dict[str, tuple[str, str]] = {
    "malformed_row": ("read", "the manifest line/row could not be parsed (bad JSON, broken CSV row)"),
    "bad_field": ("read", "a field has the wrong type (e.g. a number where a path or text belongs)"),
    "missing_id": ("read", "the row has no usable id"),
    "duplicate_id": ("read", "an earlier row with this id is kept (the first by source order among the rows not rejected for a reason of their own)"),
    "no_modality": ("read", "the row names no image, audio, text or video"),
    "missing_file": ("load", "a referenced media file does not exist"),
    "unreadable_file": ("load", "a referenced media file could not be read"),
    "empty_file": ("load", "a referenced media file has zero bytes"),
    "file_too_large": ("load", "a referenced media file is larger than prepare.max_file_bytes"),
    "image_undecodable": ("image", "not an image, truncated, or an unsupported format"),
    "image_too_large": ("image", "the header declares more pixels than prepare.image.max_pixels (bomb guard)"),
    "image_too_small": ("image", "shorter side below prepare.image.min_side"),
    "image_bad_aspect": ("image", "aspect ratio beyond prepare.image.max_aspect"),
    "audio_undecodable": ("audio", "not audio, truncated, or an unsupported format"),
    "audio_nonfinite": ("audio", "samples contain NaN or infinity"),
    "audio_too_short": ("audio", "shorter than prepare.audio.min_duration"),
    "audio_too_long": ("audio", "longer than prepare.audio.max_duration (with too_long: reject)"),
    "audio_silent": ("audio", "RMS level below prepare.audio.silence_db"),
    "video_undecodable": ("video", "not a video (or a still image), truncated before any frame, or an unsupported format"),
    "video_too_large": ("video", "the header or a decoded frame has more pixels than prepare.video.max_pixels (bomb guard)"),
    "video_too_long": ("video", "longer than prepare.video.max_duration, or more frames than prepare.video.max_frames"),
    "video_no_frames": ("video", "no video stream (e.g. an audio-only file) or no decodable frame"),
    "video_too_small": ("video", "the frames' shorter side below prepare.video.min_side"),
    "video_bad_aspect": ("video", "the frames' aspect ratio beyond prepare.video.max_aspect"),
    "text_not_utf8": ("text", "the text is not valid UTF-8"),
    "text_empty": ("text", "the text is empty or whitespace/control characters only"),
    "no_usable_modality": ("clean", "every modality the row named was dropped (on_bad_modality: drop)"),
    "unknown_label": ("label", "the label is not in prepare.label.labels"),
    "unlabeled": ("label", "no label and no labelling rule matched (with label.unlabeled: reject)"),
    "duplicate": ("dedup", "same content in every modality as another sample (see duplicate_of)"),
    "timeout": ("process", "processing the row took longer than prepare.row_timeout (a pathological file); not cached"),
    "out_of_memory": ("process", "processing the row needed more memory than prepare.row_memory_mb; not cached"),
    "processing_error": ("process", "an unexpected error while processing the row (exotic file, a decoder crash, or a bug); detail names it"),
}

MODALITIES = ("image", "audio", "text", "video")


class RecordError(Exception):
    """A per-record failure that becomes a reject row; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # pickles as (reason, detail), not as its one-string message
        return (RecordError, (self.reason, self.detail))


@dataclass(frozen=True)
class RawRow:
    """One input row, parsed but not loaded. Paths are absolute paths or URIs."""

    source: str  # "<file>:<row number>" (1-based), for humans and for ordering
    order: int  # global input order, used to break ties deterministically
    id: str
    image: str | None = None
    audio: str | None = None
    text: str | bytes | None = None  # inline str, or raw bytes read from a .txt file
    text_path: str | None = None  # directory layout: the .txt file to read
    video: str | None = None
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # media carried in the input itself (a Parquet struct's bytes, a tar member), by modality:
    # the bytes, or the RecordError met (e.g. a member over max_file_bytes, left unread). The
    # modality's path field then holds a display name ("shard-000.tar:KEY.jpg"), not a file.
    media: dict[str, Any] = field(default_factory=dict, repr=False)

    def media_paths(self) -> tuple[tuple[str, str | None], ...]:
        """(modality, path or display name) of the media to load, in MODALITIES order; a text
        given inline has none."""
        return (("image", self.image), ("audio", self.audio), ("text", self.text_path), ("video", self.video))


@dataclass(frozen=True)
class Sample:
    """A cleaned, normalized sample with its features (before tokenization)."""

    id: str
    key: str
    source: str
    order: int
    label: str | None
    jpg: bytes | None = None
    mel: Any = None  # np.ndarray float16 [n_mels, frames]
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)  # modality -> content hash (exact)
    phash: int | None = None  # 64-bit perceptual hash of the image
    video: bytes | None = None  # JPEG strip: the sampled frames stacked vertically (mmprep.video)
    vphash: int | None = None  # 64-bit perceptual hash of the video's sampled frames
    # per-sample normalization sums by modality, (count, scale, int64 [4, dims]) as
    # `staged.sample_stats` makes them when the row is staged: no second decode at writing
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def content_signature(self) -> str:
        """Same value iff every present modality has the same content (exact duplicates)."""
        # video joins the signature only when present: the signatures of other rows stay as they were
        parts = [f"{m}={self.hashes.get(m, '-')}" for m in MODALITIES if m != "video" or "video" in self.hashes]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class Reject:
    id: str | None
    source: str
    order: int
    stage: str
    reason: str
    detail: str = ""
    duplicate_of: str | None = None

    def row(self) -> dict[str, Any]:
        return {
            "id": printable(self.id),
            "source": printable(self.source),
            "stage": self.stage,
            "reason": self.reason,
            "detail": printable(self.detail[:500]),
            "duplicate_of": printable(self.duplicate_of),
        }


_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogates(text: str) -> bool:
    """Invalid UTF-8 read with errors="surrogateescape" shows up as lone surrogates."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def printable(text: str | None) -> str | None:
    """A str that encodes as UTF-8: invalid bytes and lone surrogates become visible escapes."""
    if text is None or not has_surrogates(text):
        return text
    try:  # bytes that were escaped on reading show as \\xff again
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates, e.g. a JSON "\\ud800"
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def reject(row: RawRow | Sample, error: RecordError, duplicate_of: str | None = None) -> Reject:
    return Reject(
        id=row.id,
        source=row.source,
        order=row.order,
        stage=REASONS[error.reason][0],
        reason=error.reason,
        detail=stable_detail(error.detail),
        duplicate_of=duplicate_of,
    )


_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,16}\b")


def stable_detail(detail: str) -> str:
    """A reject's detail without what differs between identical runs (object addresses in a
    library's message), and bounded (a message quoting a whole field stays readable)."""
    detail = printable(_ADDRESS.sub("0x…", detail)) or ""
    return detail if len(detail) <= 500 else detail[:497] + "..."


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(sample_id: str) -> str:
    """A tar/WebDataset/filesystem-safe key: sanitized prefix + 16 hex of sha256(id).

    Distinct ids give distinct keys (64-bit digest); the prefix keeps keys readable.
    """
    prefix = _UNSAFE.sub("_", sample_id).strip("_")[:40] or "x"
    digest = hashlib.sha256(sample_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{prefix}-{digest}"
