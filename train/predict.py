"""Classify one raw sample through the very same mmprep functions the Beam pipeline used."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from mmprep.config import params_from_dict
from mmprep.records import RawRow, RecordError, Reject
from train import data as D
from train.evaluate import load_run


def _read_input(path: str, modality: str, max_bytes: int) -> bytes:
    """A media file given to predict, read and checked as prepare reads one (same reject names)."""
    from mmprep.manifest import read_local

    data = read_local(path, max_bytes)
    if isinstance(data, RecordError):
        raise ValueError(f"the input is unusable: {data.reason} (--{modality} {data.detail})")
    return data


def predict(run_dir: str, image: str | None = None, audio: str | None = None, text: str | None = None,
            video: str | None = None) -> dict[str, Any]:
    from mmprep.process import process_row
    from mmprep.tokenizer import Tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, prep, spec = load_run(run_dir, device)
    given = {"image": image, "audio": audio, "text": text, "video": video}
    known = {m for m, used in zip(D.MODALITIES, model.active, strict=True) if used}
    unknown = [m for m, v in given.items() if v is not None and m not in known]
    if unknown:
        raise ValueError(f"this model was not trained on {' or '.join(unknown)} (it uses {', '.join(sorted(known)) or 'nothing'})")
    if text is not None and not os.path.isfile(os.path.join(run_dir, "tokenizer.model")):
        raise ValueError(f"{run_dir} has no tokenizer.model: --text cannot be encoded for this model")
    cfg = params_from_dict({"prepare": spec["params"]["prepare"]}).prepare
    row = RawRow(source="predict", order=0, id="predict", image=image, audio=audio, text=text, video=video)
    loaded: dict[str, Any] = {m: _read_input(p, m, cfg.max_file_bytes) for m, p in (("image", image), ("audio", audio), ("video", video)) if p}
    if text is not None:
        loaded["text"] = text
    sample = process_row(row, loaded, _unlabeled(cfg))
    if isinstance(sample, Reject):
        raise ValueError(f"the input is unusable: {sample.reason} ({sample.detail})")
    raw: dict[str, Any] = {"key": "predict", "label": -1}
    if sample.jpg is not None:
        from mmprep.image import decode_jpg

        raw["image"] = np.ascontiguousarray(decode_jpg(sample.jpg).transpose(2, 0, 1))
    if sample.mel is not None:
        raw["audio"] = np.asarray(sample.mel, dtype=np.float32)
    if sample.text is not None:
        tok = Tokenizer.from_file(os.path.join(run_dir, "tokenizer.model"))
        raw["text"] = tok.encode(sample.text, cfg.text.max_tokens).astype(np.int64)
    if sample.video is not None:
        raw["video"] = D.decode_strip(sample.video)
    batch = D.to_device(D.collate([raw], D.Shapes.from_spec(spec)), device)
    with torch.no_grad():
        image_t, audio_t, video_t = prep(batch, augment=False)
        logits = model(image_t, audio_t, batch["text"], video_t, batch["present"])
        probs = torch.softmax(logits.float(), dim=1)[0].cpu()
    labels = spec["labels"]
    best = int(probs.argmax())
    return {"label": labels[best], "probabilities": {lab: float(p) for lab, p in zip(labels, probs, strict=True)}}


def _unlabeled(cfg):
    """Inference rows carry no label: never reject them for that."""
    from dataclasses import replace

    return replace(cfg, label=replace(cfg.label, unlabeled="keep", labels=()))
