"""Training and evaluation where runs are stopped, resumed or pointed at other data."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mmprep.config import EvaluateConfig, TrainConfig
from train import recipe
from train.evaluate import evaluate
from train.recipe import train

sys.path.insert(0, str(Path(__file__).parent))
from factory import write_tiny_dataset  # noqa: E402

FAST = TrainConfig(width=16, epochs=2, batch_size=32, lr=3e-3, warmup_steps=5, log_every=1000, checkpoint_every=12,
                   modality_dropout=0.1, augment=False, shuffle_buffer=64)  # 12 batches an epoch: a checkpoint at each epoch's last


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _sha(path: Path) -> bytes:
    import hashlib

    return hashlib.sha256(path.read_bytes()).digest()


@pytest.mark.parametrize("killed_in", [1, 2])  # epoch 1's validation, and the last epoch's (after step == total)
def test_a_run_stopped_between_an_epochs_last_step_and_its_validation_resumes_with_that_epochs_metrics(tiny, tmp_path, monkeypatch,
                                                                                                       killed_in):
    train(str(tiny), str(tmp_path / "straight"), FAST, live_dir=str(tmp_path / "live-straight"))
    original, calls = recipe.validate, {"n": 0}

    def killed_in_validation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == killed_in:
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(recipe, "validate", killed_in_validation)
    with pytest.raises(KeyboardInterrupt):
        train(str(tiny), str(tmp_path / "resumed"), FAST, live_dir=str(tmp_path / "live-resumed"))
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)["step"] == 12 * killed_in
    train(str(tiny), str(tmp_path / "resumed"), FAST, live_dir=str(tmp_path / "live-resumed"))
    history = [json.loads((tmp_path / run / "train_config.json").read_text())["history"] for run in ("straight", "resumed")]
    assert [h["epoch"] for h in history[1]] == [1, 2] and history[0] == history[1]
    for name in ("model.pt", "checkpoints/best.pt"):
        assert _sha(tmp_path / "straight" / name) == _sha(tmp_path / "resumed" / name), name
    for live in ("live-straight", "live-resumed"):  # DVCLive's curves: one row per epoch, none lost or repeated
        rows = (tmp_path / live / "plots" / "metrics" / "train" / "train_loss.tsv").read_text().splitlines()
        assert len(rows) == 3, rows
    assert json.loads((tmp_path / "live-straight" / "metrics.json").read_text()) == json.loads((tmp_path / "live-resumed" / "metrics.json").read_text())


def test_a_run_resumed_with_another_loader_worker_count_is_refused(tiny, tmp_path):
    run = tmp_path / "run"
    train(str(tiny), str(run), replace(FAST, epochs=1, max_steps=3))
    # the loader's workers deal the shards: another worker count is another sample stream
    with pytest.raises(ValueError, match=r"other train params \(num_workers\): use a new --output"):
        train(str(tiny), str(run), replace(FAST, epochs=1, num_workers=2))


def test_a_run_directory_resumed_on_other_data_is_refused_in_one_line(tiny, tmp_path):
    run = tmp_path / "run"
    train(str(tiny), str(run), replace(FAST, epochs=1, max_steps=3))
    other = write_tiny_dataset(tmp_path / "other", seed=1)  # the same shapes: it would load and go on silently
    with pytest.raises(ValueError, match=r"was trained on other data \(.*other/dataset.json differs, run vs data: the shards\): "
                                         r"use a new --output"):
        train(str(other), str(run), replace(FAST, epochs=1))
    smaller = write_tiny_dataset(tmp_path / "smaller", per_split={"train": 96, "val": 64, "test": 64})
    with pytest.raises(ValueError, match=r"run vs data: train samples 384 vs 96\)"):
        train(str(smaller), str(run), replace(FAST, epochs=1))
    size = _edited(tiny, tmp_path / "size", lambda s: s["features"]["image"].update(size=64))  # load_state_dict's RuntimeError before
    with pytest.raises(ValueError, match=r"run vs data: image size 32 vs 64\): use a new --output or delete it$"):
        train(str(size), str(run), replace(FAST, epochs=1))
    no_text = write_tiny_dataset(tmp_path / "no_text", missing={"text": 1.0})
    with pytest.raises(ValueError, match=r"run vs data: text present vs absent\)"):
        train(str(no_text), str(run), replace(FAST, epochs=1))


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    spec = json.loads((dst / "dataset.json").read_text())
    edit(spec)
    (dst / "dataset.json").write_text(json.dumps(spec))
    return dst


def test_evaluate_refuses_data_unlike_the_models_and_an_empty_split(tiny, tmp_path):
    run = tmp_path / "run"
    train(str(tiny), str(run), replace(FAST, epochs=1))
    out = str(tmp_path / "m.json")
    vocab = _edited(tiny, tmp_path / "vocab", lambda s: s["features"]["text"].update(vocab_size=s["features"]["text"]["vocab_size"] + 7))
    with pytest.raises(ValueError, match=r"other text features than the model .*\(vocab_size"):
        evaluate(str(vocab), str(run), out, EvaluateConfig())
    size = _edited(tiny, tmp_path / "size", lambda s: s["features"]["image"].update(size=2 * s["features"]["image"]["size"]))
    with pytest.raises(ValueError, match=r"other image features .*\(size"):
        evaluate(str(size), str(run), out, EvaluateConfig())
    (tmp_path / "tokenizer").mkdir()
    shutil.copytree(tiny, tmp_path / "tokenizer" / "data")
    (tmp_path / "tokenizer" / "data" / "tokenizer.model").write_bytes(b"another model")
    with pytest.raises(ValueError, match=r"another tokenizer"):
        evaluate(str(tmp_path / "tokenizer" / "data"), str(run), out, EvaluateConfig())
    statistics = _edited(tiny, tmp_path / "stats", lambda s: s["features"]["image"].update(mean=[0.1, 0.2, 0.3]))
    assert evaluate(str(statistics), str(run), out, EvaluateConfig())["samples"] == 64  # other statistics: the model keeps its own
    empty = _edited(tiny, tmp_path / "empty", lambda s: s["splits"]["val"].update(samples=0, shards=[]))
    with pytest.raises(ValueError, match=r"the val split has no samples"):
        evaluate(str(empty), str(run), out, EvaluateConfig(split="val"))


def test_a_model_without_some_modalities_evaluates_on_data_that_has_them(tmp_path):
    images = write_tiny_dataset(tmp_path / "images", missing={"audio": 1.0, "text": 1.0})
    full = write_tiny_dataset(tmp_path / "full")
    run = tmp_path / "run"
    train(str(images), str(run), replace(FAST, epochs=1))
    metrics = evaluate(str(full), str(run), str(tmp_path / "m.json"), EvaluateConfig())
    assert metrics["samples"] == 64 and set(metrics["by_presence"]) == {"image"}


def test_a_model_that_does_not_use_a_modality_ignores_its_features_in_the_data(tiny, tmp_path):
    run = tmp_path / "run"
    train(str(tiny), str(run), replace(FAST, epochs=1, modalities=("image", "audio")))  # the data has text; the model no encoder
    out = str(tmp_path / "m.json")
    vocab = _edited(tiny, tmp_path / "vocab", lambda s: s["features"]["text"].update(vocab_size=99, max_tokens=4))
    (vocab / "tokenizer.model").write_bytes(b"another model")
    metrics = evaluate(str(vocab), str(run), out, EvaluateConfig())
    assert metrics["samples"] == 64 and set(metrics["by_presence"]) == {"image+audio"}
    mel = _edited(tiny, tmp_path / "mel", lambda s: s["features"]["audio"].update(frames=40))  # one it uses: refused
    with pytest.raises(ValueError, match=r"other audio features than the model .*\(frames 40, the model: 20\)"):
        evaluate(str(mel), str(run), out, EvaluateConfig())
    text_only = write_tiny_dataset(tmp_path / "text_only", missing={"image": 1.0, "audio": 1.0})
    with pytest.raises(ValueError, match=r"has none of the modalities the model in .* uses \(audio, image; the data has text\)"):
        evaluate(str(text_only), str(run), out, EvaluateConfig())


def test_evaluate_on_an_empty_split_is_one_line_and_a_failure(tiny, tmp_path, capsys):
    from mmprep.cli import main as cli

    run = tmp_path / "run"
    train(str(tiny), str(run), replace(FAST, epochs=1, max_steps=2))
    empty = _edited(tiny, tmp_path / "empty", lambda s: s["splits"]["test"].update(samples=0, shards=[]))
    capsys.readouterr()
    assert cli(["evaluate", "--data", str(empty), "--model", str(run), "--output", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmprep evaluate: error: ") and str(empty) in err[0], err
    assert "the test split has no samples" in err[0] and not (tmp_path / "m.json").exists()


def test_a_batch_larger_than_the_train_split_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_size 1000 is more than the 384 samples"):
        train(str(tiny), str(tmp_path / "run"), replace(FAST, batch_size=1000))
    from train.data import make_loader  # the loader for your own loop refuses it too

    with pytest.raises(ValueError, match=r"batch_size 200 x 2 ranks is more than the 384 samples of the train split"):
        make_loader(str(tiny), batch_size=200, world=2)
    assert [len(b["keys"]) for b in make_loader(str(tiny), batch_size=384)] == [384]  # the whole split: one batch


def test_evaluate_to_an_unwritable_output_fails_before_evaluating(tiny, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(str(tiny), str(run), replace(FAST, epochs=1, max_steps=2))
    from train import evaluate as ev

    evaluated = []
    monkeypatch.setattr(ev, "predictions", lambda *a, **k: evaluated.append(1))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"--output .*m\.json: cannot write there"):
        evaluate(str(tiny), str(run), str(blocker / "m.json"), EvaluateConfig())
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ValueError, match=r"dir\.json is a directory"):
        evaluate(str(tiny), str(run), str(tmp_path / "dir.json"), EvaluateConfig())
    assert not evaluated and not list(tmp_path.glob("**/*.tmp"))


def test_data_without_labels_is_refused_in_one_line(tiny, tmp_path):
    unlabeled = _edited(tiny, tmp_path / "unlabeled", lambda s: s.update(labels=[]))
    with pytest.raises(ValueError, match=r"the train split has no labeled samples .*nothing to learn"):
        train(str(unlabeled), str(tmp_path / "run"), FAST)
    assert not (tmp_path / "run" / "model.pt").exists()


def test_the_same_command_after_a_finished_run_keeps_its_record_and_fewer_steps_are_refused(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = replace(FAST, epochs=2)
    first = train(str(tiny), str(run), cfg)
    record = (run / "train_config.json").read_bytes()
    capsys.readouterr()
    assert train(str(tiny), str(run), cfg) == json.loads(record)["result"] == first | {}
    assert "is complete (24 steps, 2 epochs): nothing to do" in capsys.readouterr().err
    assert (run / "train_config.json").read_bytes() == record
    with pytest.raises(ValueError, match=r"is at step 24, past the 12 steps these params make"):
        train(str(tiny), str(run), replace(cfg, epochs=1))


def test_a_run_without_a_val_split_writes_strict_json(tmp_path):
    data = write_tiny_dataset(tmp_path / "noval", per_split={"train": 384, "val": 0, "test": 64}, shards={"train": 3, "val": 0, "test": 1})
    run = tmp_path / "run"
    result = train(str(data), str(run), replace(FAST, epochs=1))
    text = (run / "train_config.json").read_text()
    assert "NaN" not in text and result["best_val_accuracy"] is None
    saved = json.loads(text)
    assert saved["result"]["best_val_accuracy"] is None and saved["history"][0]["val_accuracy"] is None


def test_evaluate_on_a_split_without_labels_is_one_line_not_a_crash(tiny, tmp_path):
    run = tmp_path / "run"
    train(str(tiny), str(run), replace(FAST, epochs=1, max_steps=2))
    data = write_tiny_dataset(tmp_path / "unlabeled_test", unlabeled=("test",))  # same features, test rows without labels
    with pytest.raises(ValueError, match=r"the test split has no labeled samples to score \(64 unlabeled\)"):
        evaluate(str(data), str(run), str(tmp_path / "m.json"), EvaluateConfig())
    assert evaluate(str(data), str(run), str(tmp_path / "m.json"), EvaluateConfig(split="val"))["samples"] == 64



def test_macro_f1_counts_a_class_predicted_but_absent_from_the_split():
    """Predicting a class the split lacks is a mistake macro F1 must show (scikit-learn's default
    averages over the classes in the labels or the predictions)."""
    from train.evaluate import scores

    y = np.array([0, 0, 1, 1])
    exact = scores(y, y.copy(), ["a", "b", "c"])
    wrong = scores(y, np.array([0, 2, 1, 1]), ["a", "b", "c"])  # one "a" called "c", a class with no sample
    assert exact["macro_f1"] == 1.0
    # a: P 1, R 0.5 → 2/3; b: 1; c: 0 (predicted once, never right) → (2/3 + 1 + 0) / 3
    assert wrong["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
