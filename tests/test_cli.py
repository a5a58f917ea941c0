"""The command line as a new user meets it: typos caught, quiet by default, help that teaches."""

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from mmprep.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def mm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mmprep.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "corpus"
    assert mm("demo-corpus", str(out), "--samples", "40", "--params", str(ROOT / "params.yaml")).returncode == 0
    return out / "manifest.jsonl"


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("--wokers", "--workers"), ("--cahce", "--cache"), ("--num_wokers", "--num_workers"), ("--runer", "--runner"),
     ("--direct_num_wokers", "--direct_num_workers")],
)
def test_a_mistyped_prepare_option_stops_before_any_work_naming_the_closest_one(tmp_path, typo, meant):
    out = tmp_path / "out"
    run = mm("prepare", "--input", str(tmp_path / "none.jsonl"), "--output", str(out), typo, "2")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1, run.stderr
    assert f"unknown option {typo} (did you mean {meant}?)" in run.stderr
    assert not out.exists()  # before any work: not even the output directory


def test_an_option_nobody_knows_gets_no_suggestion(tmp_path):
    run = mm("prepare", "--input", "x.jsonl", "--output", str(tmp_path / "o"), "--frobnicate")
    assert run.returncode == 2 and "unknown option --frobnicate (mmprep" in run.stderr


@pytest.mark.parametrize(("command", "typo", "meant"), [("train", "--dat", "--data"), ("inspect", "--exmples", "--examples"),
                                                        ("report", "--per_label", "--per-label"), ("evaluate", "--modle", "--model")])
def test_every_command_names_a_mistyped_option_in_one_line(command, typo, meant):
    run = mm(command, typo, "x")
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"mmprep {command}: error: unknown option {typo} (did you mean {meant}?)" in run.stderr


def test_a_mistyped_command_is_named_with_the_closest_one():
    run = mm("prepar")
    assert run.returncode == 2 and "unknown command 'prepar' (did you mean prepare?)" in run.stderr


def test_beam_options_pass_through_and_runner_options_are_known():
    from pipelines.prepare import parse_args

    args, beam = parse_args(["--input", "a", "--output", "b", "--workers", "2", "--direct_running_mode=multi_processing",
                             "--runner", "apache_beam.runners.dask.dask_runner.DaskRunner", "--dask_client_address", "tcp://h:8786",
                             "--flink_master", "h:8081", "--setup_file", "./setup.py"])
    assert args.workers == 2
    assert beam == ["--direct_running_mode=multi_processing", "--runner", "apache_beam.runners.dask.dask_runner.DaskRunner",
                    "--dask_client_address", "tcp://h:8786", "--flink_master", "h:8081", "--setup_file", "./setup.py"]


def test_prepare_on_two_workers_prints_only_our_own_lines_and_all_of_beams_with_verbose(corpus, tmp_path):
    quiet = mm("prepare", "--input", str(corpus), "--output", str(tmp_path / "q"), "--params", str(ROOT / "params.yaml"),
               "--workers", "2", "--no-cache")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    lines = [x for x in quiet.stderr.splitlines() if x.strip()]
    foreign = [x for x in lines if re.match(r"^(INFO|WARNING|ERROR|DEBUG|CRITICAL):", x) or "apitools" in x]
    assert foreign == [], foreign
    assert lines[0].startswith("[mmprep prepare]") and any(x.startswith("prepared ") for x in lines)
    loud = mm("prepare", "--input", str(corpus), "--output", str(tmp_path / "l"), "--params", str(ROOT / "params.yaml"),
              "--workers", "2", "--no-cache", "-v")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "INFO:apache_beam.runners.worker.sdk_worker" in loud.stderr  # the workers' own logs, when asked for
    assert (tmp_path / "q" / "dataset.json").read_bytes() == (tmp_path / "l" / "dataset.json").read_bytes()
    # the program blocks pandas in its own process (and its workers) with the local runner:
    # in-process work (one worker) writes its tables through pyarrow all the same
    one = mm("prepare", "--input", str(corpus), "--output", str(tmp_path / "one"), "--params", str(ROOT / "params.yaml"),
             "--no-cache")
    assert one.returncode == 0, one.stderr[-2000:]
    for name in ("dataset.json", "manifest.parquet", "rejects.parquet"):
        assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_the_top_level_help_lists_every_command_with_what_it_does():
    run = mm("--help")
    assert run.returncode == 0
    for name, (_, description) in COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(description)}$", run.stdout, re.M), name
    assert "docs/data-contract.md" in run.stdout and "--version" in run.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_help_shows_an_example_and_where_its_docs_are(command):
    run = mm(command, "--help")
    assert run.returncode == 0, run.stderr
    assert f"example:\n  mmprep {command}" in run.stdout or f"example:\n  mmprep {command.split()[0]}" in run.stdout
    assert "docs" in run.stdout and "-v, --verbose" in run.stdout
    section = {"demo-corpus": "demo_corpus", "prepare": "prepare", "train": "train", "evaluate": "evaluate"}.get(command)
    if section:
        assert f"the `{section}` section of --params" in run.stdout


def test_help_shows_defaults_and_the_beam_options_of_each_runner():
    assert "(default: 3)" in mm("inspect", "--help").stdout
    text = mm("prepare", "--help").stdout
    for needle in ("--runner FnApiRunner", "--direct_num_workers", "DaskRunner", "--dask_client_address", "--flink_master",
                   "--spark_master_url", "DataflowRunner", "--setup_file", "--requirements_file", "--job_endpoint",
                   "--environment_type"):
        assert needle in text, needle


def test_version_names_mmprep_and_its_engines():
    run = mm("--version")
    assert run.returncode == 0
    for dist in ("mmprep", "apache-beam", "torch", "webdataset"):
        assert f"{dist} {metadata.version(dist)}" in run.stdout


@pytest.mark.parametrize("command", ["train", "prepare", "evaluate"])
def test_ctrl_c_is_one_line_and_exit_status_130(command, monkeypatch, capsys):
    from mmprep import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, (interrupted, *cli.COMMANDS[command][1:]))
    assert cli.main([command, "--help-not-reached"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmprep {command}: interrupted"), err
    assert "resumes" in err[0] if command == "train" else True


def test_ctrl_c_under_dvc_repro_says_how_to_resume_the_stage(monkeypatch, capsys):
    """`dvc repro` deletes a stage's outputs before running it again: the same command resumes,
    `dvc repro` would not."""
    from mmprep import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", (interrupted, *cli.COMMANDS["train"][1:]))
    monkeypatch.setenv("DVC_STAGE", "train_video")
    assert cli.main(["train"]) == 130
    err = capsys.readouterr().err.strip()
    assert "dvc commit train_video" in err and "resumes" in err


def test_a_damaged_dataset_json_is_one_line_naming_it(tmp_path, capsys):
    from mmprep.cli import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text('{"counts": ')  # torn by hand or by a full disk
    for argv in (["inspect", str(tmp_path / "data")], ["report", "--data", str(tmp_path / "data")],
                 ["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{tmp_path / 'data' / 'dataset.json'}: not valid JSON" in err[0], err


def test_output_into_a_closed_pipe_is_no_error_line(tmp_path):
    """`mmprep predict … | head -1`: the reader leaves early; that is the shell's SIGPIPE status, not an error."""
    sys.path.insert(0, str(ROOT / "tests" / "train"))
    from factory import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", per_split={"train": 4, "val": 2, "test": 2}, shards={"train": 1, "val": 1, "test": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "mmprep.cli", "verify", "--data", str(data)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=ROOT, env=env)
    child.stdout.close()  # the reader is gone before anything is written
    err = child.stderr.read().decode()
    assert child.wait(timeout=600) == 141, err
    assert err == "", err
