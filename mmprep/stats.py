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

    def _add(self, columns: np.ndarray, scale: int) -> None:
        """columns: int64 [dims, n] of value*scale (|value*scale| ≤ 2**41); sums exact.

        A square can pass int64, so each value is split as x = hi·2**20 + lo (0 ≤ lo < 2**20)
        and x² = hi²·2**40 + hi·lo·2**21 + lo²: each part is below 2**42, so its int64 sum over
        up to 2**21 values is exact; the parts are recombined as Python ints (vectorized — a
        Python int per value cost ~0.5 ms per mel)."""
        if self.count == 0 and not any(self.sums):
            self.scale = scale
        elif self.scale != scale:
            raise ValueError("cannot mix image and feature moments")
        if columns.shape[1] > 1 << 21 or (columns.size and int(np.abs(columns).max()) > 1 << 41):
            raise ValueError("too many or too large values for exact int64 moments")
        self.count += int(columns.shape[1])
        if scale == 1 and columns.size and int(columns.max()) < 1 << 16:  # pixels: squares fit int64
            sums, squares = columns.sum(axis=1), np.einsum("ij,ij->i", columns, columns)
            for i in range(columns.shape[0]):
                self.sums[i] += int(sums[i])
                self.squares[i] += int(squares[i])
            return
        hi, lo = columns >> 20, columns & ((1 << 20) - 1)
        sums = columns.sum(axis=1)
        hh, hl, ll = (hi * hi).sum(axis=1), (hi * lo).sum(axis=1), (lo * lo).sum(axis=1)
        for i in range(columns.shape[0]):
            self.sums[i] += int(sums[i])
            self.squares[i] += (int(hh[i]) << 40) + (int(hl[i]) << 21) + int(ll[i])

    def add_image(self, rgb: np.ndarray) -> None:
        """uint8 HxWx3 → per-channel moments (reported on the [0, 1] scale)."""
        self._add(rgb.reshape(-1, rgb.shape[-1]).T.astype(np.int64), 1)

    def add_features(self, feats: np.ndarray) -> None:
        """float16 [bins, frames] → per-bin moments over frames."""
        scaled = feats.astype(np.float64) * F16_SCALE  # exact: float16 → float64 → *2**24
        self._add(scaled.astype(np.int64), F16_SCALE)

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
