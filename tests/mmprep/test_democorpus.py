"""The demo corpus generators (the default task is checked end to end in tests/pipelines)."""

import json

from mmprep.democorpus import REDUNDANT_CLASSES, write_demo_corpus


def test_redundant_demo_corpus_carries_the_label_in_each_modality_and_misses_some(tmp_path):
    summary = write_demo_corpus(tmp_path, samples=120, seed=3, dirt_ratio=0.0, task="redundant", missing=0.3)
    dirt = json.loads((tmp_path / "dirt.json").read_text())
    dirty = {d["line"] for d in dirt if not d["kind"].startswith("lacks_")}  # one of each kind, even at ratio 0
    lines = (tmp_path / "manifest.jsonl").read_bytes().splitlines()
    rows = [json.loads(line) for n, line in enumerate(lines, 1) if n not in dirty]
    assert set(summary["labels"]) == set(REDUNDANT_CLASSES) and len(lines) == 120
    lacking = [r for r in rows if not {"image", "audio", "text"} <= set(r)]
    assert 0.15 < len(lacking) / len(rows) < 0.45
    assert all(sum(m in r for m in ("image", "audio", "text")) == 2 for r in lacking)
    assert {d["id"] for d in dirt if d["kind"].startswith("lacks_")} == {r["id"] for r in lacking}


def test_the_demo_corpus_is_the_same_bytes_a_second_later(tmp_path):
    """libsndfile stamps float WAVs with the current second; the corpus must not change with it
    (its clips included: written twice in one process)."""
    import hashlib
    import time

    def digest(out):
        write_demo_corpus(out, samples=60, seed=1, video=0.2)
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*")) if p.is_file()}

    first = digest(tmp_path / "a")
    time.sleep(1.1)
    assert digest(tmp_path / "b") == first
