"""Leak-free, stratified, deterministic split assignment.

Samples that share content — the same image/audio bytes, the same text up to case and
punctuation, or perceptual-hash neighbour images (or videos) — are grouped (union-find) and a group
lands in one split. A link so common that it would glue a large share of the corpus
together (a stock caption) is ignored and reported instead.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
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
    more together is refused (and reported by the caller). Arrays of 8 bytes per sample; a
    component's root is its smallest member."""

    def __init__(self, n: int, cap: int) -> None:
        self.parent = array("q", range(n))
        self.size = array("q", bytes(8 * n))  # 0 stands for 1: one sample (a zeroed array is cheap)
        self.cap = cap

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.size[ra] + self.size[rb] + 2 > self.cap:
            return False
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.size[lo] += self.size[hi] + 1
        return True

    def roots(self) -> np.ndarray:
        """Every sample's root, by pointer jumping over the whole array at once."""
        roots = np.frombuffer(self.parent, dtype=np.int64).copy() if len(self.parent) else np.zeros(0, np.int64)
        while True:
            up = roots[roots]
            if np.array_equal(up, roots):
                return roots
            roots = up


MIN_GROUP_CAP = 8  # on a small corpus max_link_share alone would split a few copies of one image (100 rows: 2)


def _cap(n: int, cfg: PrepareConfig) -> int:
    """The largest group links may build: max_link_share of the samples, but never fewer than
    MIN_GROUP_CAP (nor more than all of them)."""
    return max(2, min(n, max(MIN_GROUP_CAP, int(cfg.max_link_share * n))))


# a column of link values: (values, valid mask, names) — values sort like the hashes they stand
# for; names[v] is how an ignored link is reported (None: the values are 64-bit hashes)
LinkColumn = tuple[np.ndarray, np.ndarray, "list[str] | None"]


def _link_exact(links: dict[str, LinkColumn], cfg: PrepareConfig, uf: _UnionFind, ignored: list[dict]) -> None:
    """Samples sharing a content hash are linked, hashes visited in (modality, hash) order.
    Columnar (positions sorted by hash): a few bytes per sample."""
    for modality in sorted(set(cfg.link_modalities) & set(links)):
        values, valid, names = links[modality]
        index = np.flatnonzero(valid)
        order = index[np.argsort(values[index], kind="stable")]
        ordered = values[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(order) else order
        lengths = np.diff(np.r_[starts, len(order)])
        for start in np.flatnonzero(lengths > 1).tolist():
            s = int(starts[start])
            idx = np.sort(order[s : s + int(lengths[start])]).tolist()
            digest = ordered[s].item()
            name = names[digest][:16] if names is not None else f"{digest:016x}"
            if len(idx) > uf.cap:
                ignored.append({"modality": modality, "hash": name, "samples": len(idx), "why": "shared too widely"})
            elif sum(not uf.union(idx[0], j) for j in idx[1:]):
                ignored.append({"modality": modality, "hash": name, "samples": len(idx), "why": "would glue a too-large group"})


_PACKED_BITS = 63  # a near pair (7 bits of distance, two sample numbers) packs into a non-negative int64


# the comparisons within buckets cost about as much as this many elements of a table's sort
# and bookkeeping (measured: 16k-400k random hashes, phash_distance 4-8)
_TABLE_COST = 32


def phash_tables(n: int, d: int) -> list[tuple[str, int]]:
    """The tables of multi-index hashing for n hashes within d bits, as (name, key mask): with
    m bands (64 // m bits each, the last one the rest), two hashes within d bits agree on at
    least m - d bands, so every (m - d)-subset of the bands is one table's key. m = d + 1 (one
    band per table, named by its number) keeps buckets of n / 2**(64 // m) hashes: the pairs
    compared grow as n². More bands make longer keys and smaller buckets in more tables; m is
    the one with the fewest elements sorted and compared, estimated for random hashes."""
    from itertools import combinations
    from math import comb

    def bands(m: int) -> list[int]:
        width = 64 // m
        return [((1 << (64 - b * width if b == m - 1 else width)) - 1) << (b * width) for b in range(m)]

    def cost(m: int) -> float:
        key_bits = (m - d) * (64 // m)
        return comb(m, d) * (_TABLE_COST * n + n * n / 2 ** min(key_bits, 64))

    m = d + 1
    while m < 64 and cost(m + 1) < cost(m):
        m += 1
    masks = bands(m)
    return [("+".join(map(str, c)), sum(masks[b] for b in c)) for c in combinations(range(m), m - d)]


def _link_phash(column: tuple[np.ndarray, np.ndarray], cfg: PrepareConfig, uf: _UnionFind, ignored: list[dict], modality: str) -> None:
    """Multi-index hashing: the hashes are cut into bands (`phash_tables`); two hashes within
    d bits agree on all bands of at least one table's key. The hashes sharing a key value (a
    bucket) are compared pairwise with numpy popcounts, all buckets of a table at once: step k
    compares each hash with the k-th next one in its bucket (sorted by key, then by position).
    Images and videos each among their own."""
    if modality not in cfg.link_modalities:
        return
    d = cfg.phash_distance
    values, valid = column
    index = np.flatnonzero(valid).astype(np.int64)
    hashes = np.asarray(values, dtype=np.uint64)[index]
    # (distance, sample, sample) with sample < sample, packed in one int64 (sorted like the
    # triple) where the sample numbers fit: a corpus's near pairs are ~2 per image here
    span = max(1, len(uf.parent).bit_length())
    packed = 2 * span + 7 <= _PACKED_BITS

    def pack(dist: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if packed:
            return (dist << (2 * span)) | (a << span) | b
        return np.stack([dist, a, b], axis=1)

    found = [np.empty((0,) if packed else (0, 3), dtype=np.int64)]
    for table, mask in phash_tables(len(hashes), d):
        values = hashes & np.uint64(mask)
        order = np.argsort(values, kind="stable")
        starts = np.flatnonzero(np.r_[True, values[order][1:] != values[order][:-1]]) if len(order) else order
        lengths = np.diff(np.r_[starts, len(order)])
        for s in np.flatnonzero(lengths > 64 * uf.cap):  # a degenerate band value (e.g. blank images)
            ignored.append({"modality": f"{modality}_phash_band", "hash": table, "samples": int(lengths[s]), "why": "shared too widely"})
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
                found.append(pack(dist[near], index[a[near]], index[b[near]]))
            k += 1
            active = active[later[active] >= k]
    pairs = np.unique(np.concatenate(found), axis=None if packed else 0)  # sorted: closest pairs first
    del found
    refused, samples = 0, set()  # refused pairs, and the samples they join
    mask = (1 << span) - 1
    for start in range(0, len(pairs), 4096):  # a few pairs as Python ints at a time
        chunk = pairs[start : start + 4096]
        firsts, seconds = ((chunk >> span) & mask, chunk & mask) if packed else (chunk[:, 1], chunk[:, 2])
        for i, j in zip(firsts.tolist(), seconds.tolist(), strict=True):
            if not uf.union(i, j):
                refused += 1
                samples.update((i, j))
    if refused:
        ignored.append({"modality": f"{modality}_phash", "hash": "", "samples": len(samples), "pairs": refused,
                        "why": "neighbour links refused: they would glue a too-large group"})


def _salted(salt: str, text: str) -> int:
    """The first 64 bits of sha256(salt|text): the same order as its hex digest, in 32 bytes."""
    return int.from_bytes(hashlib.sha256(f"{salt}|{text}".encode()).digest()[:8], "big")


def _targets(cfg: PrepareConfig) -> dict[str, float]:
    return {s: cfg.splits.get(s, 0.0) for s in SPLIT_ORDER if cfg.splits.get(s, 0.0) > 0}


def _assign_groups(key_of: Callable[[int], str], groups: _Groups, labels: np.ndarray, n_labels: int, cfg: PrepareConfig) -> np.ndarray:
    """Greedy stratified group assignment (as in stratified group k-fold): the split of each
    group (an index into `_targets`), groups named by their root's key, samples' labels as
    codes whose order is the labels' order.

    Groups are visited largest first, ties in salted-hash order (the "random" part);
    each goes to the split with the largest remaining deficit for the labels it holds,
    so every label's proportions and the overall sizes track the targets closely."""
    targets = _targets(cfg)
    names = list(targets)
    totals = np.bincount(labels, minlength=n_labels).tolist()
    n = len(labels)
    have = {s: [0] * n_labels for s in names}
    size = dict.fromkeys(names, 0)
    salted = np.fromiter((_salted(cfg.split_salt, key_of(r)) for r in groups.roots.tolist()), dtype=np.uint64, count=len(groups.roots))
    visit = np.lexsort((salted, -groups.sizes))
    del salted
    out = np.zeros(len(groups.roots), dtype=np.int8)
    for g in visit:
        count, first = int(groups.sizes[g]), int(groups.starts[g])
        if count == 1:
            held = ((int(labels[groups.members[first]]), 1),)
        else:
            held = tuple(sorted(Counter(labels[groups.members[first : first + count]].tolist()).items()))

        def deficit(split: str, held=held, count: int = count) -> float:
            per_label = sum(c * (targets[split] * totals[lab] - have[split][lab]) / totals[lab] for lab, c in held)
            return per_label + count * (targets[split] * n - size[split]) / n

        best = max(names, key=lambda s: (round(deficit(s), 9), -SPLIT_ORDER.index(s)))
        out[g] = names.index(best)
        for lab, c in held:
            have[best][lab] += c
        size[best] += count
    return out


@dataclass
class _Groups:
    """The groups in root order: members[starts[g] : starts[g] + sizes[g]] are group g's samples."""

    roots: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    members: np.ndarray


@dataclass
class Split:
    """The split of every sample as arrays aligned with the (sorted) keys: a few numpy arrays of
    8 bytes or less per sample, not a Python object per sample (README "Prepare at scale")."""

    codes: np.ndarray  # int8: sample i is in split names[codes[i]]
    names: tuple[str, ...]  # the splits with a share > 0, in SPLIT_ORDER
    roots: np.ndarray  # int64: sample i's group is named by the key of sample roots[i] (its smallest)
    groups: int
    ignored_links: list[dict] = field(default_factory=list)


def split_arrays(key_of: Callable[[int], str], labels: np.ndarray, n_labels: int, links: dict[str, LinkColumn],
                 phashes: dict[str, tuple[np.ndarray, np.ndarray]], cfg: PrepareConfig) -> Split:
    """The split of every sample, from columns aligned with the sorted, unique keys (`key_of(i)`
    is key i): labels as codes in label order (unlabeled: the code of ""), content links per
    modality, perceptual hashes (uint64 values, valid mask) per modality."""
    n = len(labels)
    uf = _UnionFind(n, _cap(n, cfg))
    ignored: list[dict] = []
    _link_exact(links, cfg, uf, ignored)
    for modality, column in sorted(phashes.items()):
        _link_phash(column, cfg, uf, ignored, modality)
    roots = uf.roots()
    del uf
    members = np.argsort(roots, kind="stable")
    ordered = roots[members]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if n else np.zeros(0, dtype=np.int64)
    groups = _Groups(roots=ordered[starts], starts=starts, sizes=np.diff(np.r_[starts, n]).astype(np.int64), members=members)
    del ordered
    split_of_group = _assign_groups(key_of, groups, labels, n_labels, cfg)
    group = np.empty(n, dtype=np.int64)
    group[members] = np.repeat(np.arange(len(starts), dtype=np.int64), groups.sizes)
    return Split(codes=split_of_group[group], names=tuple(_targets(cfg)), roots=roots, groups=len(starts), ignored_links=ignored)


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
    """`split_arrays` for Python lists aligned with `keys` (sorted, unique)."""
    label_names = sorted({x or "" for x in labels})
    code = {name: i for i, name in enumerate(label_names)}
    columns: dict[str, LinkColumn] = {}
    for modality, values in links.items():
        text = [v if v is None or isinstance(v, str) else f"{v:016x}" for v in values]
        present = sorted({v for v in text if v is not None})  # values → their rank: the same order
        rank = {v: i for i, v in enumerate(present)}
        columns[modality] = (np.array([rank.get(v, -1) for v in text], dtype=np.int64), np.array([v is not None for v in text], dtype=bool), present)
    hashes = {m: (np.array([v or 0 for v in col], dtype=np.uint64), np.array([v is not None for v in col], dtype=bool)) for m, col in phashes.items()}
    split = split_arrays(keys.__getitem__, np.array([code[x or ""] for x in labels], dtype=np.int64), len(label_names), columns, hashes, cfg)
    return SplitResult(keys=keys, splits=[split.names[c] for c in split.codes.tolist()], groups=split.groups,
                       ignored_links=split.ignored_links, group_of=[keys[r] for r in split.roots.tolist()])
