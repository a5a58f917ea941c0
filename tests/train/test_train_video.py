"""Video, the fourth modality: the temporal encoders learn what only motion tells (a single frame
cannot), video joins every fusion mode and the evaluation's ablation, and runs from before video
existed still load."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mmprep import cli
from mmprep.config import EvaluateConfig, TrainConfig
from train import data as D
from train.evaluate import evaluate
from train.model import FUSIONS, FusionModel, Preprocess, random_resized_crop
from train.recipe import train

sys.path.insert(0, str(Path(__file__).parent))
from factory import write_tiny_dataset  # noqa: E402
from motion import LABELS, clip, strip_jpeg, write_motion_dataset  # noqa: E402

FAST = TrainConfig(width=32, epochs=8, batch_size=32, lr=3e-3, warmup_steps=5, log_every=1000, checkpoint_every=1000,
                   augment=False, shuffle_buffer=64)
SPLITS = {"train": 512, "val": 64, "test": 256}


@pytest.fixture(scope="module")
def motion(tmp_path_factory) -> Path:
    return write_motion_dataset(tmp_path_factory.mktemp("motion"), SPLITS)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Half the rows are clips, the others an image (noise) only."""
    return write_motion_dataset(tmp_path_factory.mktemp("mixed"), {"train": 96, "val": 16, "test": 32}, video_share=0.5)


@pytest.fixture(scope="module")
def motion_run(motion, tmp_path_factory):
    """encoder → a run trained on the motion task through the command line, as a user runs it
    (trained once, on first use), and its training time in seconds."""
    runs: dict[str, tuple[Path, float]] = {}

    def get(encoder: str) -> tuple[Path, float]:
        if encoder not in runs:
            root = tmp_path_factory.mktemp(f"run-{encoder}")
            params = root / "params.yaml"
            params.write_text(f"train:\n  video_encoder: {encoder}\n  width: 32\n  epochs: 8\n  batch_size: 32\n  lr: 0.003\n"
                              "  warmup_steps: 5\n  augment: true\n  shuffle_buffer: 64\n  log_every: 1000\n")
            started = time.perf_counter()
            assert cli.main(["train", "--data", str(motion), "--output", str(root / "run"), "--params", str(params)]) == 0
            runs[encoder] = root / "run", time.perf_counter() - started
        return runs[encoder]

    return get


@pytest.mark.parametrize("encoder", ["gru", "attention"])
def test_temporal_encoders_learn_what_only_motion_tells(motion, motion_run, tmp_path, encoder):
    """The direction of a drifting square is all there is to learn; every single frame is uninformative."""
    run, seconds = motion_run(encoder)
    assert cli.main(["evaluate", "--data", str(motion), "--model", str(run), "--output", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    print(f"{encoder}: test accuracy {m['accuracy']:.3f}, trained in {seconds:.1f}s", file=sys.stderr)
    assert m["accuracy"] >= 0.9, m["accuracy"]  # chance is 0.5
    assert m["by_presence"] == {"video": {"accuracy": m["accuracy"], "samples": SPLITS["test"]}}
    assert m["ablation"]["video_only"] == {"accuracy": m["accuracy"], "samples": SPLITS["test"], "without_modality": 0}


def test_predict_classifies_a_video_file_through_the_prepare_functions(motion_run, tmp_path, capsys):
    """An mp4 (4x the frame size, 10 fps) goes through process_row as in `mmprep prepare`: frames
    sampled, resized, stacked into the strip, then the model."""
    import cv2

    from mmprep.clips import write_clip
    from train.predict import predict

    run, _ = motion_run("gru")
    rng = np.random.default_rng(5)
    for i in range(4):
        label = i % 2
        path = tmp_path / f"clip{i}.mp4"
        write_clip(str(path), [cv2.resize(f, (64, 64), interpolation=cv2.INTER_NEAREST) for f in clip(rng, label, 8, 16)], 10.0)
        result = predict(str(run), video=str(path))
        assert result["label"] == LABELS[label] and result["probabilities"][LABELS[label]] > 0.9, result
    assert cli.main(["predict", "--model", str(run), "--video", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == LABELS[label]


def test_one_frame_of_the_same_clips_stays_near_chance(tmp_path):
    """The control: the very same clips, each cut to its middle frame (T = 1)."""
    data = write_motion_dataset(tmp_path / "one", SPLITS, keep=slice(3, 4))
    assert D.load_spec(str(data))["features"]["video"]["frames"] == 1
    train(str(data), str(tmp_path / "run"), FAST)
    m = evaluate(str(data), str(tmp_path / "run"), str(tmp_path / "m.json"), EvaluateConfig())
    assert m["accuracy"] <= 0.65, m["accuracy"]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_mode_trains_on_rows_with_and_without_video(mixed, tmp_path, fusion):
    train(str(mixed), str(tmp_path / "run"), replace(FAST, fusion=fusion, max_steps=4, augment=True,
                                                      video_encoder="attention" if fusion == "product" else "gru"))
    m = evaluate(str(mixed), str(tmp_path / "run"), str(tmp_path / "m.json"), EvaluateConfig())
    assert set(m["by_presence"]) == {"image", "video"} and sum(p["samples"] for p in m["by_presence"].values()) == 32
    video, image = m["ablation"]["video_only"], m["ablation"]["image_only"]
    assert video["samples"] == m["by_presence"]["video"]["samples"] == image["without_modality"] > 0
    assert m["ablation"]["audio_only"] == {"accuracy": None, "samples": 0, "without_modality": 32}
    page = (tmp_path / "m.html").read_text()  # the training report lists them
    assert f"<td>video_only</td><td class=\"n\">{video['accuracy']:.3f}</td>" in page and "<td>video</td>" in page


def test_a_batch_without_clips_still_reaches_every_video_weight():
    """The video encoder runs on the rows that have a clip only; with none it runs on no rows, so
    its weights still get a (zero) gradient, as DistributedDataParallel requires of every step."""
    spec = {"features": {"image": {"size": 16}, "video": {"frames": 4, "size": 16}}, "labels": ["a", "b"]}
    model = FusionModel(spec, "attention", 32, "gru", aux_heads=True, video_encoder="attention")
    image, video = torch.randn(6, 3, 16, 16), torch.full((6, 4, 3, 16, 16), float("nan"))
    present = torch.tensor([[True, False, False, False]] * 6)
    logits, aux = model(image, torch.zeros(6, 1, 1), torch.zeros(6, 1, dtype=torch.long), video, present, with_aux=True)
    assert torch.isfinite(logits).all() and torch.isfinite(aux).all()
    (logits.sum() + aux.sum()).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.video.parameters())
    # one row with a clip: only that row is encoded, and its vector is what encoding it alone gives
    model.eval()
    present[2, 3] = True
    video[2] = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        z = model.encode(image, torch.zeros(6, 1, 1), torch.zeros(6, 1, dtype=torch.long), video, present)
        assert torch.allclose(z[2, 3], model.proj[3](model.video(video[2:3]))[0], atol=1e-6)
        assert not z[[0, 1, 3, 4, 5], 3].any()


def test_clip_augmentation_crops_all_frames_alike_and_never_mirrors():
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 16).expand(3, 16, 16)  # brighter to the right
    clips = ramp.expand(64, 4, 3, 16, 16).contiguous()
    out = random_resized_crop(clips.flatten(0, 1), flip=False, group=4).view_as(clips)
    assert torch.allclose(out, out[:, :1].expand_as(out))  # a clip's frames got the same crop
    assert (out[..., 8:].mean((-1, -2, -3)) > out[..., :8].mean((-1, -2, -3))).all()  # still brighter to the right
    assert not torch.allclose(out[0, 0], out[1, 0])  # and clips got different crops
    prep = Preprocess({"features": {"video": {"frames": 4, "size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}}})
    batch = {"image": torch.zeros(2, 3, 1, 1, dtype=torch.uint8), "audio": torch.zeros(2, 1, 5),
             "video": torch.full((2, 4, 3, 16, 16), 255, dtype=torch.uint8)}
    assert torch.allclose(prep(batch, augment=False)[2], torch.full((2, 4, 3, 16, 16), 2.0))  # (1 - 0.5) / 0.25


def test_a_strip_is_checked_against_dataset_json(motion):
    shapes = D.Shapes.from_spec(D.load_spec(str(motion)))
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    frames[..., 0] = (np.arange(8) * 30).reshape(8, 1, 1)  # frame t: red t * 30, in RGB order
    decoded = D.decode_sample({"__key__": "k", "video.jpg": strip_jpeg(frames)})["video"]
    assert decoded.shape == (8, 3, 16, 16) and decoded.dtype == np.uint8
    means = decoded.mean(axis=(2, 3))  # [T, RGB]: frame order and channel order kept
    assert np.abs(means - frames.mean(axis=(1, 2))).max() < 3, means
    with pytest.raises(D.ShardError, match="strip of 12x128 pixels is not a stack of 12x12 frames"):
        D.decode_sample({"__key__": "k", "video.jpg": strip_jpeg(frames[:, :, :12])})
    short = D.decode_sample({"__key__": "k", "video.jpg": strip_jpeg(frames[:6])})
    with pytest.raises(D.ShardError, match="video of 6 frames of 16 pixels, dataset.json says 8 of 16"):
        D.collate([short], shapes)
    batch = D.collate([{"label": 0, "video": decoded}, {"label": 1}], shapes)
    assert batch["present"].tolist() == [[False, False, False, True], [False, False, False, False]]
    assert batch["video"].shape == (2, 8, 3, 16, 16) and not batch["video"][1].any()


def test_hugging_face_reads_the_strip_as_an_image(mixed, tmp_path):
    import datasets

    spec = D.load_spec(str(mixed))
    features = D.hf_features(str(mixed))
    assert isinstance(features["video.jpg"], datasets.Image)
    files = {split: D.shard_urls(str(mixed), spec, split) for split in ("train", "val", "test")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        ds = datasets.load_dataset("webdataset", data_files=files, cache_dir=str(tmp_path / "hf"), features=features)
    rows = list(ds["test"])
    clips = [r for r in rows if r["video.jpg"] is not None]
    assert 0 < len(clips) < len(rows) and all(r["jpg"] is None for r in clips)
    assert all(r["video.jpg"].size == (16, 8 * 16) for r in clips)  # width, height: 8 frames of 16 stacked
    assert ds["test"].features["cls"].names == LABELS


def test_a_run_from_before_video_still_evaluates(tmp_path):
    """Its train params have no video_encoder (and the old three modalities), its dataset.json no
    video: the model is built as it was (a 3-slot fusion) and its weights load."""
    data = write_tiny_dataset(tmp_path / "data", per_split={"train": 64, "val": 16, "test": 16})
    run = tmp_path / "run"
    train(str(data), str(run), replace(FAST, fusion="product", epochs=1, modalities=("image", "audio", "text")))
    config = json.loads((run / "train_config.json").read_text())
    del config["train"]["video_encoder"]
    (run / "train_config.json").write_text(json.dumps(config))
    state = torch.load(run / "model.pt", weights_only=True)
    assert state["head.0.weight"].shape[1] == 7 * 32 and not any(k.startswith(("video.", "proj.3", "aux.3")) for k in state)
    m = evaluate(str(data), str(run), str(tmp_path / "m.json"), EvaluateConfig())
    assert m["samples"] == 16 and m["ablation"]["video_only"]["samples"] == 0

    from train.predict import predict

    with pytest.raises(ValueError, match="not trained on video"):
        predict(str(run), video=str(tmp_path / "any.mp4"))
