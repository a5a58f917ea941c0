"""Fusion against single-modality baselines, same recipe and budget (run by hand).

    python benchmarks/fusion_bench.py [--corpora demo redundant] [--fusions concat attention …]
                                      [--set train.aux_loss=0 …] [--work DIR]

For each corpus — the demo (the label needs all three modalities) and the redundant one
(`demo_corpus.task: redundant`: every modality carries the label with its own reliability and
30 % of the rows miss one modality) — it writes and prepares the corpus once, then trains with
params.yaml's train section (plus `--set` overrides):
  * one baseline per modality (`train.modalities: [m]`, the other inputs unseen; always
    params.yaml's recipe, so `--set` variants of the fusion recipe share them),
  * the fusion model in each fusion mode,
and evaluates each on the test split. It prints, per fusion model, accuracy ÷ the best
baseline's accuracy, and each single-modality ablation ÷ that modality's own baseline (both
scored on the test rows that have the modality); on the demo also how often a single-modality
prediction names the right shape / pitch / colour (its accuracy there is a draw among the 4–6
classes one modality allows). Results go to WORK/results-TAG.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmprep.config import EvaluateConfig, load_params, params_from_dict, to_dict  # noqa: E402

CORPORA = {"demo": {}, "redundant": {"task": "redundant", "missing": 0.3, "seed": 1}}
MODALITIES = ("image", "audio", "text")


def prepared(work: Path, corpus: str, samples: int, params: Path) -> Path:
    from mmprep.democorpus import write_demo_corpus

    src, out = work / corpus / "corpus", work / corpus / "prepared"
    if not (out / "dataset.json").exists():
        cfg = {**to_dict(load_params(params).demo_corpus), "samples": samples, **CORPORA[corpus]}
        write_demo_corpus(src, **cfg)
        cmd = [sys.executable, "-m", "mmprep.cli", "prepare", "--input", str(src / "manifest.jsonl"), "--output", str(out),
               "--params", str(params)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def run(data: Path, run_dir: Path, cfg) -> dict:
    from train.evaluate import evaluate
    from train.recipe import train

    if not (run_dir / "metrics.json").exists():
        t0 = time.perf_counter()
        train(str(data), str(run_dir), cfg)
        metrics = evaluate(str(data), str(run_dir), str(run_dir / "metrics.json"), EvaluateConfig())
        metrics["train_seconds"] = round(time.perf_counter() - t0, 1)
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return json.loads((run_dir / "metrics.json").read_text())


def reads_attribute(data: Path, run_dir: Path) -> dict[str, float]:
    """Demo corpus only: the share of single-modality predictions that name the right value of the
    attribute that modality shows (shape / pitch / colour word). One modality can only narrow the
    demo's label to 4 or 6 classes, so its accuracy is a draw among them; this is not."""
    import numpy as np
    import torch

    from train import data as D
    from train.evaluate import ABLATIONS, load_run, predictions

    model, prep, spec = load_run(str(run_dir), torch.device("cpu"))
    dspec = D.load_spec(str(data))
    pred = predictions(model, prep, D.EvalStream(D.shard_urls(str(data), dspec, "test"), D.Shapes.from_spec(spec), 128),
                       torch.device("cpu"))
    names, keep = spec["labels"], pred["label"] >= 0
    out = {}
    for key, part in ABLATIONS.items():
        has = keep & (pred["pattern"] >> part & 1).astype(bool)
        if has.any():
            parts = [(names[p].split("-") + [""] * 3)[part] == (names[y].split("-") + [""] * 3)[part]
                     for p, y in zip(pred[key][has], pred["label"][has], strict=True)]
            out[key] = float(np.mean(parts))
    return out


def overrides(pairs: list[str]) -> dict:
    out: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        section, _, name = key.partition(".")
        import yaml

        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--fusions", nargs="+", default=["concat", "weighted_sum", "product", "attention"])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", nargs="*", default=[], help="train.KEY=VALUE overrides (every run)")
    ap.add_argument("--work", default=str(ROOT / "build" / "fusion_bench"))
    args = ap.parse_args()
    work = Path(args.work)
    extra = overrides(args.set)
    recipe = {**to_dict(load_params(args.params).train), "log_every": 10**6}
    plain = params_from_dict({"train": recipe}).train  # the baselines: params.yaml's recipe, never --set
    base = params_from_dict({"train": {**recipe, **extra.get("train", {})}}).train
    tag = "-".join(f"{k}={v}" for k, v in sorted(extra.get("train", {}).items())) or "default"
    results: dict = {}
    for corpus in args.corpora:
        data = prepared(work, corpus, args.samples, Path(args.params))
        runs = work / corpus / "runs" / tag
        baselines = {m: run(data, work / corpus / "runs" / f"only-{m}", replace(plain, modalities=(m,))) for m in MODALITIES}
        best = max(b["accuracy"] for b in baselines.values())
        rows = {f"baseline {m}": {"accuracy": b["accuracy"], "own": b["ablation"][f"{m}_only"]["accuracy"]}
                for m, b in baselines.items()}
        if corpus == "demo":
            for m in MODALITIES:
                rows[f"baseline {m}"]["reads"] = reads_attribute(data, work / corpus / "runs" / f"only-{m}")
        for fusion in args.fusions:
            m = run(data, runs / fusion, replace(base, fusion=fusion))
            ratios = {mod: m["ablation"][f"{mod}_only"]["accuracy"] / baselines[mod]["ablation"][f"{mod}_only"]["accuracy"]
                      for mod in MODALITIES}
            rows[fusion] = {"accuracy": m["accuracy"], "fusion_vs_best": m["accuracy"] / best,
                            "ablation_vs_own": ratios, "by_presence": m["by_presence"], "train_seconds": m["train_seconds"]}
            if corpus == "demo":
                rows[fusion]["reads"] = reads_attribute(data, runs / fusion)
        results[corpus] = rows
        print(f"\n{corpus} ({tag}): test accuracy; ablation ÷ own baseline; fusion ÷ best baseline ({best:.3f})")
        for name, r in rows.items():
            reads = "   reads its attribute: " + "  ".join(f"{k} {v:.3f}" for k, v in r["reads"].items()) if "reads" in r else ""
            if name.startswith("baseline"):
                print(f"  {name:<18} {r['accuracy']:.3f}   (rows with the modality: {r['own']:.3f}){reads}")
            else:
                ratio = "  ".join(f"{k} {v:.2f}" for k, v in r["ablation_vs_own"].items())
                print(f"  {name:<18} {r['accuracy']:.3f}   ablation÷own: {ratio}   fusion÷best {r['fusion_vs_best']:.3f}{reads}")
    (work / f"results-{tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
