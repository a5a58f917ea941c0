"""`dvc repro` end to end on a small demo corpus, in a copy of this checkout; then a no-op repro."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tracked_copy(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def dvc(repo: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(repo))
    run = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True, env=env, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_noop(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    tracked_copy(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["demo_corpus"]["samples"] = 240
    params["train"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    video = yaml.safe_load((repo / "params-video.yaml").read_text())  # layered over params.yaml by the video demo
    video["demo_corpus"]["samples"], video["train"]["epochs"] = 160, 2
    (repo / "params-video.yaml").write_text(yaml.safe_dump(video, sort_keys=False))
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "clone"], cwd=repo, check=True)  # like a fresh clone
    dvc(repo, "repro")
    dataset = json.loads((repo / "data" / "prepared" / "dataset.json").read_text())
    assert dataset["counts"]["kept"] > 200
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    if "evaluate" in stages:
        metrics = json.loads((repo / "metrics" / "eval.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert "accuracy" in dvc(repo, "metrics", "show")
        report = (repo / "reports" / "dataset.html").read_text()  # the dataset report links the training report
        assert 'href="../metrics/eval.html"' in report and (repo / "metrics" / "eval.html").exists()
    videos = json.loads((repo / "data" / "prepared_video" / "dataset.json").read_text())
    assert videos["features"]["video"]["size"] == 32 and videos["counts"]["modalities"]["train"]["video"] > 80
    assert "video_only" in json.loads((repo / "metrics" / "eval_video.json").read_text())["ablation"]
    assert (repo / "reports" / "video.html").stat().st_size > 10000
    again = dvc(repo, "repro")
    assert "up to date" in again or "didn't change" in again, again
    assert (repo / "dvclive" / "plots" / "images" / "curves.png").stat().st_size > 1000  # renders offline

    # predict: one raw demo sample through the same preprocessing as the pipeline
    row = json.loads((repo / "data" / "demo_corpus" / "manifest.jsonl").read_bytes().splitlines()[0])  # the file holds invalid UTF-8 on purpose
    media = repo / "data" / "demo_corpus"
    env = dict(os.environ, PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "mmprep.cli", "predict", "--model", str(repo / "runs" / "demo"),
           "--image", str(media / row["image"]), "--audio", str(media / row["audio"]), "--text", row["text"]]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert out[0] in dataset["labels"] and len(out) == 1 + len(dataset["labels"])
    clip = next(r for r in map(json.loads, (repo / "data" / "video_corpus" / "manifest.jsonl").read_bytes().splitlines()[12:20])
                if "video" in r)
    cmd = [sys.executable, "-m", "mmprep.cli", "predict", "--model", str(repo / "runs" / "video"),
           "--video", str(repo / "data" / "video_corpus" / clip["video"]), "--text", clip["text"]]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.splitlines()
    assert out[0] in videos["labels"] and len(out) == 1 + len(videos["labels"])

    # an experiment with another fusion module
    dvc(repo, "exp", "run", "-S", "train.fusion=attention")
    table = dvc(repo, "exp", "show", "--csv")
    assert "attention" in table and "accuracy" in table, table


def _imported_modules(entry: str) -> set[str]:
    """The project modules `entry` imports, also inside functions (lazy imports), transitively."""
    import ast

    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if name in seen or not path.exists():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    return {m for m in seen if m.split(".")[0] in ("mmprep", "train", "pipelines")}


@pytest.mark.parametrize(("stage", "entry"), [("train", "train.recipe"), ("evaluate", "train.evaluate"),
                                               ("train_video", "train.recipe"), ("evaluate_video", "train.evaluate"),
                                               ("prepare", "pipelines.prepare"), ("report", "mmprep.report")])
def test_each_stage_depends_on_the_code_it_runs(stage, entry):
    # a module a stage runs but does not declare: editing it would not rerun the stage (stale outputs)
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    code = {d for d in deps if isinstance(d, str) and (ROOT / d).exists() and not d.startswith("data/")}
    missing = []
    for module in sorted(_imported_modules(entry)):  # (not mmprep.cli: it only dispatches)
        file = module.replace(".", "/") + ".py"
        if not any(file == d or file.startswith(d.rstrip("/") + "/") for d in code):
            missing.append(file)
    assert not missing, f"stage {stage} runs {missing} but does not list it in its deps"
