"""A row with a video through process_row: its sound track as the row's audio, or not."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import soundfile as sf

from mmprep.audio import process_audio
from mmprep.clips import write_clip
from mmprep.config import PrepareConfig
from mmprep.process import process_row
from mmprep.records import RawRow, Reject

CFG = PrepareConfig()
FRAMES = [np.full((48, 64, 3), 30 * i, np.uint8) for i in range(8)]


def _clip(audio: np.ndarray | None) -> bytes:
    buf = io.BytesIO()
    write_clip(buf, FRAMES, 8, audio=audio, rate=16000)
    return buf.getvalue()


def _tone(amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)


def _row(**kw) -> RawRow:
    return RawRow(source="m.jsonl:1", order=0, id="v", video="v.mp4", label="x", **kw)


def test_the_sound_track_is_the_audio_of_a_row_without_its_own():
    s = process_row(_row(), {"video": _clip(_tone())}, CFG)
    assert s.video is not None and s.mel is not None
    assert s.meta["audio"]["source"] == "video" and s.meta["video"]["audio_track"] == {"used": True}
    assert s.mel.shape == process_audio(_wav(_tone()), CFG.audio).features.shape
    assert "audio" in s.hashes and "video" in s.hashes and s.hashes["audio"] != s.hashes["video"]


def _wav(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def test_a_row_with_its_own_audio_keeps_it_and_ignores_the_track():
    own = _wav(_tone(0.3))
    s = process_row(_row(audio="a.wav"), {"video": _clip(_tone()), "audio": own}, CFG)
    assert s.meta["audio"].get("source") != "video" and "audio_track" not in s.meta["video"]
    assert np.array_equal(s.mel, process_audio(own, CFG.audio).features)


def test_a_silent_or_missing_track_leaves_the_video_without_audio_and_says_why():
    silent = process_row(_row(), {"video": _clip(np.zeros(16000, np.float32))}, CFG)
    assert silent.mel is None and silent.video is not None
    assert silent.meta["video"]["audio_track"]["reason"] == "audio_silent"
    mute = process_row(_row(), {"video": _clip(None)}, CFG)
    assert mute.mel is None and mute.meta["video"]["audio_track"]["reason"] == "none"


def test_audio_track_ignore_takes_no_audio_from_the_clip():
    cfg = replace(CFG, video=replace(CFG.video, audio_track="ignore"))
    s = process_row(_row(), {"video": _clip(_tone())}, cfg)
    assert s.mel is None and "audio_track" not in s.meta["video"]


def test_a_bad_video_rejects_the_row_or_is_dropped():
    bad = process_row(_row(text="words"), {"video": b"not a video at all", "text": "words"}, CFG)
    assert isinstance(bad, Reject) and bad.reason == "video_undecodable"
    cfg = replace(CFG, on_bad_modality="drop")
    kept = process_row(_row(text="words"), {"video": b"not a video at all", "text": "words"}, cfg)
    assert kept.video is None and kept.text == "words" and kept.meta["dropped"] == {"video": "video_undecodable"}
