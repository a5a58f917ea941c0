"""Video: header-first bounds, bounded PyAV decoding, frames sampled by time, a JPEG strip, a
perceptual hash, and the sound track.

`process_video` takes a clip's bytes (any container and codec FFmpeg reads; the format is
probed from the content, never from a name) and samples `cfg.frames` frames at fixed times
t_i = start + (i + 0.5) · duration / frames: each is the last decoded frame whose
pts · time_base <= t_i (the first frame when none is), so a variable-frame-rate clip is
sampled by time, not by index. `start` is the first frame's time; the duration comes from
the stream header, else the container, else the decoded frames. Each sampled frame is turned
upright (the display matrix; the legacy `rotate` tag), converted to RGB from whatever pixel
format it has, resized/cropped exactly like an image (`image.resize_crop`) and stacked into
one baseline JPEG. Still images (FFmpeg's image2 / *_pipe demuxers) are not videos.

Bounds, before anything is allocated: the stream header's width×height against max_pixels,
its duration against max_duration and its declared frame count against max_frames. While
decoding: each frame's real size (FFmpeg's own `max_pixels` codec option also refuses a
larger picture buffer, even while the container is probed), frame times past max_duration,
and at most max_frames decoded frames per pass, so broken timestamps never decode forever.

Damaged files: undecodable packets are skipped and a container that breaks off ends the
stream; whatever decodes is used, and only zero decoded frames is a reject. When the frames
end before the last sample time by more than a frame (a truncated file, a header claiming
more than there is, a sound track longer than the picture), or no duration is declared, the
clip is sampled again over the span that did decode: the strip then shows the whole of what
exists rather than its last frame repeated.

Two strategies give the same frames (a test pins it; decoded frames come in presentation
order, so this holds for any file whose timestamps increase): seeking (`cfg.seek`: for a
sample time with a keyframe of the seek index between the decoder's position and it, seek to
that keyframe and decode forward; otherwise keep decoding forward) and one sequential decode.
Files without a seek index (MPEG-TS, raw streams) or a declared duration are decoded
sequentially either way. Measured with benchmarks/video_bench.py on a shared 2-core machine:
H.264 from x264 (veryfast, ~3 Mbit/s at 720p), 30 fps, x264's default keyframe interval (250
frames) or one keyframe every 2 s (phones, streaming encoders), one decoder thread, 8 frames,
seconds per clip (best of 2-3):

    clip               keyframes   sequential   seeking
    320x240,   2 s     250            0.039      0.028
    320x240,  10 s     250            0.064      0.060
    320x240,  60 s     250            0.284      0.077
    320x240,  60 s     2 s            0.284      0.058
    1280x720,  2 s     250            0.205      0.208
    1280x720, 10 s     250            0.714      0.729
    1280x720, 60 s     250            4.000      1.842
    1280x720, 60 s     2 s            4.103      0.899

Seeking costs nothing measurable where it cannot skip (short clips: it only seeks past a
keyframe more than _SEEK_GAIN ahead) and is 2-5x faster on a minute of video, the difference
between fitting prepare.row_timeout (10 s) or not for long HD clips, so it is the default.

The sound track (the first audio stream) is decoded to mono float32 (the mean of its
channels) at its own rate, at most max_duration seconds; `audio.process_waveform` validates
and featurizes it like an audio file. A track that cannot be used does not reject the video:
`track` is None and meta["audio"]["error"] says why, for the caller to decide.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from av.container import InputContainer
from av.stream import Disposition

from mmprep.config import VideoConfig
from mmprep.image import check_shape, encode_jpeg, phash, resize_crop
from mmprep.records import RecordError

av.logging.set_level(av.logging.PANIC)  # a damaged file makes FFmpeg log a line per packet

# What PyAV raises for a file it cannot read. Its MemoryError (FFmpeg's ENOMEM) is also a
# MemoryError and is re-raised first: the pipeline reports it as out_of_memory, not a bad file.
_AV_ERRORS = (av.error.FFmpegError, ValueError, OSError)
_SEEK_GAIN = 0.5  # seconds of frames a seek must skip: it costs a decoder flush and a keyframe
_MAX_BAD_PACKETS = 1000  # consecutive undecodable packets after which a stream counts as ended


@dataclass(frozen=True)
class VideoResult:
    strip: bytes  # baseline JPEG: frame i is rows [i*size, (i+1)*size), each size×size RGB
    times: list[float]  # seconds after the first frame of each sampled frame, 4 decimals
    phash: int  # 64-bit DCT hash of the sampled frames' mean (`_mean_frame`)
    track: np.ndarray | None  # the first audio stream, mono float32 (None: none, or not wanted)
    track_rate: int | None
    meta: dict[str, Any]


@dataclass(frozen=True)
class _Frame:
    time: float  # seconds (pts · time_base; for a frame without pts, the previous frame's end)
    duration: float
    frame: av.VideoFrame


@dataclass(frozen=True)
class _Sampled:
    """What one sampling pass found."""

    crops: list[np.ndarray]
    times: list[float]  # absolute times of the frames used
    first: _Frame
    last: _Frame | None  # the last frame of the stream, when it ended before the last sample time
    rotation: int
    mirrored: bool


def process_video(data: bytes, cfg: VideoConfig, want_track: bool = True) -> VideoResult:
    """Sampled frames as a JPEG strip, their times, a perceptual hash, the sound track (with
    want_track and prepare.video.audio_track: use) and metadata; a RecordError for bytes that
    are not a usable video."""
    with _open(data, cfg) as container:
        stream = _video_stream(container)
        declared = _check_header(container, stream, cfg)
        sampled = _sample(container, stream, cfg, declared)
        fps = float(stream.average_rate) if stream.average_rate else None
        meta: dict[str, Any] = {
            "format": container.format.name,
            "codec": stream.codec_context.name,
            "fps": round(fps, 4) if fps else None,
            "frames": stream.frames or None,
            "has_audio": bool(container.streams.audio),
        }
    duration, start, last = declared, sampled.first.time, sampled.last
    if duration is None or (last is not None and start + duration - (last.time + last.duration) > last.duration):
        decoded = sampled.last or sampled.first  # sample again over what decoded
        duration = max(decoded.time + decoded.duration - start, 0.0)
        with _open(data, cfg) as container:
            sampled = _sample(container, _video_stream(container), cfg, duration)
    first = sampled.first.frame
    width, height = (first.height, first.width) if sampled.rotation in (90, 270) else (first.width, first.height)
    meta.update(width=width, height=height, rotation=sampled.rotation, mirrored=sampled.mirrored, duration=round(duration, 4),
                pix_fmt=first.format.name)
    track, rate = None, None
    if want_track and cfg.audio_track == "use" and meta["has_audio"]:
        track, rate, meta["audio"] = _sound_track(data, cfg)
    return VideoResult(
        strip=encode_jpeg(np.concatenate(sampled.crops, axis=0), cfg.jpeg_quality),
        times=[round(t - sampled.first.time, 4) for t in sampled.times],
        phash=phash(_mean_frame(sampled.crops)),
        track=track,
        track_rate=rate,
        meta=meta,
    )


def _message(err: Exception) -> str:
    """FFmpeg's words without PyAV's wrapping: "[Errno 1094995529] Invalid data found when
    processing input: '<none>'" (errno and file name say nothing here) → "Invalid data found
    when processing input"; FFmpeg's last log line, when PyAV attaches one, follows."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = re.sub(r"^\[Errno -?\d+\] ", "", text).replace(": '<none>'", "")
    return text[:200]


@contextlib.contextmanager
def _open(data: bytes, cfg: VideoConfig) -> Iterator[InputContainer]:
    options = {"max_pixels": str(cfg.max_pixels), "threads": "1"}  # for the decoders that probing opens
    try:
        container = av.open(io.BytesIO(data), options=options, metadata_errors="ignore")
    except MemoryError:
        raise
    except _AV_ERRORS as err:
        size = _refused_size(err)
        if size and size[0] * size[1] > cfg.max_pixels:
            raise RecordError("video_too_large", f"a {size[0]}x{size[1]} frame exceeds max_pixels={cfg.max_pixels}") from None
        raise RecordError("video_undecodable", _message(err)) from None
    try:
        name = container.format.name
        if name == "image2" or name.endswith("_pipe"):
            raise RecordError("video_undecodable", f"a still image ({name}), not a video")
        yield container
    finally:
        container.close()


def _video_stream(container: InputContainer) -> av.VideoStream:
    """The first video stream that is not an attached picture (an MP3's or M4A's cover art)."""
    streams = [s for s in container.streams.video if not s.disposition & Disposition.attached_pic]
    if not streams:
        kinds = ", ".join(sorted({s.type for s in container.streams}))
        raise RecordError("video_no_frames", f"no video stream ({kinds} only)" if kinds else "no streams")
    if streams[0].codec_context is None:
        raise RecordError("video_undecodable", "no decoder for the video stream's codec")
    return streams[0]


def _check_header(container: InputContainer, stream: av.VideoStream, cfg: VideoConfig) -> float | None:
    """Refuse what the headers declare too large or too long; the declared duration (s)."""
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > cfg.max_pixels:
        raise RecordError("video_too_large", f"{width}x{height} exceeds max_pixels={cfg.max_pixels}")
    if width > 0 and height > 0:
        check_shape("video", width, height, cfg.min_side, cfg.max_aspect)
    duration = None
    if stream.duration and stream.duration > 0 and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration and container.duration > 0:
        duration = container.duration / av.time_base
    if duration is not None and duration > cfg.max_duration:
        raise RecordError("video_too_long", f"{duration:.2f}s > max_duration={cfg.max_duration}")
    if stream.frames > cfg.max_frames:
        raise RecordError("video_too_long", f"{stream.frames} frames > max_frames={cfg.max_frames}")
    return duration


def _decode(container: InputContainer, stream: av.stream.Stream, errors: list[str], max_pixels: int = 0) -> Iterator[Any]:
    """A stream's frames from the demuxer's position: an undecodable packet is skipped (its
    error noted), a container that breaks off ends the stream after the decoder is drained."""
    codec = stream.codec_context
    packets, bad = container.demux(stream), 0
    while True:
        try:
            packet = next(packets)
        except StopIteration:  # the demuxer's last packets were empty ones that drained the decoder
            return
        except MemoryError:
            raise
        except _AV_ERRORS as err:
            errors.append(_message(err))
            packet = None
        try:
            frames = codec.decode(packet)
        except MemoryError as err:
            if max_pixels and max_pixels < _SMALL_MAX_PIXELS and "picture accessories" in str(err):
                raise RecordError(
                    "video_too_large",
                    f"FFmpeg's {codec.name} decoder needs more than max_pixels={max_pixels} for the buffers of a "
                    f"{codec.width}x{codec.height} frame (its tables can exceed a small frame's size: raise max_pixels)",
                ) from None
            raise
        except _AV_ERRORS as err:
            width, height = _refused_size(err) or (codec.width, codec.height)
            if max_pixels and width * height > max_pixels:  # refused by the max_pixels option
                raise RecordError("video_too_large", f"a {width}x{height} frame exceeds max_pixels={max_pixels}") from None
            errors.append(_message(err))
            bad += 1
            if packet is None or bad > _MAX_BAD_PACKETS:
                return
            continue
        bad = 0
        yield from frames
        if packet is None:
            return


# MPEG-4 Part 2 and WMV decoders check their per-picture tables against max_pixels too, and
# report a refusal as ENOMEM ("Error allocating picture accessories"): a 64x48 frame needs
# max_pixels ≥ 53,760, 320x240 ≥ 125,440, 640x480 its own size. Under this bound such an ENOMEM
# is that refusal (a real allocation failure for frames this small would need a row memory
# limit of a few MB), not an out_of_memory.
_SMALL_MAX_PIXELS = 1_000_000

# FFmpeg's words when its max_pixels option refuses a picture. Codecs whose size only the
# bitstream tells (MPEG-4 Part 2, VP9, Motion JPEG ...) have no width/height in the codec
# context then: probing was refused too, so the size is known from this message only.
_REFUSED_RE = re.compile(r"Picture size (\d+)x(\d+) exceeds specified max pixel count|Failed to initialize decoder for (\d+)x(\d+)")


def _refused_size(err: Exception) -> tuple[int, int] | None:
    found = _REFUSED_RE.search(str(err))
    if found is None:
        return None
    width, height = (int(v) for v in (found.group(1, 2) if found.group(1) else found.group(3, 4)))
    return width, height


class _Frames:
    """The video stream's decoded frames with their times, from the start or from a seek;
    bounded by max_frames decoded per pass and by each frame's size."""

    def __init__(self, container: InputContainer, stream: av.VideoStream, cfg: VideoConfig) -> None:
        self.container, self.stream, self.cfg = container, stream, cfg
        stream.codec_context.thread_count = 1  # Beam parallelizes across rows; threads would only contend
        stream.codec_context.options = {"max_pixels": str(cfg.max_pixels)}
        rate = stream.average_rate or stream.guessed_rate
        self.frame_duration = 1.0 / float(rate) if rate else 0.0
        self.errors: list[str] = []
        self.decoded = 0
        self._next_time = 0.0
        self._it = self._timed()

    def __iter__(self) -> Iterator[_Frame]:
        return self

    def __next__(self) -> _Frame:
        return next(self._it)

    def seek(self, pts: int) -> bool:
        """Go to the keyframe at or before pts (stream time base); False when the demuxer can't."""
        try:
            self.container.seek(pts, stream=self.stream, backward=True)
        except MemoryError:
            raise
        except _AV_ERRORS:
            return False
        self._it = self._timed()
        return True

    def _timed(self) -> Iterator[_Frame]:
        for frame in _decode(self.container, self.stream, self.errors, self.cfg.max_pixels):
            self.decoded += 1
            if self.decoded > self.cfg.max_frames:
                raise RecordError("video_too_long", f"more than max_frames={self.cfg.max_frames} frames decoded")
            if frame.width * frame.height > self.cfg.max_pixels:
                raise RecordError("video_too_large", f"a {frame.width}x{frame.height} frame exceeds max_pixels={self.cfg.max_pixels}")
            time = frame.time if frame.time is not None else self._next_time
            duration = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else self.frame_duration
            self._next_time = time + duration
            yield _Frame(time, duration, frame)


def _keyframes(container: InputContainer, stream: av.VideoStream) -> list[int]:
    """Keyframe timestamps of the seek index, sorted; [] without one (MPEG-TS, raw streams: a
    seek there searches the file by timestamps and may land past a keyframe). Seeking to the
    start first makes the demuxers that read their index lazily (Matroska's cues) load it."""
    if not len(stream.index_entries):
        return []
    try:
        container.seek(stream.start_time or 0, stream=stream, backward=True)
    except MemoryError:
        raise
    except _AV_ERRORS:
        return []
    return sorted({entry.timestamp for entry in stream.index_entries if entry.is_keyframe})


def _sample(container: InputContainer, stream: av.VideoStream, cfg: VideoConfig, duration: float | None) -> _Sampled:
    """One pass: the frames at the sample times (all at the end of the stream when the
    duration is unknown), seeking when cfg.seek and the index make it worth it."""
    keys = _keyframes(container, stream) if cfg.seek and duration is not None else []
    frames = _Frames(container, stream, cfg)
    first = next(frames, None)
    if first is None:
        if frames.errors:
            unknown = "" if stream.codec_context.width else (
                f" (the frame size is unknown: FFmpeg also refuses to open a decoder for frames over max_pixels={cfg.max_pixels},"
                " which may be why)")  # MPEG-2, WMV, MS-MPEG-4: their refusal does not say the size
            raise RecordError("video_undecodable", f"no frame decodes: {frames.errors[0]}{unknown}")
        raise RecordError("video_no_frames", "the video stream holds no frames")
    check_shape("video", first.frame.width, first.frame.height, cfg.min_side, cfg.max_aspect)  # the real size (a header can say 0x0, or lie)
    rotation, mirrored = _rotation(first.frame, stream)
    # when each keyframe is shown: MP4's index holds decoding times, and x264's B-frames show a
    # keyframe two frames after it is decoded; the first frame tells the offset
    shift = max(first.frame.pts - keys[0], 0) if keys and first.frame.pts is not None else 0
    shown = [key + shift for key in keys]
    gain = _SEEK_GAIN / stream.time_base
    prev: _Frame | None = first  # the last frame at or before the current sample time
    ahead: _Frame | None = None  # the frame decoded after it
    last, ended = first, False

    def scan(t: float) -> None:
        nonlocal prev, ahead, last, ended
        for item in frames:
            last = item
            if item.time - first.time > cfg.max_duration:
                raise RecordError("video_too_long", f"a frame at {item.time - first.time:.2f}s > max_duration={cfg.max_duration}")
            if item.time > t:
                ahead = item
                return
            prev = item
        ended = True

    crops: list[np.ndarray] = []
    frames_used: list[av.VideoFrame] = []
    times: list[float] = []
    for i in range(cfg.frames):
        t = math.inf if duration is None else first.time + (i + 0.5) * duration / cfg.frames
        if ahead is not None and ahead.time <= t:
            prev, ahead = ahead, None
        if ahead is None and not ended:
            pos = bisect.bisect_right(shown, math.floor(t / stream.time_base))
            if pos > 0 and last.frame.pts is not None and shown[pos - 1] - last.frame.pts > gain:
                while pos > 0:  # a keyframe lies well between the decoder and t: go there
                    if not frames.seek(shown[pos - 1]):
                        shown = []  # the demuxer can't seek after all: decode on
                        scan(t)
                        break
                    prev, ahead, ended = None, None, False
                    scan(t)
                    if prev is not None or ahead is None:
                        break
                    pos -= 1  # landed past t (the keyframe's dts is before t, its pts after): one back
            else:
                scan(t)
        picked = prev or first
        same = bool(crops) and picked.frame is frames_used[-1]
        crops.append(crops[-1] if same else _crop(picked.frame, rotation, mirrored, cfg.size))
        frames_used.append(picked.frame)
        times.append(picked.time)
    return _Sampled(crops, times, first, last if ended else None, rotation, mirrored)


def _display_matrix(frame: av.VideoFrame) -> tuple[int, ...] | None:
    for side in frame.side_data:
        if getattr(side.type, "name", "") == "DISPLAYMATRIX":
            raw = bytes(side)
            if len(raw) == 36:
                return struct.unpack("=9i", raw)
    return None


def _rotation(frame: av.VideoFrame, stream: av.VideoStream) -> tuple[int, bool]:
    """(clockwise turn 0/90/180/270, mirrored) that show the frame as a player does: the frame
    is turned, then mirrored left-right when `mirrored`. From the display matrix, read as
    FFmpeg's own command line reads it (a negative determinant is a mirror: a mirror-only
    matrix is a flip, not a half turn); else the legacy `rotate` tag (clockwise, no mirror)."""
    matrix = _display_matrix(frame)
    if matrix is None:
        try:
            counter = -float(stream.metadata.get("rotate", 0))
        except ValueError:
            counter = 0
        return (-round(counter / 90) * 90) % 360, False
    counter = frame.rotation  # av_display_rotation_get: counter-clockwise degrees
    turn = (-round(counter / 90) * 90) % 360 if counter == counter else 0  # NaN: a degenerate matrix
    if turn == 90:
        return (90, True) if matrix[3] > 0 else (90, False)  # transpose / clockwise
    if turn == 270:
        return (270, True) if matrix[3] < 0 else (270, False)  # anti-transpose / counter-clockwise
    hflip, vflip = (matrix[0] < 0, matrix[4] < 0) if turn == 180 else (False, matrix[4] < 0)
    if hflip and vflip:
        return 180, False
    if vflip:
        return 180, True  # a vertical flip is a half turn and a mirror
    return 0, hflip


def _crop(frame: av.VideoFrame, rotation: int, mirrored: bool, size: int) -> np.ndarray:
    """A decoded frame of any pixel format → upright RGB → the size×size crop images get."""
    try:
        rgb = frame.to_ndarray(format="rgb24")
    except MemoryError:
        raise
    except _AV_ERRORS as err:
        raise RecordError("video_undecodable", f"{frame.format.name} frame: {_message(err)}") from None
    if rotation:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=-rotation // 90))  # np.rot90 turns counter-clockwise
    if mirrored:
        rgb = np.ascontiguousarray(rgb[:, ::-1])
    return resize_crop(rgb, size)


def _mean_frame(crops: list[np.ndarray]) -> np.ndarray:
    """The sampled frames averaged: what a clip shows over its length, in one picture to hash.
    Re-encodes and resizes of a clip land within ~2 bits of it, unrelated clips ≥ 14 bits
    apart. (A mosaic of the frames was tried first: a clip's frames are mostly alike, so its
    grid of near-copies of one picture hashed to the grid's own pattern, and unrelated clips
    came within 4 bits of each other.)"""
    return np.mean(np.stack(crops), axis=0).round().astype(np.uint8)


_SAMPLE_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0, "flt": 1.0, "dbl": 1.0}


def _mono(frame: av.AudioFrame) -> np.ndarray:
    """Any sample format, planar or packed → the mean of the channels, float32 in [-1, 1]."""
    samples = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:
        samples = samples.reshape(-1, channels).T
    kind = frame.format.name.rstrip("p")
    wave = samples.astype(np.float64)
    if kind == "u8":
        wave -= 128.0
    wave /= _SAMPLE_SCALE[kind]
    return wave.mean(axis=0).astype(np.float32)


def _sound_track(data: bytes, cfg: VideoConfig) -> tuple[np.ndarray | None, int | None, dict[str, Any]]:
    """The first audio stream as mono float32 at its own rate (at most max_duration seconds)
    and its metadata; (None, None, meta with an "error") when it can't be used."""
    with _open(data, cfg) as container:
        return _read_track(container, cfg.max_duration)


def _read_track(container: InputContainer, max_seconds: float) -> tuple[np.ndarray | None, int | None, dict[str, Any]]:
    stream = container.streams.audio[0]
    codec = stream.codec_context
    if codec is None:
        return None, None, {"codec": None, "error": "no decoder for the audio stream's codec"}
    rate, channels = codec.sample_rate, codec.channels
    info: dict[str, Any] = {"codec": codec.name, "sample_rate": rate, "channels": channels}
    if not 1000 <= rate <= 768_000 or not 1 <= channels <= 64:
        return None, None, {**info, "error": f"header declares {rate} Hz, {channels} channels"}
    limit, have = int(max_seconds * rate), 0
    chunks: list[np.ndarray] = []
    errors: list[str] = []
    for frame in _decode(container, stream, errors):
        if frame.sample_rate != rate or frame.layout.nb_channels != channels or frame.format.name.rstrip("p") not in _SAMPLE_SCALE:
            errors.append(f"the track changes to {frame.sample_rate} Hz, {frame.layout.nb_channels} channels, {frame.format.name}")
            break  # what came before it is kept
        chunks.append(_mono(frame)[: limit - have])
        have += chunks[-1].shape[0]
        if have >= limit:
            break
    if errors and not chunks:
        return None, None, {**info, "error": errors[0]}
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32), rate, info


def decode_sound(data: bytes, max_seconds: float) -> tuple[np.ndarray, int, dict[str, Any]]:
    """An audio file libsndfile does not read (AAC/M4A, WMA, AC-3, AMR, a clip's sound …),
    through FFmpeg: mono float32 at its own rate, at most `max_seconds` read, and the
    original's metadata (as `audio.decode_audio` gives it). Refusals are `audio_undecodable`."""
    try:
        with _open(data, VideoConfig()) as container:
            if not container.streams.audio:
                kinds = ", ".join(sorted({s.type for s in container.streams}))
                raise RecordError("audio_undecodable", f"no audio stream ({kinds} only)" if kinds else "no streams")
            mono, rate, info = _read_track(container, max_seconds)
            name, declared = container.format.name, container.duration
    except RecordError as err:
        if err.reason.startswith("video_"):  # what _open says of a file that is no media at all
            raise RecordError("audio_undecodable", err.detail.replace(", not a video", "")) from None
        raise
    if mono is None or rate is None:
        raise RecordError("audio_undecodable", info["error"])
    duration = declared / av.time_base if declared and declared > 0 else mono.shape[0] / rate
    meta = {"format": name, "subtype": info["codec"], "sample_rate": rate, "channels": info["channels"],
            "duration": round(duration, 4)}
    return mono, rate, meta
