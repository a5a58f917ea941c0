"""Keys, labels and the shard layout: the parts users see in file names and members."""

import io
import re
import tarfile

import numpy as np
import pytest

from mmprep.config import LabelConfig, LabelRule, ShardConfig
from mmprep.labels import build_label_map, resolve_label
from mmprep.records import RecordError, make_key
from mmprep.shards import assign_shards, iter_shard, member_bytes, sample_members, tar_bytes

SAFE = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.mark.parametrize("sample_id", ["a/b", "../../etc/passwd", "with space", "样本 1", "dot.ted", "/abs", "", "---"])
def test_keys_are_safe_and_distinct(sample_id):
    key = make_key(sample_id)
    assert SAFE.match(key) and "." not in key
    assert key != make_key(sample_id + "x")


def test_keys_of_ids_that_sanitize_alike_still_differ():
    assert make_key("a/b") != make_key("a b") != make_key("a_b")


def test_labels_normalize_rules_and_fixed_maps():
    cfg = LabelConfig(rules=(LabelRule(pattern=r"\bred\b|红", label="Red"),))
    assert resolve_label("  Circle   Low ", None, cfg) == ("circle low", "given")
    assert resolve_label(None, "a red ball", cfg) == ("red", "rule")
    assert resolve_label(None, "蓝色", cfg) == (None, "none")
    with pytest.raises(RecordError, match="unlabeled"):
        resolve_label(None, "x", LabelConfig(unlabeled="reject"))
    with pytest.raises(RecordError, match="unknown_label"):
        resolve_label("bird", None, LabelConfig(labels=("cat", "dog")))
    assert build_label_map(["b", "a", "b"], LabelConfig()) == ["a", "b"]
    assert build_label_map(["z"], LabelConfig(labels=("Dog", "cat"))) == ["dog", "cat"]


def _members(key, n):
    return sample_members(key, meta={"id": key}, tokens=np.arange(n, dtype=np.int32), label_id=1)


def test_tar_bytes_are_reproducible_sorted_and_safe():
    samples = [(k, _members(k, 3)) for k in ("b", "a", "c")]
    data = tar_bytes(samples)
    assert data == tar_bytes(list(reversed(samples)))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos][:3] == ["a.cls", "a.json", "a.tokens.npy"]
    assert {(i.mtime, i.uid, i.gid, i.uname) for i in infos} == {(946684800, 0, 0, "")}
    assert [k for k, _ in iter_shard(io.BytesIO(data))] == ["a", "b", "c"]
    assert len(data) == 1024 + sum(member_bytes(m) for _, m in samples) + (-(1024 + sum(member_bytes(m) for _, m in samples)) % 10240)


def test_iter_shard_refuses_pickles():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("a.pyd")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="refusing tar member 'a.pyd'"):
        list(iter_shard(io.BytesIO(buf.getvalue())))


def test_shards_are_capped_by_samples_and_bytes():
    items = [("train", f"k{i:02d}", 1000) for i in range(10)] + [("val", "v1", 10)]
    by_count = assign_shards(items, ShardConfig(max_samples=4, max_bytes=10**9))
    assert [by_count[f"k{i:02d}"] for i in range(10)] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert by_count["v1"] == 0
    by_bytes = assign_shards(items, ShardConfig(max_samples=100, max_bytes=3100))
    assert [by_bytes[f"k{i:02d}"] for i in range(4)] == [0, 0, 1, 1]
    huge = assign_shards([("train", "a", 10**9), ("train", "b", 1)], ShardConfig(max_samples=9, max_bytes=2048))
    assert huge == {"a": 0, "b": 1}  # an oversized sample gets a shard of its own, never an empty one


def test_our_tar_writer_gives_exactly_tarfiles_bytes():
    """Shards are streamed with a fixed ustar header; tarfile (the reference) must agree."""
    from mmprep.shards import MTIME, write_tar

    rng = np.random.default_rng(0)
    samples = [(f"k{i}-{'x' * (i % 40)}", {"json": rng.bytes(int(rng.integers(0, 3000))), "txt": b"x" * (512 * i % 1500)})
               for i in range(30)]
    ours = io.BytesIO()
    write_tar(ours, samples)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for fld in sorted(members):
                info = tarfile.TarInfo(f"{key}.{fld}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(members[fld]), MTIME, 0o444, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(members[fld]))
    assert ours.getvalue() == ref.getvalue()


def test_npy_bytes_are_numpys_own():
    from mmprep.shards import npy_bytes

    for arr in (np.arange(7, dtype=np.int32), np.zeros((64, 63), np.float16), np.zeros(0, np.int32), np.ones((3, 4), np.float16).T):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        assert npy_bytes(arr) == buf.getvalue()
