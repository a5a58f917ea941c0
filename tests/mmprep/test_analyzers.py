"""Full-pass analyzers: leak-free split, exact statistics, the tokenizer."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from mmprep.config import PrepareConfig, TextConfig
from mmprep.split import LinkInfo, assign_splits
from mmprep.stats import Moments
from mmprep.tokenizer import Tokenizer, train_tokenizer

CFG = PrepareConfig(max_link_share=0.2)


def item(key: str, label: str | None = "a", image: str | None = None, text: str | None = None, phash: int | None = None) -> LinkInfo:
    links = tuple((m, h) for m, h in (("image", image), ("text", text)) if h is not None)
    return LinkInfo(key=key, label=label, links=links, phash=phash)


def corpus(n: int, seed: int = 0) -> list[LinkInfo]:
    rng = random.Random(seed)
    return [item(f"k{i:05d}", label=rng.choice("abcd"), phash=rng.getrandbits(64)) for i in range(n)]


def test_shared_image_near_copy_and_chains_stay_in_one_split():
    items = corpus(200)
    base = 0x0F0F_F0F0_1234_5678
    items += [item(f"dup{i}", image="IMG", text=f"caption {i}") for i in range(4)]
    items += [item("near", phash=base ^ 0b101), item("orig", image="IMG", phash=base)]  # 2 bits apart
    items += [item("chain1", text="T"), item("chain2", text="T", image="IMG2"), item("chain3", image="IMG2")]
    split = assign_splits(items, CFG).split_of
    assert len({split[k] for k in ("dup0", "dup1", "dup2", "dup3", "near", "orig")}) == 1
    assert len({split[k] for k in ("chain1", "chain2", "chain3")}) == 1


def test_a_few_copies_share_a_split_on_a_small_corpus_at_the_default_link_share():
    items = corpus(100)  # 2 % of 100 samples is 2: without the floor a third copy would be "shared too widely"
    for seed in range(5):
        copies = [item(f"copy{i}", image="IMG") for i in range(6)] + [item(f"cap{i}", text="CAP") for i in range(8)]
        result = assign_splits(corpus(100, seed) + copies, PrepareConfig())
        assert len({result.split_of[c.key] for c in copies if c.key.startswith("copy")}) == 1
        assert len({result.split_of[c.key] for c in copies if c.key.startswith("cap")}) == 1 and not result.ignored_links
    many = [item(f"m{i}", text="a photo") for i in range(9)]  # past the floor: ignored and reported
    assert [link["samples"] for link in assign_splits(items + many, PrepareConfig()).ignored_links] == [9]


def test_a_stock_caption_is_ignored_and_reported():
    items = corpus(300)
    items = [item(it.key, it.label, text="a photo" if i % 3 == 0 else None, phash=it.phash) for i, it in enumerate(items)]
    result = assign_splits(items, PrepareConfig(max_link_share=0.02))
    assert any(link["modality"] == "text" and link["samples"] == 100 for link in result.ignored_links)
    stock = [result.split_of[it.key] for i, it in enumerate(items) if i % 3 == 0]
    assert len(set(stock)) == 3  # not one split swallowing them all


def test_label_proportions_within_three_points_with_groups():
    rng = random.Random(5)
    items = []
    for i in range(3000):
        group = f"g{rng.randrange(1200)}"  # random groups of 1-8 linked samples
        items.append(item(f"k{i:05d}", label=rng.choice(["a", "b", "c", "d", "e"]), image=group))
    split = assign_splits(items, PrepareConfig(max_link_share=0.01)).split_of
    for label in "abcde":
        keys = [it.key for it in items if it.label == label]
        for name, target in CFG.splits.items():
            share = sum(split[k] == name for k in keys) / len(keys)
            assert abs(share - target) <= 0.03, (label, name, share)
    groups: dict[str, set[str]] = {}
    for it in items:
        groups.setdefault(it.links[0][1], set()).add(split[it.key])
    assert all(len(s) == 1 for s in groups.values())


def test_split_is_deterministic_order_free_and_salted():
    items = corpus(500)
    a = assign_splits(items, CFG).split_of
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert assign_splits(shuffled, CFG).split_of == a
    salted = assign_splits(items, PrepareConfig(max_link_share=0.2, split_salt="other")).split_of
    assert salted != a


def test_unlabeled_items_and_zero_ratio_splits():
    items = [item(f"u{i}", label=None) for i in range(50)]
    split = assign_splits(items, PrepareConfig(splits={"train": 0.9, "test": 0.1})).split_of
    assert set(split.values()) == {"train", "test"}


def test_near_pairs_packed_or_not_give_the_same_split(monkeypatch):
    # clusters of near-identical perceptual hashes, some glued past the cap (refused links)
    rng = random.Random(3)
    items = []
    for c in range(60):
        base = rng.getrandbits(64)
        items += [item(f"c{c:02d}-{i}", label=rng.choice("ab"), phash=base ^ (1 << rng.randrange(64))) for i in range(rng.randrange(1, 15))]
    cfg = PrepareConfig(max_link_share=0.02)
    packed = assign_splits(items, cfg)
    monkeypatch.setattr("mmprep.split._PACKED_BITS", 0)  # as for a corpus too large to pack a pair in 63 bits
    unpacked = assign_splits(items, cfg)
    assert packed.split_of == unpacked.split_of and packed.group_of == unpacked.group_of
    assert packed.ignored_links == unpacked.ignored_links and packed.ignored_links  # some links were refused
    assert packed.groups < len(items) - 100  # near copies were grouped
    refused = next(link for link in packed.ignored_links if link["modality"] == "image_phash")
    assert 2 <= refused["samples"] <= min(len(items), 2 * refused["pairs"])  # samples, not pairs


@pytest.mark.parametrize("d", [0, 1, 4, 6, 8, 12])
def test_phash_tables_cover_every_pair_within_the_distance_at_every_corpus_size(d):
    from mmprep.split import phash_tables

    rng = random.Random(d)
    for n in (100, 16_000, 1_000_000, 50_000_000):
        tables = phash_tables(n, d)
        masks = [mask for _, mask in tables]
        assert len({name for name, _ in tables}) == len(tables)
        for _ in range(300):  # d bits apart, at random places: some key sees no difference
            diff = sum(1 << b for b in rng.sample(range(64), d))
            assert any(diff & mask == 0 for mask in masks), (n, d, hex(diff))
    assert len(phash_tables(1_000_000, 6)) > len(phash_tables(1_000, 6)) == 7  # longer keys for a large corpus only


def test_near_pairs_found_with_more_tables_give_the_same_split(monkeypatch):
    # what a corpus of millions gets (more bands, keys of several bands) on a small one: the same groups
    from mmprep import split

    rng = random.Random(5)
    items = []
    for c in range(80):
        base = rng.getrandbits(64)
        for i in range(rng.randrange(1, 6)):
            flips = rng.sample(range(64), rng.randrange(0, 7))
            items.append(item(f"c{c:02d}-{i}", label=rng.choice("ab"), phash=base ^ sum(1 << b for b in flips)))
    cfg = PrepareConfig(max_link_share=0.05, phash_distance=4)
    few = assign_splits(items, cfg)
    assert len(split.phash_tables(len(items), 4)) == 5
    tables = split.phash_tables
    monkeypatch.setattr(split, "phash_tables", lambda n, d: tables(10**8, d))
    assert len(split.phash_tables(len(items), 4)) > 5
    many = assign_splits(items, cfg)
    assert few.split_of == many.split_of and few.group_of == many.group_of and few.ignored_links == many.ignored_links
    assert few.groups < len(items) - 50


@pytest.mark.slow
def test_split_scales_to_a_few_hundred_thousand_items():
    rng = random.Random(0)
    items = [LinkInfo(f"k{i:07d}", "ab"[i % 2], (("text", f"t{rng.randrange(180_000)}"),), rng.getrandbits(64)) for i in range(200_000)]
    result = assign_splits(items, PrepareConfig())
    assert len(result.split_of) == 200_000 and result.groups > 100_000


def test_moments_are_exact_and_order_independent():
    rng = np.random.default_rng(0)
    feats = [rng.normal(-30, 12, (8, int(rng.integers(5, 40)))).astype(np.float16) for _ in range(40)]
    parts = []
    for f in feats:
        m = Moments.empty(8)
        m.add_features(f)
        parts.append(m)
    left = Moments.empty(8)
    for m in parts:
        left = Moments.merge(left, m)
    tree = Moments.merge(Moments.merge(*_fold(parts[::2])), Moments.merge(*_fold(parts[1::2])))
    assert left.mean_std() == tree.mean_std()
    allv = np.concatenate([f.astype(np.float64) for f in feats], axis=1)
    mean, std = left.mean_std()
    np.testing.assert_allclose(mean, allv.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(std, allv.std(axis=1), rtol=1e-5)


def test_summed_parts_equal_python_integer_moments_even_near_int64_limits():
    """The writer's chunked int64 sums (MomentSum) give exactly the Python-integer moments,
    also for values whose squares overflow int64 (then the chunk is summed as Python ints)."""
    from mmprep.stats import F16_SCALE, MomentSum, feature_parts, image_parts

    rng = np.random.default_rng(1)
    feats = [rng.normal(-30, 12, (8, int(rng.integers(5, 40)))).astype(np.float16) for _ in range(600)]
    feats[7] = np.full((8, 100_000), 65504, np.float16)  # float16's largest value over 100k frames:
    feats[9] = np.full((8, 100_000), -65504, np.float16)  # hi² sums near 2**57, past a safe int64 chunk
    summed, exact = MomentSum(8, F16_SCALE), Moments.empty(8)
    for f in feats:
        summed.add(f.shape[1], feature_parts(f))
        exact.add_features(f)
    assert summed.moments() == exact
    images = [rng.integers(0, 256, (int(rng.integers(8, 40)), 17, 3), dtype=np.uint8) for _ in range(300)]
    summed, exact = MomentSum(3, 1), Moments.empty(3)
    for img in images:
        summed.add(img.shape[0] * img.shape[1], image_parts(img))
        exact.add_image(img)
    assert summed.moments() == exact


def test_image_parts_are_exact_for_any_channel_count_and_layout():
    """OpenCV's whole-channel sums give the integers of the per-channel histograms (the
    statistics in dataset.json): 1, 3 and 4 channels, a saturated image, a strided view, and
    the reversed channels that the staging code takes from BGR pixels."""
    from mmprep.stats import image_parts

    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((64, 64, 3), (5, 7, 1), (9, 4, 4), (1, 1, 3))]
    images += [np.full((512, 64, 3), 255, np.uint8), rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)[::3, ::2]]
    bgr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for img in [*images, bgr[..., ::-1]]:
        pixels = img.reshape(-1, img.shape[-1]).astype(np.int64)
        want = np.stack([pixels.sum(0), np.zeros(img.shape[-1], np.int64), np.zeros(img.shape[-1], np.int64), (pixels**2).sum(0)])
        assert np.array_equal(image_parts(img), want), img.shape
    assert np.array_equal(image_parts(bgr)[:, ::-1], image_parts(bgr[..., ::-1]))


def _fold(parts: list[Moments]) -> tuple[Moments, Moments]:
    acc = Moments.empty(8)
    for m in parts[1:]:
        acc = Moments.merge(acc, m)
    return parts[0], acc


def test_image_moments_on_the_unit_scale_and_empty_defaults():
    m = Moments.empty(3)
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = 255
    m.add_image(img)
    assert m.mean_std(255) == ([1.0, 0.0, 0.0], [1e-6, 1e-6, 1e-6])
    assert Moments.empty(2).mean_std() == ([0.0, 0.0], [1.0, 1.0])


TEXTS = ["a red thing, I think", "this looks blue.", "我看到一个红色的东西", "颜色是蓝色", "It is red."] * 20


def test_tokenizer_handles_mixed_scripts_with_byte_fallback():
    cfg = TextConfig(vocab_size=120, max_tokens=16)
    tok = Tokenizer.from_bytes(train_tokenizer(TEXTS, cfg))
    ids = tok.encode("a red 东西 ☃ never seen", 64)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert 1 not in ids.tolist()  # no <unk>: unseen characters fall back to bytes
    assert len(tok.encode("x " * 100, cfg.max_tokens)) == 16
    assert tok.pad_id == 0


def test_tokenizer_is_deterministic_across_processes_and_picklable():
    cfg = TextConfig(vocab_size=100)
    model = train_tokenizer(reversed(TEXTS), cfg)
    assert model == train_tokenizer(TEXTS, cfg)
    code = (
        "import sys; from mmprep.tokenizer import train_tokenizer; from mmprep.config import TextConfig; "
        "texts = ['a red thing, I think', 'this looks blue.', '我看到一个红色的东西', '颜色是蓝色', 'It is red.'] * 20; "
        "sys.stdout.buffer.write(train_tokenizer(texts, TextConfig(vocab_size=100)))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert other == model
    tok = pickle.loads(pickle.dumps(Tokenizer.from_bytes(model)))
    assert tok.encode("red", 8).tolist() == Tokenizer.from_bytes(model).encode("red", 8).tolist()


def test_tokenizer_without_any_train_text_still_works():
    tok = Tokenizer.from_bytes(train_tokenizer([], TextConfig()))
    assert len(tok.encode("anything 任何", 32)) > 0
