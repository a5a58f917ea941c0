"""Missing modalities are first-class: finite logits for every fusion mode, text encoder and
presence pattern (train and eval mode, CPU and CUDA, eager and compiled); training on data where a
modality is missing or absent; a NaN stops training at once, naming the batch; predict with any
subset of inputs."""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmprep import cli
from mmprep.config import EvaluateConfig, TrainConfig
from train.evaluate import evaluate
from train.model import FUSIONS, FusionModel
from train.recipe import train

sys.path.insert(0, str(Path(__file__).parent))
from factory import write_tiny_dataset  # noqa: E402

SPEC = {"features": {"image": {"size": 32}, "audio": {"bins": 16}, "text": {"vocab_size": 40, "pad_id": 0, "max_tokens": 8},
                     "video": {"frames": 4, "size": 16}},
        "labels": list("abcdefgh")}
PATTERNS = list(itertools.product([False, True], repeat=4))  # all 16, the empty one included
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST = TrainConfig(width=32, epochs=2, batch_size=32, lr=3e-3, warmup_steps=5, log_every=1000, checkpoint_every=1000,
                   augment=False, shuffle_buffer=64)


def _batch(device: str, tokens: int = 8) -> tuple[torch.Tensor, ...]:
    """One row per presence pattern; an absent modality is what the loader makes of it (zeros, pads)."""
    g = torch.Generator().manual_seed(0)
    present = torch.tensor(PATTERNS, dtype=torch.bool)
    n = len(PATTERNS)
    image = torch.randn(n, 3, 32, 32, generator=g) * present[:, 0, None, None, None]
    audio = torch.randn(n, 16, 20, generator=g) * present[:, 1, None, None]
    text = torch.randint(1, 40, (n, tokens), generator=g) * present[:, 2, None]
    video = torch.randn(n, 4, 3, 16, 16, generator=g) * present[:, 3, None, None, None, None]
    return tuple(t.to(device) for t in (image, audio, text, video, present))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("encoder", ["transformer", "gru"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_logits_are_finite_for_every_presence_pattern(fusion, encoder, device):
    model = FusionModel(SPEC, fusion, 32, encoder, aux_heads=True, video_encoder="gru" if encoder == "transformer" else "attention")
    model = model.to(device)
    assert model.use.all()
    image, audio, text, video, present = _batch(device)
    no_text_at_all = torch.zeros(len(PATTERNS), 1, dtype=torch.long, device=device)  # a batch where no row has text
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.set_grad_enabled(mode == "train"):  # eval + no_grad is the Transformer fast path (was NaN)
            logits, aux = model(image, audio, text, video, present, with_aux=True)
            assert torch.isfinite(logits).all(), (mode, torch.isfinite(logits).all(1).tolist())
            assert torch.isfinite(aux).all(), mode
            no_text = present & torch.tensor([1, 1, 0, 1], dtype=torch.bool, device=device)
            assert torch.isfinite(model(image, audio, no_text_at_all, video, no_text)).all(), mode
    # an absent modality cannot influence the output, whatever its tensor holds (NaN × 0 was NaN)
    model.eval()
    poisoned, poisoned_video = image.clone(), video.clone()
    poisoned[~present[:, 0]] = float("nan")
    poisoned_video[~present[:, 3]] = float("nan")
    with torch.no_grad():
        assert torch.equal(model(poisoned, audio, text, poisoned_video, present), model(image, audio, text, video, present))


@pytest.mark.slow
@pytest.mark.parametrize("fusion", FUSIONS)
def test_compiled_model_gives_finite_logits_for_every_presence_pattern(fusion):
    model = FusionModel(SPEC, fusion, 32, "transformer", aux_heads=True)
    image, audio, text, video, present = _batch("cpu")
    compiled = torch.compile(model)
    model.train()
    logits, aux = compiled(image, audio, text, video, present, with_aux=True, fused=present)  # what the recipe calls
    assert torch.isfinite(logits).all() and torch.isfinite(aux).all()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(compiled(image, audio, text, video, present)).all()


@pytest.fixture(scope="module")
def gappy(tmp_path_factory) -> Path:
    """A third of the rows miss their text, a quarter their audio; there is no image at all."""
    return write_tiny_dataset(tmp_path_factory.mktemp("gappy"), missing={"image": 1.0, "text": 0.33, "audio": 0.25})


@pytest.mark.parametrize("fusion", FUSIONS)
def test_training_on_rows_missing_modalities_scores_every_pattern(gappy, tmp_path, fusion):
    train(str(gappy), str(tmp_path / "run"), replace(FAST, fusion=fusion, epochs=4))
    m = evaluate(str(gappy), str(tmp_path / "run"), str(tmp_path / "m.json"), EvaluateConfig())
    patterns = m["by_presence"]
    assert set(patterns) == {"audio+text", "audio", "text"}, patterns  # what the test split holds, nothing else
    assert sum(p["samples"] for p in patterns.values()) == m["samples"] == 64
    # without the image bit, audio+text can tell 4 of the 8 classes apart (limit 0.5, chance 0.125)
    assert patterns["audio+text"]["accuracy"] >= 0.35, patterns
    assert m["ablation"]["image_only"] == {"accuracy": None, "samples": 0, "without_modality": 64}
    assert m["ablation"]["text_only"]["samples"] + m["ablation"]["text_only"]["without_modality"] == 64
    assert json.loads((tmp_path / "m.json").read_text())["by_presence"] == patterns


def test_a_nan_stops_training_at_once_naming_the_batch(tmp_path, capsys):
    data = write_tiny_dataset(tmp_path / "data", poison="train-00007")
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  width: 32\n  epochs: 3\n  batch_size: 32\n  augment: false\n  modality_dropout: 0.0\n"
                      "  single_modality: 0.0\n")
    code = cli.main(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--params", str(params)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("mmprep train: error: step ") and "non-finite logits in " in err[-1], err[-1]
    assert err[-1].endswith("non-finite audio input in key(s) train-00007 of shard(s) train-000001.tar"), err[-1]
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    data = write_tiny_dataset(tmp_path_factory.mktemp("t"))
    run = tmp_path_factory.mktemp("run")
    train(str(data), str(run), replace(FAST, fusion="attention"))
    return run


def test_predict_accepts_any_non_empty_subset_of_inputs(trained, tmp_path):
    """Raw files through the prepare functions: each subset gives finite probabilities summing to 1."""
    import cv2
    import numpy as np
    import soundfile as sf

    from train.predict import predict

    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.full((40, 40, 3), 200, np.uint8))
    wav = tmp_path / "x.wav"
    sr = 16000
    sf.write(wav, 0.5 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr), sr)
    # the tiny dataset has no tokenizer.model: a model without a tokenizer refuses --text with a clear line
    for image, audio in ((str(img), None), (None, str(wav)), (str(img), str(wav))):
        probs = predict(str(trained), image=image, audio=audio)["probabilities"]
        assert all(np.isfinite(list(probs.values()))) and abs(sum(probs.values()) - 1) < 1e-4
    with pytest.raises(ValueError, match="no tokenizer.model"):
        predict(str(trained), image=str(img), text="hello")


def test_predict_names_a_missing_empty_or_special_file_as_prepare_would(trained, tmp_path):
    import os

    from train.predict import predict

    (tmp_path / "empty.png").write_bytes(b"")
    os.mkfifo(tmp_path / "pipe.png")  # reading it would wait for a writer forever
    for name, reason in (("nope.png", "missing_file"), ("empty.png", "empty_file"), ("pipe.png", "unreadable_file")):
        with pytest.raises(ValueError, match=f"the input is unusable: {reason} \\(--image .*{name}"):
            predict(str(trained), image=str(tmp_path / name))


def test_modality_dropout_never_adds_never_empties_and_leaves_singles():
    from train.model import modality_dropout

    g = torch.Generator().manual_seed(0)
    present = torch.tensor(PATTERNS[1:] * 500, dtype=torch.bool)  # every non-empty pattern
    for p, single in ((0.0, 1.0), (0.3, 0.0), (0.2, 0.2), (0.9, 0.5)):
        kept = modality_dropout(present, p, single, generator=g)
        assert not (kept & ~present).any()  # never a modality the sample lacks
        assert kept.any(dim=1).all()  # never none
        alone = (kept.sum(1) == 1) & (present.sum(1) == 4)
        share = alone.float().sum() / (present.sum(1) == 4).sum()
        if single == 1.0:
            assert share == 1.0
            # the kept modality is chosen at random, not always the first
            assert all(0.18 < kept[present.sum(1) == 4][:, m].float().mean() < 0.32 for m in range(4))
        elif p == 0.0:
            assert share == 0.0
