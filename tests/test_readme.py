"""The README stays a newcomer's page (issue 19): short, and everything it points to exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.synthetic import REPO_ROOT

README = REPO_ROOT / "README.md"
MAX_LINES = 300
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))


def _make_targets() -> set[str]:
    listed = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"^\s+make (\S+)", listed, re.M))


def _links(page: Path) -> list[str]:
    """Relative link targets of a markdown page (images included), anchors stripped."""
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    return [t.split("#")[0] for t in targets
            if not re.match(r"[a-z]+:", t) and t.split("#")[0]]


def test_readme_is_at_most_300_lines() -> None:
    assert len(README.read_text().splitlines()) <= MAX_LINES


def test_every_make_target_the_readme_names_exists() -> None:
    named = set(re.findall(r"\bmake ([a-z][a-z-]*[a-z])", README.read_text()))
    missing = named - _make_targets()
    assert not missing, f"README names make targets that do not exist: {sorted(missing)}"
    assert {"train", "test", "samples", "exps", "plots", "params"} <= named


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in _links(page):
        if not (page.parent / target).resolve().exists():
            broken.append(target)
    assert not broken, f"{page.name} links to missing files: {broken}"


def test_readme_points_to_the_docs_and_keeps_the_journal_out() -> None:
    text = README.read_text()
    for page in ("docs/team.md", "docs/operations.md", "docs/architecture.md"):
        assert f"]({page}" in text
    assert "load average" not in text  # measurements live in docs/performance.md
    assert "--base-port" in text and "chmod o+x" in text
    assert "make params" in text and re.search(r"about \d+ min on 2 cores", text)


def _headings(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    return {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in page.read_text().splitlines() if line.startswith("#")}


def test_anchors_into_the_docs_exist() -> None:
    """`docs/x.md#some-heading` and `#some-heading` links land on a heading of that page."""
    for page in [README, *DOCS]:
        for target, anchor in re.findall(r"\]\(([^)\s#]*)#([^)\s]+)\)", page.read_text()):
            linked = page.parent / target if target else page
            if linked.exists():
                assert anchor in _headings(linked), f"{page.name}: {target}#{anchor}: no heading"
