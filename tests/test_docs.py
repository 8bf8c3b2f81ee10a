"""The README stays short and every relative link in the docs points at a file that exists.

README.md is the front door (at most 250 lines); reference lives in docs/, history in
CHANGELOG.md. A link that leaves the checkout (the shared design briefs, ``../shared/docs/``) is
checked only where that folder is beside the checkout."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```", re.DOTALL)


def links(doc: Path, anchors: bool = False) -> list:
    """The relative link targets of a markdown file (code blocks left out); with ``anchors``,
    (file, anchor) pairs, the anchor "" where there is none."""
    text = CODE.sub("", doc.read_text())
    found = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path, _, anchor = target.partition("#")
        found.append((path, anchor) if anchors else path)
    return found


def slugs(doc: Path) -> set[str]:
    """GitHub's anchors for a markdown file's headings."""
    text = CODE.sub("", doc.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_the_readme_is_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_perf_markers_are_in_docs_performance_and_nowhere_else():
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    import bench_perf  # a script beside the tests, not a package

    body = bench_perf.PERF_DOC.read_text()
    assert bench_perf.START in body and bench_perf.END in body
    assert bench_perf.START not in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert doc.exists()
    missing = []
    for target in links(doc):
        path = (doc.parent / target).resolve()
        if not path.is_relative_to(ROOT):
            if not path.is_relative_to(ROOT.parent):
                continue
            outside = path.relative_to(ROOT.parent).parts[0]
            if not (ROOT.parent / outside).is_dir():
                continue  # e.g. ../shared/ is not beside this checkout
        if not path.exists():
            missing.append(target)
    for target, anchor in links(doc, anchors=True):
        path = (doc.parent / target).resolve()
        if anchor and path.suffix == ".md" and path.exists() and anchor not in slugs(path):
            missing.append(f"{target}#{anchor}")
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def test_the_link_finder_sees_links_and_images_but_not_code():
    doc = ROOT / "README.md"
    found = links(doc)
    assert "docs/img/explorer.png" in found and "docs/architecture.md" in found
