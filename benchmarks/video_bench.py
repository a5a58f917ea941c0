"""What a video costs to prepare, seeking against one sequential decode (run by hand; the numbers
in mmprep/video.py's docstring come from here).

    python benchmarks/video_bench.py [--work DIR] [--repeat 3]

Writes H.264 clips (x264 preset veryfast, ~3 Mbit/s at 720p: moving gradients, a moving
square, a little noise so the bitrate is a camera's rather than a cartoon's) of 2, 10 and 60 s
at 30 fps, 320x240 and 1280x720, with x264's default keyframe interval (250 frames) and, for
the minute-long ones, a keyframe every 2 s (phones, streaming encoders); then times
`process_video` (sound track off, prepare.video defaults otherwise) with cfg.seek on and off,
best of --repeat runs, and checks both give the same strip. "fps" is the clip's frames per
second of processing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from mmprep.clips import write_clip  # noqa: E402
from mmprep.config import VideoConfig  # noqa: E402
from mmprep.video import process_video  # noqa: E402

FPS = 30
CLIPS = [  # (width, height, seconds, keyframe interval in frames; None: x264's default 250)
    (320, 240, 2, None),
    (320, 240, 10, None),
    (320, 240, 60, None),
    (320, 240, 60, 2 * FPS),
    (1280, 720, 2, None),
    (1280, 720, 10, None),
    (1280, 720, 60, None),
    (1280, 720, 60, 2 * FPS),
]


def frames(n: int, height: int, width: int) -> Iterator[np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx % 256, yy % 256, ((xx + yy) // 4) % 256], -1).astype(np.uint8)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 4, (height, width, 1), dtype=np.uint8) for _ in range(7)]
    side = height // 4
    for i in range(n):
        frame = np.roll(base, (2 * i, 3 * i), (0, 1)) + noise[i % 7]
        x = (i * 7) % (width - side)
        frame[height // 3 : height // 3 + side, x : x + side] = 255
        yield frame


def timed(data: bytes, cfg: VideoConfig, repeat: int) -> tuple[float, bytes]:
    best, strip = float("inf"), b""
    for _ in range(repeat):
        start = time.perf_counter()
        strip = process_video(data, cfg, want_track=False).strip
        best = min(best, time.perf_counter() - start)
    return best, strip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="where the clips go (default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"{'clip':<22}{'keyframes':>10}{'MB':>7}{'sequential s':>14}{'fps':>8}{'seeking s':>11}{'fps':>8}{'speed-up':>10}")
        for width, height, seconds, gop in CLIPS:
            path = work / f"{width}x{height}-{seconds}s-g{gop or 250}.mp4"
            if not path.exists():
                options = {"preset": "veryfast"} | ({"g": str(gop)} if gop else {})
                write_clip(str(path), frames(seconds * FPS, height, width), FPS, options=options)
            data = path.read_bytes()
            repeat = args.repeat if seconds < 60 else max(1, args.repeat - 1)
            sequential, a = timed(data, VideoConfig(seek=False), repeat)
            seeking, b = timed(data, replace(VideoConfig(), seek=True), repeat)
            assert a == b, f"{path.name}: the strategies disagree"
            n = seconds * FPS
            keys = f"{gop // FPS} s" if gop else "250"
            print(f"{f'{width}x{height}, {seconds} s':<22}{keys:>10}{len(data) / 1e6:>7.1f}{sequential:>14.3f}{n / sequential:>8.0f}"
                  f"{seeking:>11.3f}{n / seeking:>8.0f}{sequential / seeking:>9.1f}x")


if __name__ == "__main__":
    main()
