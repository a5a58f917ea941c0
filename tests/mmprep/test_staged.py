"""The staged-row format: what the cache stores between processing a row and writing it."""

import cv2
import numpy as np
import pytest

from mmprep import staged
from mmprep.config import PrepareConfig
from mmprep.process import process_row
from mmprep.records import RawRow, Reject


def png() -> bytes:
    img = np.full((40, 40, 3), 90, np.uint8)
    cv2.circle(img, (20, 20), 10, (255, 255, 255), -1)
    return cv2.imencode(".png", img)[1].tobytes()


def wav() -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(np.arange(12000) / 5), 16000, format="WAV")
    return buf.getvalue()


def _sample():
    """A sample with every modality: the statistics of image and audio travel together."""
    row = RawRow(source="m.jsonl:3", order=2, id="x/1", text="A caption, in words.", label="Cat", image="x.png", audio="x.wav")
    return process_row(row, {"image": png(), "audio": wav(), "text": "A caption, in words."}, PrepareConfig())


def test_a_sample_survives_the_round_trip_with_its_current_position():
    s = _sample()
    summ = staged.summary(s, 32)
    data = staged.encode(s, "n1", summ)
    back = staged.decode(data, s.id, "other.jsonl:9", 8)
    assert (back.key, back.label, back.jpg, back.text, back.hashes, back.phash) == (s.key, s.label, s.jpg, s.text, s.hashes, s.phash)
    assert back.source == "other.jsonl:9" and back.order == 8 and back.meta["source"] == "other.jsonl:9"
    want = staged.sample_stats(s)
    assert sorted(back.stats) == sorted(want) == ["audio", "image"] and all(
        back.stats[m][:2] == want[m][:2] and np.array_equal(back.stats[m][2], want[m][2]) for m in want
    )
    light = staged.peek(data, "n1", s.id, "m.jsonl:3", 2, 32)
    assert light == (s.key, s.id, 2, "m.jsonl:3", s.label, summ["signature"], tuple(map(tuple, summ["links"])), s.phash, s.text, summ["size"],
                     None)
    assert staged.peek(data, "another-name", s.id, "m", 2, 32) is None  # another entry's bytes: a miss
    assert staged.peek(data, "n1", s.id, "m", 2, 64) is None  # size bound made for another max_tokens


def test_a_reject_round_trips():
    rej = Reject("x", "m.jsonl:1", 0, "image", "image_undecodable", "bad bytes")
    data = staged.encode(rej, "n2")
    assert staged.decode(data, "x", "m.jsonl:5", 4) == Reject("x", "m.jsonl:5", 4, "image", "image_undecodable", "bad bytes")


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_damaged_bytes_are_refused(damage):
    data = bytearray(staged.encode(_sample(), "n3", staged.summary(_sample(), 32)))
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 3] ^= 1
    else:
        data = bytearray(np.random.default_rng(0).bytes(500))
    with pytest.raises(ValueError):
        staged.decode(bytes(data), "x", "s", 0)


def test_a_video_sample_keeps_its_frames_hash_and_statistics_through_the_round_trip():
    import io

    from mmprep.clips import write_clip

    frames = [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(6)]
    buf = io.BytesIO()
    write_clip(buf, frames, 6)
    row = RawRow(source="m.jsonl:1", order=0, id="v", text="moving", video="v.mp4")
    s = process_row(row, {"video": buf.getvalue(), "text": "moving"}, PrepareConfig())
    assert s.video is not None and s.vphash is not None
    summ = staged.summary(s, 32)
    data = staged.encode(s, "n", summ)
    back = staged.decode(data, s.id, s.source, s.order)
    assert (back.video, back.vphash, back.meta["video"]) == (s.video, s.vphash, s.meta["video"])
    assert sorted(back.stats) == ["video"] and back.stats["video"][0] == 8 * PrepareConfig().video.size ** 2
    light = staged.peek(data, "n", s.id, s.source, s.order, 32)
    assert light[-1] == s.vphash and ["video", s.hashes["video"][:16]] in summ["links"]


def test_a_partial_entry_completed_by_the_worker_is_the_entry_made_in_one_go():
    """The row child sends an entry without statistics and summary; the worker completes it
    (`staged.complete`): the bytes must be those `encode` makes from the processed row at once
    (the cache, the shards and the plan see no difference)."""
    s = _sample()
    partial = staged.encode(s, "n", with_stats=False)
    assert len(partial) < len(staged.encode(s, "n", staged.summary(s, 32)))
    for max_tokens in (32, 64):
        done = staged.complete(partial, "n", s.id, s.source, s.order, max_tokens)
        assert done == staged.encode(s, "n", staged.summary(s, max_tokens))
    text_only = process_row(RawRow(source="m.jsonl:9", order=8, id="t", text="only words here"), {"text": "only words here"}, PrepareConfig())
    assert staged.complete(staged.encode(text_only, "t", with_stats=False), "t", "t", "m.jsonl:9", 8, 32) == staged.encode(
        text_only, "t", staged.summary(text_only, 32))
    rej = Reject("x", "m.jsonl:1", 0, "image", "image_undecodable", "bad bytes")
    assert staged.complete(staged.encode(rej, "r", with_stats=False), "r", "x", "m.jsonl:1", 0, 32) == staged.encode(rej, "r")


def test_the_context_follows_the_source_of_the_row_code(tmp_path):
    """A cache outlives code changes: rows made by other code must not be found (the version
    number stays 0.1.0 in an edited checkout)."""
    import shutil
    from pathlib import Path

    here = Path(staged.__file__).parent
    for copy in ("a", "b", "edited"):
        (tmp_path / copy).mkdir()
        for name in staged.ROW_CODE:
            shutil.copy(here / f"{name}.py", tmp_path / copy / f"{name}.py")
    with open(tmp_path / "edited" / "image.py", "a") as f:
        f.write("\nJPEG_QUALITY_FIX = 1\n")
    assert staged.code_digest(str(tmp_path / "a")) == staged.code_digest(str(tmp_path / "b")) == staged.code_digest(str(here))
    assert staged.code_digest(str(tmp_path / "edited")) != staged.code_digest(str(tmp_path / "a"))
    assert staged.context_digest(PrepareConfig()) == staged.context_digest(PrepareConfig())


def test_processing_and_staging_a_row_imports_only_the_row_code(tmp_path):
    """ROW_CODE names every mmprep module whose code decides an entry: a row of every modality,
    processed, encoded as the child does and completed as the worker does, imports no other."""
    import io
    import json
    import subprocess
    import sys

    from mmprep.clips import write_clip

    clip = io.BytesIO()
    write_clip(clip, [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(6)], 6)
    for name, data in (("x.png", png()), ("x.wav", wav()), ("v.mp4", clip.getvalue())):
        (tmp_path / name).write_bytes(data)
    script = f"""
import json, sys
from pathlib import Path
from mmprep import staged
from mmprep.config import PrepareConfig
from mmprep.process import process_row
from mmprep.records import RawRow
d = Path({str(tmp_path)!r})
for row, loaded in (
    (RawRow(source="m:1", order=0, id="a", text="Words here.", label="Cat", image="x.png", audio="x.wav"),
     {{"image": (d / "x.png").read_bytes(), "audio": (d / "x.wav").read_bytes(), "text": "Words here."}}),
    (RawRow(source="m:2", order=1, id="v", text="moving", video="v.mp4"), {{"video": (d / "v.mp4").read_bytes(), "text": "moving"}}),
):
    partial = staged.encode(process_row(row, loaded, PrepareConfig()), "n", with_stats=False)
    staged.finish(partial, "n", row.id, row.source, row.order, 32)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("mmprep."))))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    used = {m.removeprefix("mmprep.") for m in json.loads(out.splitlines()[-1])}
    assert {"image", "audio", "video", "text", "process"} <= used  # the row really went through every decoder
    assert used <= set(staged.ROW_CODE), f"modules deciding an entry but not in ROW_CODE: {sorted(used - set(staged.ROW_CODE))}"


@pytest.mark.parametrize(
    "fields",
    [
        {"image": "x.png"},  # image only: no text, no label
        {"audio": "x.wav", "label": "Dog"},  # audio only
        {"image": "x.png", "audio": "x.wav", "label": "词"},  # no text, a non-Latin label
        {"text": "Ünïcode — 中文 text", "audio": "x.wav"},  # no image
    ],
    ids=["image-only", "audio-only", "no-text", "no-image"],
)
def test_finish_on_rows_missing_modalities_gives_the_one_go_entry_and_its_light_record(fields):
    """Rows the demo never makes: the completed entry is the one `encode` makes at once, and the
    light record is what `peek` reads back from it (absent modalities stay absent)."""
    media = {"image": png(), "audio": wav()}
    row = RawRow(source="m.jsonl:4", order=3, id="r/4", **fields)
    loaded = {m: media[m] for m in ("image", "audio") if m in fields}
    if "text" in fields:
        loaded["text"] = fields["text"]
    s = process_row(row, loaded, PrepareConfig())
    assert not isinstance(s, Reject), s
    done, light = staged.finish(staged.encode(s, "n", with_stats=False), "n", s.id, s.source, s.order, 32)
    assert done == staged.encode(s, "n", staged.summary(s, 32))
    assert light == staged.peek(done, "n", s.id, s.source, s.order, 32)
    back = staged.decode(done, s.id, s.source, s.order)
    assert sorted(back.stats) == sorted(m for m, v in (("image", s.jpg), ("audio", s.mel)) if v is not None)
    assert (back.text is None) == ("text" not in fields) and light[8] == back.text
