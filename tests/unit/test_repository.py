"""The repository is self-contained: the code cites the project's own contract documents."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "drivers", "simulator", "cmcs", "bench", "information_model", "siteconfig", "tsnwire", "tests")
OUTSIDE = re.compile(r"\b(INTERFACE|DOMAIN|DESIGN)\.md\b|\.\./shared/")


def test_no_source_cites_a_document_outside_the_repository():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.resolve() == Path(__file__).resolve():
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if OUTSIDE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "cite docs/interface.md, docs/domain.md or docs/design.md instead:\n" + "\n".join(offenders)


def test_the_cited_contract_documents_exist():
    for name in ("interface.md", "domain.md", "design.md"):
        text = (ROOT / "docs" / name).read_text(encoding="utf-8")
        assert len(text) > 2000, f"docs/{name} is missing or a stub"
