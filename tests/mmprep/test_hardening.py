"""Real-world media and hostile bytes, one function at a time: orientation for every
container and pixel format, bounded headers, text that keeps emoji sequences."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from mmprep.config import ImageConfig
from mmprep.image import decode_image, process_image
from mmprep.records import RecordError
from mmprep.text import normalize_text

CFG = ImageConfig(size=32)


def tiff(orientation: int, order: str = "<") -> bytes:
    """A minimal TIFF-structured EXIF block with one Orientation tag."""
    head = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, 8) + struct.pack(order + "H", 1)
    return head + struct.pack(order + "HHI", 0x0112, 3, 1) + struct.pack(order + "HH", orientation, 0) + b"\0\0\0\0"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_exif(img: np.ndarray, orientation: int) -> bytes:
    data = cv2.imencode(".png", img)[1].tobytes()
    return data[:33] + chunk(b"eXIf", tiff(orientation)) + data[33:]  # right after IHDR


def jpeg_with_exif(img: np.ndarray, orientation: int) -> bytes:
    app1 = b"Exif\0\0" + tiff(orientation, ">")
    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def webp_with_exif(img: np.ndarray, orientation: int) -> bytes:
    """A lossless WebP rewritten as extended (VP8X) with an EXIF chunk."""
    data = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    body = data[12:]
    h, w = img.shape[:2]
    flags = 0x08 | (0x10 if img.ndim == 3 and img.shape[2] == 4 else 0)  # EXIF (+ alpha)
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([flags, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    exif = tiff(orientation)
    exif_chunk = b"EXIF" + struct.pack("<I", len(exif)) + exif + b"\0" * (len(exif) & 1)
    payload = b"WEBP" + vp8x + body + exif_chunk
    return b"RIFF" + struct.pack("<I", len(payload)) + payload


def marked(h: int = 40, w: int = 64) -> np.ndarray:
    """BGR with a white block top-left and a red block bottom-right: every flip/turn differs."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:16, :16] = (255, 255, 255)
    img[24:, 48:] = (0, 0, 255)
    return img


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_for_every_container_and_pixel_format(orientation):
    """A phone photo saved with transparency or 16 bits per channel turns like a JPEG does
    (OpenCV applies EXIF only to what it decodes as 8-bit colour)."""
    reference, _ = decode_image(jpeg_with_exif(marked(), orientation), CFG)
    assert reference.shape[:2] == ((64, 40) if orientation >= 5 else (40, 64))
    bgra = np.dstack([marked(), np.full((40, 64), 255, np.uint8)])
    variants = {
        "png": png_with_exif(marked(), orientation),
        "png-alpha": png_with_exif(bgra, orientation),
        "png-16bit": png_with_exif(marked().astype(np.uint16) * 257, orientation),
        "png-gray-16bit": png_with_exif(cv2.cvtColor(marked(), cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257, orientation),
        "webp": webp_with_exif(marked(), orientation),
        "webp-alpha": webp_with_exif(bgra, orientation),
    }
    for name, data in variants.items():
        rgb, meta = decode_image(data, CFG)
        assert rgb.shape[:2] == reference.shape[:2], name
        gray = cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY) if "gray" in name else reference
        got = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if "gray" in name else rgb
        assert np.abs(got.astype(int) - gray).mean() < 3, name
        assert meta["bit_depth"] == (16 if "16bit" in name else 8)


def test_a_png_chunk_declaring_a_gigabyte_is_refused_from_the_header():
    data = cv2.imencode(".png", marked())[1].tobytes()
    hostile = data[:33] + struct.pack(">I", 1 << 30) + b"IDAT" + data[41:]
    # refused by the chunk walk before the decoder sees it (libpng took 25 s and 4.4 GB on it)
    with pytest.raises(RecordError, match="image_undecodable.*declares 1073741824 bytes past the end"):
        decode_image(hostile, CFG)


@pytest.mark.parametrize("data", [b"RIFF\0\0\0\0WEBPVP8L\0\0", b"RIFF\0\0\0\0WEBPVP8 ", b"RIFF\x10\0\0\0WEBPVP8X\0\0"])
def test_short_webp_headers_are_rejects_not_crashes(data):
    with pytest.raises(RecordError, match="image_undecodable"):
        process_image(data, CFG)


def test_jpeg_is_decoded_once_and_keeps_its_channel_count():
    gray = cv2.imencode(".jpg", cv2.cvtColor(marked(), cv2.COLOR_BGR2GRAY))[1].tobytes()
    rgb, meta = decode_image(gray, CFG)
    assert meta["channels"] == 1 and rgb.shape == (40, 64, 3)


@pytest.mark.parametrize(
    "text",
    [
        "👩\u200d💻 at work",  # ZWJ sequence
        "👨\u200d👩\u200d👧\u200d👦 family",
        "I \u2764\ufe0f it",  # variation selector
        "press 1\ufe0f\u20e3",  # keycap
        "🇯🇵 flag",  # regional indicators
        "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f Scotland",  # tag sequence
        "می\u200cخواهم",  # Persian ZWNJ
        "क्\u200dष",  # Devanagari ZWJ
        "\U0001fae9 a code point newer than some Pythons",
    ],
)
def test_normalization_keeps_emoji_and_joiner_sequences(text):
    assert normalize_text(text, 200) == (text, False)


def test_normalization_drops_only_invisible_layout_characters():
    raw = "a\u200bb\u00adc\u202ed\u2066e\ufefff\x00g\ue000h\ttab\nline"
    assert normalize_text(raw, 200) == ("abcdefgh tab line", False)
    with pytest.raises(RecordError, match="text_empty"):
        normalize_text("\u200d\ufe0f \u200b", 200)


def test_a_huge_caption_is_cut_before_normalization(monkeypatch):
    """A 10 MB one-line caption is normalized only as far as max_chars needs (whole, it took
    139 s and 5.6 GB)."""
    import unicodedata

    seen = []
    real = unicodedata.normalize
    monkeypatch.setattr("mmprep.text.unicodedata.normalize", lambda form, s: seen.append(len(s)) or real(form, s))
    text, truncated = normalize_text("word " * 2_000_000, 100)
    assert truncated and len(text) <= 100 and text.startswith("word word")
    assert seen and max(seen) <= 8 * 100 + 64


def test_reject_details_hold_nothing_that_differs_between_runs():
    from mmprep.records import RawRow, reject

    row = RawRow(source="m.jsonl:1", order=0, id="x")
    err = RecordError("processing_error", f"TypeError: bad {object()!r} in {'y' * 2000}")
    detail = reject(row, err).detail
    assert "0x…" in detail and not any(c.isdigit() for c in detail.split("0x")[1][:8]) and len(detail) <= 500


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("kind", ["jpeg", "png-rgba", "png-16bit-gray", "webp-rgba", "tiff", "avif"])
def test_files_written_by_pillow_turn_as_pillow_turns_them(kind, orientation, tmp_path):
    """Real files from another library (Pillow writes the EXIF block the way cameras and
    editors do): our pixels match Pillow's own `exif_transpose`."""
    pil = pytest.importorskip("PIL.Image")
    from PIL import ImageOps

    rgb = marked()[:, :, ::-1]  # RGB for Pillow
    exif = pil.Exif()
    exif[0x0112] = orientation
    if kind == "png-16bit-gray":
        gray = cv2.cvtColor(marked(), cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
        image = pil.fromarray(gray)  # I;16
    elif kind in ("jpeg", "tiff", "avif"):
        image = pil.fromarray(np.ascontiguousarray(rgb))
    else:
        image = pil.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), mode="RGBA")
    fmt = {"jpeg": "JPEG", "png-rgba": "PNG", "png-16bit-gray": "PNG", "webp-rgba": "WEBP", "tiff": "TIFF", "avif": "AVIF"}[kind]
    if fmt == "AVIF" and not pytest.importorskip("PIL.features").check("avif"):
        pytest.skip("this Pillow cannot write AVIF")
    path = tmp_path / f"x.{fmt.lower()}"
    image.save(path, format=fmt, exif=exif, **({"quality": 98} if fmt in ("JPEG", "AVIF") else {"lossless": True} if fmt == "WEBP" else {}))
    ours, meta = decode_image(path.read_bytes(), CFG)
    with pil.open(path) as reopened:
        turned = ImageOps.exif_transpose(reopened)
        # 16-bit grey: the top 8 bits (Pillow's own conversion to "L" clips instead of scaling)
        want = (np.asarray(turned).astype(np.uint16) >> 8).astype(np.uint8) if "gray" in kind else np.asarray(turned.convert("RGB"))
    got = cv2.cvtColor(ours, cv2.COLOR_RGB2GRAY) if "gray" in kind else ours
    assert got.shape[:2] == want.shape[:2]
    assert np.abs(got.astype(int) - want).mean() < 3
    assert meta["bit_depth"] == (16 if "16bit" in kind else 8)


@pytest.mark.parametrize("rate", [16000, 44100])
def test_float_audio_at_the_edge_of_float32_is_a_reason_not_an_error(rate):
    import io

    import soundfile as sf

    from mmprep.audio import process_audio
    from mmprep.config import AudioConfig

    wave = (np.sin(np.arange(rate) / 3) * 3.0e38).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype="FLOAT")
    try:
        features = process_audio(buf.getvalue(), AudioConfig()).features
    except RecordError as err:
        assert err.reason == "audio_nonfinite"
    else:
        assert np.isfinite(features.astype(np.float32)).all()
