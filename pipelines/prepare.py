"""The prepare driver: raw corpus → clean, labeled, normalized, split WebDataset shards.

    read → dedup ids → load+decode+clean+normalize+featurize+label → dedup content
         → label map → leak-free split → tokenizer + stats (train only) → shards → tables → dataset.json

Usage (also through `mmprep prepare`): python -m pipelines.prepare --input SRC --output OUT
[--params params.yaml] [--workers N] [any Beam option, passed through untouched].
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from mmprep.config import PrepareConfig, load_params
from mmprep.labels import build_label_map
from mmprep.split import assign_splits
from pipelines import steps
from pipelines.read import InputError, ReadRowsFn, resolve_input
from pipelines.write import FinalizeFn, WriteShardFn, join, shard_key


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="mmprep prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="manifest (.jsonl/.csv/.parquet) or directory; local or URI")
    parser.add_argument("--output", required=True, help="output directory (local or URI)")
    parser.add_argument("--params", default=None, help="params.yaml (section `prepare`); defaults if omitted")
    parser.add_argument("--workers", type=int, default=None, help="local worker processes (default 1)")
    return parser.parse_known_args(argv)


def pipeline_options(beam_args: list[str], workers: int | None) -> PipelineOptions:
    """Beam flags pass through untouched; without --runner we run Beam's FnApiRunner locally
    (the DirectRunner would first try to download the Prism binary)."""
    options = PipelineOptions(beam_args)
    std = options.view_as(StandardOptions)
    if std.runner is None:
        std.runner = "FnApiRunner"
    direct = options.view_as(DirectOptions)
    if workers is not None:
        if workers < 1:
            raise InputError(f"--workers must be >= 1, got {workers}")
        direct.direct_num_workers = workers
        direct.direct_running_mode = "multi_processing" if workers > 1 else "in_memory"
    elif direct.direct_num_workers is None or "--direct_num_workers" not in " ".join(beam_args):
        direct.direct_num_workers = 1
    return options


def build(p: beam.Pipeline, kind: str, src: str, out: str, cfg: PrepareConfig) -> None:
    rows, read_rejects = p | "Source" >> beam.Create([(kind, src)]) | "ReadRows" >> steps.Separate(ReadRowsFn())
    input_rows = (rows, read_rejects) | "AllRows" >> beam.Flatten() | "CountRows" >> beam.combiners.Count.Globally()
    unique, id_rejects = (
        rows
        | "KeyById" >> beam.Map(steps.by_id)
        | "GroupById" >> beam.GroupByKey()
        | "FirstById" >> steps.Separate(steps.KeepFirstFn("duplicate_id", "id already used by"))
    )
    processed, process_rejects = (
        unique
        | "Spread" >> beam.Reshuffle()
        | "Process" >> steps.Separate(steps.ProcessRowFn(cfg))
    )
    samples, duplicate_rejects = (
        processed
        | "KeyBySignature" >> beam.Map(steps.by_signature)
        | "GroupBySignature" >> beam.GroupByKey()
        | "Canonical" >> steps.Separate(steps.KeepFirstFn("duplicate", "same content as"))
    )
    labels = (
        samples
        | "Labels" >> beam.FlatMap(steps.label_of)
        | "DistinctLabels" >> beam.Distinct()
        | "LabelList" >> beam.combiners.ToList()
        | "LabelMap" >> beam.Map(build_label_map, cfg.label)
    )
    split_result = (
        samples
        | "LinkInfo" >> beam.Map(steps.link_info)
        | "AllLinks" >> beam.combiners.ToList()
        | "AssignSplits" >> beam.Map(assign_splits, cfg)
    )
    split_of = split_result | "SplitOf" >> beam.Map(steps.split_of)
    split_info = split_result | "SplitInfo" >> beam.Map(steps.split_report)
    split = samples | "AttachSplit" >> beam.Map(steps.with_split, beam.pvalue.AsSingleton(split_of))
    train = split | "TrainOnly" >> beam.Filter(steps.is_train)
    model = (
        train
        | "TrainTexts" >> beam.FlatMap(steps.train_text, cfg.split_salt)
        | "TextSample" >> beam.CombineGlobally(steps.SmallestFn(cfg.text.tokenizer_sample))
        | "TrainTokenizer" >> beam.Map(_train_tokenizer, cfg)
    )
    bins = cfg.audio.n_mels if cfg.audio.feature == "logmel" else cfg.audio.n_mfcc
    image_stats = train | "ImageStats" >> beam.CombineGlobally(steps.MomentsFn("image", 3))
    audio_stats = train | "AudioStats" >> beam.CombineGlobally(steps.MomentsFn("audio", bins))
    items = split | "Members" >> beam.ParDo(
        steps.ToMembersFn(cfg), beam.pvalue.AsSingleton(model), beam.pvalue.AsSingleton(labels)
    )
    shard_of = (
        items
        | "Sizes" >> beam.Map(steps.size_of)
        | "AllSizes" >> beam.combiners.ToList()
        | "AssignShards" >> beam.Map(_assign_shards, cfg)
    )
    shards = (
        items
        | "KeyByShard" >> beam.Map(shard_key, beam.pvalue.AsSingleton(shard_of))
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShardFn(out))
    )
    rejects = (read_rejects, id_rejects, process_rejects, duplicate_rejects) | "AllRejects" >> beam.Flatten()
    side = beam.pvalue
    _ = (
        p
        | "Finish" >> beam.Create([None])
        | "Finalize"
        >> beam.ParDo(
            FinalizeFn(out, cfg),
            side.AsList(shards),
            side.AsList(rejects),
            side.AsSingleton(input_rows),
            side.AsSingleton(labels),
            side.AsSingleton(model),
            side.AsSingleton(image_stats),
            side.AsSingleton(audio_stats),
            side.AsSingleton(split_info),
        )
    )


def _train_tokenizer(sample: list[tuple[str, str]], cfg: PrepareConfig) -> bytes:
    from mmprep.tokenizer import train_tokenizer

    return train_tokenizer([text for _, text in sample], cfg.text)


def _assign_shards(sizes: list[tuple[str, str, int]], cfg: PrepareConfig) -> dict[str, int]:
    from mmprep.shards import assign_shards

    return assign_shards(sizes, cfg.shard)


def run(argv: list[str] | None = None) -> int:
    args, beam_args = parse_args(argv)
    cfg = load_params(args.params).prepare
    kind, src = resolve_input(args.input)
    out = args.output.rstrip("/")
    options = pipeline_options(beam_args, args.workers)
    if not FileSystems.exists(out):
        FileSystems.mkdirs(out)
    done = join(out, "dataset.json")
    if FileSystems.exists(done):
        FileSystems.delete([done])  # from now on the directory does not look complete
    print(f"[mmprep prepare] {kind} {src} → {out} (runner {options.view_as(StandardOptions).runner})", file=sys.stderr)
    started = time.monotonic()
    with beam.Pipeline(options=options) as p:
        build(p, kind, src, out, cfg)
    result = p.result
    return report(out, cfg, result, time.monotonic() - started)


def report(out: str, cfg: PrepareConfig, result, seconds: float) -> int:
    """Print the Beam counters and the dataset summary; non-zero past max_reject_ratio."""
    try:
        counters = result.metrics().query(MetricsFilter())["counters"]
    except NotImplementedError:  # the DaskRunner collects no metrics (Beam 2.77); dataset.json has the counts
        counters = []
    lines = sorted((f"{c.key.metric.namespace}.{c.key.metric.name}", c.committed) for c in counters)
    if lines:
        print("\nBeam counters", file=sys.stderr)
    for name, value in lines:
        print(f"  {name:<40} {value:>10}", file=sys.stderr)
    done = join(out, "dataset.json")
    if not FileSystems.exists(done):
        rejected = sum(v for n, v in lines if n.startswith("rejects."))
        read = sum(v for n, v in lines if n == "read.rows")
        share = f"{rejected}/{read} rows rejected ({rejected / read:.1%})" if read else "the share of rejected rows"
        print(
            f"mmprep prepare: error: {share} exceeds prepare.max_reject_ratio={cfg.max_reject_ratio}; "
            f"see {join(out, 'rejects.parquet')}",
            file=sys.stderr,
        )
        return 1
    with FileSystems.open(done) as f:
        counts = json.loads(f.read())["counts"]
    splits = ", ".join(f"{k} {v}" for k, v in counts["splits"].items())
    print(
        f"\nprepared {counts['kept']} of {counts['input_rows']} rows ({splits}); "
        f"{counts['rejected']} rejected in {seconds:.1f}s → {out}",
        file=sys.stderr,
    )
    for reason, n in counts["rejects"].items():
        print(f"  rejected {reason:<24} {n:>8}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        return run(argv)
    except (InputError, ValueError, OSError) as err:
        print(f"mmprep prepare: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
