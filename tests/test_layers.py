"""The import direction of DESIGN.md, and the docs that must match the code."""

import re
import subprocess
import sys
from pathlib import Path

from mmprep.records import REASONS

ROOT = Path(__file__).resolve().parents[1]


def test_mmprep_imports_neither_beam_nor_torch():
    code = (
        "import sys, mmprep.cli, mmprep.config, mmprep.process, mmprep.manifest, mmprep.shards, mmprep.inspection, "
        "mmprep.image, mmprep.audio, mmprep.text, mmprep.split, mmprep.stats, mmprep.tokenizer, mmprep.democorpus; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('apache_beam', 'torch', 'webdataset', 'pipelines', 'train')))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert run.stdout.strip() == "[]"


def test_pipelines_and_train_never_import_each_other():
    for folder, other in (("pipelines", "train"), ("train", "pipelines")):
        for path in (ROOT / folder).glob("*.py"):
            assert not re.search(rf"^\s*(from|import) {other}\b", path.read_text(), re.M), path


def test_docs_document_exactly_the_reject_reasons():
    contract = (ROOT / "docs" / "data-contract.md").read_text()
    section = contract.split("## Reject reasons", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", section, re.M))
    assert documented == set(REASONS)
