"""The prepare driver: raw corpus → clean, labeled, normalized, split WebDataset shards.

    plan input ranges (driver) → per range: read, reuse-or-process each row, stage it, index part
    → plan: dedup ids + content, label map, leak-free split, tokenizer (train only), shards
    → per shard: stream the staged rows into a tar → tables → dataset.json (last)

Usage (also through `mmprep prepare`): python -m pipelines.prepare --input SRC --output OUT
[--params params.yaml] [--workers N] [--cache DIR | --no-cache] [any Beam option, passed through].
"""

from __future__ import annotations

import os

# Arrow's default allocator (mimalloc) keeps what the plan step frees; with the system allocator
# that step's peak memory per row measured 3x lower. Arrow reads this once, before its first
# allocation (so it is set before Beam and pyarrow are imported); worker processes inherit it.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

import argparse  # noqa: E402
import json
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from mmprep.config import PrepareConfig, load_params
from mmprep.console import HelpFormatter, Parser, only_our_lines, set_verbosity, suggest
from mmprep.labels import check_fixed_labels
from mmprep.staged import context_digest
from pipelines import reaper, steps
from pipelines.files import is_local, join
from pipelines.plan import PlanFn
from pipelines.progress import Reporter
from pipelines.read import InputError, Plan, plan_input, resolve_input
from pipelines.staging import default_cache, hold_run, release_run, sweep_dead_runs
from pipelines.write import WORK, FinalizeFn, WriteShardFn

PREPARE_EPILOG = """\
example:
  mmprep prepare --input data/corpus/manifest.jsonl --output data/prepared --params params.yaml --workers 2

reads params: the `prepare` section of --params (every knob: params.yaml; without --params the
built-in defaults of mmprep/config.py, not ./params.yaml); README "prepare" and
docs/data-contract.md in the repository.

Beam options pass through untouched (an option neither mmprep nor Beam knows is an error):
  local (default)  --runner FnApiRunner; --workers N sets --direct_num_workers N with
                   --direct_running_mode multi_processing
  Dask             --runner apache_beam.runners.dask.dask_runner.DaskRunner
                   --dask_client_address tcp://HOST:8786   (pip install 'mmprep[dask]')
  Flink            --runner FlinkRunner --flink_master HOST:8081 --environment_type LOOPBACK|EXTERNAL
  Spark            --runner SparkRunner --spark_master_url spark://HOST:7077
                   (or PortableRunner --job_endpoint HOST:8099)
  Dataflow         --runner DataflowRunner --project P --region R --temp_location gs://B/tmp
                   --setup_file ./setup.py or --requirements_file requirements.txt
  any portable     --runner PortableRunner --job_endpoint HOST:PORT --environment_type EXTERNAL
                   --environment_config HOST:50000
"""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """mmprep's own options, and the rest for Beam; a flag that neither knows is an InputError
    naming the closest known one (Beam itself would only log a warning and drop it)."""
    parser = Parser(prog="mmprep prepare", description="Raw corpus → clean, labeled, split WebDataset shards + tables "
                    "(Apache Beam, local or a cluster).", epilog=PREPARE_EPILOG, formatter_class=HelpFormatter,
                    allow_abbrev=False)
    parser.add_argument("--input", required=True, help="manifest (.jsonl/.csv/.parquet), directory layout, Hugging Face Parquet, "
                        "or WebDataset tars (a .tar, folder, comma list, {000..009} pattern); local or URI")
    parser.add_argument("--output", required=True, help="output directory (local or URI)")
    parser.add_argument("--params", action="append", default=None, help="params.yaml (section `prepare`); built-in defaults (mmprep/config.py) if omitted; repeat to layer files, later ones win")
    parser.add_argument("--workers", type=int, default=None, help="local worker processes (None: 1, or Beam's --direct_num_workers)")
    parser.add_argument(
        "--cache",
        default=None,
        help="directory (local or URI) of processed rows reused by later runs "
        "(None: $MMPREP_CACHE, else $XDG_CACHE_HOME/mmprep or ~/.cache/mmprep)",
    )
    parser.add_argument("--no-cache", action="store_true", help="process every row; stage rows inside --output, removed at the end")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: Beam's and the libraries' logs too; -vv: debug logs (Beam's workers too)")
    args, beam_args = parser.parse_known_args(argv)
    if args.no_cache and args.cache is not None:
        raise InputError("--cache and --no-cache exclude each other: give one")
    unknown = unknown_flags(beam_args)
    if unknown:
        raise InputError(f"unknown option {unknown[0]}{suggest(unknown[0], parser.known_flags(), beam_flags())} "
                         "(mmprep prepare --help lists the options; Beam options pass through)")
    if args.verbose >= 2 and not any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
        beam_args = [*beam_args, "--default_sdk_harness_log_level=DEBUG"]
    return args, beam_args


def _import_runner(beam_args: list[str]) -> None:
    """A runner given by its module path registers its own options (DaskRunner: --dask_*)."""
    import importlib

    for i, arg in enumerate(beam_args):
        value = arg.split("=", 1)[1] if arg.startswith("--runner=") else beam_args[i + 1] if arg == "--runner" and i + 1 < len(beam_args) else None
        if value and "." in value:
            try:
                importlib.import_module(value.rsplit(".", 1)[0])
            except Exception:  # noqa: BLE001 - Beam reports an unknown runner itself, clearly
                pass


def _beam_parser():
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():  # as Beam's get_all_options does
        cls._add_argparse_args(parser)
    return parser


def unknown_flags(beam_args: list[str]) -> list[str]:
    """The flags among `beam_args` that no registered PipelineOptions class defines."""
    _import_runner(beam_args)
    _, rest = _beam_parser().parse_known_args(beam_args)
    return [a.split("=", 1)[0] for a in rest if a.startswith("-")]


def beam_flags() -> list[str]:
    return [o for o in _beam_parser()._option_string_actions if o.startswith("--")]


def pipeline_options(beam_args: list[str], workers: int | None) -> PipelineOptions:
    """Beam flags pass through untouched; without --runner we run Beam's FnApiRunner locally
    (the DirectRunner would first try to download the Prism binary)."""
    options = PipelineOptions(beam_args)
    std = options.view_as(StandardOptions)
    if std.runner is None:
        std.runner = "FnApiRunner"
    if std.runner and std.runner.endswith("DaskRunner") and not any(
        a.startswith(("--dask_partition_size", "--dask_npartitions")) for a in beam_args
    ):
        # one input range per Dask partition, so the ranges spread over the workers (the
        # DaskRunner's default of 128 elements per partition would put them all on one)
        options = PipelineOptions([*beam_args, "--dask_partition_size", "1"])
        std = options.view_as(StandardOptions)
    direct = options.view_as(DirectOptions)
    if workers is not None:
        if workers < 1:
            raise InputError(f"--workers must be >= 1, got {workers}")
        direct.direct_num_workers = workers
        direct.direct_running_mode = "multi_processing" if workers > 1 else "in_memory"
    elif direct.direct_num_workers is None or "--direct_num_workers" not in " ".join(beam_args):
        direct.direct_num_workers = 1
    return options


def local_runner(options: PipelineOptions):
    """The runner object for `beam.Pipeline`: for the local FnApiRunner with worker processes
    (`--direct_running_mode multi_processing`), one whose workers start as
    `python -m pipelines.worker` (Beam's SDK worker, without pandas: ~0.5 s less start-up each);
    None (Beam builds the runner named in the options) otherwise."""
    std, direct = options.view_as(StandardOptions), options.view_as(DirectOptions)
    if std.runner != "FnApiRunner" or direct.direct_running_mode != "multi_processing":
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    command = f"{shlex.quote(sys.executable)} -m pipelines.worker"

    class LocalRunner(FnApiRunner):
        """FnApiRunner whose worker processes run `command`: Beam sets its own worker command
        in `run_pipeline` when the running mode is multi_processing; this runner keeps ours.
        (Should Beam rename that attribute, its own command is used: the same workers, pandas
        imported.)"""

        @property
        def _default_environment(self):
            return SubprocessSDKEnvironment.from_command_string(command_string=command)

        @_default_environment.setter
        def _default_environment(self, value) -> None:
            pass

    return LocalRunner()


def build(p: beam.Pipeline, plan: Plan, out: str, cfg: PrepareConfig, store: str, reuse: bool, progress: str | None,
          run: str = "", overlap: bool = True) -> None:
    """A straight line: per-range processing (parallel) → one global plan over light
    records (index files) → per-shard writing (parallel) → final tables. Nothing per row
    crosses a shuffle, combiner or side input; payloads wait in the staging store."""
    work = join(out, WORK)
    _ = (
        p
        | "Ranges" >> beam.Create(plan.ranges)
        | "Process" >> beam.ParDo(steps.ProcessRangeFn(cfg, store, reuse, work, progress, plan.rows, run, overlap))
        | "IndexParts" >> steps.Gather()
        | "Plan" >> beam.ParDo(PlanFn(out, work, cfg))
        | "SpreadShards" >> beam.Reshuffle()
        | "WriteShards" >> beam.ParDo(WriteShardFn(out, work, store, cfg))
        | "ShardInfos" >> steps.Gather()
        | "Finalize" >> beam.ParDo(FinalizeFn(out, work, cfg))
    )


# numerical libraries in Beam's worker processes: one thread each (see mmprep.process.limit_threads)
_ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _clean(out: str) -> None:
    """Leftovers of an earlier (killed) run: the work directory and temporary files."""
    work = join(out, WORK)
    if is_local(work):
        shutil.rmtree(work, ignore_errors=True)  # FileSystems.delete walks it file by file
    elif FileSystems.exists(work):
        FileSystems.delete([work])
    stale = [m.path for m in FileSystems.match([join(out, "*.tmp-*")])[0].metadata_list]
    if stale:
        FileSystems.delete(stale)


def _check_writable(directory: str, flag: str) -> None:
    """A local staging/cache directory that cannot be written is a one-line error before any
    work (not a Beam traceback from inside a worker)."""
    if not is_local(directory):
        return
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as err:
        raise InputError(f"{flag} {directory}: not a writable directory ({err.strerror or err})") from None


def _check_apart(kind: str, src: str, out: str, given: str | None = None) -> None:
    """The output must neither be nor hold nor sit inside the input: prepare deletes and
    rewrites files in its output (shards of other runs, tables, dataset.json), and a later run
    would read its own output as input rows."""
    from pipelines.read import expand_paths

    inputs = expand_paths(src) if kind in ("webdataset", "parquet") and ("," in src or "{" in src) else [src]
    if given and given.rstrip("/") != src and "," not in given and "{" not in given:
        inputs.append(given.rstrip("/") or "/")  # a folder holding the manifest: the folder as given counts too
    if not is_local(out) or not all(is_local(p) for p in inputs):
        return
    where = os.path.realpath(out)
    for path in inputs:
        path = os.path.realpath(path)
        if os.path.commonpath([where, path]) in (where, path):
            inside = "holds" if path.startswith(where + os.sep) else "is inside" if where != path else "is"
            raise InputError(f"--output {out} {inside} the input {path}: write the prepared data to a directory apart from the "
                             "input (prepare deletes and rewrites files in its output)")


def _check_runner(options: PipelineOptions) -> None:
    """An unknown --runner is a one-line error before any work (the output is left as it is)."""
    from apache_beam.runners.runner import create_runner

    runner = options.view_as(StandardOptions).runner
    try:
        create_runner(runner)
    except (ValueError, ImportError) as err:
        raise InputError(f"--runner {runner}: {str(err).splitlines()[0]}") from None


DONE_NOTE = "the output has no dataset.json; run again once fixed"


def run(argv: list[str] | None = None) -> int:
    args, beam_args = parse_args(argv)
    set_verbosity(args.verbose)
    cfg = load_params(args.params).prepare
    check_fixed_labels(cfg.label)
    kind, src = resolve_input(args.input)
    out = args.output.rstrip("/")
    options = pipeline_options(beam_args, args.workers)
    _check_apart(kind, src, out, args.input)
    _check_runner(options)
    _check_writable(out, "--output")
    if not FileSystems.exists(out):
        FileSystems.mkdirs(out)
    done = join(out, "dataset.json")
    if FileSystems.exists(done):
        FileSystems.delete([done])  # from now on the directory does not look complete
    _clean(out)
    plan = plan_input(kind, src)
    store = join(out, WORK, "staging") if args.no_cache else (args.cache or default_cache())
    _check_writable(store, "--no-cache: --output" if args.no_cache else "--cache")
    runner = options.view_as(StandardOptions).runner
    print(
        f"[mmprep prepare] {kind} {src}: {plan.rows:,} rows in {len(plan.ranges)} ranges → {out} (runner {runner}; "
        f"{'no cache' if args.no_cache else f'cache {store}'})",
        file=sys.stderr,
    )
    for name in _ONE_THREAD:
        os.environ.setdefault(name, "1")
    started = time.monotonic()
    progress = tempfile.mkdtemp(prefix="mmprep-progress-")
    run_id, context = uuid.uuid4().hex[:12], context_digest(cfg)
    sweep_dead_runs(store, context)  # temporary files of killed runs that used this cache
    lock = hold_run(store, context, run_id)
    local_processes = options.view_as(DirectOptions).direct_running_mode == "multi_processing"
    watcher = reaper.start() if local_processes else None  # stops our worker processes if this one is killed
    log = None
    try:
        # quiet by default: Beam's worker processes log their start and stop at INFO on our stderr
        with only_our_lines(args.verbose == 0) as log, Reporter(progress, plan.rows), beam.Pipeline(local_runner(options), options=options) as p:
            # Beam 2.77's DaskRunner drops what a DoFn emits from finish_bundle (it collects a
            # partition's output before calling it): ranges are finished one by one there
            build(p, plan, out, cfg, store, not args.no_cache, progress, run_id, overlap=not str(runner).endswith("DaskRunner"))
    except Exception as err:  # noqa: BLE001 - a worker's failure (disk full, output gone): one line, not Beam's traceback
        raise RunError(root_cause(err) + (f"; Beam's full log: {log}" if log else "")) from err
    finally:
        shutil.rmtree(progress, ignore_errors=True)
        release_run(lock)
        if watcher is not None:
            watcher.terminate()
            watcher.wait()
    result = p.result
    _clean(out)
    return report(out, cfg, result, time.monotonic() - started)


class RunError(RuntimeError):
    """The pipeline failed in a worker (not a bad row: those are rejects)."""


_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")


def root_cause(err: BaseException) -> str:
    """One line for a failed run: the innermost "SomeError: message" in what the runner
    reports (a worker's exception arrives with its traceback and Beam's step names), with
    the step it happened in when Beam names one."""
    while err.__cause__ is not None and not isinstance(err, OSError):
        err = err.__cause__
    text = str(err)
    found = [m for m in (_ERROR_LINE.match(line.strip()) for line in text.splitlines()) if m]
    message = f"{found[-1].group(1)}: {found[-1].group(2)}" if found else f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
    message = re.sub(r" \[while running '[^']*'\]", "", message)
    step = re.search(r"\[while running '([^']+)'\]", text)
    return f"{message}" + (f" (in step {step.group(1).split('/')[0]})" if step else "")


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
    try:
        return run(argv)
    except (InputError, ValueError, OSError) as err:
        print(f"mmprep prepare: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"mmprep prepare: error: {err} (nothing was published: {DONE_NOTE})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
