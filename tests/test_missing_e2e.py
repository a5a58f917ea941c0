"""End to end on data the demo never makes: a corpus whose rows lack a modality (and where each
modality alone carries the label) through the real Beam prepare, training, evaluate and predict."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmprep.config import EvaluateConfig, TrainConfig
from mmprep.democorpus import write_demo_corpus
from pipelines.prepare import main as prepare_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["attention"])
def test_rows_lacking_a_modality_go_through_prepare_train_evaluate_predict(tmp_path, fusion):
    from train.evaluate import evaluate
    from train.predict import predict
    from train.recipe import train

    corpus, data, run = tmp_path / "corpus", tmp_path / "data", tmp_path / "run"
    write_demo_corpus(corpus, samples=600, seed=5, dirt_ratio=0.0, task="redundant", missing=0.4)
    assert prepare_main(["--input", str(corpus / "manifest.jsonl"), "--output", str(data), "--params",
                         str(ROOT / "params.yaml")]) == 0
    lacking = {d["id"]: d["kind"][len("lacks_"):] for d in json.loads((corpus / "dirt.json").read_text())
               if d["kind"].startswith("lacks_")}
    kept = {r["id"]: r for r in pq.read_table(data / "manifest.parquet").to_pylist()}
    assert lacking and set(lacking) <= set(kept)  # kept, not rejected, and recorded as lacking it
    assert all(not kept[i][f"has_{m}"] for i, m in lacking.items())

    cfg = replace(TrainConfig(), fusion=fusion, width=48, epochs=6, batch_size=32, log_every=10**6, augment=False)
    train(str(data), str(run), cfg)
    m = evaluate(str(data), str(run), str(tmp_path / "m.json"), EvaluateConfig())
    patterns = m["by_presence"]
    assert "image+audio+text" in patterns and any(p.count("+") == 1 for p in patterns), patterns
    assert sum(p["samples"] for p in patterns.values()) == m["samples"]
    assert m["accuracy"] > 0.45, m  # 6 classes: chance 0.17; the best single modality shows 80 % of labels
    # the image and audio encoders learned alone (text, the least reliable, needs more than 480 rows)
    assert m["ablation"]["image_only"]["accuracy"] > 0.4 and m["ablation"]["audio_only"]["accuracy"] > 0.4, m["ablation"]
    assert all(a["samples"] + a["without_modality"] == m["samples"] for a in m["ablation"].values())

    # predict with every non-empty subset of raw inputs, through the run's own tokenizer
    rows = [json.loads(line) for n, line in enumerate((corpus / "manifest.jsonl").read_bytes().splitlines(), 1)
            if not any(d["line"] == n for d in json.loads((corpus / "dirt.json").read_text()))]
    row = next(r for r in rows if {"image", "audio", "text"} <= set(r))
    files = {"image": str(corpus / row["image"]), "audio": str(corpus / row["audio"]), "text": row["text"]}
    for n in range(1, 8):
        given = {k: v for i, (k, v) in enumerate(files.items()) if n >> i & 1}
        probs = predict(str(run), **given)["probabilities"]
        assert np.isfinite(list(probs.values())).all() and abs(sum(probs.values()) - 1) < 1e-4, given
