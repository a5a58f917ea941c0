"""Audio: header-checked decoding (soundfile), validation, resampling, normalization, log-mel/MFCC."""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf

from mmprep.config import AudioConfig
from mmprep.records import RecordError


@dataclass(frozen=True)
class AudioResult:
    features: np.ndarray  # float16 [bins, frames]
    meta: dict[str, Any]


def decode_audio(data: bytes, cfg: AudioConfig) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Mono float32 at the file's own rate (the mean of its channels, not yet validated:
    `process_waveform` does that), and the original's metadata.

    The header's duration is checked before reading, so a huge file is refused (or only its
    first max_duration seconds are read, with too_long: crop) without allocating it whole."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, channels, frames = f.samplerate, f.channels, f.frames
            meta = {"format": f.format, "subtype": f.subtype, "sample_rate": sr, "channels": channels}
            if not 1000 <= sr <= 768_000 or not 1 <= channels <= 64:
                raise RecordError("audio_undecodable", f"header declares {sr} Hz, {channels} channels")
            duration = frames / sr
            if duration > cfg.max_duration and cfg.too_long == "reject":
                raise RecordError("audio_too_long", f"{duration:.2f}s > max_duration={cfg.max_duration}")
            wanted = min(frames, int(cfg.max_duration * sr)) if frames > 0 else int(cfg.max_duration * sr)
            wave = f.read(frames=wanted, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as err:
        message = re.sub(r"^Error opening <[^>]*>: ", "", str(err).strip().splitlines()[0])[:200]
        if "Format not recognised" not in message:
            raise RecordError("audio_undecodable", message) from None
        return _decode_ffmpeg(data, cfg, message)
    if wave.shape[0] == 0:  # a header whose sizes were never written (a recorder stopped mid-stream,
        try:                # a WAV written to a pipe) says 0 frames: FFmpeg reads the samples to the end
            mono, rate, found = _decode_ffmpeg(data, cfg, "the header declares no samples")
        except RecordError as err:
            if err.reason != "audio_undecodable":
                raise
        else:
            if mono.shape[0]:
                return mono, rate, {**meta, "sample_rate": rate, "duration": found["duration"]}
    meta["duration"] = round(frames / sr if frames > 0 else wave.shape[0] / sr, 4)
    return wave.mean(axis=1, dtype=np.float64).astype(np.float32), sr, meta


def _decode_ffmpeg(data: bytes, cfg: AudioConfig, why: str) -> tuple[np.ndarray, int, dict[str, Any]]:
    """What libsndfile does not know (AAC in M4A/MP4, WMA, AC-3, AMR …) through FFmpeg (PyAV).
    A second longer than max_duration is read when too_long is reject, so the check sees it."""
    from mmprep.video import decode_sound

    extra = 1.0 if cfg.too_long == "reject" else 0.0
    try:
        mono, sr, meta = decode_sound(data, cfg.max_duration + extra)
    except RecordError as err:
        raise RecordError("audio_undecodable", f"{why} (libsndfile); FFmpeg: {err.detail}"[:200]) from None
    if meta["duration"] > cfg.max_duration and cfg.too_long == "reject":
        raise RecordError("audio_too_long", f"{meta['duration']:.2f}s > max_duration={cfg.max_duration}")
    return mono, sr, meta


def process_waveform(mono: np.ndarray, sr: int, meta: dict[str, Any], cfg: AudioConfig) -> AudioResult:
    """The checks and steps every decoded waveform goes through, whatever it came from (an
    audio file, a video's sound track): validate, cut to max_duration, resample, crop/pad,
    normalize, features. `meta` is the source's metadata; a "duration" is added when absent.

    A NaN anywhere in a frame's channels makes their mean NaN (and +inf with -inf too), so
    checking the mono mix finds what checking the channels would."""
    if "duration" not in meta:
        meta = {**meta, "duration": round(mono.shape[0] / sr, 4)}
    if mono.shape[0] == 0:
        raise RecordError("audio_too_short", "no samples")
    if not np.isfinite(mono).all():
        raise RecordError("audio_nonfinite", "samples contain NaN or infinity")
    limit = int(cfg.max_duration * sr)
    if mono.shape[0] > limit:  # an audio file was cut while reading (decode_audio); a track is cut here
        if cfg.too_long == "reject":
            raise RecordError("audio_too_long", f"{mono.shape[0] / sr:.2f}s > max_duration={cfg.max_duration}")
        mono = mono[:limit]
    if mono.shape[0] / sr < cfg.min_duration:
        raise RecordError("audio_too_short", f"{mono.shape[0] / sr:.3f}s < min_duration={cfg.min_duration}")
    # the level of what changes: a DC offset alone (a dead microphone's bias, unsigned silence
    # written as 0) is no sound, however far from zero it sits
    ac = mono.astype(np.float64) - mono.mean(dtype=np.float64)
    rms = float(np.sqrt(np.mean(np.square(ac))))
    level = 20 * np.log10(rms) if rms > 0 else -np.inf
    if level < cfg.silence_db:
        raise RecordError("audio_silent", f"RMS {level:.1f} dBFS (DC offset removed) < silence_db={cfg.silence_db}")
    wave = prepare_waveform(mono, sr, cfg)
    return AudioResult(features=waveform_features(wave, cfg), meta=meta)


def resample(mono: np.ndarray, sr: int, target: int) -> np.ndarray:
    """soxr's high-quality resampler, trimmed/padded to ceil(n·target/sr) samples: what
    `librosa.resample(res_type="soxr_hq")` returns (a test pins it), without importing librosa."""
    import soxr

    n = int(np.ceil(mono.shape[0] * float(target) / sr))
    out = soxr.resample(mono, sr, target, quality="soxr_hq")
    return np.pad(out, (0, n - out.shape[0])) if out.shape[0] < n else out[:n]


def prepare_waveform(mono: np.ndarray, sr: int, cfg: AudioConfig) -> np.ndarray:
    """Resample, crop/pad to clip_seconds, normalize loudness."""
    if sr != cfg.sample_rate:
        mono = resample(mono, sr, cfg.sample_rate).astype(np.float32)
        if not np.isfinite(mono).all():  # samples near float32's limit can overflow in the filter
            raise RecordError("audio_nonfinite", "samples overflow when resampled (values near the float limit)")
    if cfg.clip_seconds > 0:
        n = int(round(cfg.clip_seconds * cfg.sample_rate))
        if mono.shape[0] > n:
            start = 0 if cfg.crop == "start" else (mono.shape[0] - n) // 2
            mono = mono[start : start + n]
        elif mono.shape[0] < n:
            mono = np.pad(mono, (0, n - mono.shape[0]))
    if cfg.normalize == "peak":
        peak = float(np.max(np.abs(mono)))
        mono = mono * (0.99 / peak) if peak > 0 else mono
    elif cfg.normalize == "rms":
        rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
        if rms > 0:
            mono = mono * (10 ** (-20 / 20) / rms)
            mono = np.clip(mono, -1.0, 1.0)
    return mono.astype(np.float32)


@functools.lru_cache(maxsize=8)
def mel_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-style mel filterbank, float32 [n_mels, 1 + n_fft/2], 0 Hz to sr/2: the numbers of
    `librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)` (a test pins them)."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:  # linear below 1 kHz, logarithmic above
        mel = f / (200.0 / 3)
        above = f >= 1000.0
        mel[above] = 15.0 + np.log(f[above] / 1000.0) / (np.log(6.4) / 27.0)
        return mel

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        f = m * (200.0 / 3)
        above = m >= 15.0
        f[above] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m[above] - 15.0))
        return f

    fft_f = np.fft.rfftfreq(n_fft, 1.0 / sr)
    mel_f = mel_to_hz(np.linspace(*hz_to_mel(np.array([0.0, sr / 2.0])), n_mels + 2))
    ramps = np.subtract.outer(mel_f, fft_f)
    fdiff = np.diff(mel_f)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]  # in float64, stored as float32
    return weights


def waveform_features(wave: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """Log-mel (dB, top 80 dB) or MFCC, float16 [bins, frames].

    The numbers of librosa's `melspectrogram` (periodic Hann window, centred frames padded
    with zeros, power 2) → `power_to_db(ref=1, top_db=80)` → `mfcc(norm="ortho")`, which a
    test pins; written with numpy because importing librosa's feature modules costs ~2 s per
    worker process (scipy.signal, numba caches) and it rebuilt the filterbank for every clip."""
    n_fft, hop = cfg.n_fft, cfg.hop_length
    padded = np.pad(wave.astype(np.float32, copy=False), n_fft // 2)
    if padded.shape[0] < n_fft:
        padded = np.pad(padded, (0, n_fft - padded.shape[0]))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann, float64
    spectrum = np.fft.rfft(frames * window, axis=-1).astype(np.complex64)
    power = np.abs(spectrum).T ** 2  # [1 + n_fft/2, frames]
    mel = np.einsum("ft,mf->mt", power, mel_filters(cfg.sample_rate, n_fft, cfg.n_mels), optimize=True)
    logmel = 10.0 * np.log10(np.maximum(mel, np.float32(1e-10)))
    logmel = np.maximum(logmel, logmel.max() - np.float32(80.0))
    if cfg.feature == "logmel":
        feats = logmel
    else:
        import scipy.fft

        feats = scipy.fft.dct(logmel, axis=0, type=2, norm="ortho")[: cfg.n_mfcc]
    return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=-80.0).astype(np.float16)


def process_audio(data: bytes, cfg: AudioConfig) -> AudioResult:
    mono, sr, meta = decode_audio(data, cfg)
    return process_waveform(mono, sr, meta, cfg)
