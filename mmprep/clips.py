"""Write small video clips from RGB arrays (PyAV): the fixtures of the video tests, the demo
corpus and the video benchmark.

Bytes are reproducible: the muxer and the encoders run with FFmpeg's `bitexact` flags (no
library version strings or creation times in the file) and one encoder thread (x264's and
libvpx's output depends on their thread count), so the same inputs give the same file on the
same FFmpeg build — a test pins it for mp4, webm (VP8, VP9), mkv, mov and avi with MPEG-4 Part 2,
VP8/VP9 or MJPEG.
Not libx264: once a process has encoded some clips, it can write different bytes for the same
frames and sound (the video packets differ from the first or 7th frame on; the first ~170 clips
of the video demo were identical across processes, later ones not; CI once saw two consecutive
encodes of one 10-frame mkv clip differ), while MPEG-4 Part 2, VP8 and VP9 stay identical.
Cause not found: x264 runs with one thread and no sync lookahead; x264's own thread options,
converting to YUV before the encoder, flush-to-zero floating point and glibc's MALLOC_PERTURB_
did not change it, and valgrind finds no uninitialised read in the encoder. The demo corpus
therefore writes MPEG-4 Part 2 into its mp4s.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from fractions import Fraction
from typing import IO

import av
import numpy as np
from av.codec.context import Flags

_AUDIO_CODEC = {"webm": "libopus", "matroska": "libopus", "mkv": "libopus", "avi": "pcm_s16le"}  # else AAC
_FORMAT = {"mkv": "matroska"}
_TIME_BASE = Fraction(1, 1000)  # explicit pts (variable frame rate) are written in milliseconds


def write_clip(
    path_or_file: str | IO[bytes],
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    container: str = "mp4",
    codec: str = "libx264",
    audio: np.ndarray | None = None,
    rate: int = 16000,
    pix_fmt: str = "yuv420p",
    rotation: int = 0,
    times: list[float] | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """Encode `frames` (RGB uint8 HxWx3, all the first one's size; any iterable, so a long
    clip need not be held in memory) at `fps`.

    `audio`: float samples in [-1, 1], [n] or [n, channels], added as a second stream at `rate`
    (Opus in webm/mkv, PCM in avi, else AAC). `rotation`: the clockwise turn a player
    applies on display (what a phone records: 90 for a portrait clip held upright), written as
    the stream's display matrix. `times`: explicit presentation times in seconds, one per frame
    (a variable-frame-rate clip); otherwise frame i is at i / fps. `options`: encoder options
    (e.g. {"preset": "veryfast", "g": "60"} for x264's speed and keyframe interval)."""
    frames = iter(frames)
    head = next(frames)
    fmt = _FORMAT.get(container, container)
    with av.open(path_or_file, mode="w", format=fmt, container_options={"fflags": "+bitexact"}) as out:
        rate_q = Fraction(fps).limit_denominator(1001)
        video = out.add_stream(codec, rate=rate_q)
        video.height, video.width = head.shape[:2]
        video.codec_context.options = dict(options or {})
        video.pix_fmt = pix_fmt
        video.thread_count = 1
        video.codec_context.flags |= Flags.bitexact
        if times is not None:
            video.codec_context.time_base = _TIME_BASE
        if rotation:
            video.set_display_rotation(-rotation)  # PyAV's angle is counter-clockwise
        sound = None
        if audio is not None:
            sound = out.add_stream(_AUDIO_CODEC.get(container, "aac"), rate=rate)
            channels = 1 if audio.ndim == 1 else audio.shape[1]
            sound.layout = "mono" if channels == 1 else "stereo"
            sound.codec_context.flags |= Flags.bitexact
        for i, rgb in enumerate(itertools.chain([head], frames)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] / _TIME_BASE), _TIME_BASE
            else:
                frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if sound is not None and audio is not None:
            _write_audio(out, sound, audio, rate)


def _write_audio(out: av.container.OutputContainer, sound: av.AudioStream, audio: np.ndarray, rate: int) -> None:
    """Packed 16-bit samples in 1024-sample frames (the AAC frame size; other encoders resample
    through PyAV's frame buffering)."""
    pcm = np.clip(np.round(np.asarray(audio, np.float64) * 32767), -32768, 32767).astype(np.int16)
    pcm = pcm.reshape(pcm.shape[0], -1)
    layout = "mono" if pcm.shape[1] == 1 else "stereo"
    resampler = av.AudioResampler(format=sound.format.name, layout=layout, rate=rate, frame_size=sound.frame_size or 1024)
    for start in range(0, pcm.shape[0], 1024):
        chunk = pcm[start : start + 1024]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk.reshape(1, -1)), format="s16", layout=layout)
        frame.sample_rate, frame.pts = rate, start
        for converted in resampler.resample(frame):
            out.mux(sound.encode(converted))
    for converted in resampler.resample(None):
        out.mux(sound.encode(converted))
    out.mux(sound.encode())
