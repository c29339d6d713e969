"""Every citation of the project's own method documents points at a section that exists.

Code, YAML and README cite ``docs/method.md §N.M`` (and ``docs/data_notes.md §N``); the numbering of those documents
is stable because of that. A citation of a missing section, or a document without the section headings, fails here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("method.md", "data_notes.md")
CITATION = re.compile(r"docs/(method|data_notes)\.md §(\d+(?:\.\d+)?)((?:[-,/] ?(?:§)?\d+(?:\.\d+)?)*)")
HEADING = re.compile(r"^#{2,3} §(\d+(?:\.\d+)?)\b", re.MULTILINE)


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    keep = (".py", ".yaml", ".md", ".sh", ".sbatch", ".toml", ".cfg")
    return [REPO / n for n in names if n.endswith(keep) and "published_splits" not in n and (REPO / n).is_file()]


def _sections(doc: str) -> set[str]:
    return set(HEADING.findall((REPO / "docs" / doc).read_text()))


def _cited() -> dict[str, set[tuple[str, str]]]:
    cited: dict[str, set[tuple[str, str]]] = {d: set() for d in DOCS}
    for path in _tracked_text_files():
        for doc, first, rest in CITATION.findall(path.read_text(errors="replace")):
            numbers = [first] + re.findall(r"\d+(?:\.\d+)?", rest)
            for number in numbers:
                cited[f"{doc}.md"].add((number, str(path.relative_to(REPO))))
    return cited


@pytest.mark.parametrize("doc", DOCS)
def test_document_has_numbered_sections(doc):
    sections = _sections(doc)
    assert len(sections) >= 5, f"docs/{doc} has no '## §N' / '### §N.M' headings"


@pytest.mark.parametrize("doc", DOCS)
def test_every_citation_resolves(doc):
    sections = _sections(doc)
    cited = _cited()[doc]
    missing = sorted({(number, where) for number, where in cited if number not in sections})
    assert not missing, f"citations of docs/{doc} sections that do not exist: {missing[:20]}"


def test_method_citations_are_used_in_the_code():
    # A guard on the test itself: the code base cites the method document widely.
    assert len(_cited()["method.md"]) > 100
