"""End to end: the Beam prepare pipeline on the demo corpus, as a user would check its output."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmprep.democorpus import write_demo_corpus
from pipelines.prepare import main as prepare_main

ROOT = Path(__file__).resolve().parents[2]
CHECKER = Path(os.environ.get("MMPREP_CONTRACT_CHECKER", ROOT.parent / "shared" / "tools" / "check_contract.py"))
PARAMS = ROOT / "params.yaml"


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(out, samples=400, seed=3)
    return out


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared1")
    assert prepare_main(["--input", str(corpus / "manifest.jsonl"), "--output", str(out), "--params", str(PARAMS)]) == 0
    return out


def test_contract_checker_passes(prepared, corpus):
    if not CHECKER.exists():
        pytest.skip(f"{CHECKER} not found (set MMPREP_CONTRACT_CHECKER to ../shared/tools/check_contract.py)")
    run = subprocess.run(
        [sys.executable, str(CHECKER), str(prepared), "--input", str(corpus / "manifest.jsonl")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_nothing_lost_and_every_dirt_kind_rejected_with_its_reason(prepared, corpus):
    manifest = pq.read_table(prepared / "manifest.parquet").to_pylist()
    rejects = pq.read_table(prepared / "rejects.parquet").to_pylist()
    lines = [x for x in (corpus / "manifest.jsonl").read_bytes().splitlines() if x.strip()]
    assert len(manifest) + len(rejects) == len(lines)
    kept_ids = {r["id"] for r in manifest}
    assert not kept_ids & {r["id"] for r in rejects if r["id"] is not None}
    by_source = {r["source"]: r for r in rejects}
    dirt = json.loads((corpus / "dirt.json").read_text())
    kinds = set()
    for d in dirt:
        if d.get("when_labels_fixed"):
            continue
        rej = by_source.get(f"manifest.jsonl:{d['line']}")
        if d["reason"] is None:
            assert d["id"] in kept_ids, d
            continue
        assert rej is not None, f"dirt {d} was not rejected"
        assert rej["reason"] == d["reason"], (d, rej)
        kinds.add(d["kind"])
    assert len(kinds) >= 10
    for rej in rejects:
        if rej["reason"] == "duplicate":
            assert rej["duplicate_of"] in kept_ids


def test_reproducible_bytes_with_two_worker_processes(prepared, corpus, tmp_path):
    out = tmp_path / "prepared2"
    argv = ["--input", str(corpus / "manifest.jsonl"), "--output", str(out), "--params", str(PARAMS), "--workers", "2",
            "--no-cache"]
    assert prepare_main(argv) == 0
    assert digests(out) == digests(prepared)


@pytest.mark.slow
def test_reproducible_bytes_on_a_dask_cluster(prepared, corpus, tmp_path):
    """Beam's DaskRunner on a dask.distributed scheduler with two separate worker processes
    writes the same bytes as the local runner."""
    pytest.importorskip("distributed", reason="pip install 'mmprep[dask]'")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    py = [sys.executable, "-m"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen([*py, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], **quiet)
    procs = [scheduler]
    try:
        _wait_for_port(port, scheduler)
        procs += [subprocess.Popen([*py, "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard"], **quiet)
                  for _ in range(2)]
        _wait_for_workers(address, 2)
        out = tmp_path / "dask"
        run = subprocess.run(
            [*py, "mmprep.cli", "prepare", "--input", str(corpus / "manifest.jsonl"), "--output", str(out),
             "--params", str(PARAMS), "--no-cache", "--runner", "apache_beam.runners.dask.dask_runner.DaskRunner",
             "--dask_client_address", address],
            capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert "DaskRunner" in run.stderr
        assert digests(out) == digests(prepared)
        assert not (out / ".mmprep-work").exists()
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


def _wait_for_workers(address: str, n: int, seconds: float = 90) -> None:
    import time

    from distributed import Client

    with Client(address, timeout=seconds) as client:
        deadline = time.monotonic() + seconds
        while len(client.scheduler_info()["workers"]) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} dask workers did not register in {seconds}s")
            time.sleep(0.5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 90) -> None:
    import socket
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited ({proc.returncode}): {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {seconds}s")


@pytest.mark.slow
def test_reproducible_bytes_on_a_portable_runner_with_a_worker_pool(prepared, corpus, tmp_path):
    """The path to a cluster: a Beam job service plus an external SDK worker pool (as a Flink
    or Spark job server would use) writes the same bytes as the local runner."""
    job_port, pool_port = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    services = [
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                          "--port", str(job_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                          f"--service_port={pool_port}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        _wait_for_port(job_port, services[0])
        _wait_for_port(pool_port, services[1])
        out = tmp_path / "portable"
        run = subprocess.run(
            [sys.executable, "-m", "mmprep.cli", "prepare", "--input", str(corpus / "manifest.jsonl"), "--output", str(out),
             "--params", str(PARAMS), "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
             "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool_port}"],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert "runner PortableRunner" in run.stdout + run.stderr
        assert digests(out) == digests(prepared)
    finally:
        for proc in services:
            proc.terminate()
            proc.wait(timeout=30)


def test_webdataset_client_reads_exactly_the_manifest(prepared):
    import webdataset as wds

    ds = json.loads((prepared / "dataset.json").read_text())
    manifest = pq.read_table(prepared / "manifest.parquet").to_pylist()
    audio, text = ds["features"]["audio"], ds["features"]["text"]
    for split in ("train", "val", "test"):
        urls = [str(prepared / n) for n in ds["splits"][split]["shards"]]
        keys = []
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):  # raw bytes: no decoders
            keys.append(sample["__key__"])
            if "mel.npy" in sample:
                mel = np.load(io.BytesIO(sample["mel.npy"]), allow_pickle=False)
                assert mel.dtype == np.float16 and mel.shape == (audio["bins"], audio["frames"])
            if "tokens.npy" in sample:
                tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
                assert tokens.dtype == np.int32 and 0 < len(tokens) <= text["max_tokens"]
                assert tokens.max() < text["vocab_size"]
            assert set(sample) - {"__key__", "__url__", "__local_path__"} <= {"jpg", "mel.npy", "tokens.npy", "txt", "cls", "json"}
        assert sorted(keys) == sorted(r["key"] for r in manifest if r["split"] == split)
        assert keys == sorted(keys)


def test_dataset_json_describes_the_data(prepared):
    ds = json.loads((prepared / "dataset.json").read_text())
    image = ds["features"]["image"]
    assert len(image["mean"]) == 3  # on the [0, 1] scale, as the loader divides pixels by 255
    assert all(0 < m < 1 and 0 < s < 1 for m, s in zip(image["mean"], image["std"], strict=True))
    assert len(ds["features"]["audio"]["std"]) == ds["features"]["audio"]["bins"]
    assert ds["counts"]["kept"] == sum(ds["counts"]["splits"].values())
    for name, info in ds["shards"].items():
        assert hashlib.sha256((prepared / name).read_bytes()).hexdigest() == info["sha256"]
    assert ds["params"]["prepare"]["image"]["size"] == 64


def test_inspect_summarizes(prepared):
    from mmprep.cli import main

    assert main(["inspect", str(prepared)]) == 0


def test_rerun_replaces_stale_output(prepared, corpus, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "train-000099.tar").write_bytes(b"stale")
    (out / "dataset.json").write_text("{}")
    assert prepare_main(["--input", str(corpus / "manifest.jsonl"), "--output", str(out), "--params", str(PARAMS)]) == 0
    assert not (out / "train-000099.tar").exists()
    assert digests(out) == digests(prepared)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mmprep.cli", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "/nonexistent/m.jsonl", "--output", "/tmp/x"], "no such manifest file"),
        (["--input", "/nonexistent", "--output", "/tmp/x"], "no such file or directory"),
    ],
)
def test_unusable_input_exits_nonzero_with_one_line(args, message):
    run = run_cli("prepare", *args)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in run.stderr


def test_bad_params_exit_nonzero_with_one_line(corpus, tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("prepare:\n  image:\n    size: huge\n")
    run = run_cli("prepare", "--input", str(corpus / "manifest.jsonl"), "--output", str(tmp_path / "o"), "--params", str(bad))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["mmprep prepare: error: prepare.image.size: expected int, got str 'huge'"]
