"""Leak-free, stratified, deterministic split assignment.

Samples that share content — the same image/audio bytes, the same text up to case and
punctuation, or perceptual-hash neighbour images (or videos) — are grouped (union-find) and a group
lands in one split. A link so common that it would glue a large share of the corpus
together (a stock caption) is ignored and reported instead.
"""

from __future__ import annotations

import hashlib
from collections import Counter
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
    vphash: int | None = None  # a video's perceptual hash


@dataclass
class SplitResult:
    keys: list[str]  # sorted
    splits: list[str]  # the split of keys[i]
    groups: int
    ignored_links: list[dict] = field(default_factory=list)
    group_of: list[str] = field(default_factory=list)  # the group of keys[i]: its smallest key

    @property
    def split_of(self) -> dict[str, str]:
        return dict(zip(self.keys, self.splits, strict=True))


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


def _link_exact(links: dict[str, list[str | int | None]], cfg: PrepareConfig, uf: _UnionFind, ignored: list[dict]) -> None:
    """Samples sharing a content hash are linked, hashes visited in (modality, hash) order.
    Columnar (index lists sorted by hash), not a dict of lists: a few bytes per sample."""
    for modality in sorted(set(cfg.link_modalities) & set(links)):
        values = links[modality]
        order = sorted((i for i, v in enumerate(values) if v is not None), key=values.__getitem__)
        start = 0
        while start < len(order):
            digest = values[order[start]]
            end = start + 1
            while end < len(order) and values[order[end]] == digest:
                end += 1
            if end - start > 1:
                idx = sorted(order[start:end])
                if len(idx) > uf.cap:
                    ignored.append({"modality": modality, "hash": _hex(digest), "samples": len(idx), "why": "shared too widely"})
                elif sum(not uf.union(idx[0], j) for j in idx[1:]):
                    ignored.append({"modality": modality, "hash": _hex(digest), "samples": len(idx), "why": "would glue a too-large group"})
            start = end


def _link_phash(phashes: Sequence[int | None], cfg: PrepareConfig, uf: _UnionFind, ignored: list[dict], modality: str) -> None:
    """Multi-index hashing: with d+1 bands, two hashes within d bits agree on some band;
    the hashes sharing a band value (a bucket) are compared pairwise with numpy popcounts,
    all buckets of a band at once: step k compares each hash with the k-th next one in its
    bucket (sorted by band value, then by position). Images and videos each among their own."""
    if modality not in cfg.link_modalities:
        return
    d = cfg.phash_distance
    index = np.array([i for i, ph in enumerate(phashes) if ph is not None], dtype=np.int64)
    hashes = np.array([phashes[i] for i in index], dtype=np.uint64)
    bands = d + 1
    width = 64 // bands
    found = [np.empty((0, 3), dtype=np.int64)]  # (distance, sample, sample) with sample < sample
    for band in range(bands):
        shift = band * width
        bits = 64 - shift if band == bands - 1 else width
        values = (hashes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)
        order = np.argsort(values, kind="stable")
        starts = np.flatnonzero(np.r_[True, values[order][1:] != values[order][:-1]]) if len(order) else order
        lengths = np.diff(np.r_[starts, len(order)])
        for s in np.flatnonzero(lengths > 64 * uf.cap):  # a degenerate band value (e.g. blank images)
            ignored.append({"modality": f"{modality}_phash_band", "hash": f"{band}", "samples": int(lengths[s]), "why": "shared too widely"})
        usable = np.repeat(lengths <= 64 * uf.cap, lengths)
        # how many later members of its bucket each position has
        later = np.repeat(starts + lengths, lengths) - np.arange(len(order)) - 1
        active = np.flatnonzero(usable & (later > 0))
        k = 1
        while len(active):
            a, b = order[active], order[active + k]
            dist = np.bitwise_count(hashes[a] ^ hashes[b]).astype(np.int64)
            near = dist <= d
            if near.any():
                found.append(np.stack([dist[near], index[a[near]], index[b[near]]], axis=1))
            k += 1
            active = active[later[active] >= k]
    pairs = np.unique(np.concatenate(found), axis=0)  # sorted: closest pairs first
    refused = [(dist, i, j) for dist, i, j in pairs.tolist() if not uf.union(i, j)]
    if refused:
        ignored.append({"modality": f"{modality}_phash", "hash": "", "samples": len(refused), "why": "neighbour links refused: they would glue a too-large group"})


def _salted(salt: str, text: str) -> int:
    """The first 64 bits of sha256(salt|text): the same order as its hex digest, in 32 bytes."""
    return int.from_bytes(hashlib.sha256(f"{salt}|{text}".encode()).digest()[:8], "big")


def _hex(digest: str | int) -> str:
    return digest[:16] if isinstance(digest, str) else f"{digest:016x}"


def _targets(cfg: PrepareConfig) -> dict[str, float]:
    return {s: cfg.splits.get(s, 0.0) for s in SPLIT_ORDER if cfg.splits.get(s, 0.0) > 0}


def _assign_groups(groups: list[tuple[str, tuple[tuple[str, int], ...]]], cfg: PrepareConfig) -> list[str]:
    """Greedy stratified group assignment (as in stratified group k-fold); groups are
    (name, ((label, count), …)) and the result is the split of each, in input order.

    Groups are visited largest first, ties in salted-hash order (the "random" part);
    each goes to the split with the largest remaining deficit for the labels it holds,
    so every label's proportions and the overall sizes track the targets closely."""
    targets = _targets(cfg)
    totals: Counter = Counter()
    for _, labels in groups:
        for label, c in labels:
            totals[label] += c
    n = sum(totals.values())
    have = {s: Counter() for s in targets}
    size = dict.fromkeys(targets, 0)
    visit = sorted(range(len(groups)), key=lambda g: (-sum(c for _, c in groups[g][1]), _salted(cfg.split_salt, groups[g][0])))
    out = [""] * len(groups)
    for g in visit:
        labels = groups[g][1]
        count = sum(c for _, c in labels)

        def deficit(split: str, labels=labels, count: int = count) -> float:
            per_label = sum(c * (targets[split] * totals[lab] - have[split][lab]) / totals[lab] for lab, c in labels)
            return per_label + count * (targets[split] * n - size[split]) / n

        best = max(targets, key=lambda s: (round(deficit(s), 9), -SPLIT_ORDER.index(s)))
        out[g] = best
        for label, c in labels:
            have[best][label] += c
        size[best] += count
    return out


def assign_splits(items: Sequence[LinkInfo], cfg: PrepareConfig) -> SplitResult:
    items = sorted(items, key=lambda it: it.key)
    links = {m: [dict(it.links).get(m) for it in items] for m in ("image", "audio", "text", "video")}
    phashes = {"image": [it.phash for it in items], "video": [it.vphash for it in items]}
    return split_columns([it.key for it in items], [it.label for it in items], links, phashes, cfg)


def split_columns(
    keys: list[str],
    labels: list[str | None],
    links: dict[str, list[str | int | None]],  # a content hash (hex, or its first 64 bits as an int)
    phashes: dict[str, list[int | None]],  # modality (image, video) → perceptual hashes
    cfg: PrepareConfig,
) -> SplitResult:
    """The split of every sample, from columns aligned with `keys` (sorted, unique)."""
    n = len(keys)
    uf = _UnionFind(n, _cap(n, cfg))
    ignored: list[dict] = []
    _link_exact(links, cfg, uf, ignored)
    for modality, column in sorted(phashes.items()):
        _link_phash(column, cfg, uf, ignored, modality)
    roots = [uf.find(i) for i in range(n)]
    by_root = sorted(range(n), key=roots.__getitem__)
    groups: list[tuple[str, tuple[tuple[str, int], ...]]] = []
    group_of_root = [0] * n
    start = 0
    while start < n:  # a group is named by its smallest key (the root)
        root, end = roots[by_root[start]], start + 1
        while end < n and roots[by_root[end]] == root:
            end += 1
        counts = Counter(labels[i] or "" for i in by_root[start:end])
        group_of_root[root] = len(groups)
        groups.append((keys[root], tuple(sorted(counts.items()))))
        start = end
    del by_root
    group_split = _assign_groups(groups, cfg)
    return SplitResult(keys=keys, splits=[group_split[group_of_root[r]] for r in roots], groups=len(groups), ignored_links=ignored,
                       group_of=[keys[r] for r in roots])
