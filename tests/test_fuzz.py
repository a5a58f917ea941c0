"""Property-based fuzzing (hypothesis) of everything that reads untrusted bytes: manifest lines,
CSV records, image and audio decoders, text normalization. A small budget here (CI);
`benchmarks/fuzz.py --minutes N` runs longer, structure-aware, with hang and memory checks.

The property is always the same: a reject with a reason from the closed list, or a result —
never another exception."""

from __future__ import annotations

import io
import itertools

import cv2
import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmprep.audio import process_audio
from mmprep.config import AudioConfig, ImageConfig
from mmprep.image import process_image
from mmprep.manifest import csv_records, parse_jsonl_line, parse_record
from mmprep.records import REASONS, RawRow, RecordError, Reject
from mmprep.text import _DROP_RANGES, normalize_text

BUDGET = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
IMG = ImageConfig(size=32, max_pixels=4_000_000)
AUD = AudioConfig(n_mels=32, clip_seconds=0.5)


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    rgba = np.dstack([img, rng.integers(0, 255, (40, 56), dtype=np.uint8)])
    out = {
        "png": cv2.imencode(".png", rgba)[1].tobytes(),
        "jpeg": cv2.imencode(".jpg", img)[1].tobytes(),
        "webp": cv2.imencode(".webp", img)[1].tobytes(),
        "bmp": cv2.imencode(".bmp", img)[1].tobytes(),
        "gif-ish": b"GIF89a" + bytes(64),
    }
    wave = (0.3 * np.sin(np.arange(8000) / 7)).astype(np.float32)
    for fmt, subtype in (("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")):
        buf = io.BytesIO()
        sf.write(buf, wave, 16000, format=fmt, subtype=subtype)
        out[fmt.lower()] = buf.getvalue()
    return out


SEEDS = _seeds()


@st.composite
def mutated(draw, kinds: tuple[str, ...]) -> bytes:
    """A valid file with bytes flipped, a slice removed or duplicated, or cut short."""
    data = bytearray(SEEDS[draw(st.sampled_from(kinds))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "dup", "truncate", "int"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if not data:
            break
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[at:]
        else:  # a header field set to an extreme (sizes, lengths, counts)
            data[at : at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"]))
    return bytes(data)


@BUDGET
@given(mutated(("png", "jpeg", "webp", "bmp", "gif-ish")))
def test_images_decode_or_reject(data):
    try:
        result = process_image(data, IMG)
    except RecordError as err:
        assert err.reason.startswith("image_")
    else:
        assert result.jpg.startswith(b"\xff\xd8")


@BUDGET
@given(mutated(("wav", "flac", "ogg", "mp3")))
def test_audio_decodes_or_rejects(data):
    try:
        result = process_audio(data, AUD)
    except RecordError as err:
        assert err.reason.startswith("audio_")
    else:
        assert np.isfinite(result.features.astype(np.float32)).all()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@BUDGET
@given(st.binary(max_size=300) | st.builds(lambda d: repr(d).encode(), st.dictionaries(st.text(max_size=6), json_values, max_size=6)))
def test_manifest_lines_parse_or_reject(line):
    row = parse_jsonl_line(line, "m.jsonl:1", 0, "/base")
    assert isinstance(row, RawRow | Reject)
    if isinstance(row, Reject):
        assert row.reason in REASONS


@BUDGET
@given(st.dictionaries(st.sampled_from(["id", "image", "audio", "text", "label", "x", "y"]), json_values, max_size=7))
def test_records_of_any_types_parse_or_reject(record):
    row = parse_record(record, "m.parquet:1", 0, "")
    assert isinstance(row, RawRow | Reject)
    if isinstance(row, RawRow):
        import json

        json.dumps(row.extra, ensure_ascii=False).encode("utf-8")  # metadata always encodes


csv_text = st.lists(st.text(alphabet=st.sampled_from('ab,"\n\r x'), max_size=12), min_size=1, max_size=12).map(
    lambda parts: "\n".join(parts).encode()
)


@BUDGET
@given(csv_text)
def test_csv_records_lose_no_byte_and_read_the_same_from_any_boundary(data):
    lines = io.BytesIO(data).readlines()
    records = list(csv_records(lines))
    assert sum(size for _, _, size, _ in records) == len(data)
    assert all(used >= 1 for _, used, _, _ in records)
    offsets = list(itertools.accumulate(size for _, _, size, _ in records))
    width = next((len(fields) for fields, _, _, _ in records if fields), None)  # the header's
    first = next((i for i, (fields, _, _, _) in enumerate(records) if fields), len(records))
    for i, start in enumerate(offsets[:-1]):  # a range starting at a record boundary reads the rest the same
        if i < first:
            continue
        again = [(f, u, s) for f, u, s, _ in csv_records(io.BytesIO(data[start:]).readlines(), width)]
        assert again == [(f, u, s) for f, u, s, _ in records[i + 1 :]]


@BUDGET
@given(st.text(max_size=400), st.integers(1, 50))
def test_text_normalization_is_bounded_and_drops_only_what_it_says(text, max_chars):
    try:
        out, _ = normalize_text(text, max_chars)
    except RecordError as err:
        assert err.reason == "text_empty"
        return
    assert 0 < len(out) <= max_chars and out == out.strip()
    assert not any(lo <= ord(ch) <= hi for ch in out for lo, hi in _DROP_RANGES)


@pytest.mark.parametrize("kind", sorted(SEEDS))
def test_the_seeds_themselves_are_valid(kind):
    """The fuzzers start from files that decode (else they only test the first check)."""
    if kind == "gif-ish":
        return
    if kind in ("png", "jpeg", "webp", "bmp"):
        assert process_image(SEEDS[kind], IMG).jpg
    else:
        assert process_audio(SEEDS[kind], AUD).features.size
