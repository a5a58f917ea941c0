"""Images: header-first bomb guard, robust OpenCV decoding, normalization, perceptual hash."""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmprep.config import ImageConfig
from mmprep.records import RecordError

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**30))  # process-wide backstop
import cv2  # noqa: E402

cv2.setNumThreads(1)  # Beam parallelizes across rows; per-image threads only contend


@dataclass(frozen=True)
class ImageResult:
    jpg: bytes
    phash: int
    meta: dict[str, Any]


def _png(d: bytes) -> tuple[int, int]:
    if d[12:16] != b"IHDR":
        raise ValueError("PNG without IHDR")
    return struct.unpack(">II", d[16:24])


def _gif(d: bytes) -> tuple[int, int]:
    return struct.unpack("<HH", d[6:10])


def _bmp(d: bytes) -> tuple[int, int]:
    if struct.unpack("<I", d[14:18])[0] == 12:
        return struct.unpack("<HH", d[18:22])
    w, h = struct.unpack("<ii", d[18:26])
    return abs(w), abs(h)


def _webp(d: bytes) -> tuple[int, int]:
    chunk = d[12:16]
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", d[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        b = d[21:25]
        w = 1 + (((b[1] & 0x3F) << 8) | b[0])
        h = 1 + (((b[3] & 0x0F) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
        return w, h
    if chunk == b"VP8X":
        w = 1 + int.from_bytes(d[24:27], "little")
        h = 1 + int.from_bytes(d[27:30], "little")
        return w, h
    raise ValueError(f"unknown WebP chunk {chunk!r}")


def _jpeg(d: bytes) -> tuple[int, int]:
    """Walk the marker segments to the first SOFn frame header."""
    i = 2
    while i + 9 < len(d):
        if d[i] != 0xFF:
            raise ValueError("JPEG marker expected")
        marker = d[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", d[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", d[i + 5 : i + 9])
            return w, h
        i += 2 + length
    raise ValueError("no JPEG frame header")


def _jpeg_components(d: bytes) -> int:
    """Colour components in the JPEG frame header (1 grey, 3 YCbCr, 4 CMYK)."""
    i = 2
    while i + 9 < len(d) and d[i] == 0xFF:
        marker = d[i + 1]
        if marker == 0xFF or marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return d[i + 9]
        i += 2 + struct.unpack(">H", d[i + 2 : i + 4])[0]
    return 3


def _tiff_ifd0(d: bytes) -> dict[int, tuple[int, int]]:
    """{tag: (type, value)} of the single-valued SHORT/LONG tags of a TIFF's first image
    directory (classic TIFF and BigTIFF, either byte order; an EXIF block is one too); the
    directory's entries are bounded by the file."""
    order = {b"II": "<", b"MM": ">"}[d[:2]]
    big = struct.unpack(order + "H", d[2:4])[0] == 43
    (ifd,) = struct.unpack(order + ("Q" if big else "I"), d[8:16] if big else d[4:8])
    count_fmt, entry_size, value_at = ("Q", 20, 12) if big else ("H", 12, 8)
    head = struct.calcsize(count_fmt)
    (count,) = struct.unpack(order + count_fmt, d[ifd : ifd + head])
    tags: dict[int, tuple[int, int]] = {}
    for i in range(min(count, 4096)):
        entry = d[ifd + head + entry_size * i : ifd + head + entry_size * (i + 1)]
        if len(entry) < entry_size:
            break
        tag, kind = struct.unpack(order + "HH", entry[:4])
        fmt = {3: "H", 4: "I", 16: "Q" if big else ""}.get(kind)  # SHORT, LONG, LONG8 (BigTIFF)
        if fmt:
            tags[tag] = (kind, struct.unpack(order + fmt, entry[value_at : value_at + struct.calcsize(fmt)])[0])
    return tags


def _tiff(d: bytes) -> tuple[int, int]:
    tags = _tiff_ifd0(d)
    if 256 not in tags or 257 not in tags:
        raise ValueError("no ImageWidth/ImageLength in the first directory")
    return tags[256][1], tags[257][1]


def _boxes(d: bytes, start: int, end: int):
    """(type, payload start, payload end) of the ISOBMFF boxes in d[start:end], sizes bounded by it."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", d[pos : pos + 8])
        head = 8
        if size == 1:
            (size,) = struct.unpack(">Q", d[pos + 8 : pos + 16])
            head = 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            raise ValueError(f"box {kind!r} declares {size} bytes past its parent")
        yield kind, pos + head, pos + size
        pos += size


def _avif_properties(d: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of the item property boxes (meta → iprp → ipco), in file order."""
    for kind, a, b in _boxes(d, 0, len(d)):
        if kind == b"meta":  # a full box: version and flags first
            return [(k4, d[a4:b4]) for k2, a2, b2 in _boxes(d, a + 4, b) if k2 == b"iprp"
                    for k3, a3, b3 in _boxes(d, a2, b2) if k3 == b"ipco"
                    for k4, a4, b4 in _boxes(d, a3, b3)]
    return []


def _avif(d: bytes) -> tuple[int, int]:
    """The largest image spatial extent (`ispe`) among the item properties: a grid's full size,
    not one tile's."""
    sizes = [struct.unpack(">II", p[4:12]) for k, p in _avif_properties(d) if k == b"ispe" and len(p) >= 12]
    if not sizes:
        raise ValueError("no image size (ispe) in its item properties")
    return max(sizes, key=lambda wh: wh[0] * wh[1])


def _avif_orient(img: np.ndarray, d: bytes) -> np.ndarray:
    """AVIF's own orientation, which OpenCV leaves to the caller: `irot` (quarter turns
    anticlockwise) and `imir` (mirror: 0 top↔bottom, 1 left↔right, as libavif reads it), in file order — how
    Pillow and phones store an EXIF orientation in AVIF."""
    turns = (None, cv2.ROTATE_90_COUNTERCLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_CLOCKWISE)
    for kind, payload in _avif_properties(d):
        if kind == b"irot" and payload and turns[payload[0] & 3] is not None:
            img = cv2.rotate(img, turns[payload[0] & 3])
        elif kind == b"imir" and payload:
            img = cv2.flip(img, 0 if payload[0] & 1 == 0 else 1)
    return img


def _isobmff_image(d: bytes) -> str | None:
    """"avif" for an AVIF, "heif" for HEIC/HEIF (phones' photos: OpenCV has no decoder), by the
    ftyp box's brands; None for anything else."""
    if d[4:8] != b"ftyp" or len(d) < 16:
        return None
    size = min(struct.unpack(">I", d[:4])[0], len(d), 256)
    brands = {d[8:12]} | {d[i : i + 4] for i in range(16, size - 3, 4)}
    if brands & {b"avif", b"avis"}:
        return "avif"
    if brands & {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"}:
        return "heif"
    return None


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png", _png),
    (b"II*\x00", "tiff", _tiff),
    (b"MM\x00*", "tiff", _tiff),
    (b"II+\x00", "tiff", _tiff),  # BigTIFF
    (b"MM\x00+", "tiff", _tiff),
    (b"\xff\xd8\xff", "jpeg", _jpeg),
    (b"GIF87a", "gif", _gif),
    (b"GIF89a", "gif", _gif),
    (b"BM", "bmp", _bmp),
)


def read_image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; nothing is decoded or allocated."""
    parser, fmt = None, None
    for magic, name, fn in _SIGNATURES:
        if data.startswith(magic):
            parser, fmt = fn, name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        parser, fmt = _webp, "webp"
    box = _isobmff_image(data)
    if box == "avif":
        parser, fmt = _avif, "avif"
    elif box == "heif":
        raise RecordError("image_undecodable", "HEIC/HEIF (a phone's photo format) has no decoder here: convert it "
                          "to JPEG or PNG first (e.g. `heif-convert`, or ImageMagick `magick x.heic x.jpg`)")
    if parser is None:
        raise RecordError("image_undecodable", f"unsupported format or not an image (starts with {data[:8]!r})")
    try:
        width, height = parser(data)
    except (ValueError, IndexError, KeyError, struct.error) as err:
        raise RecordError("image_undecodable", f"{fmt}: unreadable header ({err or type(err).__name__})") from None
    if width <= 0 or height <= 0:
        raise RecordError("image_undecodable", f"{fmt}: header declares {width}x{height}")
    return fmt, width, height


def _complete(fmt: str, data: bytes) -> bool:
    """A truncated PNG/JPEG decodes to a partly grey image in OpenCV; refuse it instead."""
    if fmt == "png":
        return data.rfind(b"IEND") > 0
    if fmt == "jpeg":  # EOI after the last scan (an EXIF thumbnail's EOI sits before it)
        sos = data.rfind(b"\xff\xda")
        return sos > 0 and data.find(b"\xff\xd9", sos) > 0
    return True


def _png_exif(data: bytes) -> bytes | None:
    """Walk a PNG's chunks (lengths checked against the file before any decoder trusts them:
    a chunk declaring a gigabyte must not make libpng allocate it); returns its eXIf payload."""
    pos, exif = 8, None
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if length > len(data) - pos - 12:
            raise RecordError("image_undecodable", f"png: chunk {kind!r} declares {length} bytes past the end of the file")
        if kind == b"eXIf":
            exif = data[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            return exif
        pos += 12 + length
    raise RecordError("image_undecodable", "png: truncated file")


def _webp_exif(data: bytes) -> bytes | None:
    pos = 12
    while pos + 8 <= len(data):
        kind, length = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if kind == b"EXIF":
            return data[pos + 8 : pos + 8 + length]
        pos += 8 + length + (length & 1)
    return None


def exif_orientation(exif: bytes | None) -> int:
    """The Orientation tag (1-8) of a TIFF-structured EXIF block ("Exif\\0\\0" prefix
    allowed), 1 when absent or unreadable."""
    if not exif:
        return 1
    tiff = exif[6:] if exif.startswith(b"Exif\0\0") else exif
    try:
        kind, value = _tiff_ifd0(tiff).get(0x0112, (3, 1))
    except (KeyError, IndexError, struct.error):
        return 1
    return value if kind == 3 and 1 <= value <= 8 else 1


def orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (what a camera or phone recorded) to decoded pixels."""
    if orientation == 2:
        img = cv2.flip(img, 1)
    elif orientation == 3:
        img = cv2.rotate(img, cv2.ROTATE_180)
    elif orientation == 4:
        img = cv2.flip(img, 0)
    elif orientation == 5:
        img = cv2.transpose(img)
    elif orientation == 6:
        img = cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    elif orientation == 7:
        img = cv2.flip(cv2.transpose(img), -1)
    elif orientation == 8:
        img = cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return img


def _to_rgb(img: np.ndarray) -> np.ndarray:
    """Any decoded array (gray, BGR, BGRA, 16-bit) → 8-bit RGB; alpha composited on white."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:  # composited on white, in integers, a block of rows at a time (small temporaries)
        out = np.empty((img.shape[0], img.shape[1], 3), np.uint8)
        for top in range(0, img.shape[0], 256):
            block = img[top : top + 256]
            x = np.subtract(255, block[:, :, :3], dtype=np.uint16)
            x *= block[:, :, 3:4]
            # round((c·a + 255·(255 − a)) / 255) = (255·255 + 127 − a·(255 − c)) // 255, exactly (never
            # a tie: 255 is odd); what float32 arithmetic gave, 2.4x faster (a 49 MP PNG took 4 s)
            np.subtract(65152, x, out=x)
            x //= 255
            out[top : top + 256] = x
        return cv2.cvtColor(out, cv2.COLOR_BGR2RGB, dst=out)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)


def check_shape(kind: str, width: int, height: int, min_side: int, max_aspect: float) -> None:
    """`{kind}_too_small` below `min_side`, `{kind}_bad_aspect` beyond `max_aspect` (images, and
    video frames: a 4x4 picture would be blown up to the stored size, a 2000x50 strip cropped to
    its middle 50 pixels)."""
    if min(width, height) < min_side:
        raise RecordError(f"{kind}_too_small", f"{width}x{height}, shorter side below min_side={min_side}")
    if max(width, height) / min(width, height) > max_aspect:
        raise RecordError(f"{kind}_bad_aspect", f"{width}x{height} beyond max_aspect={max_aspect}")


# libjpeg's warnings that mean scan data is missing or wrong: it goes on and fills the rest of
# the picture with flat grey (or garbage), and OpenCV returns that image as if it were whole.
# Warnings about harmless oddities ("N extraneous bytes before marker", a bad ICC marker) are not
# among them: such files decode completely.
_JPEG_DATA_LOSS = (b"premature end of data segment", b"instead of RST", b"bad Huffman code", b"bad arithmetic code",
                   b"Premature end of JPEG file")
_LIBJPEG_LINES = (b"Corrupt JPEG data", b"Premature end of JPEG file")
_stderr_lock = threading.Lock()
_stderr_file: list[Any] = []  # the spool file, made on first use


def _after_fork() -> None:
    """A forked child gets its own lock (another thread may have held it) and spool file (not
    one whose offset it shares with its parent)."""
    global _stderr_lock
    _stderr_lock = threading.Lock()
    _stderr_file.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


@contextlib.contextmanager
def _libjpeg_warning(found: list[bytes]):
    """Collect what is written to fd 2 meanwhile: OpenCV's JPEG decoder leaves libjpeg's own
    message handler in place, which prints an image's first warning there and nowhere else.
    Lines that are not libjpeg's are written back to fd 2 afterwards; without a usable fd 2 the
    block just runs."""
    with _stderr_lock:
        try:
            if not _stderr_file:
                _stderr_file.append(tempfile.TemporaryFile(buffering=0))
            spool = _stderr_file[0]
            saved = os.dup(2)
        except OSError:
            yield
            return
        text = b""
        try:
            os.dup2(spool.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
            # drained even when the decode raised: a warning left in the spool would otherwise
            # be read as the next image's
            if os.lseek(spool.fileno(), 0, os.SEEK_CUR):  # something was written (the offset is shared with fd 2)
                os.lseek(spool.fileno(), 0, os.SEEK_SET)
                text = spool.read()
                os.lseek(spool.fileno(), 0, os.SEEK_SET)
                os.ftruncate(spool.fileno(), 0)
            if text:
                lines = text.splitlines(keepends=True)
                found.extend(x for x in lines if x.startswith(_LIBJPEG_LINES))
                other = b"".join(x for x in lines if not x.startswith(_LIBJPEG_LINES))
                if other:
                    with contextlib.suppress(OSError):
                        os.write(2, other)


_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _jpeg_scale(width: int, height: int, size: int) -> int:
    """The denominator of libjpeg's DCT scaling (1/2, 1/4, 1/8) for a JPEG far larger than its
    target: the largest that divides both sides (so a scaled pixel is exactly an s × s block of
    the original, and the resize and crop fall where they fall in a full decode) and leaves the
    shorter side at least 2 × `size` (Pillow's `draft` with `reducing_gap=2`: the area filter
    makes the rest of the way). 1, a full decode, otherwise."""
    for s in (8, 4, 2):
        if width % s == 0 and height % s == 0 and min(width, height) >= 2 * size * s:
            return s
    return 1


def _decode_jpeg(buf: np.ndarray, width: int, height: int, size: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """OpenCV's JPEG decode (EXIF orientation applied, CMYK and grey as colour), scaled down per
    `_jpeg_scale`; with it the original's upright (width, height), which OpenCV's turn of the
    scaled pixels by its EXIF orientation shows (a full decode where the shape says neither).
    Damaged scan data is `image_undecodable`."""
    for s in dict.fromkeys((_jpeg_scale(width, height, size), 1)):
        warning: list[bytes] = []
        with _libjpeg_warning(warning):
            img = cv2.imdecode(buf, _REDUCED[s])
        lost = [x for x in warning if any(w in x for w in _JPEG_DATA_LOSS)]
        if lost:  # decoded, but partly grey: refuse it as a truncated file is refused
            raise RecordError("image_undecodable", f"jpeg: {lost[0].decode('ascii', 'replace').strip()}")
        if s == 1 or img is None:
            return img, None
        if img.shape[:2] == (height // s, width // s):
            return img, (width, height)
        if img.shape[:2] == (width // s, height // s):
            return img, (height, width)
    return img, None  # (not reached: the loop ends with s == 1)


def decode_image(data: bytes, cfg: ImageConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Validated, oriented RGB uint8 pixels and the original's metadata. A JPEG at least four
    times `cfg.size` on its shorter side comes out scaled down by libjpeg (`_jpeg_scale`)."""
    fmt, width, height = read_image_size(data)
    if width * height > cfg.max_pixels:
        raise RecordError("image_too_large", f"{width}x{height} exceeds max_pixels={cfg.max_pixels}")
    if not _complete(fmt, data):
        raise RecordError("image_undecodable", f"{fmt}: truncated file")
    exif = _png_exif(data) if fmt == "png" else _webp_exif(data) if fmt == "webp" else None
    buf = np.frombuffer(data, np.uint8)
    oriented = None  # the original's upright width and height, where the pixels are scaled down
    try:  # decoded once: JPEG as colour (OpenCV applies its EXIF orientation and converts CMYK),
        # the rest unchanged (alpha and 16-bit kept; a TIFF's first page, its Orientation tag
        # applied by OpenCV), PNG/WebP oriented here from their eXIf/EXIF chunk
        if fmt == "jpeg":
            img, oriented = _decode_jpeg(buf, width, height, cfg.size)
        else:
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        if "Insufficient memory" in str(err):
            raise MemoryError(f"{fmt}: {width}x{height}") from None
        raise RecordError("image_undecodable", f"{fmt}: {str(err).strip().splitlines()[-1]}") from None
    if img is None or img.size == 0:
        raise RecordError("image_undecodable", f"{fmt}: OpenCV could not decode it")
    channels = _jpeg_components(data) if fmt == "jpeg" else 1 if img.ndim == 2 else img.shape[2]
    depth = 16 if img.dtype == np.uint16 else 8
    if fmt == "avif":
        img = _avif_orient(img, data)
    elif fmt not in ("jpeg", "tiff"):
        img = orient(img, exif_orientation(exif))
    rgb = _to_rgb(img)
    h, w = rgb.shape[:2]
    if oriented:
        w, h = oriented
    check_shape("image", w, h, cfg.min_side, cfg.max_aspect)
    meta = {"format": fmt, "width": int(w), "height": int(h), "channels": int(channels), "bit_depth": depth}
    return rgb, meta


def resize_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Shorter side → size (area filter when shrinking), then a centre square crop."""
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(rgb, (nw, nh), interpolation=interp)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RecordError("image_undecodable", "JPEG encoding failed")
    return buf.tobytes()


def phash(rgb: np.ndarray) -> int:
    """64-bit DCT perceptual hash: resized or re-encoded copies land within a few bits."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def process_image(data: bytes, cfg: ImageConfig) -> ImageResult:
    rgb, meta = decode_image(data, cfg)
    out = resize_crop(rgb, cfg.size)
    return ImageResult(jpg=encode_jpeg(out, cfg.jpeg_quality), phash=phash(rgb), meta=meta)


def decode_jpg(jpg: bytes, rgb: bool = True) -> np.ndarray:
    """Our normalized JPEG → RGB uint8 HxWx3 (for statistics and inference); BGR, OpenCV's own
    order, with `rgb=False`."""
    img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a JPEG written by mmprep")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if rgb else img


def decode_strip(strip: bytes, frames: int | None = None) -> np.ndarray:
    """A video strip (square frames stacked vertically in one JPEG, `video.process_video`) →
    uint8 [frames, size, size, 3] RGB; `frames` None: as many as it holds."""
    rgb = decode_jpg(strip)
    height, size = rgb.shape[:2]
    if height % size or (frames is not None and height != frames * size):
        expected = f" ({frames} square frames expected)" if frames is not None else ""
        raise ValueError(f"video strip of {size}x{height} pixels is not a stack of {size}x{size} frames{expected}")
    return rgb.reshape(height // size, size, size, 3)
