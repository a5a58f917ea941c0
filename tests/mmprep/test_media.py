"""Per-record media functions: what a user would notice about decoded, cleaned, normalized data."""

from __future__ import annotations

import io
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
import soundfile as sf

from mmprep.audio import process_audio
from mmprep.config import AudioConfig, ImageConfig
from mmprep.image import decode_jpg, hamming, process_image, read_image_size
from mmprep.records import RecordError
from mmprep.text import decode_text, normalize_text, text_link_key

IMG = ImageConfig(size=32, max_pixels=10_000_000)
AUD = AudioConfig(sample_rate=16000, clip_seconds=1.0, n_mels=40, n_fft=512, hop_length=256, min_duration=0.2)


def scene(h: int = 90, w: int = 120) -> np.ndarray:
    """BGR: left half dark blue, right half bright red, a white disc at the centre."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (120, 20, 20)
    img[:, w // 2 :] = (20, 20, 220)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 4, (255, 255, 255), -1)
    return img


def enc(ext: str, img: np.ndarray, *params: int) -> bytes:
    return cv2.imencode(ext, img, list(params))[1].tobytes()


def exif_orientation_jpeg(img: np.ndarray, orientation: int) -> bytes:
    """A JPEG with an APP1 Exif segment holding one Orientation tag."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00\x00\x00\x00"
    app1 = b"Exif\x00\x00" + tiff
    data = enc(".jpg", img, cv2.IMWRITE_JPEG_QUALITY, 95)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]


def bomb_png(width: int, height: int) -> bytes:
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


@pytest.mark.parametrize(
    "data",
    [
        enc(".png", scene()),
        enc(".jpg", scene()),
        enc(".jpg", scene(), cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        enc(".bmp", scene()),
        enc(".webp", scene(), cv2.IMWRITE_WEBP_QUALITY, 90),
        enc(".gif", scene()),
        enc(".png", cv2.cvtColor(scene(), cv2.COLOR_BGR2GRAY)),
        enc(".png", scene().astype(np.uint16) * 257),
        enc(".png", np.dstack([scene(), np.full((90, 120), 255, np.uint8)])),
    ],
    ids=["png", "jpeg", "progressive", "bmp", "webp", "gif", "gray", "png16", "rgba"],
)
def test_every_format_normalizes_to_rgb_jpeg_of_the_configured_size(data):
    fmt, w, h = read_image_size(data)
    assert (w, h) == (120, 90)
    result = process_image(data, IMG)
    rgb = decode_jpg(result.jpg)
    assert rgb.shape == (32, 32, 3)
    assert result.meta["width"] == 120 and result.meta["height"] == 90
    if result.meta["channels"] != 1:  # colour survives: left blue, right red (RGB order)
        assert rgb[16, 2, 2] > rgb[16, 2, 0] and rgb[16, 29, 0] > rgb[16, 29, 2]


def test_exif_orientation_is_honoured():
    img = scene(60, 120)
    rotated = process_image(exif_orientation_jpeg(img, 6), ImageConfig(size=32))
    assert (rotated.meta["width"], rotated.meta["height"]) == (60, 120)  # 90° turn: portrait now


def photo(h: int, w: int) -> np.ndarray:
    """BGR, photo-like (gradients, grain, edges) and asymmetric: a green square top left."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.dstack([x / w * 200, (np.sin(y / 37) + 1) * 90, 60 + y / h * 150])
    img += np.random.default_rng(1).normal(0, 10, img.shape)
    cv2.circle(img, (w * 2 // 3, h // 2), min(h, w) // 3, (250, 250, 250), 12)
    img[h // 10 : h // 4, w // 10 : w // 4] = (0, 200, 0)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("h", "w"), [(904, 1200), (905, 1203)])
def test_a_large_jpeg_decoded_at_a_reduced_scale_is_the_full_decode_within_a_level(monkeypatch, h, w):
    """A JPEG far larger than image.size, with sides that 2, 4 or 8 divide, is decoded by libjpeg
    at that scale: the stored picture, turned by its EXIF orientation, is a full decode's within
    about a level per pixel before its JPEG encoding, and the metadata keep the original's
    upright size. Other sides (905x1203) decode whole, as before."""
    import mmprep.image as image

    cfg = ImageConfig(size=48)
    img = photo(h, w)
    for orientation in range(1, 9):
        data = exif_orientation_jpeg(img, orientation)
        scaled, meta = image.decode_image(data, cfg)
        with monkeypatch.context() as m:
            m.setattr(image, "_jpeg_scale", lambda *_: 1)
            full, _ = image.decode_image(data, cfg)
            want = process_image(data, cfg)
        got = process_image(data, cfg)
        upright = (h, w) if orientation < 5 else (w, h)
        assert full.shape[:2] == upright and (meta["height"], meta["width"]) == upright
        assert got.meta == want.meta
        if h % 8:
            assert scaled.shape == full.shape and got == want
            continue
        assert scaled.shape[:2] == (upright[0] // 8, upright[1] // 8)
        diff = np.abs(image.resize_crop(scaled, 48).astype(int) - image.resize_crop(full, 48).astype(int))
        assert diff.mean() < 1.0, (orientation, diff.mean())
        assert np.abs(decode_jpg(got.jpg).astype(int) - decode_jpg(want.jpg).astype(int)).mean() < 2.5
        assert hamming(got.phash, want.phash) <= 4


def test_transparent_pixels_become_white():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = (0, 0, 255)  # pure red but fully transparent
    out = decode_jpg(process_image(enc(".png", rgba), ImageConfig(size=32)).jpg)
    assert out.mean() > 240


def test_bomb_header_is_refused_before_decoding():
    with pytest.raises(RecordError, match="image_too_large"):
        process_image(bomb_png(100_000, 100_000), IMG)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"<!DOCTYPE html><html>nope</html>", "image_undecodable"),
        (enc(".jpg", scene())[:400], "image_undecodable"),
        (enc(".png", scene())[:300], "image_undecodable"),
        (b"\x89PNG\r\n\x1a\n", "image_undecodable"),
        (enc(".png", scene(8, 200)), "image_too_small"),
        (enc(".png", scene(20, 400)), "image_bad_aspect"),
    ],
    ids=["html", "truncated-jpeg", "truncated-png", "png-magic-only", "small", "aspect"],
)
def test_bad_images_are_rejects_with_reasons(data, reason):
    with pytest.raises(RecordError, match=reason):
        process_image(data, IMG)


def _scan(data: bytes) -> tuple[int, int]:
    """Where a baseline JPEG's entropy-coded data starts and ends (its SOS segment to the EOI)."""
    sos = data.rfind(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0], data.rfind(b"\xff\xd9")


def test_a_jpeg_whose_scan_data_is_damaged_is_a_reject_not_a_grey_image(capfd):
    """libjpeg decodes a JPEG with lost or broken scan data to a partly flat-grey picture, and
    only prints a warning: such a file has its EOI, so the truncation check passes it."""
    good = enc(".jpg", cv2.resize(scene(), (400, 300)))
    start, end = _scan(good)
    cut = good[: (start + end) // 2] + b"\xff\xd9"  # a download cut off, then "repaired" with an EOI
    restart = good[:start] + good[start : (start + end) // 2] + b"\xff\xd3" + good[(start + end) // 2 :]  # a stray RST marker
    for damaged in (cut, restart):
        with pytest.raises(RecordError, match=r"image_undecodable: jpeg: Corrupt JPEG data"):
            process_image(damaged, IMG)
    # a harmless oddity libjpeg also warns about (padding after the scan) still decodes, the same
    padded = good[:end] + b"\x00" * 7 + good[end:]
    assert process_image(padded, IMG).jpg == process_image(good, IMG).jpg
    # what others print meanwhile is left alone; libjpeg's warnings are not printed at all
    print("before", flush=True)
    process_image(good, IMG)
    captured = capfd.readouterr()
    assert "before" in captured.out and "Corrupt JPEG" not in captured.err


def test_a_warning_from_a_decode_that_raised_is_not_the_next_images(monkeypatch):
    """A decoder that prints libjpeg's warning and then fails (OpenCV's out-of-memory error)
    must not leave that warning to be read as the next, intact image's."""
    import mmprep.image as image

    good = enc(".jpg", cv2.resize(scene(), (400, 300)))
    real = cv2.imdecode

    def fails(buf, flags):
        os.write(2, b"Corrupt JPEG data: premature end of data segment\n")
        raise MemoryError("jpeg")

    monkeypatch.setattr(image.cv2, "imdecode", fails)
    with pytest.raises(MemoryError):
        process_image(good, IMG)
    monkeypatch.setattr(image.cv2, "imdecode", real)
    assert process_image(good, IMG).jpg  # not image_undecodable


def test_phash_links_resized_reencoded_copies_not_different_images():
    a = scene()
    b = scene()
    cv2.rectangle(b, (5, 5), (60, 80), (0, 255, 0), -1)
    small = cv2.resize(a, (80, 60), interpolation=cv2.INTER_AREA)
    ha = process_image(enc(".png", a), IMG).phash
    assert hamming(ha, process_image(enc(".jpg", small, cv2.IMWRITE_JPEG_QUALITY, 70), IMG).phash) <= 6
    assert hamming(ha, process_image(enc(".png", b), IMG).phash) > 10


def test_image_output_is_deterministic():
    data = enc(".jpg", scene())
    assert process_image(data, IMG).jpg == process_image(data, IMG).jpg


def tone(sr: int, seconds: float, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    y = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([y] * channels, axis=1) if channels > 1 else y


def wav_bytes(y: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
@pytest.mark.parametrize(("sr", "channels"), [(8000, 1), (22050, 2), (44100, 1), (48000, 2)])
def test_wav_of_any_depth_rate_and_channels_gives_fixed_logmel(subtype, sr, channels):
    feats = process_audio(wav_bytes(tone(sr, 0.7, channels=channels), sr, "WAV", subtype), AUD).features
    assert feats.dtype == np.float16 and feats.shape == (40, 1 + 16000 // 256)
    assert np.isfinite(feats.astype(np.float32)).all()


def test_a_wav_whose_header_never_got_its_sizes_keeps_its_samples():
    """A recorder stopped mid-stream, or a WAV written to a pipe, leaves the data size 0 in the
    header: libsndfile reads no samples, the file holds a whole clip."""
    full = wav_bytes(tone(22050, 0.8, 880), 22050)
    streamed = bytearray(full)
    at = streamed.index(b"data")
    streamed[at + 4 : at + 8] = struct.pack("<I", 0)
    streamed[4:8] = struct.pack("<I", 0)
    a, b = process_audio(full, AUD), process_audio(bytes(streamed), AUD)
    assert b.meta["duration"] == pytest.approx(0.8, abs=0.01) and b.meta["format"] == "WAV"
    assert np.array_equal(a.features, b.features)
    header_only = bytes(streamed[: at + 8])  # the sizes unwritten and no samples: still a reject
    with pytest.raises(RecordError) as err:
        process_audio(header_only, AUD)
    assert err.value.reason == "audio_too_short"


def test_flac_ogg_and_mp3_decode():
    for fmt, subtype in (("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")):
        result = process_audio(wav_bytes(tone(16000, 0.5), 16000, fmt, subtype), AUD)
        assert result.meta["format"] == fmt


def test_pitch_shows_in_the_mel_bins():
    low = process_audio(wav_bytes(tone(16000, 1.0, 200), 16000), AUD).features.astype(np.float32)
    high = process_audio(wav_bytes(tone(16000, 1.0, 2000), 16000), AUD).features.astype(np.float32)
    assert low.mean(axis=1).argmax() < high.mean(axis=1).argmax()


def m4a_bytes(wave: np.ndarray, sr: int, fmt: str = "ipod", codec: str = "aac") -> bytes:
    """An audio-only M4A (AAC), what phones and podcast tools write; libsndfile cannot read it."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sr)
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=sr, frame_size=stream.frame_size or 1024)
        frame = av.AudioFrame.from_ndarray((np.asarray(wave) * 32767).astype(np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = sr
        for converted in [*resampler.resample(frame), *resampler.resample(None)]:
            out.mux(stream.encode(converted))
        out.mux(stream.encode())
    return buf.getvalue()


def test_m4a_and_other_formats_libsndfile_lacks_decode_through_ffmpeg():
    data = m4a_bytes(tone(16000, 1.0, 2000), 16000)
    with pytest.raises(sf.LibsndfileError):
        sf.read(io.BytesIO(data))
    result = process_audio(data, AUD)
    wav = process_audio(wav_bytes(tone(16000, 1.0, 2000), 16000), AUD)
    assert result.features.shape == wav.features.shape
    assert result.features.astype(np.float32).mean(axis=1).argmax() == wav.features.astype(np.float32).mean(axis=1).argmax()
    assert (result.meta["subtype"], result.meta["sample_rate"], result.meta["channels"]) == ("aac", 16000, 1)
    with pytest.raises(RecordError, match="audio_too_long"):
        process_audio(m4a_bytes(tone(16000, 3.0), 16000), AudioConfig(max_duration=2.0, too_long="reject"))
    cropped = process_audio(m4a_bytes(tone(16000, 3.0), 16000), AudioConfig(max_duration=2.0, too_long="crop"))
    assert cropped.meta["duration"] > 2.9  # the original's duration; only 2 s were read
    with pytest.raises(RecordError, match="audio_silent"):
        process_audio(m4a_bytes(np.zeros(16000), 16000), AUD)


@pytest.mark.parametrize("data", [b"<html>not audio</html>", enc(".png", scene())], ids=["html", "png"])
def test_what_neither_libsndfile_nor_ffmpeg_reads_is_one_clear_reason(data):
    with pytest.raises(RecordError) as err:
        process_audio(data, AUD)
    assert err.value.reason == "audio_undecodable" and "BytesIO" not in err.value.detail and "video" not in err.value.detail


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: wav_bytes(np.where(np.arange(8000) == 50, np.nan, tone(16000, 0.5)), 16000, "WAV", "FLOAT"), "audio_nonfinite"),
        (lambda: wav_bytes(np.zeros(16000), 16000), "audio_silent"),
        (lambda: wav_bytes(np.full(16000, 0.5), 16000), "audio_silent"),  # a DC offset only
        (lambda: wav_bytes(0.02 + 1e-5 * np.sin(np.arange(16000)), 16000, "WAV", "FLOAT"), "audio_silent"),  # a biased dead mic
        (lambda: bytes(wav_bytes(np.zeros(16000), 16000, "WAV", "PCM_U8")[:44]) + bytes(16000), "audio_silent"),  # u8 silence as 0s
        (lambda: wav_bytes(tone(16000, 0.05), 16000), "audio_too_short"),
        (lambda: b"RIFF\x00\x00\x00\x00WAVEjunk", "audio_undecodable"),
        (lambda: b"<html>not audio</html>", "audio_undecodable"),
    ],
    ids=["nan", "silent", "dc", "biased-silence", "u8-zeros", "short", "bad-riff", "html"],
)
def test_bad_audio_is_a_reject_with_a_reason(make, reason):
    with pytest.raises(RecordError, match=reason):
        process_audio(make(), AUD)


def test_too_long_is_cropped_or_rejected_per_policy():
    data = wav_bytes(tone(8000, 3.0), 8000)
    cfg = AudioConfig(max_duration=2.0, clip_seconds=0, n_mels=40, hop_length=256)
    assert process_audio(data, cfg).features.shape[1] == 1 + 2 * 16000 // 256
    with pytest.raises(RecordError, match="audio_too_long"):
        process_audio(data, AudioConfig(max_duration=2.0, too_long="reject"))


def test_mfcc_option_and_determinism():
    data = wav_bytes(tone(22050, 0.8), 22050)
    cfg = AudioConfig(feature="mfcc", n_mfcc=13, n_mels=40)
    assert process_audio(data, cfg).features.shape[0] == 13
    assert process_audio(data, AUD).features.tobytes() == process_audio(data, AUD).features.tobytes()


@pytest.mark.parametrize(("sr", "n_fft", "hop", "n_mels"), [(16000, 512, 256, 40), (22050, 2048, 512, 128), (8000, 400, 160, 64)])
@pytest.mark.parametrize("feature", ["logmel", "mfcc"])
@pytest.mark.filterwarnings("ignore:n_fft=")  # librosa's note on clips shorter than a frame
def test_features_are_librosas_numbers_bit_for_bit(sr, n_fft, hop, n_mels, feature):
    """Our numpy log-mel/MFCC and soxr resampling give exactly librosa's float16 output (a
    user comparing with librosa, or moving between mmprep versions, sees the same features)."""
    import librosa

    from mmprep.audio import mel_filters, resample, waveform_features

    cfg = AudioConfig(sample_rate=sr, n_fft=n_fft, hop_length=hop, n_mels=n_mels, feature=feature, n_mfcc=13)
    assert np.array_equal(mel_filters(sr, n_fft, n_mels), librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels))
    rng = np.random.default_rng(sr)
    for n in (7, n_fft - 1, n_fft + 1, sr, sr + 333):
        wave = (rng.standard_normal(n) * rng.uniform(1e-3, 1.0)).astype(np.float32)
        logmel = librosa.power_to_db(
            librosa.feature.melspectrogram(y=wave, sr=sr, n_fft=n_fft, hop_length=hop, n_mels=n_mels), ref=1.0, top_db=80.0
        )
        want = logmel if feature == "logmel" else librosa.feature.mfcc(S=logmel, n_mfcc=13)
        assert np.array_equal(waveform_features(wave, cfg), want.astype(np.float16)), n
    for orig in (8000, 11025, 44100, 48000):
        wave = (rng.standard_normal(orig + 77) * 0.2).astype(np.float32)
        assert np.array_equal(resample(wave, orig, sr), librosa.resample(wave, orig_sr=orig, target_sr=sr, res_type="soxr_hq"))


def test_text_decoding_and_normalization():
    assert decode_text("\ufeffhello".encode()) == "hello"
    with pytest.raises(RecordError, match="text_not_utf8"):
        decode_text(b"caf\xe9")
    with pytest.raises(RecordError, match="text_not_utf8"):
        decode_text("bad \udcff")
    assert normalize_text("  A&amp;B\u200b \t\n ｆｕｌｌ\x07width  ", 100) == ("A&B fullwidth", False)
    assert normalize_text("我看到一个红色的东西 😀", 100)[0] == "我看到一个红色的东西 😀"
    assert normalize_text("x" * 50, 10) == ("x" * 10, True)
    for empty in ("", "   ", "\u200b\x00", "&nbsp;"):
        with pytest.raises(RecordError, match="text_empty"):
            normalize_text(empty, 100)


def test_text_link_key_ignores_case_and_punctuation():
    assert text_link_key("A red ball.") == text_link_key("a  RED ball")
    assert text_link_key("a red ball") != text_link_key("a blue ball")


def test_text_link_key_keeps_vowel_signs_and_tells_symbol_only_captions_apart():
    """Captions that are different words are not "the same text": Devanagari/Thai vowel signs
    are combining marks, and emoji-only or punctuation-only captions have no letters at all."""
    assert len({text_link_key(t) for t in ("कल", "काल", "किल", "कुल")}) == 4
    assert text_link_key("แมว") != text_link_key("แม")
    assert len({text_link_key(t) for t in ("🐱🐶", "🐍🦊", "!!!", "???", "🇺🇦")}) == 5
    assert text_link_key("🐱 🐶") == text_link_key("🐱🐶")  # spacing still ignored
    assert text_link_key("❤️") == text_link_key("❤")  # and so are variation selectors
    assert text_link_key(normalize_text("Cafe\u0301!", 100)[0]) == text_link_key("café")  # accents composed first


def test_alpha_is_composited_on_white_exactly():
    """Every (colour, alpha) pair: c·a/255 + 255·(1 − a/255), rounded (the integer arithmetic of
    the compositing is checked against the formula over all 65,536 pairs)."""
    from mmprep.image import _to_rgb

    c, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    bgra = np.stack([c, c, c, a], axis=-1).astype(np.uint8)
    expected = np.round(c * a / 255 + 255 * (1 - a / 255)).astype(np.uint8)
    assert (_to_rgb(bgra) == expected[:, :, None]).all()


def tiff_bytes(arr: np.ndarray, orientation: int = 1, **save) -> bytes:
    """A TIFF as scanners, microscopes and photo tools write them (Pillow), RGB in."""
    from PIL import Image

    im = Image.fromarray(arr)
    exif = im.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "TIFF", exif=exif, **save)
    return buf.getvalue()


@pytest.mark.parametrize("save", [{}, {"compression": "tiff_lzw"}, {"compression": "tiff_adobe_deflate"},
                                  {"compression": "jpeg"}, {"big_tiff": True}], ids=["raw", "lzw", "deflate", "jpeg", "bigtiff"])
def test_tiff_decodes_like_the_other_formats(save):
    rgb = cv2.cvtColor(scene(), cv2.COLOR_BGR2RGB)
    data = tiff_bytes(rgb, **save)
    assert read_image_size(data) == ("tiff", 120, 90)
    result = process_image(data, IMG)
    assert result.meta["format"] == "tiff" and (result.meta["width"], result.meta["height"]) == (120, 90)
    out = decode_jpg(result.jpg)
    assert out[16, 2, 2] > out[16, 2, 0] and out[16, 29, 0] > out[16, 29, 2]  # left blue, right red
    assert hamming(result.phash, process_image(enc(".png", scene()), IMG).phash) <= 4


def test_tiff_orientation_16_bit_and_a_bomb_header():
    rgb = cv2.cvtColor(scene(), cv2.COLOR_BGR2RGB)
    upright = process_image(enc(".png", cv2.rotate(scene(), cv2.ROTATE_90_CLOCKWISE)), IMG)
    turned = process_image(tiff_bytes(rgb, orientation=6), IMG)  # stored sideways, tagged "rotate 90° CW"
    assert (turned.meta["width"], turned.meta["height"]) == (90, 120)
    assert hamming(turned.phash, upright.phash) <= 4
    deep = process_image(enc(".tiff", scene().astype(np.uint16) * 257), IMG)
    assert deep.meta["bit_depth"] == 16 and deep.meta["format"] == "tiff"
    bomb = bytearray(tiff_bytes(rgb))
    for tag in (256, 257):  # ImageWidth, ImageLength (Pillow writes them as LONG): 60000 x 60000
        at = bomb.index(struct.pack("<HHI", tag, 4, 1))
        bomb[at + 8 : at + 12] = struct.pack("<I", 60000)
    with pytest.raises(RecordError) as err:
        process_image(bytes(bomb), IMG)
    assert err.value.reason == "image_too_large"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_avif_decodes_upright_and_heic_says_what_to_do(orientation):
    """AVIF (web and phone photos) stores an EXIF orientation as irot/imir boxes, which OpenCV
    does not apply; the result must look like the same picture turned by hand."""
    from PIL import Image, features

    from mmprep.image import orient

    if not features.check("avif"):
        pytest.skip("this Pillow cannot write AVIF")
    rgb = cv2.cvtColor(scene(), cv2.COLOR_BGR2RGB)
    rgb[:30, :30] = (0, 255, 0)  # a corner mark: every turn and mirror differs
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "AVIF", exif=exif, quality=95)
    got = process_image(buf.getvalue(), IMG)
    want = process_image(enc(".png", orient(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), orientation)), IMG)
    assert got.meta["format"] == "avif"
    assert (got.meta["width"], got.meta["height"]) == (want.meta["width"], want.meta["height"])
    assert hamming(got.phash, want.phash) <= 8
    heic = struct.pack(">I4s4sI4s4s", 24, b"ftyp", b"heic", 0, b"mif1", b"heic") + b"\0" * 64
    with pytest.raises(RecordError, match="HEIC") as err:
        process_image(heic, IMG)
    assert err.value.reason == "image_undecodable"
