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

import numpy as np

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
    """Union-find whose components never grow past `cap` samples: a link that would glue
    more together is refused (and reported by the caller)."""

    def __init__(self, n: int, cap: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n
        self.cap = cap

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.size[ra] + self.size[rb] > self.cap:
            return False
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.size[lo] += self.size[hi]
        return True


def _cap(n: int, cfg: PrepareConfig) -> int:
    return max(2, int(cfg.max_link_share * n))


def _link_exact(items: Sequence[LinkInfo], cfg: PrepareConfig, uf: _UnionFind, ignored: list[dict]) -> None:
    members: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        for modality, digest in item.links:
            if modality in cfg.link_modalities:
                members[(modality, digest)].append(i)
    for (modality, digest), idx in sorted(members.items()):
        if len(idx) > uf.cap:
            ignored.append({"modality": modality, "hash": digest[:16], "samples": len(idx), "why": "shared too widely"})
            continue
        refused = sum(not uf.union(idx[0], j) for j in idx[1:])
        if refused:
            ignored.append({"modality": modality, "hash": digest[:16], "samples": len(idx), "why": "would glue a too-large group"})


def _link_phash(items: Sequence[LinkInfo], cfg: PrepareConfig, uf: _UnionFind, ignored: list[dict]) -> None:
    """Multi-index hashing: with d+1 bands, two hashes within d bits agree on some band;
    candidates in a band bucket are compared all-pairs with numpy popcounts."""
    if "image" not in cfg.link_modalities:
        return
    d = cfg.phash_distance
    index = np.array([i for i, it in enumerate(items) if it.phash is not None], dtype=np.int64)
    hashes = np.array([items[i].phash for i in index], dtype=np.uint64)
    bands = d + 1
    width = 64 // bands
    pairs: set[tuple[int, int, int]] = set()
    for band in range(bands):
        shift = band * width
        bits = 64 - shift if band == bands - 1 else width
        values = (hashes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)
        order = np.argsort(values, kind="stable")
        cuts = np.flatnonzero(np.diff(values[order])) + 1
        for bucket in np.split(order, cuts):
            if len(bucket) < 2:
                continue
            if len(bucket) > 64 * uf.cap:  # a degenerate band value (e.g. blank images)
                ignored.append({"modality": "image_phash_band", "hash": f"{band}", "samples": len(bucket), "why": "shared too widely"})
                continue
            h = hashes[bucket]
            dist = np.bitwise_count(h[:, None] ^ h[None, :])
            for a, b in zip(*np.nonzero(np.triu(dist <= d, 1)), strict=True):
                pairs.add((int(dist[a, b]), int(index[bucket[a]]), int(index[bucket[b]])))
    refused = [(dist, i, j) for dist, i, j in sorted(pairs) if not uf.union(i, j)]  # closest pairs first
    if refused:
        ignored.append({"modality": "image_phash", "hash": "", "samples": len(refused), "why": "neighbour links refused: they would glue a too-large group"})


def _salted(salt: str, text: str) -> str:
    return hashlib.sha256(f"{salt}|{text}".encode()).hexdigest()


def _targets(cfg: PrepareConfig) -> dict[str, float]:
    return {s: cfg.splits.get(s, 0.0) for s in SPLIT_ORDER if cfg.splits.get(s, 0.0) > 0}


def _assign_groups(groups: list[tuple[str, Counter]], cfg: PrepareConfig) -> dict[str, str]:
    """Greedy stratified group assignment (as in stratified group k-fold).

    Groups are visited largest first, ties in salted-hash order (the "random" part);
    each goes to the split with the largest remaining deficit for the labels it holds,
    so every label's proportions and the overall sizes track the targets closely."""
    targets = _targets(cfg)
    totals: Counter = Counter()
    for _, labels in groups:
        totals.update(labels)
    n = sum(totals.values())
    have = {s: Counter() for s in targets}
    size = dict.fromkeys(targets, 0)
    order = sorted(groups, key=lambda g: (-sum(g[1].values()), _salted(cfg.split_salt, g[0])))
    out: dict[str, str] = {}
    for gid, labels in order:
        count = sum(labels.values())

        def deficit(split: str, labels: Counter = labels, count: int = count) -> float:
            per_label = sum(c * (targets[split] * totals[lab] - have[split][lab]) / totals[lab] for lab, c in labels.items())
            return per_label + count * (targets[split] * n - size[split]) / n

        best = max(targets, key=lambda s: (round(deficit(s), 9), -SPLIT_ORDER.index(s)))
        out[gid] = best
        have[best].update(labels)
        size[best] += count
    return out


def assign_splits(items: Sequence[LinkInfo], cfg: PrepareConfig) -> SplitResult:
    items = sorted(items, key=lambda it: it.key)
    uf = _UnionFind(len(items), _cap(len(items), cfg))
    ignored: list[dict] = []
    _link_exact(items, cfg, uf, ignored)
    _link_phash(items, cfg, uf, ignored)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(len(items)):
        members[uf.find(i)].append(i)
    groups = [(items[root].key, Counter(items[i].label or "" for i in idx)) for root, idx in members.items()]
    group_split = _assign_groups(groups, cfg)  # a group is named by its smallest key (the root)
    split_of = {items[i].key: group_split[items[root].key] for root, idx in members.items() for i in idx}
    return SplitResult(split_of=split_of, groups=len(members), ignored_links=ignored)
