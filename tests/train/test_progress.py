"""Train and evaluate show a progress bar with rate and ETA on a terminal, plain lines in logs."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from factory import write_tiny_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("progress")
    data = write_tiny_dataset(base / "data")
    params = base / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"width": 16, "epochs": 1, "batch_size": 32, "log_every": 4, "augment": False},
                                      "evaluate": {"batch_size": 16}}))
    return data, params


def run(args: list[str], tty: bool) -> str:
    """The command's stderr (and stdout), through a pseudo-terminal when `tty`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    env.pop("MMPREP_NO_BAR", None)
    cmd = [sys.executable, "-m", "mmprep.cli", *args]
    if not tty:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal 120 columns wide
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, env=env, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=600) == 0, b"".join(chunks)[-2000:]
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_bars_with_rate_and_eta_and_a_log_gets_plain_lines(setup, tmp_path):
    data, params = setup
    for tty in (True, False):
        model = tmp_path / f"run-{tty}"
        train = run(["train", "--data", str(data), "--output", str(model), "--params", str(params)], tty)
        evaluate = run(["evaluate", "--data", str(data), "--model", str(model), "--output", str(tmp_path / f"m-{tty}.json"),
                        "--params", str(params)], tty)
        if tty:  # tqdm: "[train] epoch 1/1:  50%|…| 6/12 [00:01<00:01,  5.2batch/s]"
            assert re.search(r"\[train\] epoch 1/1: .*\d+/12 \[\d+:\d+<\d+:\d+, +[\d.]+(batch/s|s/batch)", train), train[-800:]
            assert re.search(r"\[evaluate\] test: .*\d+/4 \[\d+:\d+<\d+:\d+", evaluate), evaluate[-800:]
        else:
            assert "\r" not in train + evaluate  # no bar's control characters in a log file
            assert re.search(r"\[train\] step 4/12 loss [\d.]+ .* samples/s", train), train[-800:]
            assert re.search(r"\[evaluate\] test: batch 4/4 \([\d.]+ batches/s, ETA 0s\)", evaluate), evaluate[-800:]
        assert "accuracy" in evaluate
