"""Text: strict UTF-8, normalization, and a link key for near-identical captions."""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata

from mmprep.records import RecordError

# Invisible characters dropped from text, as fixed code point ranges (not Unicode categories,
# which differ between Python versions' tables): controls, surrogates, private use,
# noncharacters, and format characters that only steer layout (soft hyphen, zero-width space,
# bidi marks/embeddings/isolates, word joiner, byte order mark, ...). Kept on purpose: ZWJ and
# ZWNJ (emoji sequences like 👩‍💻, Persian/Indic spelling), variation selectors, combining
# keycaps, tag characters (subdivision flags), and code points this Python does not know yet
# (new emoji), so what is kept does not depend on the Python version.
_DROP_RANGES = (
    (0x0000, 0x001F), (0x007F, 0x009F), (0x00AD, 0x00AD), (0x061C, 0x061C), (0x180E, 0x180E),
    (0x200B, 0x200B), (0x200E, 0x200F), (0x202A, 0x202E), (0x2060, 0x2064), (0x2066, 0x206F),
    (0xD800, 0xDFFF), (0xE000, 0xF8FF), (0xFDD0, 0xFDEF), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB),
    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0001, 0xE0001), (0xF0000, 0x10FFFF),
)
_DROP_RE = re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _DROP_RANGES) + "]")
_NONCHAR_RE = re.compile("[\\ufffe\\uffff" + "".join(f"\\U{p:04x}fffe\\U{p:04x}ffff" for p in range(1, 16)) + "]")
_SPACE_RE = re.compile(r"\s+")
RAW_FACTOR = 8  # text is cut at RAW_FACTOR·max_chars characters before normalization (bounded work)


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


def drop_invisible(text: str) -> str:
    """Whitespace runs (controls such as tab and newline included) become one space, then the
    invisible layout characters (`_DROP_RANGES`) and noncharacters are dropped."""
    return _NONCHAR_RE.sub("", _DROP_RE.sub("", _SPACE_RE.sub(" ", text)))


def normalize_text(text: str, max_chars: int) -> tuple[str, bool]:
    """HTML entities unescaped, NFKC, invisible layout characters dropped (`_DROP_RANGES`),
    whitespace collapsed; truncated (never rejected) past max_chars. Returns (text, truncated).

    Work is bounded: only the first RAW_FACTOR·max_chars characters are normalized (NFKC and
    entities change a text's length by a small factor, so a 10 MB caption costs no more
    than a long one)."""
    cut = len(text) > RAW_FACTOR * max_chars + 64
    if cut:
        text = text[: RAW_FACTOR * max_chars + 64]
    text = unicodedata.normalize("NFKC", html.unescape(text))
    text = _SPACE_RE.sub(" ", drop_invisible(text)).strip()
    if not text.strip("\u200c\u200d\ufe0e\ufe0f"):
        raise RecordError("text_empty", "empty after normalization")
    if len(text) > max_chars:
        return text[:max_chars].rstrip(), True
    return text, cut


def text_link_key(text: str) -> str:
    """Captions that differ only in case, punctuation, symbols or spacing share this key.

    Combining marks are letters' parts (Devanagari and Thai vowel signs: कल and काल are two
    words), so they are kept, variation selectors aside. A caption of symbols only (emoji,
    "!!!") has no letters to compare: its key is the caption without spacing, so two different
    emoji captions are not one "same text"."""
    folded = "".join(ch for ch in text.casefold() if not 0xFE00 <= ord(ch) <= 0xFE0F)
    core = "".join(ch for ch in folded if unicodedata.category(ch)[0] in "LNM")
    if not core:
        core = "\0" + "".join(folded.split())  # (a prefix no letter-bearing caption's key has)
    return hashlib.sha256(core.encode("utf-8")).hexdigest()
