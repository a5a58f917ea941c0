"""Text: strict UTF-8, normalization, and a link key for near-identical captions."""

from __future__ import annotations

import hashlib
import html
import unicodedata

from mmprep.records import RecordError

_DROP = {"Cc", "Cf", "Co", "Cs", "Cn"}


def decode_text(value: str | bytes) -> str:
    """Bytes must be strict UTF-8 (a BOM is dropped); a str must not hold lone surrogates
    (what invalid bytes become when a manifest line is read with surrogateescape)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise RecordError("text_not_utf8", f"invalid UTF-8 at byte {err.start}") from None
    for index, char in enumerate(value):
        if 0xD800 <= ord(char) <= 0xDFFF:
            raise RecordError("text_not_utf8", f"invalid UTF-8 (or a lone surrogate) at character {index}")
    return value


def normalize_text(text: str, max_chars: int) -> tuple[str, bool]:
    """HTML entities unescaped, NFKC, control/format characters dropped, whitespace collapsed;
    truncated (never rejected) past max_chars. Returns (text, truncated)."""
    text = unicodedata.normalize("NFKC", html.unescape(text))
    kept = [" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in _DROP]
    text = " ".join("".join(kept).split())
    if not text:
        raise RecordError("text_empty", "empty after normalization")
    if len(text) > max_chars:
        return text[:max_chars].rstrip(), True
    return text, False


def text_link_key(text: str) -> str:
    """Captions that differ only in case, punctuation, symbols or spacing share this key."""
    core = "".join(ch for ch in text.casefold() if unicodedata.category(ch)[0] in "LN")
    return hashlib.sha256(core.encode("utf-8")).hexdigest()
