"""The embedded demo corpus: synthetic, deterministic, and built so only fusion solves it.

label = f"{shape}-{pitch}-{colour}":
  shape  (circle/square/triangle) is seen only in the image (drawn in a random colour),
  pitch  (low/high) is heard only in the audio,
  colour (red/blue) is read only in the text (English or Chinese, varied phrasings).
No single modality determines the label (12 classes; one modality narrows it to 4 or 6).

`video` of the clean rows are video rows instead: a clip (mp4: MPEG-4 Part 2 + AAC, or webm:
VP8 + Opus) of a shape moving left
or right from a random start, whose sound track carries the pitch (the row names no audio of
its own), and the caption the colour: label = f"{direction}-{pitch}-{colour}" (8 more classes).
Every single frame shows the shape somewhere along its path, so only motion tells the direction.

`task="redundant"` writes a second corpus where every modality carries the whole label, each
with its own reliability (the image shows the right class in 80 % of rows, the audio in 70 %,
the caption in 65 %, otherwise another class), and `missing` of the clean rows lack one
modality: each modality alone is informative, and only fusion reaches beyond the best one.
label = one of 6 classes; image: shape × (filled | outline); audio: one of 6 pitch bands;
text: one of 6 colour words.

About `dirt_ratio` of the rows carry one defect each, of every kind the cleaner handles;
`dirt.json` lists them with the reject reason mmprep must give (null: the row is kept).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import soundfile as sf

SHAPES = ("circle", "square", "triangle")
PITCHES = ("low", "high")
COLOURS = ("red", "blue")
ZH_COLOURS = {"red": "红色", "blue": "蓝色", "green": "绿色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
# the redundant task: class k is shown by REDUNDANT[k] in each modality (with its own reliability)
REDUNDANT_CLASSES = ("class-a", "class-b", "class-c", "class-d", "class-e", "class-f")
REDUNDANT_IMAGES = tuple((s, fill) for s in SHAPES for fill in (True, False))
REDUNDANT_PITCHES = (200.0, 340.0, 580.0, 990.0, 1680.0, 2850.0)
REDUNDANT_COLOURS = tuple(ZH_COLOURS)
RELIABILITY = {"image": 0.8, "audio": 0.7, "text": 0.65}
EN_TEMPLATES = (
    "a {c} {n}, I think", "this {n} looks {c}.", "Mostly {c}, with some noise around the {n}", "I'd call that {n} {c}",
    "{C} {n}!", "the colour of the {n} is {c}", "definitely a {c} {n}; no doubt", "something {c} over there",
    "It is {c}.", "hmm... {c}, probably", "my guess for the {n}: {c}", "Honestly the {n} seems {c} to me",
)
EN_NOUNS = ("thing", "object", "item", "blob", "patch", "spot", "mark", "sticker", "toy", "card", "piece", "sign")
ZH_TEMPLATES = ("这个{n}是{c}的", "我看到一个{c}的{n}", "{n}的颜色是{c}", "好像是{c}。", "{c}的{n}，没错", "嗯……应该是{c}吧")
ZH_NOUNS = ("东西", "物体", "图案", "标记", "贴纸", "玩具", "卡片", "小块")
FILLERS = ("", "", "", "well, ", "ok so ", "note: ", "look — ", "quick one: ")
EN_SUFFIXES = ("", "", " near the window", " in this photo", " on the left", " today", " again", " as usual",
               " from far away", " at night", " in the corner", ", I guess", " and bright", " under the lamp")
ZH_SUFFIXES = ("", "", "，在窗边", "，今天", "，我觉得", "，看起来", "，在角落里", "，又一次", "，远远看去", "，很明显")
ZH_PREFIXES = ("", "", "嗯，", "你看，", "说实话，", "好吧，")

DIRECTIONS = ("left", "right")
VIDEO_FPS = 12
# kind -> expected reject reason, for video rows (every 20th video row has one, in turn)
VIDEO_DIRT: dict[str, str] = {"truncated_video": "video_undecodable", "audio_only_video": "video_no_frames"}

# kind -> expected reject reason (None: kept). Every kind appears in every corpus of >= 200 rows.
DIRT: dict[str, str | None] = {
    "truncated_image": "image_undecodable",
    "zero_byte_image": "empty_file",
    "non_image": "image_undecodable",
    "silent_audio": "audio_silent",
    "short_audio": "audio_too_short",
    "nan_audio": "audio_nonfinite",
    "empty_text": "text_empty",
    "whitespace_text": "text_empty",
    "invalid_utf8_text": "text_not_utf8",
    "exact_duplicate": "duplicate",
    "missing_file": "missing_file",
    "malformed_line": "malformed_row",
    "unknown_label": None,
    "near_duplicate_image": None,
    "unlabeled": None,
}


def _image(rng: np.random.Generator, shape: str, filled: bool = True) -> np.ndarray:
    """A noisy BGR canvas with the shape inside the central square, in a random colour."""
    h, w = (int(x) for x in rng.integers(56, 200, size=2))
    side = min(h, w)
    base = rng.uniform(30, 220, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    for _ in range(2):  # two random-direction colour gradients: varied low frequencies
        theta = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(theta) * xx / w + np.sin(theta) * yy / h)[..., None]
        img += ramp * rng.uniform(-35, 35, size=3)
    for _ in range(int(rng.integers(0, 3))):  # thin distractor lines
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(img, p1, p2, rng.uniform(0, 255, size=3).tolist(), 1, cv2.LINE_AA)
    img = np.clip(img + rng.normal(0, 6, (h, w, 3)), 0, 255)
    colour = rng.uniform(0, 255, size=3)
    while abs(colour.mean() - base.mean()) < 80:  # visible in grayscale too
        colour = rng.uniform(0, 255, size=3)
    cx = w / 2 + rng.uniform(-0.08, 0.08) * side
    cy = h / 2 + rng.uniform(-0.08, 0.08) * side
    r = rng.uniform(0.28, 0.40) * side
    angle = rng.uniform(0, 2 * np.pi)
    thickness = -1 if filled else max(2, round(side * 0.06))
    if shape == "circle":
        cv2.circle(img, (round(cx), round(cy)), round(r), colour.tolist(), thickness, cv2.LINE_AA)
    else:
        n = 4 if shape == "square" else 3
        pts = [(cx + r * np.cos(angle + 2 * np.pi * k / n), cy + r * np.sin(angle + 2 * np.pi * k / n)) for k in range(n)]
        poly = [np.round(pts).astype(np.int32)]
        if filled:
            cv2.fillPoly(img, poly, colour.tolist(), cv2.LINE_AA)
        else:
            cv2.polylines(img, poly, True, colour.tolist(), thickness, cv2.LINE_AA)
    return img.astype(np.uint8)


def _encode_image(rng: np.random.Generator, img: np.ndarray) -> tuple[bytes, str]:
    kind = rng.choice(["png", "jpg", "jpg", "gray", "rgba"], p=[0.3, 0.25, 0.3, 0.08, 0.07])
    if kind == "jpg":
        return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])[1].tobytes(), "jpg"
    if kind == "gray":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif kind == "rgba":
        img = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    return cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 6])[1].tobytes(), "png"


def _tone(rng: np.random.Generator, pitch: str | float, sr: int, seconds: float) -> np.ndarray:
    if isinstance(pitch, float):  # a band around this frequency (the redundant task)
        f0 = pitch * rng.uniform(0.92, 1.08)
    else:
        f0 = rng.uniform(180, 320) if pitch == "low" else rng.uniform(700, 1300)
    t = np.arange(int(sr * seconds)) / sr
    wave = sum(a * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) for k, a in ((1, 1.0), (2, 0.4), (3, 0.2)) if f0 * k < sr / 2)
    envelope = np.minimum(1.0, t / 0.03) * np.minimum(1.0, (t[-1] - t + 1e-3) / 0.05)
    wave = wave * envelope * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)) * rng.uniform(0.1, 0.6)
    return wave + rng.normal(0, rng.uniform(0.005, 0.03), t.size)


def _encode_audio(rng: np.random.Generator, wave: np.ndarray, sr: int) -> tuple[bytes, str]:
    if rng.random() < 0.2:
        wave = np.stack([wave, wave * rng.uniform(0.6, 1.0) + rng.normal(0, 0.005, wave.size)], axis=1)
    fmt, subtype, ext = [("WAV", "PCM_16", "wav"), ("WAV", "PCM_24", "wav"), ("WAV", "FLOAT", "wav"), ("FLAC", "PCM_16", "flac")][
        int(rng.choice(4, p=[0.35, 0.1, 0.1, 0.45]))
    ]
    return _sound_file(np.clip(wave, -1, 1).astype(np.float32), sr, fmt, subtype), ext


def _sound_file(wave: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    """libsndfile's bytes, reproducible: a float WAV's PEAK chunk carries the second it was
    written (version, timestamp, then a value and position per channel); it is set to 0."""
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    data = bytearray(buf.getvalue())
    at = data.find(b"PEAK", 12) if fmt == "WAV" else -1
    if at >= 0:
        data[at + 12 : at + 16] = bytes(4)
    return bytes(data)


def _caption(rng: np.random.Generator, colour: str) -> str:
    if rng.random() < 0.35:
        core = str(rng.choice(ZH_TEMPLATES)).format(c=ZH_COLOURS[colour], n=rng.choice(ZH_NOUNS))
        return str(rng.choice(ZH_PREFIXES)) + core + str(rng.choice(ZH_SUFFIXES))
    core = str(rng.choice(EN_TEMPLATES)).format(c=colour, C=colour.upper(), n=rng.choice(EN_NOUNS))
    text = str(rng.choice(FILLERS)) + core + str(rng.choice(EN_SUFFIXES))
    return text.upper() if rng.random() < 0.05 else text


def _sample_id(i: int) -> str:
    variants = {7: f"demo {i:06d}", 11: f"样本-{i:06d}", 13: f"demo.{i:06d}", 17: f"demo/{i:06d}"}
    return variants.get(i % 19, f"demo-{i:06d}")


class _Writer:
    """Writes media files under OUT/media and remembers manifest lines."""

    def __init__(self, out: Path, rng: np.random.Generator, task: str = "combined") -> None:
        self.out, self.rng, self.task = out, rng, task
        (out / "media").mkdir(parents=True, exist_ok=True)
        self.lines: list[bytes] = []

    def put(self, name: str, data: bytes) -> str:
        (self.out / "media" / name).write_bytes(data)
        return f"media/{name}"

    def _shown(self, label: str, modality: str) -> int:
        """The class a modality shows: the true one with its reliability, else another at random."""
        k = REDUNDANT_CLASSES.index(label)
        if self.rng.random() < RELIABILITY[modality]:
            return k
        return int((k + self.rng.integers(1, len(REDUNDANT_CLASSES))) % len(REDUNDANT_CLASSES))

    def sample(self, i: int, label: str) -> dict[str, Any]:
        if self.task == "redundant":
            shape, filled = REDUNDANT_IMAGES[self._shown(label, "image")]
            pitch: str | float = REDUNDANT_PITCHES[self._shown(label, "audio")]
            colour = REDUNDANT_COLOURS[self._shown(label, "text")]
        else:
            (shape, pitch, colour), filled = label.split("-"), True
        img, ext = _encode_image(self.rng, _image(self.rng, shape, filled))
        sr = int(self.rng.choice([16000, 22050, 44100, 48000], p=[0.5, 0.3, 0.1, 0.1]) if self.task == "redundant"
                 else self.rng.choice([8000, 16000, 22050, 44100, 48000], p=[0.3, 0.4, 0.2, 0.05, 0.05]))
        audio, aext = _encode_audio(self.rng, _tone(self.rng, pitch, sr, float(self.rng.uniform(0.6, 1.3))), sr)
        return {
            "id": _sample_id(i),
            "image": self.put(f"{i:06d}.{ext}", img),
            "audio": self.put(f"{i:06d}.{aext}", audio),
            "text": _caption(self.rng, colour),
            "label": label,
        }


def _clip_frames(rng: np.random.Generator, direction: str) -> list[np.ndarray]:
    """RGB frames of a random shape crossing ~45 % of a square canvas left or right, from a
    random start: the shape's place in any one frame says nothing about where it goes."""
    side = 2 * int(rng.integers(40, 65))  # even: 4:2:0 chroma
    n = int(rng.integers(12, 19))  # 1.0-1.5 s at VIDEO_FPS
    canvas = cv2.cvtColor(_image(rng, "square", True), cv2.COLOR_BGR2RGB)
    canvas = cv2.resize(canvas, (side, side), interpolation=cv2.INTER_AREA)
    colour = rng.uniform(0, 255, size=3)
    while abs(colour.mean() - canvas.mean()) < 70:
        colour = rng.uniform(0, 255, size=3)
    shape = str(rng.choice(SHAPES))
    r = rng.uniform(0.10, 0.16) * side
    travel = rng.uniform(0.40, 0.50) * side * (1 if direction == "right" else -1)
    x0 = rng.uniform(r, side - r - abs(travel)) + (abs(travel) if direction == "left" else 0)
    y = rng.uniform(r, side - r)
    frames = []
    for k in range(n):
        frame = canvas.copy()
        cx = x0 + travel * k / (n - 1)
        if shape == "circle":
            cv2.circle(frame, (round(cx), round(y)), round(r), colour.tolist(), -1, cv2.LINE_AA)
        else:
            m = 4 if shape == "square" else 3
            pts = [(cx + r * np.cos(2 * np.pi * j / m), y + r * np.sin(2 * np.pi * j / m)) for j in range(m)]
            cv2.fillPoly(frame, [np.round(pts).astype(np.int32)], colour.tolist(), cv2.LINE_AA)
        frames.append(np.clip(frame + rng.normal(0, 4, frame.shape), 0, 255).astype(np.uint8))
    return frames


def _video_row(w: _Writer, rng: np.random.Generator, i: int, row: dict[str, Any], kind: str | None) -> dict[str, Any]:
    """A clean row turned into a video row (see the module docstring); `kind` a VIDEO_DIRT key."""
    from mmprep.clips import write_clip

    _, pitch, colour = row["label"].split("-")
    direction = str(rng.choice(DIRECTIONS))
    frames = _clip_frames(rng, direction)
    seconds = len(frames) / VIDEO_FPS
    track = _tone(rng, pitch, 16000, seconds).astype(np.float32)
    # MPEG-4 Part 2, not H.264, in the mp4s: x264 wrote different bytes for the same frames once a
    # process had encoded a few hundred clips (mmprep/clips.py); H.264 decoding is tested elsewhere
    container, codec = ("webm", "libvpx") if rng.random() < 0.25 else ("mp4", "mpeg4")
    if kind == "truncated_video":  # an mp4 cut before its index (moov, written last): nothing decodes
        container, codec = "mp4", "mpeg4"
    buf = io.BytesIO()
    if kind == "audio_only_video":  # only a sound track, under a video's name
        sf.write(buf, track, 16000, format="WAV", subtype="PCM_16")
    else:
        write_clip(buf, frames, VIDEO_FPS, container=container, codec=codec, audio=track, rate=16000)
    data = buf.getvalue()
    if kind == "truncated_video":
        data = data[: len(data) // 3]
    for gone in ("image", "audio"):  # written for the row it replaces
        (w.out / row[gone]).unlink()
    video = {k: v for k, v in row.items() if k not in ("image", "audio")}
    video.update(video=w.put(f"{i:06d}.{container}", data), label=f"{direction}-{pitch}-{colour}")
    return video


def _line(row: dict[str, Any]) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8")


def _dirty(w: _Writer, kind: str, i: int, row: dict[str, Any], clean: list[dict[str, Any]]) -> bytes:
    """Apply one defect to a fresh sample row; returns the manifest line."""
    rng = w.rng
    if kind == "truncated_image":
        data = (w.out / row["image"]).read_bytes()
        (w.out / row["image"]).write_bytes(data[: int(len(data) * 0.6)])
    elif kind == "zero_byte_image":
        (w.out / row["image"]).write_bytes(b"")
    elif kind == "non_image":
        row["image"] = w.put(f"{i:06d}-page.jpg", b"<!DOCTYPE html><html><head><title>404</title></head><body>Not Found</body></html>")
    elif kind in ("silent_audio", "short_audio", "nan_audio"):
        seconds = 0.05 if kind == "short_audio" else 1.0
        wave = np.zeros(int(16000 * seconds), np.float32) if kind == "silent_audio" else _tone(rng, "low", 16000, seconds).astype(np.float32)
        if kind == "nan_audio":
            wave[rng.integers(0, wave.size, 5)] = np.nan
        row["audio"] = w.put(f"{i:06d}-{kind}.wav", _sound_file(wave, 16000))
    elif kind == "empty_text":
        row["text"] = ""
    elif kind == "whitespace_text":
        row["text"] = " \t\u3000 \n "
    elif kind == "invalid_utf8_text":
        row["text"] = "INVALID"
        return _line(row).replace(b"INVALID", b"caf\xe9 \xff\xfe broken")
    elif kind == "exact_duplicate":
        original = clean[int(rng.integers(0, len(clean)))]
        row.update({k: original[k] for k in ("image", "audio", "text", "label")})
    elif kind == "missing_file":
        row["image"] = f"media/{i:06d}-missing.png"
    elif kind == "malformed_line":
        return _line(row)[: int(rng.integers(10, 30))]
    elif kind == "unknown_label":
        row["label"] = "hexagon-mid-green"
    elif kind == "unlabeled":
        del row["label"]
    return _line(row)


def _near_duplicate(w: _Writer, i: int, original: dict[str, Any]) -> bytes:
    """A resized, re-encoded copy of another row's image with its own caption and audio."""
    img = cv2.imdecode(np.frombuffer((w.out / original["image"]).read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    scale = float(w.rng.uniform(0.6, 0.85))
    small = cv2.resize(img, (max(40, round(img.shape[1] * scale)), max(40, round(img.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    row = w.sample(i, original["label"])
    row["image"] = w.put(f"{i:06d}-near.jpg", cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes())
    return _line(row)


def _plan(samples: int, dirt_ratio: float, rng: np.random.Generator) -> list[str]:
    """Which dirt kind (or "clean") each row gets. The first 12 rows are clean, so exact and
    near duplicates always have an earlier original; every kind appears at least once."""
    head = min(12, samples)
    per_kind = max(1, round(samples * dirt_ratio / len(DIRT)))
    kinds = [k for k in DIRT for _ in range(per_kind)][: max(0, samples - head)]
    rest = ["clean"] * (samples - head - len(kinds)) + kinds
    return ["clean"] * head + [rest[j] for j in rng.permutation(len(rest))]


def write_demo_corpus(out: str | Path, samples: int = 2000, seed: int = 0, dirt_ratio: float = 0.05,
                      task: str = "combined", missing: float = 0.0, video: float = 0.0) -> dict[str, Any]:
    """Write OUT/manifest.jsonl, OUT/media/*, OUT/dirt.json; byte-identical per arguments.
    `missing`: share of clean rows that lack one modality (chosen at random); they are kept.
    `video`: share of the other clean rows (after the first 12) that become video rows (the
    combined task only); their draws come from a stream of their own, so the other rows are
    the same whatever `video` is."""
    out = Path(out)
    rng = np.random.Generator(np.random.PCG64(seed))
    vrng = np.random.Generator(np.random.PCG64([seed, 1]))
    videos = 0
    w = _Writer(out, rng, task)
    if task == "redundant":
        labels = list(REDUNDANT_CLASSES)
    else:
        labels = [f"{s}-{p}-{c}" for s in SHAPES for p in PITCHES for c in COLOURS]
    balanced = [labels[i % len(labels)] for i in range(samples)]
    rng.shuffle(balanced)
    clean: list[dict[str, Any]] = []
    dirt: list[dict[str, Any]] = []
    for i, kind in enumerate(_plan(samples, dirt_ratio, rng)):
        if kind == "near_duplicate_image":
            original = clean[int(rng.integers(0, len(clean)))]
            line = _near_duplicate(w, i, original)
            dirt.append({"id": _sample_id(i), "line": i + 1, "kind": kind, "reason": None, "group": original["id"]})
        else:
            row = w.sample(i, balanced[i])
            line = _line(row) if kind == "clean" else _dirty(w, kind, i, row, clean)
            if kind == "clean" and missing > 0 and i >= 12 and rng.random() < missing:
                gone = str(rng.choice(["image", "audio", "text"]))  # kept, but not a source of duplicates
                line = _line({k: v for k, v in row.items() if k != gone})
                dirt.append({"id": row["id"], "line": i + 1, "kind": f"lacks_{gone}", "reason": None})
            elif kind == "clean" and task == "combined" and i >= 12 and vrng.random() < video:
                bad = list(VIDEO_DIRT)[videos // 20 % len(VIDEO_DIRT)] if videos % 20 == 19 else None
                vrow = _video_row(w, vrng, i, row, bad)
                line = _line(vrow)
                videos += 1
                if bad:
                    dirt.append({"id": row["id"], "line": i + 1, "kind": bad, "reason": VIDEO_DIRT[bad]})
                else:
                    balanced[i] = vrow["label"]
            elif kind == "clean":
                clean.append(row)
            else:
                entry = {"id": row["id"], "line": i + 1, "kind": kind, "reason": DIRT[kind]}
                if kind == "unknown_label":
                    entry.update({"reason": None, "when_labels_fixed": "unknown_label"})
                dirt.append(entry)
        w.lines.append(line)
    (out / "manifest.jsonl").write_bytes(b"\n".join(w.lines) + b"\n")
    (out / "dirt.json").write_text(json.dumps(dirt, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return {"rows": len(w.lines), "labels": dict(Counter(balanced)), "dirt": dict(Counter(d["kind"] for d in dirt))}
