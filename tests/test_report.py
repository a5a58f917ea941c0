"""`mmprep report`: one HTML file that opens offline, checked in a real headless browser."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MMPREP_TEST_ARTIFACTS", ROOT / ".test-artifacts"))


def mm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mmprep.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report")
    corpus, out = base / "corpus", base / "prepared"
    assert mm("demo-corpus", str(corpus), "--samples", "300", "--params", str(ROOT / "params.yaml")).returncode == 0
    run = mm("prepare", "--input", str(corpus / "manifest.jsonl"), "--output", str(out), "--params", str(ROOT / "params.yaml"),
             "--no-cache")
    assert run.returncode == 0, run.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def report(prepared) -> tuple[Path, str]:
    run = mm("report", "--data", str(prepared), "--per-label", "2")
    assert run.returncode == 0, run.stderr[-2000:]
    path = prepared / "report.html"
    assert str(path) in run.stdout
    return path, path.read_text(encoding="utf-8")


def test_the_report_is_one_file_that_needs_no_network(report):
    _, text = report
    assert "<script" not in text.lower()
    sources = re.findall(r'\b(?:src|href)="([^"#][^"]*)"', text)
    assert sources, "no images or audio at all"
    assert all(s.startswith("data:") for s in sources), [s[:60] for s in sources if not s.startswith("data:")]
    assert "@import" not in text and "url(" not in text  # no stylesheet or font fetched either


def test_the_report_shows_the_counts_gallery_and_card_of_the_data(prepared, report):
    _, text = report
    ds = json.loads((prepared / "dataset.json").read_text())
    c = ds["counts"]
    for figure in (c["input_rows"], c["kept"], c["rejected"]):
        assert f"<b>{figure:,}</b>" in text
    for reason in c["rejects"]:
        assert f"<td>{reason}</td>" in text  # each reason with its examples
    counts = _label_counts(prepared)
    assert len(counts) <= 24  # every label has its place in the gallery: 2 samples each (--per-label 2)
    assert text.count('<div class="sample">') == sum(min(2, n) for n in counts.values())
    assert text.count("<audio ") == text.count('<div class="sample">')  # every demo sample has audio
    for name, shard in ds["shards"].items():
        assert name in text and shard["sha256"] in text
    assert "No group is in two splits" in text
    assert "text.max_tokens" in text and "unknown-token rate" in text


def _label_counts(prepared: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in pq.read_table(prepared / "manifest.parquet", columns=["label"]).to_pylist():
        counts[r["label"] or "<unlabeled>"] = counts.get(r["label"] or "<unlabeled>", 0) + 1
    return counts


def test_a_group_in_two_splits_is_shown_as_leakage(prepared, tmp_path):
    """The leakage check can fail: move one member of a group to another split."""
    leaky = tmp_path / "leaky"
    shutil.copytree(prepared, leaky)
    table = pq.read_table(leaky / "manifest.parquet")
    rows = table.to_pylist()
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[r["group"]] = sizes.get(r["group"], 0) + 1
    group = max(sizes, key=sizes.get)
    assert sizes[group] > 1, "the demo corpus has linked samples"
    member = next(r for r in rows if r["group"] == group)
    member["split"] = "test" if member["split"] != "test" else "train"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), leaky / "manifest.parquet")
    run = mm("report", "--data", str(leaky))
    assert run.returncode == 0, run.stderr[-2000:]
    text = (leaky / "report.html").read_text()
    assert "1 group(s) are in more than one split" in text and group in text


def test_report_of_a_directory_that_is_not_a_dataset_is_one_line(tmp_path):
    run = mm("report", "--data", str(tmp_path))
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "dataset.json" in run.stderr


def _chromium() -> str:
    """Debian's chromium, installed here when missing (apt, as root); otherwise the test says why it skips."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("needs Debian's chromium (apt-get install chromium): no apt-get or not root here to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium ({' '.join(cmd)}): {done.stderr.strip()[-300:]}")
    return shutil.which("chromium") or pytest.skip("apt-get installed chromium but it is not on PATH")


HARNESS = """<!DOCTYPE html><html><body>
<iframe id="r" src="REPORT" style="width:1280px;height:1000px"></iframe><pre id="result">pending</pre>
<script>
const out = document.getElementById('result');
document.getElementById('r').addEventListener('load', async () => {
  const doc = document.getElementById('r').contentDocument;
  const imgs = [...doc.images];
  await Promise.all(imgs.map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; })));
  const audios = [...doc.querySelectorAll('audio')];
  await Promise.all(audios.map(a => a.readyState >= 1 ? 0 : new Promise(r => {
    a.onloadedmetadata = a.onerror = r; a.load(); })));
  out.textContent = 'RESULT' + JSON.stringify({
    images: imgs.length, broken: imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.alt),
    charts: imgs.filter(i => i.alt.includes(' ') && i.naturalWidth > 100).length,
    audios: audios.length, silent: audios.filter(a => !(a.readyState >= 1 && a.duration > 0.1)).length,
    durations: audios.slice(0, 3).map(a => a.duration)}) + 'END';
});
</script></body></html>"""


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser_with_images_charts_and_playable_audio(report, tmp_path):
    chromium = _chromium()
    path, text = report
    harness = path.parent / "harness.html"
    harness.write_text(HARNESS.replace("REPORT", path.name))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files",
             "--enable-logging=stderr", "--v=0"]
    run = subprocess.run([chromium, *flags, "--virtual-time-budget=30000", "--dump-dom", harness.as_uri()],
                         capture_output=True, text=True, timeout=180)
    found = re.search(r"RESULT(.*?)END", run.stdout, re.S)
    assert found, f"the harness did not finish: {run.stdout[-500:]} {run.stderr[-1500:]}"
    result = json.loads(found.group(1))
    assert result["images"] == text.count("<img ") and result["broken"] == []
    assert result["charts"] >= 6  # bars and histograms, each a PNG the browser decoded
    assert result["audios"] == text.count("<audio ") > 0 and result["silent"] == 0, result
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console  # no console message at all: no script in the report, nothing failed to load
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    snap = subprocess.run([chromium, *flags[:4], "--window-size=1280,4000", f"--screenshot={shot}", path.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert shot.exists(), snap.stderr[-1000:]
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (4000, 1280) and pixels.std() > 20  # a page with pictures, not a blank one


def test_a_dataset_prepared_before_split_groups_were_recorded_still_gets_its_report(prepared, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    table = pq.read_table(old / "manifest.parquet")
    pq.write_table(table.drop_columns(["group"]), old / "manifest.parquet")
    run = mm("report", "--data", str(old))
    assert run.returncode == 0, run.stderr[-2000:]
    text = (old / "report.html").read_text()
    assert "no <code>group</code> column" in text and "<audio " in text


def test_a_text_only_dataset_gets_a_report_without_images_or_audio(tmp_path):
    """Data the demo never makes: no image or audio at all (no such features in dataset.json)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": f"r{i}", "text": f"note number {i} — ünïcode 文字", "label": "ab"[i % 2]})
                                  for i in range(40)) + "\n", encoding="utf-8")
    run = mm("prepare", "--input", str(manifest), "--output", str(tmp_path / "out"), "--no-cache")
    assert run.returncode == 0, run.stderr[-2000:]
    run = mm("report", "--data", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr[-2000:]
    text = (tmp_path / "out" / "report.html").read_text()
    assert "<audio " not in text and 'alt="image of' not in text and "token length" in text
    assert text.count('<div class="sample">') == 6  # 3 per label


def test_report_refuses_a_negative_gallery_and_a_missing_training_report_in_one_line(tmp_path, capsys):
    from mmprep.cli import main

    for extra, message in ((["--per-label", "-1"], "--per-label and --max-labels must be >= 0"),
                           (["--training", str(tmp_path / "nope.html")], "nope.html: no such file")):
        assert main(["report", "--data", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
