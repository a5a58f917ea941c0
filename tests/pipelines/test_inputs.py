"""More input kinds through the real Beam pipeline: Parquet as Hugging Face `datasets` writes it
(embedded media, ClassLabel) and existing WebDataset tars (a folder, a list, a brace pattern),
hostile tars included. Same accounting, rejects and determinism as a manifest."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmprep.shards import iter_shard
from pipelines import read
from pipelines.prepare import main as prepare_main
from tests.pipelines.test_hostile import params_with, png, wav
from tests.pipelines.test_prepare import CHECKER, PARAMS, digests

MEDIA = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
NAMES = ["cat", "dog", "bird"]


def hf_metadata(**features: dict) -> dict[bytes, bytes]:
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def write_hf(path: Path, rows: list[dict], row_group_size: int = 4) -> Path:
    """A Parquet file as `datasets` writes one: image/audio {bytes, path} structs, a ClassLabel
    int label whose names are in the schema metadata."""
    schema = pa.schema(
        [("image", MEDIA), ("audio", MEDIA), ("text", pa.string()), ("label", pa.int64()), ("note", pa.string())],
        metadata=hf_metadata(
            image={"_type": "Image"}, audio={"_type": "Audio"}, text={"dtype": "string", "_type": "Value"},
            label={"names": NAMES, "_type": "ClassLabel"}, note={"dtype": "string", "_type": "Value"},
        ),
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def hf_rows(n: int = 14) -> list[dict]:
    rng = np.random.default_rng(5)
    rows = [
        {"image": {"bytes": png(np.random.default_rng(100 + i), 40, 48), "path": f"img_{i}.png"},
         "audio": {"bytes": wav(rng, 0.5), "path": None}, "text": f"a caption, number {i}", "label": i % 3, "note": f"n{i}"}
        for i in range(n)
    ]
    rows[3]["image"] = {"bytes": b"this is not an image", "path": "broken.png"}  # image_undecodable
    rows[5].update(image=None, audio=None, text=None)  # null structs and no text: no_modality
    rows[7]["image"] = {"bytes": None, "path": "on_disk.png"}  # read like a manifest path, beside the file
    rows[8]["label"] = -1  # `datasets`' "no label": unlabeled, kept
    rows[9]["audio"] = {"bytes": None, "path": None}  # neither bytes nor path: bad_field
    rows[10]["label"] = 7  # not a class of the ClassLabel: bad_field
    return rows


def run(src: str | Path, out: Path, *extra: str, params: Path = PARAMS) -> tuple[list[dict], list[dict], dict]:
    assert prepare_main(["--input", str(src), "--output", str(out), "--params", str(params), *extra]) == 0
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    return manifest, rejects, json.loads((out / "dataset.json").read_text())


def metas(out: Path) -> dict[str, dict]:
    """id -> the sample's .json, and every member field seen, from the shards."""
    found = {}
    for shard in sorted(out.glob("*.tar")):
        for _, members in iter_shard(str(shard)):
            meta = json.loads(members["json"])
            found[meta["id"]] = {**meta, "fields": sorted(members)}
    return found


def check_contract(out: Path) -> None:
    if not CHECKER.exists():
        return
    done = subprocess.run([sys.executable, str(CHECKER), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hugging_face_parquet_with_embedded_media_and_class_labels(tmp_path):
    (tmp_path / "on_disk.png").write_bytes(png(np.random.default_rng(7), 40, 48))
    src = write_hf(tmp_path / "train.parquet", hf_rows())
    assert pq.ParquetFile(src).metadata.num_row_groups == 4
    manifest, rejects, ds = run(src, tmp_path / "out", params=params_with(tmp_path, max_reject_ratio=0.5))
    assert len(manifest) + len(rejects) == 14 == ds["counts"]["input_rows"]
    assert sorted((r["source"], r["reason"]) for r in rejects) == [
        ("train.parquet:10", "bad_field"), ("train.parquet:11", "bad_field"),
        ("train.parquet:4", "image_undecodable"), ("train.parquet:6", "no_modality"),
    ]
    kept = {r["id"]: r for r in manifest}
    # no id column: the id is "<file>:<row>"; ClassLabel ints come out as their names
    assert set(kept) == {f"train.parquet:{i + 1}" for i in range(14)} - {r["source"] for r in rejects}
    assert {kept[f"train.parquet:{i + 1}"]["label"] for i in (0, 1, 2)} == {"cat", "dog", "bird"}
    assert kept["train.parquet:9"]["label"] is None
    assert set(ds["labels"]) == set(NAMES)
    samples = metas(tmp_path / "out")
    assert all({"jpg", "mel.npy", "tokens.npy", "txt", "json"} <= set(m["fields"]) for m in samples.values())
    first = samples["train.parquet:1"]
    assert first["image"]["sha256"] == hashlib.sha256(hf_rows()[0]["image"]["bytes"]).hexdigest()
    assert first["extra"] == {"note": "n0"}  # extra columns carried; the media columns are not
    assert samples["train.parquet:8"]["image"]["sha256"] == hashlib.sha256((tmp_path / "on_disk.png").read_bytes()).hexdigest()
    check_contract(tmp_path / "out")


def test_embedded_media_are_cached_by_their_bytes(tmp_path):
    """An embedded image has no file to stat: its cache entry is named by its bytes, so changing
    them (same row, same id, same path) processes the row again instead of reusing the old one."""
    rows = hf_rows()[:3]  # clean rows
    cache = tmp_path / "cache"
    write_hf(tmp_path / "train.parquet", rows)
    run(tmp_path / "train.parquet", tmp_path / "out1", "--cache", str(cache))
    rows[0]["image"]["bytes"] = png(np.random.default_rng(999), 40, 48)
    write_hf(tmp_path / "train.parquet", rows)
    run(tmp_path / "train.parquet", tmp_path / "out2", "--cache", str(cache))
    sha = metas(tmp_path / "out2")["train.parquet:1"]["image"]["sha256"]
    assert sha == hashlib.sha256(rows[0]["image"]["bytes"]).hexdigest()
    assert metas(tmp_path / "out2")["train.parquet:2"] == metas(tmp_path / "out1")["train.parquet:2"]


def test_parquet_row_group_boundaries_do_not_change_the_output(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "on_disk.png").write_bytes(png(np.random.default_rng(7), 40, 48))
    rows = hf_rows()  # once: libsndfile stamps a float WAV's PEAK chunk with the current second
    write_hf(tmp_path / "a" / "train.parquet", rows, row_group_size=3)
    write_hf(tmp_path / "b" / "train.parquet", rows, row_group_size=1000)
    params = params_with(tmp_path, max_reject_ratio=0.5)
    run(tmp_path / "a" / "train.parquet", tmp_path / "out-a", "--no-cache", params=params)
    run(tmp_path / "b" / "train.parquet", tmp_path / "out-b", "--no-cache", params=params)
    a, b = digests(tmp_path / "out-a"), digests(tmp_path / "out-b")
    differ = sorted(name for name in set(a) | set(b) if a.get(name) != b.get(name))
    details = {name: [pq.read_table(tmp_path / d / name).to_pylist() for d in ("out-a", "out-b")]
               for name in differ if name.endswith(".parquet")}
    assert not differ, f"{differ}: {details}"


def test_a_folder_or_list_of_parquet_files_is_one_input(tmp_path):
    """A Hugging Face repository's data/ folder (several files, a README beside them), or a list
    of the files: rows numbered per file, ids derived per file, so none collide."""
    rows = hf_rows()
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    (tmp_path / "repo" / "README.md").write_text("# a dataset card")
    for i, part in enumerate((rows[:3], rows[11:])):  # clean rows, other content in each file
        write_hf(data / f"train-{i:05d}-of-00002.parquet", part, row_group_size=2)
    manifest, rejects, ds = run(tmp_path / "repo", tmp_path / "out", "--no-cache")
    assert not rejects and ds["counts"]["input_rows"] == 6
    assert sorted(r["id"] for r in manifest) == sorted(f"data/train-{i:05d}-of-00002.parquet:{n}" for i in range(2) for n in (1, 2, 3))
    listed = ",".join(str(data / f"train-{i:05d}-of-00002.parquet") for i in range(2))
    manifest, _, _ = run(listed, tmp_path / "out-list", "--no-cache")
    assert sorted(r["id"] for r in manifest) == sorted(f"train-{i:05d}-of-00002.parquet:{n}" for i in range(2) for n in (1, 2, 3))


def test_parquet_written_by_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    n = 6
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": png(np.random.default_rng(i), 40, 48), "path": None} for i in range(n)],
         "text": [f"caption {i}" for i in range(n)], "label": [i % 2 for i in range(n)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["cat", "dog"])}),
    ).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "train.parquet"))
    manifest, rejects, _ = run(tmp_path / "train.parquet", tmp_path / "out")
    assert not rejects and len(manifest) == n
    assert sorted(r["label"] for r in manifest) == ["cat"] * 3 + ["dog"] * 3


# --- WebDataset ------------------------------------------------------------------------------


def tar_of(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return path


def sample(key: str, seed: int, label: str | None = None) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    members = [(f"{key}.png", png(rng, 40, 48)), (f"{key}.wav", wav(rng, 0.5)), (f"{key}.txt", f"caption of {key}".encode()),
               (f"{key}.json", b'{"any": "metadata"}')]
    return members + ([(f"{key}.cls", f" {label}\n".encode())] if label else [])


def shards(folder: Path, n: int = 2, per: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n):
        members = [m for i in range(per) for m in sample(f"{s:03d}{i:03d}", 10 * s + i, ("cat", "dog")[i % 2])]
        tar_of(folder / f"shard-{s:03d}.tar", members)
    return folder


def test_a_webdataset_folder_list_and_pattern_give_the_same_dataset(tmp_path):
    src = shards(tmp_path / "wds")
    manifest, rejects, ds = run(src, tmp_path / "dir", "--no-cache")
    assert not rejects and len(manifest) == 12 == ds["counts"]["input_rows"]
    assert {r["label"] for r in manifest} == {"cat", "dog"}
    found = metas(tmp_path / "dir")
    assert found["001002"]["source"] == "shard-001.tar:3"
    assert found["001002"]["extra"] == {"ignored_files": ["001002.json"]}  # listed, never read
    assert all({"jpg", "mel.npy", "tokens.npy", "txt", "cls"} <= set(m["fields"]) for m in found.values())
    check_contract(tmp_path / "dir")
    want = digests(tmp_path / "dir")
    run(f"{src}/shard-{{000..001}}.tar", tmp_path / "pattern", "--no-cache")
    run(f"{src}/shard-000.tar,{src}/shard-001.tar", tmp_path / "list", "--no-cache")
    assert digests(tmp_path / "pattern") == digests(tmp_path / "list") == want
    # one tar alone, and a folder holding only it
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "shard-000.tar").write_bytes((src / "shard-000.tar").read_bytes())
    single, _, _ = run(src / "shard-000.tar", tmp_path / "single", "--no-cache")
    run(tmp_path / "one", tmp_path / "folder-of-one", "--no-cache")
    assert len(single) == 6 and digests(tmp_path / "single") == digests(tmp_path / "folder-of-one")


class _Touch:
    """A pickle that creates a file when loaded: its loading would show."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_hostile_tars_finish_and_account_for_every_sample(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    touched = tmp_path / "pwned"
    big = png(np.random.default_rng(1), 300, 300)
    tar_of(src / "a.tar", [
        *sample("ok1", 1, "cat"),
        ("pyd.txt", b"a sample with a pickle"), ("pyd.pyd", pickle.dumps(_Touch(str(touched)))),
        ("pyd.pkl", pickle.dumps(_Touch(str(touched)))),
        ("big.png", big), ("big.cls", b"cat"),  # over max_file_bytes: file_too_large, left unread
        _special("link.png", tarfile.SYMTYPE, "/etc/passwd"), ("link.txt", b"a symlinked image"),
        _special("hard.png", tarfile.LNKTYPE, "ok1.png"),  # alone: no readable modality
        _special("dev.wav", tarfile.CHRTYPE),
        ("../evil.png", png(np.random.default_rng(2), 40, 48)), ("/abs.png", png(np.random.default_rng(3), 40, 48)),
        ("clsonly.cls", b"dog"),
        ("empty.png", b""),
        *sample("ok2", 2, "dog"),
    ])
    tar_of(src / "b-empty.tar", [])
    whole = tar_of(tmp_path / "c.tar", [m for i in range(4) for m in sample(f"c{i}", 20 + i, "cat")]).read_bytes()
    with tarfile.open(tmp_path / "c.tar") as t:
        cut = next(m for m in t.getmembers() if m.name == "c2.wav").offset_data + 100
    (src / "c-truncated.tar").write_bytes(whole[:cut])
    params = params_with(tmp_path, max_reject_ratio=1.0, max_file_bytes=100_000)
    assert len(big) > 100_000
    manifest, rejects, ds = run(src, tmp_path / "out", params=params)
    assert not touched.exists()
    rows = len(manifest) + len(rejects)
    assert rows == ds["counts"]["input_rows"] == read.plan_input(*read.resolve_input(str(src))).rows == 12
    kept = {r["id"]: r for r in manifest}
    assert set(kept) == {"ok1", "ok2", "pyd", "link", "c0", "c1"}
    found = metas(tmp_path / "out")
    assert found["pyd"]["extra"] == {"ignored_files": ["pyd.pyd", "pyd.pkl"]}
    assert found["link"]["extra"] == {"ignored_files": ["link.png (symlink, not followed)"]}
    assert not found["link"]["fields"].count("jpg")
    assert sorted(r["source"] for r in rejects) == ["a.tar:3", "a.tar:5", "a.tar:6", "a.tar:7", "a.tar:8", "c-truncated.tar:3"]
    assert {(r["id"], r["source"], r["reason"]) for r in rejects} == {
        (None, "c-truncated.tar:3", "malformed_row"),  # the sample the truncation cut; c0, c1 before it are kept
        ("big", "a.tar:3", "file_too_large"),
        ("hard", "a.tar:5", "no_modality"),
        ("dev", "a.tar:6", "no_modality"),
        ("clsonly", "a.tar:7", "no_modality"),
        ("empty", "a.tar:8", "empty_file"),
    }
    damage = next(r for r in rejects if r["reason"] == "malformed_row")["detail"]
    assert "c-truncated.tar" in damage and "byte" in damage
    assert "hardlink, not followed" in next(r for r in rejects if r["id"] == "hard")["detail"]


@pytest.mark.parametrize("cut", ["header", "not-a-tar"])
def test_a_corrupt_tar_is_one_reject_after_the_samples_before_it(tmp_path, cut):
    whole = tar_of(tmp_path / "x.tar", [m for i in range(5) for m in sample(f"s{i}", i)]).read_bytes()
    with tarfile.open(tmp_path / "x.tar") as t:
        offset = next(m for m in t.getmembers() if m.name == "s3.png").offset
    data = bytearray(whole)
    if cut == "header":
        data[offset : offset + 100] = b"x" * 100  # a damaged header: s3 (and all after it) unreadable
    else:
        data = bytearray(b"\x1f\x8b" + bytes(2000))  # e.g. a .tar.gz named .tar
    (tmp_path / "x.tar").write_bytes(bytes(data))
    plan = read.plan_input("webdataset", str(tmp_path / "x.tar"))
    rows = [r for rng in plan.ranges for r in read.read_range(rng, 10**6)]
    assert len(rows) == plan.rows
    assert [getattr(r, "reason", "kept") for r in rows] == (["kept"] * 3 if cut == "header" else []) + ["malformed_row"]


def test_a_gzipped_tar_is_one_reject_never_dropped(tmp_path):
    """README: `.tar.gz` inputs are one reject each. In a folder of tars (or a list) one was
    skipped without a word, and given alone it was "no files below it"."""
    import gzip

    folder = shards(tmp_path / "wds", n=1, per=3)
    raw = tar_of(tmp_path / "z.tar", [m for i in range(2) for m in sample(f"z{i}", 50 + i)]).read_bytes()
    (folder / "shard-001.tar.gz").write_bytes(gzip.compress(raw, mtime=0))
    (tmp_path / "alone.tgz").write_bytes(gzip.compress(raw, mtime=0))
    for given, kept in ((folder, 3), (f"{folder}/shard-000.tar,{folder}/shard-001.tar.gz", 3), (tmp_path / "alone.tgz", 0)):
        out = tmp_path / f"out-{kept}-{len(str(given))}"
        assert prepare_main(["--input", str(given), "--output", str(out), "--params", str(params_with(tmp_path, max_reject_ratio=1.0))]) == 0
        rejects = pq.read_table(out / "rejects.parquet").to_pylist()
        assert len(pq.read_table(out / "manifest.parquet")) == kept
        assert [r["reason"] for r in rejects] == ["malformed_row"] and "gzip" in rejects[0]["detail"]
        assert json.loads((out / "dataset.json").read_text())["counts"]["input_rows"] == kept + 1


def test_tar_range_boundaries_do_not_change_the_rows(tmp_path, monkeypatch):
    """Pieces of one sample each (several per tar, merged per range) read the same rows as one
    piece per tar; hidden members and directories never count as samples."""
    src = shards(tmp_path / "wds", n=2, per=7)
    with tarfile.open(src / "shard-000.tar", "a") as tar:
        tar.addfile(_special("sub", tarfile.DIRTYPE))
        info = tarfile.TarInfo("sub/._hidden.png")
        tar.addfile(info, io.BytesIO(b""))

    def rows(per_piece: int, min_ranges: int) -> list[tuple]:
        monkeypatch.setattr(read, "PLAN_UNIT", per_piece)
        monkeypatch.setattr(read, "MIN_RANGES", min_ranges)
        plan = read.plan_input("webdataset", str(src))
        found = [(r.source, r.order, r.id, r.label, tuple(sorted(r.media.items())), tuple(sorted(r.extra.items(), key=str)))
                 for rng in plan.ranges for r in read.read_range(rng, 10**6)]
        assert len(found) == plan.rows == 14
        return found, len(plan.ranges)

    fine, many = rows(1, 64)
    coarse, few = rows(1000, 1)
    assert fine == coarse and many == 14 and few == 1
    assert [o for _, o, *_ in fine] == list(range(14))


def test_brace_patterns_expand_like_braceexpand():
    assert read.expand_paths("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert read.expand_paths("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar", "b/x-9.tar", "b/x-10.tar"]
    assert read.expand_paths("a.tar,gs://b/{1..2}.tar") == ["a.tar", "gs://b/1.tar", "gs://b/2.tar"]


@pytest.mark.slow
def test_new_inputs_give_the_same_bytes_with_two_workers(tmp_path):
    (tmp_path / "on_disk.png").write_bytes(png(np.random.default_rng(7), 40, 48))
    params = params_with(tmp_path, max_reject_ratio=0.5)
    inputs = {"parquet": write_hf(tmp_path / "train.parquet", hf_rows(), row_group_size=2), "wds": shards(tmp_path / "wds", 3, 5)}
    for name, src in inputs.items():
        run(src, tmp_path / f"{name}-1", "--no-cache", params=params)
        run(src, tmp_path / f"{name}-2", "--no-cache", "--workers", "2", params=params)
        assert digests(tmp_path / f"{name}-1") == digests(tmp_path / f"{name}-2"), name
    assert os.listdir(tmp_path / "wds-2")
