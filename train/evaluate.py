"""Evaluation on a split: accuracy, macro F1, per-class metrics, confusion matrix, accuracy
per presence pattern found in the data (e.g. image+audio for rows without text), and a
modality ablation (the same samples with only one modality present)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from mmprep.config import EvaluateConfig
from train import data as D
from train.data import MODALITIES
from train.model import FusionModel, Preprocess, build_model
from train.progress import progress_bar

ABLATIONS = {f"{m}_only": i for i, m in enumerate(MODALITIES)}


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
    model = build_model(spec, cfg)
    state = torch.load(os.path.join(run_dir, "model.pt"), map_location="cpu", weights_only=True)
    # runs from before absent modalities had no encoder carry weights for them: unused, dropped here
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    return model.to(device).eval(), Preprocess(spec).to(device), spec


def pattern_name(code: int) -> str:
    """Presence bits (image=1, audio=2, text=4, video=8) → "image+text"; no modality → "none"."""
    return "+".join(m for i, m in enumerate(MODALITIES) if code >> i & 1) or "none"


@torch.no_grad()
def predictions(model, prep, batches, device, bf16: bool = False) -> dict[str, np.ndarray]:
    """One pass: labels, the presence pattern of each sample (among the modalities the model
    uses), the prediction with every present modality and with each one alone (one encoding,
    a fusion pass per modality more)."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("label", "pattern", "all", *ABLATIONS)}
    index = torch.arange(len(MODALITIES), device=device)
    for batch in batches:
        batch = D.to_device(batch, device)
        present = batch["present"] & model.use
        image, audio, video = prep(batch, augment=False)
        out["label"].append(batch["label"].cpu().numpy())
        out["pattern"].append((present.long() << index).sum(1).cpu().numpy())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z = model.encode(image, audio, batch["text"], video, present, batch.get("audio_frames"))
            out["all"].append(model.classify(z, present).argmax(1).cpu().numpy())
            for name, m in ABLATIONS.items():
                alone = present & (index == m)
                out[name].append(model.classify(z, alone).argmax(1).cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}


def ablation(pred: dict[str, np.ndarray]) -> dict[str, tuple[float | None, int, int]]:
    """Per modality, over the labeled samples that have it: (accuracy with it alone or None,
    samples scored, samples without it) — samples without a modality cannot be scored on it alone."""
    labeled = pred["label"] >= 0
    y, pattern = pred["label"][labeled], pred["pattern"][labeled]
    out = {}
    for name, index in ABLATIONS.items():
        has = (pattern >> index & 1).astype(bool)
        accuracy = float((pred[name][labeled][has] == y[has]).mean()) if has.any() else None
        out[name] = (accuracy, int(has.sum()), int((~has).sum()))
    return out


def scores(y: np.ndarray, p: np.ndarray, names: list[str]) -> dict[str, Any]:
    k = len(names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(k), where=cm.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    support = cm.sum(1)
    # macro F1 over the classes in the split or in the predictions (as scikit-learn's default): a
    # class predicted but absent from the split scores 0 and counts, it is not dropped
    present = (support > 0) | (cm.sum(0) > 0)
    return {
        "accuracy": float(tp.sum() / max(1, cm.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            n: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, n in enumerate(names)
        },
        "confusion_matrix": cm.tolist(),
    }


# what may differ between the data a model was trained on and data it is evaluated on
_FREE = {"mean", "std"}  # statistics of the data (the model keeps its own normalization)


def check_compatible(spec: dict[str, Any], data_spec: dict[str, Any], run_dir: str, data_dir: str,
                     used: set[str] | None = None) -> None:
    """The data must look like the model's: the same labels, and for each modality the model uses
    (`used`, default: every one of its training data) that the data has, the same features (image
    size, mel bins/frames, max tokens, vocabulary, and the same tokenizer: the same token ids). A
    modality the model has no encoder for is ignored; one the data lacks is missing."""
    if data_spec["labels"] != spec["labels"]:
        raise ValueError(f"{data_dir} has other labels than the model in {run_dir} was trained on")
    if used is not None and not used & set(data_spec["features"]):  # every sample "none": the model could only guess
        raise ValueError(f"{data_dir} has none of the modalities the model in {run_dir} uses ({', '.join(sorted(used))}; "
                         f"the data has {', '.join(sorted(data_spec['features'])) or 'none'})")
    for modality, theirs in sorted(spec["features"].items()):
        ours = data_spec["features"].get(modality)
        if ours is None or (used is not None and modality not in used):
            continue
        differ = sorted(k for k in set(ours) | set(theirs) if k not in _FREE and ours.get(k) != theirs.get(k))
        if differ:
            raise ValueError(f"{data_dir} was prepared with other {modality} features than the model in {run_dir} "
                             f"({', '.join(f'{k} {ours.get(k)}, the model: {theirs.get(k)}' for k in differ)})")
        if modality == "text" and _tokenizer_sha(data_dir) != _tokenizer_sha(run_dir):
            raise ValueError(f"{data_dir} has another tokenizer than the model in {run_dir} was trained with (other token ids)")


def _tokenizer_sha(directory: str) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(D.read_bytes(directory, "tokenizer.model")).hexdigest()
    except FileNotFoundError:  # a hand-made dataset without one
        return None


def evaluate(data_dir: str, run_dir: str, output_json: str, cfg: EvaluateConfig) -> dict[str, Any]:
    _check_writable(output_json)  # before the evaluation, not after it
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, prep, spec = load_run(run_dir, device)
    data_spec = D.load_spec(data_dir)
    used = {m for m, active in zip(MODALITIES, model.active, strict=True) if active}
    check_compatible(spec, data_spec, run_dir, data_dir, used)
    if not data_spec["splits"].get(cfg.split, {}).get("samples"):
        raise ValueError(f"{data_dir}: the {cfg.split} split has no samples (evaluate.split picks another)")
    urls = D.shard_urls(data_dir, data_spec, cfg.split)
    # the model's features; a modality the model has no encoder for is read as the data has it (and unused)
    shapes = D.Shapes.from_spec({"features": {**data_spec["features"],
                                              **{m: f for m, f in spec["features"].items() if m in used}}})
    names = spec["labels"]
    total = -(-data_spec["splits"][cfg.split]["samples"] // cfg.batch_size)
    stream = _shown(D.EvalStream(urls, shapes, cfg.batch_size, data_spec.get("shards")), total, f"[evaluate] {cfg.split}")
    pred = predictions(model, prep, stream, device)
    labeled = pred["label"] >= 0
    if not labeled.any():
        raise ValueError(f"{data_dir}: the {cfg.split} split has no labeled samples to score ({len(labeled)} unlabeled)")
    y, p, pattern = pred["label"][labeled], pred["all"][labeled], pred["pattern"][labeled]
    metrics = {"split": cfg.split, "samples": int(len(y)), "unlabeled_skipped": int((~labeled).sum()), **scores(y, p, names)}
    # every labeled sample is scored above, also one without any modality the model uses
    # ("none": the model can only guess); here the accuracy of each presence pattern found
    metrics["by_presence"] = {
        pattern_name(code): {"accuracy": float((y[pattern == code] == p[pattern == code]).mean()),
                             "samples": int((pattern == code).sum())}
        for code in sorted(set(pattern.tolist()), key=lambda c: (-bin(c).count("1"), c))
    }
    metrics["ablation"] = {name: {"accuracy": acc, "samples": n, "without_modality": without}
                           for name, (acc, n, without) in ablation(pred).items()}
    tmp = f"{output_json}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, output_json)
    base = os.path.splitext(output_json)[0]
    confusion = plot_confusion(np.array(metrics["confusion_matrix"]), names, base + "_confusion.png")
    write_html(metrics, run_dir, data_dir, confusion, base + ".html")
    return metrics


def _check_writable(output_json: str) -> None:
    """The metrics file's directory exists (made) and takes a file: a bad --output fails at once."""
    tmp = f"{output_json}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output_json)), exist_ok=True)
        if os.path.isdir(output_json):
            raise IsADirectoryError(f"{output_json} is a directory")
        with open(tmp, "w", encoding="utf-8"):
            pass
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"--output {output_json}: cannot write there ({e.strerror or e})") from None


def _shown(batches, total: int, desc: str):
    """Batches with progress: a tqdm bar on a terminal, else a plain line every ~10 %."""
    bar = progress_bar(total, desc, "batch", leave=True)
    started = time.perf_counter()
    for i, batch in enumerate(batches, 1):
        yield batch
        if bar is not None:
            bar.update()
        elif i == total or i % max(1, total // 10) == 0:
            rate = i / max(1e-9, time.perf_counter() - started)
            print(f"{desc}: batch {i}/{total} ({rate:.1f} batches/s, ETA {(total - i) / rate:.0f}s)", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()


def write_html(metrics: dict[str, Any], run_dir: str, data_dir: str, confusion_png: bytes, path: str) -> None:
    """The training report beside the metrics: headline figures, per-class metrics, the
    confusion matrix, the modality ablation and presence patterns, the training curves; one
    self-contained file (images inline, no script), linked from `mmprep report`."""
    from mmprep.webpage import cards, img, page, table

    headline = cards([("accuracy", f"{metrics['accuracy']:.3f}"), ("macro F1", f"{metrics['macro_f1']:.3f}"),
                      (f"{metrics['split']} samples scored", metrics["samples"]),
                      ("unlabeled, skipped", metrics["unlabeled_skipped"])])
    per_class = table(["label", "precision", "recall", "F1", "support"],
                      [[n, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
                       for n, v in metrics["per_class"].items()], numeric=(1, 2, 3, 4))
    ablation_rows = [[name, "—" if v["accuracy"] is None else f"{v['accuracy']:.3f}", v["samples"], v.get("without_modality", "")]
                     for name, v in metrics["ablation"].items()]
    presence_rows = [[name, f"{v['accuracy']:.3f}", v["samples"]] for name, v in metrics["by_presence"].items()]
    curves = os.path.join(run_dir, "curves.png")
    history = ""
    if os.path.exists(curves):
        with open(curves, "rb") as f:
            history = img("image/png", f.read(), "training curves: train loss and val accuracy per epoch")
    config = os.path.join(run_dir, "train_config.json")
    params = ""
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            params = "<pre>" + json.dumps(json.load(f)["train"], indent=1).replace("<", "&lt;") + "</pre>"
    sections = [
        ("summary", "Summary", headline),
        ("per-class", "Per class", per_class),
        ("confusion", "Confusion matrix", img("image/png", confusion_png, "confusion matrix: true label by predicted label")),
        ("ablation", "Modality ablation",
         '<p class="sub">Accuracy with only one modality given to the model (the others masked as absent), and by '
         "the modalities each sample actually has.</p>"
         + table(["input", "accuracy", "samples", "without modality"], ablation_rows, numeric=(1, 2, 3))
         + table(["modalities present", "accuracy", "samples"], presence_rows, numeric=(1, 2))),
        ("training", "Training", history + params),
    ]
    from mmprep.webpage import esc

    subtitle = f"model {esc(os.path.abspath(run_dir))} · data {esc(os.path.abspath(data_dir))} · split {esc(metrics['split'])}"
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page("mmprep training report", subtitle, sections))
    os.replace(tmp, path)


def plot_confusion(cm: np.ndarray, names: list[str], path: str) -> bytes:
    """The confusion matrix as a PNG file at `path`; returns its bytes (for the HTML report)."""
    from mmprep.webpage import pyplot

    plt = pyplot()

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
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    with open(path, "rb") as f:
        return f.read()
