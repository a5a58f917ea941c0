"""The README and docs/ are all a user has: every link must lead somewhere inside the repository."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = unicodedata.normalize("NFKC", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks are not links
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http(s):, mailto: … are not files
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if ROOT not in (dest, *dest.parents):
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_docs_point_nowhere_outside_the_repository():
    outside = "../" + "shared"  # the developers' workspace: users never have it
    for doc in DOCS:
        assert outside not in doc.read_text(), f"{doc.relative_to(ROOT)} points to {outside}"


def test_the_readme_links_the_data_contract():
    assert "](docs/data-contract.md)" in (ROOT / "README.md").read_text()


def test_the_link_check_catches_a_broken_link(tmp_path, monkeypatch):
    """The check itself: a made-up link is found (so the test above can fail)."""
    doc = ROOT / "docs" / "data-contract.md"
    assert "docs/nothing-here.md" not in {t for t in _links(doc)}
    fake = tmp_path / "x.md"
    fake.write_text("see [a](nothing-here.md) and [b](#no-such-heading)\n# Real\n")
    assert _links(fake) == ["nothing-here.md", "#no-such-heading"]
    assert "no-such-heading" not in _anchors(fake) and "real" in _anchors(fake)
