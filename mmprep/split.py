"""Leak-free, stratified, deterministic split assignment.

Samples that share content — the same image/audio bytes, the same text up to case and
punctuation, or perceptual-hash neighbour images — are grouped (union-find) and a group
lands in one split. A link so common that it would glue a large share of the corpus
together (a stock caption) is ignored and reported instead.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from mmprep.config import PrepareConfig

SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class LinkInfo:
    key: str
    label: str | None
    links: tuple[tuple[str, str], ...]  # (modality, content hash)
    phash: int | None = None


@dataclass
class SplitResult:
    split_of: dict[str, str]
    groups: int
    ignored_links: list[dict] = field(default_factory=list)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _cap(n: int, cfg: PrepareConfig) -> int:
    return max(2, int(cfg.max_link_share * n))


def _link_exact(items: Sequence[LinkInfo], cfg: PrepareConfig, uf: _UnionFind, ignored: list[dict]) -> None:
    members: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        for modality, digest in item.links:
            if modality in cfg.link_modalities:
                members[(modality, digest)].append(i)
    cap = _cap(len(items), cfg)
    for (modality, digest), idx in sorted(members.items()):
        if len(idx) > cap:
            ignored.append({"modality": modality, "hash": digest[:16], "samples": len(idx)})
            continue
        for j in idx[1:]:
            uf.union(idx[0], j)


def _link_phash(items: Sequence[LinkInfo], cfg: PrepareConfig, uf: _UnionFind, ignored: list[dict]) -> None:
    """Multi-index hashing: with d+1 bands, two hashes within d bits agree on some band."""
    if "image" not in cfg.link_modalities:
        return
    d = cfg.phash_distance
    bands = d + 1
    width = 64 // bands
    cap = _cap(len(items), cfg)
    hashed = [(i, it.phash) for i, it in enumerate(items) if it.phash is not None]
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        shift = band * width
        bits = 64 - shift if band == bands - 1 else width
        mask = (1 << bits) - 1
        buckets: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for i, h in hashed:
            buckets[(h >> shift) & mask].append((i, h))
        for value, bucket in sorted(buckets.items()):
            if len(bucket) > cap:
                ignored.append({"modality": "image_phash_band", "hash": f"{band}:{value:x}", "samples": len(bucket)})
                continue
            for x in range(len(bucket)):
                for y in range(x + 1, len(bucket)):
                    (i, hi), (j, hj) = bucket[x], bucket[y]
                    if (hi ^ hj).bit_count() <= d:
                        pairs.add((i, j))
    for i, j in sorted(pairs):
        uf.union(i, j)


def _salted(salt: str, text: str) -> str:
    return hashlib.sha256(f"{salt}|{text}".encode()).hexdigest()


def _targets(cfg: PrepareConfig) -> list[tuple[str, float]]:
    return [(s, cfg.splits.get(s, 0.0)) for s in SPLIT_ORDER if cfg.splits.get(s, 0.0) > 0]


def _assign_stratum(groups: list[tuple[str, int, str]], cfg: PrepareConfig) -> dict[str, str]:
    """groups: (salted hash, size, group id) → split per group.

    Walk groups in hash order; each goes to the split whose cumulative target share its
    midpoint falls in, so every label's proportions track the targets closely."""
    targets = _targets(cfg)
    total = sum(size for _, size, _ in groups)
    bounds, acc = [], 0.0
    for name, ratio in targets:
        acc += ratio
        bounds.append((name, acc))
    out, seen = {}, 0
    for _, size, gid in sorted(groups):
        mid = (seen + size / 2) / total
        out[gid] = next((name for name, bound in bounds if mid <= bound + 1e-12), bounds[-1][0])
        seen += size
    return out


def assign_splits(items: Sequence[LinkInfo], cfg: PrepareConfig) -> SplitResult:
    items = sorted(items, key=lambda it: it.key)
    uf = _UnionFind(len(items))
    ignored: list[dict] = []
    _link_exact(items, cfg, uf, ignored)
    _link_phash(items, cfg, uf, ignored)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(items)):
        members[uf.find(i)].append(i)
    strata: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    for root, idx in members.items():
        gid = items[root].key  # the root is the smallest index, i.e. the smallest key
        labels = Counter(items[i].label or "" for i in idx)
        label = min(labels, key=lambda lab: (-labels[lab], lab))
        strata[label].append((_salted(cfg.split_salt, gid), len(idx), gid))
    group_split: dict[str, str] = {}
    for label in sorted(strata):
        group_split.update(_assign_stratum(strata[label], cfg))
    split_of = {items[i].key: group_split[items[root].key] for root, idx in members.items() for i in idx}
    return SplitResult(split_of=split_of, groups=len(members), ignored_links=ignored)
