"""Video through prepare: the demo corpus's video rows, near-duplicate clips, every input form,
hostile files — checked in the output as a user would (shards, tables, dataset.json)."""

from __future__ import annotations

import base64
import collections
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from mmprep.clips import write_clip
from mmprep.democorpus import VIDEO_DIRT, write_demo_corpus
from mmprep.image import decode_strip
from mmprep.shards import iter_shard
from pipelines.prepare import main as prepare_main
from tests.pipelines.test_prepare import CHECKER, PARAMS, digests


def _prepare(src: Path | str, out: Path, *extra: str) -> None:
    assert prepare_main(["--input", str(src), "--output", str(out), "--params", str(PARAMS), *extra]) == 0


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    found = {}
    for tar in sorted(out.glob("*.tar")):
        for key, members in iter_shard(str(tar)):
            found[key] = members
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video-corpus")
    write_demo_corpus(out, samples=160, seed=5, video=0.5)
    return out


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video-prepared")
    _prepare(corpus / "manifest.jsonl", out)
    return out


def test_contract_checker_finds_nothing_but_the_video_member(prepared, corpus):
    """The checker predates video: the `.video.jpg` member (documented, with the README's
    migration note) is the one thing it may object to; every other check must pass."""
    if not CHECKER.exists():
        pytest.skip(f"{CHECKER} not found (set MMPREP_CONTRACT_CHECKER to ../shared/tools/check_contract.py)")
    run = subprocess.run([sys.executable, str(CHECKER), str(prepared), "--input", str(corpus / "manifest.jsonl")],
                         capture_output=True, text=True)
    problems = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    video = [line for line in problems if re.search(r"unexpected member '[A-Za-z0-9_-]+\.video\.jpg'", line)]
    summary = [line for line in problems if line not in video]
    with_video = pq.read_table(prepared / "manifest.parquet")["has_video"].to_pylist().count(True)
    assert video and summary == [f"FAIL: {with_video} problems; {summary[0].split('; ', 1)[-1]}"], "\n".join(summary[:20])


def test_video_rows_become_frame_strips_with_their_sound_track_as_audio(prepared, corpus):
    ds = json.loads((prepared / "dataset.json").read_text())
    cfg = ds["params"]["prepare"]["video"]
    feature = ds["features"]["video"]
    assert feature["member"] == "video.jpg" and (feature["frames"], feature["size"]) == (cfg["frames"], cfg["size"])
    assert len(feature["mean"]) == 3 and all(0 < s < 1 for s in feature["std"])
    rows = {}
    for line in (corpus / "manifest.jsonl").read_bytes().splitlines():
        try:
            row = json.loads(line.decode("utf-8", "replace"))
        except ValueError:
            continue  # the corpus's malformed line
        rows[row["id"]] = row
    manifest = {r["id"]: r for r in pq.read_table(prepared / "manifest.parquet").to_pylist()}
    videos = [i for i, r in rows.items() if "video" in r and i in manifest]
    assert len(videos) >= 40
    samples = _samples(prepared)
    for sample_id in videos:
        m = manifest[sample_id]
        assert m["has_video"] and m["has_audio"] and m["has_text"] and not m["has_image"]
        members = samples[m["key"]]
        frames = decode_strip(members["video.jpg"], feature["frames"])
        assert frames.shape == (feature["frames"], feature["size"], feature["size"], 3)
        meta = json.loads(members["json"])
        times = meta["video"]["times"]
        assert len(times) == feature["frames"] and times == sorted(times) and times[-1] < meta["video"]["duration"]
        assert meta["video"]["audio_track"] == {"used": True} and meta["audio"]["source"] == "video"
        assert m["label"].split("-")[0] in ("left", "right")
    assert ds["counts"]["modalities"]["train"]["video"] == sum(1 for r in manifest.values() if r["has_video"] and r["split"] == "train")


def test_hostile_video_rows_are_rejects_with_their_reason(prepared, corpus):
    dirt = [d for d in json.loads((corpus / "dirt.json").read_text()) if d["kind"] in VIDEO_DIRT]
    assert {d["kind"] for d in dirt} == set(VIDEO_DIRT)
    rejects = {r["id"]: r for r in pq.read_table(prepared / "rejects.parquet").to_pylist()}
    for d in dirt:
        assert rejects[d["id"]]["reason"] == d["reason"], rejects.get(d["id"])
        assert rejects[d["id"]]["stage"] == "video"


def _moving(direction: int, seed: int, side: int = 96, n: int = 14) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (side, side, 3)).astype(np.uint8)
    base = cv2.GaussianBlur(base, (0, 0), 6)
    out = []
    for k in range(n):
        frame = base.copy()
        x = 20 + direction * 4 * k if direction > 0 else side - 20 - 4 * k
        cv2.circle(frame, (int(x), side // 2), 10, (250, 250, 250), -1)
        out.append(frame)
    return out


def _clip(frames: list[np.ndarray], **kw) -> bytes:
    buf = io.BytesIO()
    write_clip(buf, frames, 12, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Six clips: a, its re-encode at another bitrate and size (a near duplicate), four others."""
    root = tmp_path_factory.mktemp("clips")
    a = _moving(1, 0)
    (root / "a.mp4").write_bytes(_clip(a))
    smaller = [cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in a]
    (root / "a-copy.webm").write_bytes(_clip(smaller, container="webm", codec="libvpx"))
    for i in range(4):
        (root / f"other{i}.mp4").write_bytes(_clip(_moving(-1 if i % 2 else 1, 10 + i)))
    return root


def test_a_reencoded_resized_copy_of_a_clip_shares_its_split_group(clips, tmp_path):
    lines = [json.dumps({"id": p.stem, "video": p.name, "text": f"clip {p.stem}", "label": "x"}) for p in sorted(clips.iterdir())]
    (clips / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    _prepare(clips / "manifest.jsonl", out)
    groups = {r["id"]: r["group"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert groups["a"] == groups["a-copy"]
    assert len({groups[f"other{i}"] for i in range(4)} | {groups["a"]}) == 5


def test_directory_layout_and_webdataset_inputs_read_video_files(clips, tmp_path):
    folder = tmp_path / "folder"
    for label, names in (("right", ("a.mp4", "other0.mp4")), ("left", ("other1.mp4", "a-copy.webm"))):
        (folder / label).mkdir(parents=True)
        for name in names:
            (folder / label / name).write_bytes((clips / name).read_bytes())
    (folder / "right" / "a.txt").write_text("a clip with a caption")
    out = tmp_path / "out-folder"
    _prepare(folder, out)
    manifest = {r["id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert set(manifest) == {"right/a", "right/other0", "left/other1", "left/a-copy"}
    assert all(r["has_video"] for r in manifest.values()) and manifest["right/a"]["has_text"]
    assert manifest["left/a-copy"]["label"] == "left"

    tar_path = tmp_path / "clips.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, name in (("k1", "a.mp4"), ("k2", "other2.mp4")):
            for field, data in (("mp4", (clips / name).read_bytes()), ("cls", b"moving")):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out-tar"
    _prepare(tar_path, out)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["id"] for r in manifest) == ["k1", "k2"] and all(r["has_video"] for r in manifest)

    import pyarrow as pa  # Parquet as Hugging Face writes a Video column: {bytes, path} structs

    table = pa.table({"video": [{"bytes": (clips / "a.mp4").read_bytes(), "path": "a.mp4"}, {"bytes": None, "path": str(clips / "other3.mp4")}],
                      "label": ["right", "left"]})
    hf = tmp_path / "hf"
    hf.mkdir()
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": {"video": {"_type": "Video"}}}})}),
                   hf / "train.parquet")
    out = tmp_path / "out-hf"
    _prepare(hf / "train.parquet", out)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(r["id"] for r in manifest) == ["train.parquet:1", "train.parquet:2"] and all(r["has_video"] for r in manifest)


def test_hostile_files_named_as_video_are_rejects_not_crashes(clips, tmp_path):
    good = (clips / "a.mp4").read_bytes()
    png = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))[1].tobytes()
    files = {"half.mp4": good[: len(good) // 2], "png.mp4": png, "empty.mkv": b"", "noise.webm": os.urandom(5000)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    lines = [json.dumps({"id": n, "video": n, "label": "x"}) for n in files]
    good_clips = sorted(p for p in clips.iterdir() if p.suffix != ".jsonl")  # enough kept rows to stay under max_reject_ratio
    lines += [json.dumps({"id": p.name, "video": str(p), "label": "x"}) for p in good_clips]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    _prepare(tmp_path / "manifest.jsonl", out, "--no-cache")
    rejects = {r["id"]: r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert rejects == {"half.mp4": "video_undecodable", "png.mp4": "video_undecodable", "empty.mkv": "empty_file",
                       "noise.webm": "video_undecodable"}
    assert sorted(r["id"] for r in pq.read_table(out / "manifest.parquet").to_pylist()) == [p.name for p in good_clips]


def test_video_output_is_the_same_bytes_with_two_workers_and_from_the_cache(prepared, corpus, tmp_path):
    two = tmp_path / "two"
    _prepare(corpus / "manifest.jsonl", two, "--workers", "2")
    assert digests(two) == digests(prepared)
    again = tmp_path / "again"  # every row from the cache the fixture's run filled
    _prepare(corpus / "manifest.jsonl", again)
    assert digests(again) == digests(prepared)


def test_the_report_shows_each_clips_frames_left_to_right(prepared, tmp_path):
    from mmprep.report import build_report

    page = tmp_path / "report.html"
    build_report(str(prepared), str(page))
    html = page.read_text()
    shown = re.findall(r'<img src="data:image/jpeg;base64,([^"]+)" alt="video frames of [^"]+" height="48">', html)
    assert shown
    frames = json.loads((prepared / "dataset.json").read_text())["features"]["video"]
    strip = cv2.imdecode(np.frombuffer(base64.b64decode(shown[0]), np.uint8), cv2.IMREAD_COLOR)
    assert strip.shape[:2] == (frames["size"], frames["size"] * frames["frames"])


def test_the_report_shows_the_clips_durations_rates_and_codecs(prepared, tmp_path):
    from mmprep.report import build_report

    page = tmp_path / "report.html"
    build_report(str(prepared), str(page))
    html = page.read_text()
    assert "original video duration" in html and "original video frame rate" in html
    clips = collections.Counter()
    for members in _samples(prepared).values():
        video = json.loads(members["json"]).get("video")
        if video:
            clips[f"{video['format']} / {video['codec']}"] += 1
    assert len(clips) >= 2  # the demo writes mp4/MPEG-4 Part 2 and webm/VP8
    for name, count in clips.items():
        assert re.search(rf"<td>{re.escape(name)}</td><td[^>]*>{count:,}</td>", html), name
