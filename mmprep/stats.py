"""Exact, order-independent normalization statistics (mean/std per channel or bin).

Sums are kept as Python integers in fixed point, so merging partial results in any order
or tree shape — 1 Beam worker or 20 — gives bit-identical numbers in dataset.json.
Image pixels are uint8 (already integers); float16 features are exact multiples of 2**-24.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F16_SCALE = 2**24  # every finite float16 is an integer multiple of 2**-24


@dataclass
class Moments:
    count: int
    sums: list[int]
    squares: list[int]
    scale: int = 1  # values were multiplied by this before summing

    @classmethod
    def empty(cls, dims: int, scale: int = 1) -> Moments:
        return cls(0, [0] * dims, [0] * dims, scale)

    def _start(self, scale: int, n: int) -> None:
        if self.count == 0 and not any(self.sums):
            self.scale = scale
        elif self.scale != scale:
            raise ValueError("cannot mix image and feature moments")
        self.count += n

    def add_image(self, rgb: np.ndarray) -> None:
        """uint8 HxWx3 → per-channel moments (reported on the [0, 1] scale): from each
        channel's 256-bin histogram, exact and cheap."""
        pixels = rgb.reshape(-1, rgb.shape[-1])
        self._start(1, int(pixels.shape[0]))
        levels = np.arange(256, dtype=np.int64)
        for i in range(pixels.shape[1]):
            hist = np.bincount(pixels[:, i], minlength=256).astype(np.int64)
            self.sums[i] += int(hist @ levels)
            self.squares[i] += int(hist @ (levels * levels))

    def add_features(self, feats: np.ndarray) -> None:
        """float16 [bins, frames] → per-bin moments over frames.

        Values times 2**24 are exact integers x (|x| < 2**41). A square can pass int64, so x is
        split as hi·2**20 + lo (0 ≤ lo < 2**20) and x² = hi²·2**40 + hi·lo·2**21 + lo²: each part
        is below 2**42, so its int64 sum over up to 2**21 frames is exact; the parts are
        recombined as Python ints per bin (a Python int per value cost ~0.5 ms per mel)."""
        columns = (feats.astype(np.float64) * F16_SCALE).astype(np.int64)  # exact: float16 → float64 → *2**24
        if columns.shape[1] > 1 << 21:
            raise ValueError("too many frames for exact int64 moments")
        self._start(F16_SCALE, int(columns.shape[1]))
        hi, lo = columns >> 20, columns & ((1 << 20) - 1)
        sums = columns.sum(axis=1).tolist()
        hh, hl, ll = (hi * hi).sum(axis=1).tolist(), (hi * lo).sum(axis=1).tolist(), (lo * lo).sum(axis=1).tolist()
        for i in range(columns.shape[0]):
            self.sums[i] += sums[i]
            self.squares[i] += (hh[i] << 40) + (hl[i] << 21) + ll[i]

    @classmethod
    def from_parts(cls, count: int, parts: np.ndarray, scale: int) -> Moments:
        """From `image_parts`/`feature_parts`-style int64 rows [sums, hh, hl, ll] (Python ints)."""
        sums, hh, hl, ll = ([int(v) for v in row] for row in parts)
        return cls(count, sums, [(a << 40) + (b << 21) + c for a, b, c in zip(hh, hl, ll, strict=True)], scale)

    @staticmethod
    def merge(a: Moments, b: Moments) -> Moments:
        if a.count == 0:
            return Moments(b.count, list(b.sums), list(b.squares), b.scale)
        if b.count == 0:
            return Moments(a.count, list(a.sums), list(a.squares), a.scale)
        if a.scale != b.scale:
            raise ValueError("cannot merge moments of different kinds")
        sums = [x + y for x, y in zip(a.sums, b.sums, strict=True)]
        squares = [x + y for x, y in zip(a.squares, b.squares, strict=True)]
        return Moments(a.count + b.count, sums, squares, a.scale)

    def mean_std(self, unit: float = 1.0) -> tuple[list[float], list[float]]:
        """Mean and std per dim, values divided by `unit` (255 for pixels), 6 significant digits."""
        if self.count == 0:
            return [0.0] * len(self.sums), [1.0] * len(self.sums)
        means, stds = [], []
        n = self.count
        for s, q in zip(self.sums, self.squares, strict=True):
            var_num = q * n - s * s  # exact integer: n²·scale²·variance
            mean = s / (n * self.scale * unit)
            std = math.sqrt(max(var_num, 0)) / (n * self.scale * unit)
            means.append(float(f"{mean:.6g}"))
            stds.append(max(float(f"{std:.6g}"), 1e-6))
        return means, stds


def image_parts(rgb: np.ndarray) -> np.ndarray:
    """A uint8 HxWxC image's per-channel sums as int64 rows [sums, 0, 0, squares] (the layout
    of `feature_parts`; a channel of ≤ 2**30 pixels cannot overflow).

    OpenCV sums whole channels (values and their squares: 255² fits uint16) in about a third
    of the time of numpy's per-channel histograms; its float64 totals are exact while below
    2**53, i.e. for channels of fewer than 2**37 pixels. Otherwise (or more than 4 channels):
    the histograms."""
    channels = rgb.shape[-1]
    zeros = np.zeros(channels, np.int64)
    if rgb.ndim == 3 and channels <= 4 and rgb.dtype == np.uint8 and rgb.shape[0] * rgb.shape[1] < 1 << 37:
        import cv2

        rgb = np.ascontiguousarray(rgb)  # OpenCV takes only contiguous rows
        wide = rgb.astype(np.uint16)
        sums = np.array(cv2.sumElems(rgb)[:channels]).astype(np.int64)
        squares = np.array(cv2.sumElems(cv2.multiply(wide, wide))[:channels]).astype(np.int64)
        return np.stack([sums, zeros, zeros, squares])
    pixels = rgb.reshape(-1, channels)
    levels = np.arange(256, dtype=np.int64)
    hist = np.stack([np.bincount(pixels[:, i], minlength=256) for i in range(channels)]).astype(np.int64)
    return np.stack([hist @ levels, zeros, zeros, hist @ (levels * levels)])


def feature_parts(feats: np.ndarray) -> np.ndarray:
    """float16 [bins, frames] → int64 rows [sums, hh, hl, ll] per bin of the values times 2**24
    (exact integers x = hi·2**20 + lo; x² = hh·2**40 + hl·2**21 + ll, see add_features)."""
    columns = (feats.astype(np.float64) * F16_SCALE).astype(np.int64)
    if columns.shape[1] > 1 << 21:
        raise ValueError("too many frames for exact int64 moments")
    hi, lo = columns >> 20, columns & ((1 << 20) - 1)
    return np.stack([columns.sum(axis=1), (hi * hi).sum(axis=1), (hi * lo).sum(axis=1), (lo * lo).sum(axis=1)])


class MomentSum:
    """Exact running totals of many samples' parts: int64 sums over chunks whose size cannot
    overflow (checked from the values), Python integers across chunks."""

    CHUNK = 256

    def __init__(self, dims: int, scale: int) -> None:
        self.count, self.scale = 0, scale
        self.totals = np.zeros((4, dims), dtype=object)  # Python ints
        self.pending: list[np.ndarray] = []

    def add(self, count: int, parts: np.ndarray) -> None:
        self.count += count
        self.pending.append(parts)
        if len(self.pending) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        stack = np.stack(self.pending)
        self.pending = []
        if int(np.abs(stack).max()) < (1 << 62) // len(stack):
            self.totals += stack.sum(axis=0).astype(object)
        else:  # values near the int64 range: add as Python integers
            self.totals += stack.astype(object).sum(axis=0)

    def moments(self) -> Moments:
        self._flush()
        return Moments.from_parts(self.count, self.totals, self.scale)
