"""Every `docs/design.md §N` the repository cites names a section that exists in docs/design.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SCANNED = ("hybridize", "kernels", "bench", "recipes", "tools", "notebooks", "tests", "README.md", "CONTRIBUTING.md")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".ipynb", ".toml"}
# "docs/design.md §3.1", also a list: "docs/design.md §3.1, §3.2" or "§3.1 and §3.2"
CITATION = re.compile(r"docs/design\.md((?:(?:\s*,\s*|\s+and\s+|\s+)§\d+(?:\.\d+)*)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)


def sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def citations() -> dict[str, set[str]]:
    """{path relative to the repository: the sections it cites}"""
    found: dict[str, set[str]] = {}
    for name in SCANNED:
        top = ROOT / name
        files = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file() and p.suffix in SUFFIXES]
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            cited = {s for m in CITATION.finditer(text) for s in SECTION.findall(m.group(1))}
            if cited:
                found[str(path.relative_to(ROOT))] = cited
    return found


def test_design_document_has_numbered_sections():
    assert {"3.1", "3.2", "3.3", "3.4"} <= sections()


def test_citations_are_found():
    cited = citations()
    assert any(p.startswith("hybridize") for p in cited), cited


def test_every_cited_section_exists():
    have = sections()
    missing = {path: sorted(s - have) for path, s in citations().items() if s - have}
    assert missing == {}, f"citations of sections that docs/design.md does not have: {missing}"


def test_citation_pattern_reads_lists():
    m = CITATION.search("Reuse rules (docs/design.md §3.1, §3.2):")
    assert SECTION.findall(m.group(1)) == ["3.1", "3.2"]
