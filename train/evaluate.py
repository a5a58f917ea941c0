"""Evaluation on a split: accuracy, macro F1, per-class metrics, confusion matrix, and a
modality ablation (the same test set with only one modality present)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from mmprep.config import EvaluateConfig
from train import data as D
from train.model import FusionModel, Preprocess

ABLATIONS = {"image_only": 0, "audio_only": 1, "text_only": 2}


def load_run(run_dir: str, device: torch.device) -> tuple[FusionModel, Preprocess, dict[str, Any]]:
    """Model + preprocessing from a self-contained run directory (weights_only loading)."""
    if not os.path.isfile(os.path.join(run_dir, "dataset.json")):
        raise FileNotFoundError(f"{run_dir}: not a run directory written by `mmprep train` (no dataset.json)")
    spec = D.load_spec(run_dir)
    config_path = os.path.join(run_dir, "train_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: --model must be a run directory written by `mmprep train`")
    with open(config_path, encoding="utf-8") as f:
        cfg = json.load(f)["train"]
    model = FusionModel(spec, cfg["fusion"], cfg["width"], cfg["text_encoder"])
    model.load_state_dict(torch.load(os.path.join(run_dir, "model.pt"), map_location="cpu", weights_only=True))
    return model.to(device).eval(), Preprocess(spec).to(device), spec


@torch.no_grad()
def predictions(model, prep, batches, device, only: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    labels, preds = [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        present = batch["present"]
        if only is not None:
            keep = torch.zeros_like(present)
            keep[:, only] = True
            present = present & keep
        image, audio = prep(batch, augment=False)
        logits = model(image, audio, batch["text"], present)
        usable = present.any(dim=1) & (batch["label"] >= 0)
        labels.append(batch["label"][usable].cpu().numpy())
        preds.append(logits.argmax(1)[usable].cpu().numpy())
    return np.concatenate(labels or [np.zeros(0, int)]), np.concatenate(preds or [np.zeros(0, int)])


def scores(y: np.ndarray, p: np.ndarray, names: list[str]) -> dict[str, Any]:
    k = len(names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(k), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    support = cm.sum(1)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / max(1, cm.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            n: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, n in enumerate(names)
        },
        "confusion_matrix": cm.tolist(),
    }


def evaluate(data_dir: str, run_dir: str, output_json: str, cfg: EvaluateConfig) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, prep, spec = load_run(run_dir, device)
    data_spec = D.load_spec(data_dir)
    if data_spec["labels"] != spec["labels"]:
        raise ValueError(f"{data_dir} has other labels than the model in {run_dir} was trained on")
    urls = D.shard_urls(data_dir, data_spec, cfg.split)
    shapes = D.Shapes.from_spec(spec)
    names = spec["labels"]
    y, p = predictions(model, prep, D.EvalStream(urls, shapes, cfg.batch_size, data_spec.get("shards")), device)
    metrics = {"split": cfg.split, "samples": int(len(y)), **scores(y, p, names)}
    metrics["ablation"] = {}
    for name, index in ABLATIONS.items():
        ya, pa = predictions(model, prep, D.EvalStream(urls, shapes, cfg.batch_size, data_spec.get("shards")), device, only=index)
        metrics["ablation"][name] = {"accuracy": float((ya == pa).mean()) if len(ya) else 0.0, "samples": int(len(ya))}
    os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
    tmp = f"{output_json}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, output_json)
    plot_confusion(np.array(metrics["confusion_matrix"]), names, os.path.splitext(output_json)[0] + "_confusion.png")
    return metrics


def plot_confusion(cm: np.ndarray, names: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6, color="black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
