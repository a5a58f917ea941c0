"""Training as a user sees it: fusion modes learn, resume is exact, DDP is even, loading is safe."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmprep.config import EvaluateConfig, TrainConfig
from train import data as D
from train.evaluate import evaluate
from train.recipe import train

sys.path.insert(0, str(Path(__file__).parent))
from factory import write_tiny_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAST = TrainConfig(width=32, epochs=6, batch_size=32, lr=3e-3, warmup_steps=5, log_every=1000, checkpoint_every=1000,
                   modality_dropout=0.1, augment=False, shuffle_buffer=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_256_test(tmp_path_factory) -> Path:  # the same train and val samples; a test split large enough for one-modality scores
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny256"), per_split={"train": 384, "val": 64, "test": 256})


@pytest.mark.parametrize("fusion", ["concat", "weighted_sum", "product", "attention"])
def test_every_fusion_mode_learns_well_above_chance(tiny_256_test, tmp_path, fusion):
    tiny = tiny_256_test
    run = tmp_path / "run"
    train(str(tiny), str(run), replace(FAST, fusion=fusion, text_encoder="gru" if fusion == "product" else "transformer"),
          live_dir=str(tmp_path / "live"))
    metrics = evaluate(str(tiny), str(run), str(tmp_path / "m.json"), EvaluateConfig())
    assert metrics["accuracy"] >= 0.6, metrics["accuracy"]  # chance is 1/8
    assert set(metrics["ablation"]) == {"image_only", "audio_only", "text_only", "video_only"}
    assert metrics["ablation"].pop("video_only") == {"accuracy": None, "samples": 0, "without_modality": 256}  # no video here
    assert all(m["accuracy"] < metrics["accuracy"] for m in metrics["ablation"].values())
    # each modality alone carries one bit of three: its ceiling is 0.25 (chance 0.125); a lazy encoder sits at chance
    assert all(m["accuracy"] >= 0.18 for m in metrics["ablation"].values()), metrics["ablation"]
    assert metrics["by_presence"] == {"image+audio+text": {"accuracy": metrics["accuracy"], "samples": 256}}
    # validation's per-modality accuracy is in DVCLive, so a lazy encoder is visible while training
    live = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert set(live["val"]) == {"accuracy", "image_only", "audio_only", "text_only"}, live
    history = json.loads((run / "train_config.json").read_text())["history"]
    assert all({"val_image_only", "val_audio_only", "val_text_only"} <= set(h) for h in history)
    assert (tmp_path / "m_confusion.png").stat().st_size > 1000
    page = (tmp_path / "m.html").read_text()  # the training report beside the metrics: one offline file
    assert "<script" not in page and all(src.startswith("data:") for src in re.findall(r'src="([^"]+)"', page))
    assert f"{metrics['accuracy']:.3f}" in page and page.count('alt="confusion matrix') == 1 and 'alt="training curves' in page
    for label, m in metrics["per_class"].items():
        assert f"<td>{label}</td><td class=\"n\">{m['precision']:.3f}</td>" in page
    for name, m in metrics["ablation"].items():
        assert f"<td>{name}</td><td class=\"n\">{m['accuracy']:.3f}</td>" in page
    for name in ("model.pt", "dataset.json", "train_config.json", "curves.png", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).exists(), name


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_a_crash_gives_bitwise_identical_weights(tiny, tmp_path, monkeypatch, workers):
    """Also with loader worker processes (whose next epoch starts before the current one ends).
    The resumed run's history and curves cover every epoch, the ones before the crash too."""
    cfg = replace(FAST, epochs=2, checkpoint_every=5, augment=True, modality_dropout=0.3, num_workers=workers)
    train(str(tiny), str(tmp_path / "straight"), cfg)
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def crash_at_step_17(self, *args, **kwargs):  # in epoch 2 (12 batches per epoch)
        calls["n"] += 1
        if calls["n"] == 17:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_at_step_17)
    with pytest.raises(KeyboardInterrupt):
        train(str(tiny), str(tmp_path / "resumed"), cfg)
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 15  # the crash came between checkpoints
    train(str(tiny), str(tmp_path / "resumed"), cfg)
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads((tmp_path / run / "train_config.json").read_text())["history"] for run in ("straight", "resumed")]
    assert [h["epoch"] for h in history[1]] == [1, 2] and history[0] == history[1]
    with pytest.raises(ValueError, match=r"other train params \(fusion\)"):
        train(str(tiny), str(tmp_path / "resumed"), replace(cfg, fusion="product"))


def test_equal_batches_on_every_rank_even_with_few_uneven_shards(tiny):
    spec = D.load_spec(str(tiny))
    urls = D.shard_urls(str(tiny), spec, "train")  # 3 shards of 128 samples
    batches = D.batches_per_epoch(spec, "train", 40, world=2)
    counts = []
    for rank in range(2):
        stream = D.TrainStream(urls, D.Shapes.from_spec(spec), 40, batches, seed=0, epoch=0, rank=rank, world=2, buffer=16)
        counts.append(sum(1 for _ in stream))
    assert counts == [batches, batches]
    with_workers = list(D.loader(D.TrainStream(urls, D.Shapes.from_spec(spec), 40, batches, 0, 0, 0, 4, 16), 2, 0, False))
    assert len(with_workers) == batches


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers,buffer", [(0, 1000), (2, 64), (3, 0)])
def test_an_epoch_is_one_pass_no_sample_twice_and_ranks_share_nothing(tiny, workers, buffer):
    from train.data import make_loader

    spec = D.load_spec(str(tiny))
    n = spec["splits"]["train"]["samples"]  # 384 in 3 shards: uneven shares of shards per slot
    for epoch in (0, 1):
        ranks = [[k for b in make_loader(str(tiny), batch_size=40, epoch=epoch, rank=r, world=2, num_workers=workers,
                                         shuffle_buffer=buffer) for k in b["keys"]] for r in range(2)]
        keys = ranks[0] + ranks[1]
        assert len(ranks[0]) == len(ranks[1]) == 40 * (n // 80)
        assert len(set(keys)) == len(keys), f"{len(keys) - len(set(keys))} samples twice in epoch {epoch}"
    seen = set()  # the few samples an epoch leaves out are others in each epoch, also from a one-shard split
    single = write_tiny_dataset(tiny.parent / f"single-{workers}-{buffer}", shards={"train": 1, "val": 1, "test": 1})
    for epoch in range(6):
        keys = [k for b in make_loader(str(single), batch_size=40, epoch=epoch, num_workers=workers, shuffle_buffer=buffer)
                for k in b["keys"]]
        assert len(keys) == len(set(keys)) == 360
        seen.update(keys)
    assert len(seen) == n
    one = [k for b in make_loader(str(tiny), batch_size=32, num_workers=workers, shuffle_buffer=buffer) for k in b["keys"]]
    assert sorted(one) == sorted(s["key"] for s in D.read_shards(D.shard_urls(str(tiny), spec, "train")))  # 384 = 12 x 32: all


@pytest.mark.slow
def test_torchrun_two_processes_odd_shard_count(tiny, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  width: 32\n  epochs: 2\n  batch_size: 32\n  augment: false\n  log_every: 1000\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m", "mmprep.cli",
           "train", "--data", str(tiny), "--output", str(tmp_path / "run"), "--params", str(params)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    done = sorted(line for line in run.stderr.splitlines() if "done:" in line)
    assert len(done) == 2 and done[0].split("done:")[1] == done[1].split("done:")[1], done
    result = json.loads((tmp_path / "run" / "train_config.json").read_text())["result"]
    assert result["world_size"] == 2 and result["steps"] == 2 * (384 // (32 * 2))


def _shard_with(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "bad-000000.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_member_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    shard = _shard_with(tmp_path, "x.pyd", pickle.dumps(_Evil(str(marker))))
    with pytest.raises(D.ShardError, match=r"refusing member\(s\) \['pyd'\]"):
        list(D.read_shards([str(shard)]))
    assert not marker.exists()


def test_a_truncated_shard_is_reported_not_silently_shortened(tiny, tmp_path):
    index = D.load_spec(str(tiny))["shards"]
    data = (tiny / "train-000000.tar").read_bytes()
    cut = tmp_path / "train-000000.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(D.ShardError, match=r"train-000000.tar: \d+ bytes but dataset.json records"):
        list(D.read_shards([str(cut)], index))
    remote_like = {"train-000000.tar": {**index["train-000000.tar"], "bytes": len(data) // 2 + 100}}
    with pytest.raises(D.ShardError, match=r"train-000000.tar: truncated shard \(ends inside a member"):
        list(D.read_shards([str(cut)], remote_like))  # size unknown up front: the tar stream itself tells
    blocks = tmp_path / "blocks" / "train-000000.tar"  # cut at a member boundary, a valid-looking prefix
    blocks.parent.mkdir()
    blocks.write_bytes(data[:512 * 8])
    with pytest.raises(D.ShardError, match=r"truncated shard \(ends without the end-of-archive marker\)"):
        list(D.read_shards([str(blocks)]))
    flipped = bytearray(data)
    flipped[3] ^= 0x20  # one bit of the first member name
    bad = tmp_path / "flip" / "train-000000.tar"
    bad.parent.mkdir()
    bad.write_bytes(bytes(flipped))
    with pytest.raises(D.ShardError, match=r"bad tar header checksum"):
        list(D.read_shards([str(bad)]))


@pytest.mark.parametrize("record", [b"0 path=x\n", b"-5 path=x\n", b"zz path=x\n"])
def test_a_hostile_pax_header_is_an_error_not_a_hang(tmp_path, record):
    path = tmp_path / "bad-000000.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("x.json")
        info.type, info.size = tarfile.XHDTYPE, len(record)
        tar.addfile(info, io.BytesIO(record))
    with pytest.raises(D.ShardError, match="corrupt shard"):
        list(D.read_shards([str(path)]))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_shards_repacked_by_other_tar_writers_read_the_same(tiny, tmp_path, fmt):
    """Users re-pack shards (GNU tar, PAX with long names, directories): the same samples come out."""
    src = tiny / "train-000000.tar"
    expected = [(s["key"], s["label"], s["image"].tobytes(), s["audio"].tobytes()) for s in D.read_shards([str(src)])]
    out = tmp_path / "repacked.tar"
    # a long directory name: a ustar prefix field, else (too long for it) a GNU long name or a PAX record
    prefix = "d" * 120 + "/" if fmt == tarfile.USTAR_FORMAT else "données-" + "d" * 200 + "/"
    with tarfile.open(src) as old, tarfile.open(out, "w", format=fmt) as new:
        new.addfile(tarfile.TarInfo(prefix[:-1]) if fmt != tarfile.USTAR_FORMAT else _dir(prefix[:-1]))
        for member in old.getmembers():
            data = old.extractfile(member).read()
            member.name = prefix + member.name
            new.addfile(member, io.BytesIO(data))
    got = [(s["key"], s["label"], s["image"].tobytes(), s["audio"].tobytes()) for s in D.read_shards([str(out)])]
    assert {tarfile.PAX_FORMAT: b"path=", tarfile.GNU_FORMAT: b"././@LongLink"}.get(fmt, b"ustar") in out.read_bytes()
    assert [(prefix + k, *rest) for k, *rest in expected] == got


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.fixture
def http_root(tmp_path):
    """Serve a directory over HTTP on localhost (what a bucket or a CDN looks like to the loader)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_training_over_http_gives_the_same_weights_as_from_disk(tiny, tmp_path, http_root):
    root, url = http_root
    for f in tiny.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    cfg = replace(FAST, epochs=1)
    train(str(tiny), str(tmp_path / "local"), cfg)
    train(url + "/", str(tmp_path / "remote"), cfg)
    a = torch.load(tmp_path / "local" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "remote" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "remote" / "dataset.json").read_bytes() == (tiny / "dataset.json").read_bytes()
    metrics = evaluate(url, str(tmp_path / "remote"), str(tmp_path / "m.json"), EvaluateConfig())
    assert metrics["accuracy"] > 0.2

    data = (root / "train-000001.tar").read_bytes()
    (root / "train-000001.tar").write_bytes(data[: len(data) // 3])  # a server that serves a cut file
    with pytest.raises(D.ShardError, match=r"train-000001.tar: truncated shard"):
        list(D.read_shards(D.shard_urls(url, D.load_spec(url), "train"), D.load_spec(url)["shards"]))
    with pytest.raises(FileNotFoundError, match=r"/nothing/dataset.json: cannot fetch"):
        D.load_spec(url + "/nothing")


def _flip_label_byte(src: Path, dst: Path) -> None:
    """Copy a dataset, changing one byte inside the first .cls member of train-000000.tar."""
    shutil.copytree(src, dst)
    data = bytearray((dst / "train-000000.tar").read_bytes())
    header = data.find(b".cls\0")
    header -= header % 512
    data[header + 512] ^= 0x01  # "3" → "2": a different, valid label
    (dst / "train-000000.tar").write_bytes(bytes(data))


def test_a_flipped_label_byte_is_found_by_verify_and_by_the_loader(tiny, tmp_path, capsys):
    from mmprep.cli import main as cli

    assert cli(["verify", "--data", str(tiny)]) == 0
    assert "ok: 5 shards" in capsys.readouterr().out
    bad = tmp_path / "bad"
    _flip_label_byte(tiny, bad)
    assert cli(["verify", "--data", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("mmprep verify: train-000000.tar: sha256") and "corrupted" in err[0]
    spec = D.load_spec(str(bad))
    with pytest.raises(D.ShardError, match=r"train-000000.tar: corrupted shard \(sha256 differs"):
        list(D.read_shards(D.shard_urls(str(bad), spec, "train"), spec["shards"]))
    (bad / "stray-000000.tar").write_bytes(b"")
    (bad / "val-000000.tar").unlink()
    assert cli(["verify", "--data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "stray-000000.tar: a shard file that dataset.json does not list" in err and "val-000000.tar: missing" in err


def test_a_corrupt_shard_read_by_loader_workers_is_one_line(tiny, tmp_path, capsys):
    from mmprep.cli import main as cli

    bad = tmp_path / "bad"
    _flip_label_byte(tiny, bad)
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 1\n  num_workers: 2\n  batch_size: 32\n")
    assert cli(["train", "--data", str(bad), "--output", str(tmp_path / "run"), "--params", str(params)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmprep")]
    assert len(err) == 1 and "train-000000.tar: corrupted shard" in err[0] and "Traceback" not in err[0]


def test_verify_reads_a_dataset_over_http(tiny, http_root, capsys):
    from mmprep.cli import main as cli

    root, url = http_root
    for f in tiny.iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    assert cli(["verify", "--data", url]) == 0
    data = bytearray((root / "val-000000.tar").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "val-000000.tar").write_bytes(bytes(data))
    assert cli(["verify", "--data", url + "/"]) == 1
    assert "val-000000.tar" in capsys.readouterr().err
