"""The documentation's relative links point at files that exist (results files are renamed and
paragraphs move between the READMEs; a link written from the wrong folder is easy to miss)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "benchmarks/README.md", "csrc/README.md"]
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    path = ROOT / doc
    targets = [m.group(1) for m in LINK.finditer(path.read_text())]
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert local, f"{doc}: no relative links found (the pattern no longer matches?)"
    missing = [t for t in local if not (path.parent / t).exists()]
    assert not missing, f"{doc}: links to missing files: {missing}"
