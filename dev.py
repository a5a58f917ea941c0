#!/usr/bin/env python3
"""Set-up and entry points for a fresh machine with only Python 3.10+.

    python3 dev.py demo     # venv + deps, then `dvc repro`: demo corpus → prepare → train → evaluate
    python3 dev.py test     # venv + deps, then the whole test suite (pytest; extra args pass through)

The virtual environment lives in .venv. torch is installed only when the venv has none
(MMPREP_TORCH overrides the requirement, e.g. a CUDA build), so a GPU user's torch stays.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
TORCH = os.environ.get("MMPREP_TORCH", "torch==2.13.0")


def sh(*cmd: str | Path, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def ensure_env() -> dict[str, str]:
    if not PY.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
        sh(PY, "-m", "pip", "install", "-q", "--upgrade", "pip")
    if subprocess.run([str(PY), "-c", "import torch"], capture_output=True).returncode != 0:
        sh(PY, "-m", "pip", "install", "-q", TORCH)
    stamp = VENV / ".mmprep-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        sh(PY, "-m", "pip", "install", "-q", "-e", ".[dev]")
        stamp.write_text(digest)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(VENV))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def summary() -> None:
    """The headline numbers (`dvc metrics show` lists every per-class value too)."""
    import json

    for name, what, report in (("eval", "", "reports/dataset.html"), ("eval_video", "video demo: ", "reports/video.html")):
        path = ROOT / "metrics" / f"{name}.json"
        if path.exists():
            m = json.loads(path.read_text())
            ablation = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in m["ablation"].items() if v["accuracy"] is not None)
            print(f"\n{what}test accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}; one modality only: {ablation}")
            print(f"open offline: {report} (the data) and metrics/{name}.html (the model)")
    print("more: dvc metrics show | dvc plots show | mmprep inspect data/prepared | runs/demo/curves.png")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__, file=sys.stderr)
        return 2
    env = ensure_env()
    if argv[0] == "demo":
        sh(BIN / "dvc", "repro", *argv[1:], env=env)
        summary()
    elif argv[0] == "test":
        sh(PY, "-m", "pytest", *(argv[1:] or ["-q"]), env=env)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
