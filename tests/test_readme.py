"""The README and docs/ hold together: every doc is reachable from the README, every
relative link in them resolves, the docs build as a site (`make docs`: MkDocs, strict),
the README's grid is the shipped smoke grid, and the record schema in docs/records.md is
what `orchestrate schema` prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.records import describe_schema

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links(path: Path) -> list[str]:
    """Relative link targets of a Markdown file (web addresses and anchors left out)."""
    return [t for t in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:|#", t)]


def test_every_doc_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t).resolve() for t in _links(README)}
    unlinked = [d.name for d in DOCS if d.resolve() not in linked]
    assert unlinked == [], "link each doc from the README's Documentation section"


def test_the_docs_build_as_a_site(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "analysis" / "index.html").read_text()
    assert "Findings" in page and 'href="../records/"' in page


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(path: Path) -> None:
    broken = [t for t in _links(path) if not (path.parent / t.split("#")[0]).exists()]
    assert broken == []


def test_readme_grid_is_the_smoke_grid() -> None:
    block = re.search(r"```yaml\n(name: smoke\n.*?)```", README.read_text(), flags=re.S)
    assert block is not None
    assert yaml.safe_load(block.group(1)) == yaml.safe_load((ROOT / "grid/smoke.yaml").read_text())


def test_readme_starts_with_the_purpose_and_the_two_commands() -> None:
    text = README.read_text()
    assert text.index("memory") < text.index("make demo") < text.index("make test")
    assert text.index("make test") < text.index("## ")


def test_records_doc_is_the_schema_the_command_prints() -> None:
    assert describe_schema() in (ROOT / "docs" / "records.md").read_text()
