"""The `mmprep` command. Subcommands import their heavy layers (Beam, torch) lazily."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mmprep.config import ConfigError, load_params
from mmprep.console import HelpFormatter, Parser

DOCS = "README.md and docs/ (docs/data-contract.md: every file, member and column) in the mmprep repository"


def _parser(command: str, example: str, params: str | None) -> argparse.ArgumentParser:
    """A command's parser: its one-line description, an example, the params section it reads,
    -v/--verbose; no abbreviated options (a typo is an error, not another option)."""
    reads = f"reads params: the `{params}` section of --params (without --params: the built-in defaults of mmprep/config.py, not ./params.yaml)\n" if params else ""
    parser = Parser(prog=f"mmprep {command}", description=COMMANDS[command][1], formatter_class=HelpFormatter,
                                     allow_abbrev=False, epilog=f"example:\n  {example}\n\n{reads}docs: {DOCS}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: the libraries' logs and warnings too; -vv: debug")
    return parser


def _args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    from mmprep.console import set_verbosity

    set_verbosity(args.verbose)
    return args


def _demo_corpus(argv: list[str]) -> int:
    parser = _parser("demo-corpus", "mmprep demo-corpus data/demo_corpus --samples 2000 --params params.yaml", "demo_corpus")
    parser.add_argument("out", help="output directory (manifest.jsonl + media/)")
    parser.add_argument("--samples", type=int, default=None, help="number of samples (default: params or 2000)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: params or 0)")
    parser.add_argument("--video", type=float, default=None, help="share of clean rows that are video clips (default: params or 0)")
    parser.add_argument("--params", action="append", default=None, help="params.yaml (section demo_corpus); repeat to layer files, later ones win")
    args = _args(parser, argv)
    cfg = load_params(args.params).demo_corpus
    from mmprep.config import params_from_dict, to_dict

    overrides = {k: v for k, v in (("samples", args.samples), ("seed", args.seed), ("video", args.video)) if v is not None}
    cfg = params_from_dict({"demo_corpus": {**to_dict(cfg), **overrides}}).demo_corpus
    from mmprep.democorpus import write_demo_corpus

    summary = write_demo_corpus(args.out, **to_dict(cfg))  # the demo_corpus section is the function's keywords
    print(f"demo corpus: {summary.get('rows', cfg.samples)} rows → {args.out}/manifest.jsonl")
    return 0


class _QuietBeamImport(logging.Filter):
    """Beam logs a warning about optional GCP clients at import; it is noise for local runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def _local_runner(argv: list[str]) -> bool:
    """Whether prepare's arguments leave Beam's local FnApiRunner (the default) in charge."""
    for i, arg in enumerate(argv):
        if arg.startswith("--runner="):
            return arg.split("=", 1)[1] == "FnApiRunner"
        if arg == "--runner":
            return argv[i + 1 : i + 2] == ["FnApiRunner"]
    return True


def _prepare(argv: list[str]) -> int:
    logging.getLogger().addFilter(_QuietBeamImport())
    from pipelines.prepare import main

    return main(argv)


def _train(argv: list[str]) -> int:
    parser = _parser("train", "mmprep train --data data/prepared --output runs/demo --params params.yaml\n"
                     "  torchrun --nproc_per_node=N -m mmprep.cli train --data data/prepared --output runs/demo   (DDP)", "train")
    parser.add_argument("--data", required=True, help="prepared dataset directory (mmprep prepare --output)")
    parser.add_argument("--output", required=True, help="run directory (checkpoints, model, metrics)")
    parser.add_argument("--params", action="append", default=None, help="params.yaml (section train); repeat to layer files, later ones win")
    parser.add_argument("--metrics", default=None, help="DVCLive directory (None: RUN/dvclive)")
    args = _args(parser, argv)
    cfg = load_params(args.params).train
    from train.recipe import train

    train(args.data, args.output, cfg, live_dir=args.metrics)
    return 0


def _evaluate(argv: list[str]) -> int:
    parser = _parser("evaluate", "mmprep evaluate --data data/prepared --model runs/demo --output metrics/eval.json --params params.yaml",
                     "evaluate")
    parser.add_argument("--data", required=True, help="prepared dataset directory")
    parser.add_argument("--model", required=True, help="run directory written by mmprep train")
    parser.add_argument("--output", required=True, help="metrics JSON to write (a PNG confusion matrix beside it)")
    parser.add_argument("--params", action="append", default=None, help="params.yaml (section evaluate); repeat to layer files, later ones win")
    args = _args(parser, argv)
    cfg = load_params(args.params).evaluate
    from train.evaluate import evaluate

    metrics = evaluate(args.data, args.model, args.output, cfg)
    ablation = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in metrics.get("ablation", {}).items() if v["accuracy"] is not None)
    print(f"accuracy {metrics['accuracy']:.3f}  macro_f1 {metrics['macro_f1']:.3f}  ({ablation}) → {args.output}")
    return 0


def _predict(argv: list[str]) -> int:
    parser = _parser("predict", "mmprep predict --model runs/demo --image cat.jpg --audio meow.wav --text 'a grey cat'", None)
    parser.add_argument("--model", required=True, help="run directory written by mmprep train")
    parser.add_argument("--image", default=None, help="an image file")
    parser.add_argument("--audio", default=None, help="an audio file")
    parser.add_argument("--text", default=None, help="the text, inline")
    parser.add_argument("--video", default=None, help="a video file")
    args = _args(parser, argv)
    if args.image is None and args.audio is None and args.text is None and args.video is None:
        parser.error("give at least one of --image, --audio, --text, --video")
    from train.predict import predict

    result = predict(args.model, image=args.image, audio=args.audio, text=args.text, video=args.video)
    print(result["label"])
    for label, p in sorted(result["probabilities"].items(), key=lambda kv: -kv[1]):
        print(f"  {label:<30} {p:.3f}")
    return 0


def _inspect(argv: list[str]) -> int:
    parser = _parser("inspect", "mmprep inspect data/prepared --examples 5", None)
    parser.add_argument("out", help="prepared dataset directory")
    parser.add_argument("--examples", type=int, default=3, help="reject examples per reason")
    args = _args(parser, argv)
    from mmprep.inspection import inspect_dataset

    print(inspect_dataset(args.out, examples=args.examples))
    return 0


def _verify(argv: list[str]) -> int:
    parser = _parser("verify", "mmprep verify --data data/prepared\n  mmprep verify --data https://example.org/datasets/prepared", None)
    parser.add_argument("--data", required=True, help="prepared dataset directory or http(s):// URL")
    args = _args(parser, argv)
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
    parser = _parser("report", "mmprep report --data data/prepared --output reports/dataset.html --training metrics/eval.html", None)
    parser.add_argument("--data", required=True, help="prepared dataset directory (mmprep prepare --output)")
    parser.add_argument("--output", default=None, help="HTML file to write (None: DATA/report.html)")
    parser.add_argument("--training", default=None, help="the training report (mmprep evaluate's HTML) to link, if any")
    parser.add_argument("--per-label", type=int, default=3, help="gallery samples per label")
    parser.add_argument("--max-labels", type=int, default=24, help="labels shown in the gallery, most frequent first")
    args = _args(parser, argv)
    if args.per_label < 0 or args.max_labels < 0:
        raise ValueError(f"--per-label and --max-labels must be >= 0 (0: no gallery), got {args.per_label} and {args.max_labels}")
    if args.training is not None and not os.path.isfile(args.training):
        raise FileNotFoundError(f"--training {args.training}: no such file (mmprep evaluate writes it beside its --output JSON)")
    from mmprep.report import build_report

    path, info = build_report(args.data, args.output, per_label=args.per_label, max_labels=args.max_labels, training=args.training)
    print(f"report: {info['gallery']} gallery samples, {info['images']} images, {info['audio_clips']} audio clips, "
          f"{info['bytes'] / 1e6:.1f} MB in {info['seconds']:.1f}s → {path}")
    return 0


COMMANDS = {
    "demo-corpus": (_demo_corpus, "Write the embedded demo corpus (generated: images, audio, text, labels, with dirt)."),
    "prepare": (_prepare, "Raw corpus → clean, labeled, split WebDataset shards + tables (Apache Beam, local or a cluster)."),
    "train": (_train, "Train a multimodal fusion model on prepared shards (PyTorch, CPU or GPU, DDP with torchrun)."),
    "evaluate": (_evaluate, "Score a trained run on a split: metrics JSON, confusion matrix, ablation, an HTML report."),
    "predict": (_predict, "Classify one raw sample (image/audio/text/video) with a trained run."),
    "inspect": (_inspect, "Print what a prepared dataset holds: counts, splits, rejects by reason, features."),
    "verify": (_verify, "Check every shard of a prepared dataset against dataset.json and the manifest (sha256, sizes)."),
    "report": (_report, "Write one offline HTML page about a prepared dataset: counts, distributions, gallery, leakage."),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: mmprep COMMAND [options]   (mmprep COMMAND --help: its options, an example, the params it reads)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", "  mmprep --version   versions of mmprep and of Beam, torch, webdataset", "",
              "Every command prints only its own lines; -v adds the libraries' logs, -vv debug logs.", f"docs: {DOCS}"]
    return "\n".join(lines)


def version() -> str:
    from importlib import metadata

    found = []
    for dist in ("apache-beam", "torch", "webdataset", "pyarrow", "numpy"):
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} not installed")
    return f"mmprep {metadata.version('mmprep')} ({', '.join(found)}; python {sys.version.split()[0]})"


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["prepare"] and _local_runner(sys.argv[2:]):
        # the `mmprep prepare` program with the local runner (not a caller's process, which may
        # need pandas later): Beam's import of pandas for its DataFrame type hints, which
        # prepare never uses, is ~0.5 s of every run's start-up (its worker processes skip it too)
        from pipelines.worker import block_pandas

        block_pandas()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(version())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            import difflib

            close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            print(f"mmprep: error: unknown command {argv[0]!r}{hint}; mmprep --help lists them", file=sys.stderr)
            return 2
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except BrokenPipeError:  # `mmprep predict … | head -1`: the reader has all it wanted, not an error
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        except (OSError, ValueError):  # a replaced sys.stdout without a file descriptor
            pass
        return 141  # 128 + SIGPIPE, as a shell reports a writer killed by it
    except (ConfigError, OSError, ValueError, FloatingPointError) as err:  # bad params/input/shards, NaN in training: one line
        print(f"mmprep {argv[0]}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, what is left, the shell's exit status for SIGINT
        left = INTERRUPTED.get(argv[0], "")
        if argv[0] == "train" and os.environ.get("DVC_STAGE"):  # DVC deletes a stage's outs before it reruns it
            left += (f" (`dvc repro` would delete it first: run this stage's command itself, then "
                     f"`dvc commit {os.environ['DVC_STAGE']}`)")
        print(f"\nmmprep {argv[0]}: interrupted{left}", file=sys.stderr)
        return 130


# what an interrupted command leaves (see README: train resumes, prepare publishes atomically)
INTERRUPTED = {
    "train": "; the last checkpoint stays: the same command resumes from it",
    "prepare": "; an output without dataset.json is incomplete: run the same command again",
}


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
