"""Prepared shards open with the ecosystem's own tools (stock webdataset, Hugging Face datasets),
and `make_loader` gives a user's own PyTorch loop the recipe's batches: seeded, rank-split, resumable."""

from __future__ import annotations

import io
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
import yaml

from mmprep.democorpus import write_demo_corpus
from pipelines.prepare import main as prepare_main
from train import data as D

sys.path.insert(0, str(Path(__file__).parent))
from factory import BINS, FRAMES, SIZE, TOKENS, write_tiny_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")
MEMBERS = {"jpg", "mel.npy", "tokens.npy", "txt", "cls", "json"}


# ---- data -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The real Beam prepare on a demo corpus whose rows may lack a modality or a label, cut
    into shards of 10: samples differ in their members, as real data does."""
    root = tmp_path_factory.mktemp("ecosystem")
    corpus, out = root / "corpus", root / "out"
    write_demo_corpus(corpus, samples=60, seed=7, dirt_ratio=0.0, task="redundant", missing=0.3)
    lines = (corpus / "manifest.jsonl").read_bytes().splitlines()
    for i in range(0, len(lines), 6):  # every 6th row unlabeled (lines that are not JSON stay as they are)
        try:
            row = json.loads(lines[i])
        except ValueError:
            continue
        row.pop("label", None)
        lines[i] = json.dumps(row).encode()
    (corpus / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["shard"]["max_samples"] = 10
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert prepare_main(["--input", str(corpus / "manifest.jsonl"), "--output", str(out), "--params", str(root / "params.yaml")]) == 0
    return out


@pytest.fixture(scope="module")
def manifest(prepared) -> dict[str, dict]:
    rows = {r["key"]: r for r in pq.read_table(prepared / "manifest.parquet").to_pylist()}
    # the data the tests below must see: samples lacking each modality and a label, several shards
    assert all(any(not r[f"has_{m}"] for r in rows.values()) for m in ("image", "audio", "text")), "corpus too clean"
    assert any(r["label_id"] is None for r in rows.values()), "no unlabeled sample"
    assert len(D.load_spec(str(prepared))["splits"]["train"]["shards"]) >= 3
    return rows


def shard_samples(shard: Path) -> dict[str, dict[str, bytes]]:
    """{key: {field: bytes}} of one shard in member order, read with tarfile (not our loader)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, field = m.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Every sample has every member but `.txt` (the factory writes none): 4 even train shards."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"), per_split={"train": 96, "val": 20, "test": 13},
                              shards={"train": 4, "val": 2, "test": 1})


# ---- stock webdataset -------------------------------------------------------------------------
def test_stock_webdataset_decodes_every_member_and_nothing_needs_unpickling(prepared, manifest):
    data = str(prepared)
    spec = D.load_spec(data)
    f = spec["features"]
    for shard in prepared.glob("*.tar"):
        with tarfile.open(shard) as tar:
            fields = {m.name.split(".", 1)[1] for m in tar.getmembers()}
        assert fields <= MEMBERS, f"{shard.name}: {fields - MEMBERS}"
        assert not {x for x in fields if x.rsplit(".", 1)[-1] in ("pyd", "pkl", "pickle")}
    for split in SPLITS:
        urls = D.shard_urls(data, spec, split)
        ours = {s["key"]: s for s in D.read_shards(urls, spec["shards"])}
        stock = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
        assert [s["__key__"] for s in stock] == list(ours) and len(stock) == spec["splits"][split]["samples"]
        for s in stock:
            row, mine = manifest[s["__key__"]], ours[s["__key__"]]
            assert ("jpg" in s) == row["has_image"] and ("mel.npy" in s) == row["has_audio"]
            assert ("tokens.npy" in s) == ("txt" in s) == row["has_text"]
            if "jpg" in s:
                img = s["jpg"]
                assert img.dtype == np.uint8 and img.shape == (f["image"]["size"], f["image"]["size"], 3)
                assert np.abs(img.transpose(2, 0, 1).astype(int) - mine["image"]).mean() < 2  # PIL's and cv2's JPEG decoders
            if "mel.npy" in s:
                mel = s["mel.npy"]
                assert mel.dtype == np.float16 and mel.shape == (f["audio"]["bins"], f["audio"]["frames"])
                assert np.array_equal(mel.astype(np.float32), mine["audio"])
            if "tokens.npy" in s:
                tokens = s["tokens.npy"]
                assert tokens.dtype == np.int32 and tokens.ndim == 1 and 0 < len(tokens) <= f["text"]["max_tokens"]
                assert np.array_equal(tokens, mine["text"])
                assert isinstance(s["txt"], str) and s["txt"]
            assert isinstance(s["json"], dict) and s["json"]["key"] == s["__key__"] and s["json"]["split"] == split
            if row["label_id"] is None:
                assert "cls" not in s and mine["label"] == -1
            else:
                assert isinstance(s["cls"], int) and s["cls"] == row["label_id"] == mine["label"]
                assert spec["labels"][s["cls"]] == row["label"]


# ---- Hugging Face datasets --------------------------------------------------------------------
def hf_load(data_dir: Path, cache: Path, **kwargs):
    """`datasets.load_dataset("webdataset", …)` over every split, offline, with a private cache."""
    import datasets

    spec = D.load_spec(str(data_dir))
    files = {split: D.shard_urls(str(data_dir), spec, split) for split in SPLITS}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        return datasets.load_dataset("webdataset", data_files=files, cache_dir=str(cache), **kwargs)


def test_stock_hugging_face_call_reads_shards_whose_samples_share_members(tiny, tmp_path):
    import datasets
    from PIL import Image

    ds = hf_load(tiny, tmp_path / "hf")
    spec = D.load_spec(str(tiny))
    assert {split: len(ds[split]) for split in SPLITS} == {s: spec["splits"][s]["samples"] for s in SPLITS}
    features = ds["train"].features
    assert isinstance(features["jpg"], datasets.Image)
    assert features["cls"] == datasets.Value("int64")
    assert features["mel.npy"] == datasets.List(datasets.List(datasets.Value("float16")))
    assert features["tokens.npy"] == datasets.List(datasets.Value("int32"))
    row = ds["train"][0]
    assert isinstance(row["jpg"], Image.Image) and row["jpg"].size == (SIZE, SIZE) and row["jpg"].mode == "RGB"
    assert np.asarray(row["mel.npy"]).shape == (BINS, FRAMES)
    assert isinstance(row["cls"], int) and 0 <= row["cls"] < len(spec["labels"])
    assert row["json"] == {"id": row["__key__"]}
    ours = next(D.read_shards(D.shard_urls(str(tiny), spec, "train")[:1]))
    assert row["__key__"] == ours["key"] and row["cls"] == ours["label"]
    assert row["tokens.npy"] == ours["text"].tolist()


def test_stock_hugging_face_inference_refuses_samples_that_differ_in_members(prepared, manifest, tmp_path):
    """Why hf_features exists: the builder infers columns from the first 5 samples of one shard
    (the first of the last split given) and stops when they lack different members."""
    shard = prepared / D.load_spec(str(prepared))["splits"]["test"]["shards"][0]
    assert len({frozenset(fields) for fields in list(shard_samples(shard).values())[:5]}) > 1  # precondition
    with pytest.raises(ValueError, match="don't share the same prefix or the same types"):
        hf_load(prepared, tmp_path / "hf")


def test_hf_features_read_every_sample_with_typed_columns(prepared, manifest, tmp_path):
    import datasets
    from PIL import Image

    data = str(prepared)
    spec = D.load_spec(data)
    f = spec["features"]
    features = D.hf_features(data)
    ds = hf_load(prepared, tmp_path / "hf", features=features)
    raw = {key: fields for shard in prepared.glob("*.tar") for key, fields in shard_samples(shard).items()}
    assert features["cls"] == datasets.ClassLabel(names=spec["labels"])
    for split in SPLITS:
        part = ds[split]
        assert part.features == features and len(part) == spec["splits"][split]["samples"]
        assert part["__key__"] == [s["key"] for s in D.read_shards(D.shard_urls(data, spec, split))]  # shard order
        for row in part:
            key, m = row["__key__"], manifest[row["__key__"]]
            # the whole metadata, keys the first samples lack included
            assert alike(row["json"], json.loads(raw[key]["json"])) and row["json"]["split"] == split
            if m["has_image"]:
                assert isinstance(row["jpg"], Image.Image) and row["jpg"].size == (f["image"]["size"],) * 2
            else:
                assert row["jpg"] is None
            if m["has_audio"]:
                mel = np.load(io.BytesIO(raw[key]["mel.npy"]), allow_pickle=False)
                assert np.array_equal(np.asarray(row["mel.npy"], np.float16), mel)
                assert mel.shape == (f["audio"]["bins"], f["audio"]["frames"])
            else:
                assert row["mel.npy"] is None
            if m["has_text"]:
                assert row["tokens.npy"] == np.load(io.BytesIO(raw[key]["tokens.npy"]), allow_pickle=False).tolist()
                assert row["txt"] == raw[key]["txt"].decode("utf-8") and isinstance(row["txt"], str)
            else:
                assert row["tokens.npy"] is None and row["txt"] is None
            assert row["cls"] == m["label_id"]  # None when unlabeled
            if row["cls"] is not None:
                assert part.features["cls"].int2str(row["cls"]) == m["label"]
    # the torch format gives the tensors a training step wants
    sample = next(r for r in ds["train"].with_format("torch") if r["jpg"] is not None and r["mel.npy"] is not None)
    assert sample["jpg"].dtype == torch.uint8 and sample["jpg"].shape == (3, f["image"]["size"], f["image"]["size"])
    assert sample["mel.npy"].shape == (f["audio"]["bins"], f["audio"]["frames"]) and sample["mel.npy"].is_floating_point()
    assert sample["cls"].dtype == torch.int64


def alike(a, b) -> bool:
    """Equal JSON values; floats to 1e-12 (HF's Json type parses with pandas' ujson, which may miss
    the last binary digit: 0.8995 comes back as 0.8995000000000001)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(alike(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(alike(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_hf_features_follow_the_modalities_a_dataset_has(tmp_path):
    data = write_tiny_dataset(tmp_path / "d", per_split={"train": 8, "val": 2, "test": 2}, missing={"audio": 1.0})
    assert set(D.hf_features(str(data))) == {"cls", "jpg", "json", "tokens.npy", "txt", "__key__", "__url__"}


# ---- make_loader ------------------------------------------------------------------------------
def epoch_of(data: Path, **kwargs) -> list[dict]:
    return list(D.make_loader(str(data), batch_size=8, shuffle_buffer=32, **kwargs))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)
        for x, y in zip(a, b, strict=True))


def test_make_loader_batches_are_what_the_recipe_loop_consumes(tiny):
    spec = D.load_spec(str(tiny))
    batches = epoch_of(tiny)
    assert len(batches) == D.batches_per_epoch(spec, "train", 8, 1) == 12
    b = batches[0]
    assert set(b) == {"image", "audio", "text", "video", "present", "label", "keys", "shards"}
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (8, 3, SIZE, SIZE)
    assert b["audio"].dtype == torch.float32 and b["audio"].shape == (8, BINS, FRAMES)
    assert b["text"].dtype == torch.int64 and b["text"].shape[0] == 8 and b["text"].shape[1] <= TOKENS
    assert b["present"].dtype == torch.bool and b["present"].shape == (8, 4) and b["present"][:, :3].all()
    assert not b["present"][:, 3].any() and b["video"].dtype == torch.uint8 and not b["video"].any()  # no video in this data
    assert b["label"].dtype == torch.int64 and ((0 <= b["label"]) & (b["label"] < 8)).all()
    # the recipe's own construction of an epoch (train/recipe.py epoch_batches) gives the same batches
    stream = D.TrainStream(D.shard_urls(str(tiny), spec, "train"), D.Shapes.from_spec(spec), 8, 12, 0, 3, 0, 1, 32, spec["shards"])
    assert same(epoch_of(tiny, epoch=3), list(D.loader(stream, 0, 3, pin=False)))


def test_same_seed_and_epoch_give_the_same_batches_another_epoch_another_order(tiny):
    first = epoch_of(tiny, epoch=1, seed=7)
    assert same(first, epoch_of(tiny, epoch=1, seed=7))
    keys = [k for b in first for k in b["keys"]]
    for other in (epoch_of(tiny, epoch=2, seed=7), epoch_of(tiny, epoch=1, seed=8)):
        assert [k for b in other for k in b["keys"]] != keys


@pytest.mark.parametrize("workers,skip", [(0, 5), (2, 3), (2, 4), (2, 12)])
def test_skip_batches_resumes_an_epoch_exactly(tiny, workers, skip):
    full = epoch_of(tiny, epoch=1, num_workers=workers)
    resumed = epoch_of(tiny, epoch=1, num_workers=workers, skip_batches=skip)
    assert len(resumed) == 12 - skip and same(resumed, full[skip:])


@pytest.mark.parametrize("train_shards", [4, 1])
def test_two_ranks_read_disjoint_shares_that_cover_the_split(tmp_path, train_shards):
    """Ranks deal the shuffled shards (or, with fewer shards than ranks, every 2nd sample)
    between them. With even shares and a one-sample shuffle buffer (nothing read ahead into
    the next pass) one epoch on world 2 is exactly a partition of the train split."""
    data = write_tiny_dataset(tmp_path / "d", per_split={"train": 96, "val": 4, "test": 4},
                              shards={"train": train_shards, "val": 1, "test": 1})
    train_keys = {r["key"] for r in pq.read_table(data / "manifest.parquet").to_pylist() if r["split"] == "train"}
    for epoch in (0, 1):
        ranks = [list(D.make_loader(str(data), batch_size=8, epoch=epoch, rank=r, world=2, shuffle_buffer=1)) for r in (0, 1)]
        assert [len(r) for r in ranks] == [6, 6]
        seen = [[k for b in r for k in b["keys"]] for r in ranks]
        assert all(len(s) == len(set(s)) == 48 for s in seen)
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == train_keys


@pytest.mark.parametrize("workers", [0, 2])
def test_an_evaluation_split_yields_every_sample_once_in_shard_order(tiny, workers):
    spec = D.load_spec(str(tiny))
    for split, sizes in (("val", [8, 8, 4]), ("test", [8, 5])):
        order = [key for shard in spec["splits"][split]["shards"] for key in shard_samples(tiny / shard)]
        batches = list(D.make_loader(str(tiny), split, batch_size=8, num_workers=workers))
        assert [len(b["keys"]) for b in batches] == sizes
        assert [k for b in batches for k in b["keys"]] == order
        assert torch.cat([b["label"] for b in batches]).tolist() == [s["label"] for s in D.read_shards(D.shard_urls(str(tiny), spec, split))]


def test_make_loader_refuses_what_it_cannot_do(tiny):
    with pytest.raises(ValueError, match="no split 'dev'"):
        D.make_loader(str(tiny), "dev")
    with pytest.raises(ValueError, match="skip_batches"):
        D.make_loader(str(tiny), "val", skip_batches=1)
    with pytest.raises(ValueError, match="12 batches"):
        D.make_loader(str(tiny), batch_size=8, skip_batches=13)
