"""Audio: header-checked decoding (soundfile), validation, resampling, normalization, log-mel/MFCC."""

from __future__ import annotations

import io
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
    """Mono float32 at the file's own rate, and the original's metadata.

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
        raise RecordError("audio_undecodable", str(err).strip().splitlines()[0][:200]) from None
    meta["duration"] = round(frames / sr if frames > 0 else wave.shape[0] / sr, 4)
    if wave.shape[0] == 0:
        raise RecordError("audio_too_short", "no samples")
    if not np.isfinite(wave).all():
        raise RecordError("audio_nonfinite", "samples contain NaN or infinity")
    mono = wave.mean(axis=1, dtype=np.float64).astype(np.float32)
    if mono.shape[0] / sr < cfg.min_duration:
        raise RecordError("audio_too_short", f"{mono.shape[0] / sr:.3f}s < min_duration={cfg.min_duration}")
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    level = 20 * np.log10(rms) if rms > 0 else -np.inf
    if level < cfg.silence_db:
        raise RecordError("audio_silent", f"RMS {level:.1f} dBFS < silence_db={cfg.silence_db}")
    return mono, sr, meta


def prepare_waveform(mono: np.ndarray, sr: int, cfg: AudioConfig) -> np.ndarray:
    """Resample, crop/pad to clip_seconds, normalize loudness."""
    import librosa

    if sr != cfg.sample_rate:
        mono = librosa.resample(mono, orig_sr=sr, target_sr=cfg.sample_rate, res_type="soxr_hq")
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


def waveform_features(wave: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """Log-mel (dB, top 80 dB) or MFCC, float16 [bins, frames]."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=wave, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels, center=True
    )
    logmel = librosa.power_to_db(mel, ref=1.0, top_db=80.0)
    feats = logmel if cfg.feature == "logmel" else librosa.feature.mfcc(S=logmel, n_mfcc=cfg.n_mfcc)
    return np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=-80.0).astype(np.float16)


def process_audio(data: bytes, cfg: AudioConfig) -> AudioResult:
    mono, sr, meta = decode_audio(data, cfg)
    wave = prepare_waveform(mono, sr, cfg)
    return AudioResult(features=waveform_features(wave, cfg), meta=meta)
