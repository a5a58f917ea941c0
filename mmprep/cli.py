"""The `mmprep` command. Subcommands import their heavy layers (Beam, torch) lazily."""

from __future__ import annotations

import argparse
import logging
import sys

from mmprep.config import ConfigError, load_params


def _demo_corpus(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmprep demo-corpus", description="Write the embedded demo corpus.")
    parser.add_argument("out", help="output directory (manifest.jsonl + media/)")
    parser.add_argument("--samples", type=int, default=None, help="number of samples (default: params or 2000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: params or 0)")
    parser.add_argument("--params", default=None, help="params.yaml (section demo_corpus)")
    args = parser.parse_args(argv)
    cfg = load_params(args.params).demo_corpus
    from mmprep.config import params_from_dict, to_dict

    overrides = {k: v for k, v in (("samples", args.samples), ("seed", args.seed)) if v is not None}
    cfg = params_from_dict({"demo_corpus": {**to_dict(cfg), **overrides}}).demo_corpus
    from mmprep.democorpus import write_demo_corpus

    summary = write_demo_corpus(args.out, **to_dict(cfg))  # the demo_corpus section is the function's keywords
    print(f"demo corpus: {summary.get('rows', cfg.samples)} rows → {args.out}/manifest.jsonl")
    return 0


class _QuietBeamImport(logging.Filter):
    """Beam logs a warning about optional GCP clients at import; it is noise for local runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def _prepare(argv: list[str]) -> int:
    logging.getLogger().addFilter(_QuietBeamImport())
    from pipelines.prepare import main

    return main(argv)


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmprep train", description="Train a fusion model on prepared shards.")
    parser.add_argument("--data", required=True, help="prepared dataset directory (mmprep prepare --output)")
    parser.add_argument("--output", required=True, help="run directory (checkpoints, model, metrics)")
    parser.add_argument("--params", default=None, help="params.yaml (section train)")
    parser.add_argument("--metrics", default=None, help="DVCLive directory (default RUN/dvclive)")
    args = parser.parse_args(argv)
    cfg = load_params(args.params).train
    from train.recipe import train

    train(args.data, args.output, cfg, live_dir=args.metrics)
    return 0


def _evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmprep evaluate", description="Evaluate a trained run on a split.")
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--model", required=True, help="run directory written by mmprep train")
    parser.add_argument("--output", required=True, help="metrics JSON to write (a PNG confusion matrix beside it)")
    parser.add_argument("--params", default=None, help="params.yaml (section evaluate)")
    args = parser.parse_args(argv)
    cfg = load_params(args.params).evaluate
    from train.evaluate import evaluate

    metrics = evaluate(args.data, args.model, args.output, cfg)
    ablation = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in metrics.get("ablation", {}).items() if v["accuracy"] is not None)
    print(f"accuracy {metrics['accuracy']:.3f}  macro_f1 {metrics['macro_f1']:.3f}  ({ablation}) → {args.output}")
    return 0


def _predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmprep predict", description="Classify one raw sample.")
    parser.add_argument("--model", required=True, help="run directory written by mmprep train")
    parser.add_argument("--image", default=None)
    parser.add_argument("--audio", default=None)
    parser.add_argument("--text", default=None)
    args = parser.parse_args(argv)
    if not (args.image or args.audio or args.text):
        parser.error("give at least one of --image, --audio, --text")
    from train.predict import predict

    result = predict(args.model, image=args.image, audio=args.audio, text=args.text)
    print(result["label"])
    for label, p in sorted(result["probabilities"].items(), key=lambda kv: -kv[1]):
        print(f"  {label:<30} {p:.3f}")
    return 0


def _inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmprep inspect", description="Summarize a prepared dataset.")
    parser.add_argument("out", help="prepared dataset directory")
    parser.add_argument("--examples", type=int, default=3, help="reject examples per reason")
    args = parser.parse_args(argv)
    from mmprep.inspection import inspect_dataset

    print(inspect_dataset(args.out, examples=args.examples))
    return 0


def _verify(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mmprep verify",
        description="Check every shard of a prepared dataset against dataset.json (bytes, sha256, sample count, "
        "members) and manifest.parquet (keys). Exits 1 naming each problem.",
    )
    parser.add_argument("--data", required=True, help="prepared dataset directory or http(s):// URL")
    args = parser.parse_args(argv)
    from mmprep.verify import verify

    problems, totals = verify(args.data)
    for problem in problems:
        print(f"mmprep verify: {problem}", file=sys.stderr)
    if problems:
        print(f"mmprep verify: {len(problems)} problem(s) in {args.data}", file=sys.stderr)
        return 1
    print(f"ok: {totals['shards']} shards, {totals['samples']:,} samples, {totals['bytes']:,} bytes match dataset.json → {args.data}")
    return 0


def _report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mmprep report",
        description="Write one self-contained HTML page about a prepared dataset (counts, rejects, distributions, "
        "a gallery with images, features and audio, duplicates and leakage, the dataset card); opens offline.",
    )
    parser.add_argument("--data", required=True, help="prepared dataset directory (mmprep prepare --output)")
    parser.add_argument("--output", default=None, help="HTML file to write (default DATA/report.html)")
    parser.add_argument("--training", default=None, help="the training report (mmprep evaluate's HTML) to link, if any")
    parser.add_argument("--per-label", type=int, default=3, help="gallery samples per label (default 3)")
    parser.add_argument("--max-labels", type=int, default=24, help="labels shown in the gallery, most frequent first (default 24)")
    args = parser.parse_args(argv)
    from mmprep.report import build_report

    path, info = build_report(args.data, args.output, per_label=args.per_label, max_labels=args.max_labels, training=args.training)
    print(f"report: {info['gallery']} gallery samples, {info['images']} images, {info['audio_clips']} audio clips, "
          f"{info['bytes'] / 1e6:.1f} MB in {info['seconds']:.1f}s → {path}")
    return 0


COMMANDS = {
    "demo-corpus": _demo_corpus,
    "prepare": _prepare,
    "train": _train,
    "evaluate": _evaluate,
    "predict": _predict,
    "inspect": _inspect,
    "verify": _verify,
    "report": _report,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = " | ".join(COMMANDS)
        print(f"usage: mmprep {{{names}}} …   (mmprep COMMAND --help for each)", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"mmprep: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, OSError, ValueError, FloatingPointError) as err:  # bad params/input/shards, NaN in training: one line
        print(f"mmprep {argv[0]}: error: {one_line(err)}", file=sys.stderr)
        return 2


def one_line(err: BaseException) -> str:
    """An error's message as one line. A DataLoader worker's error arrives re-raised with the
    worker's whole traceback in its message; its last line is what went wrong."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, message = last.partition(": ")
        text = message if sep and "." in name and " " not in name else last
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
