"""Reading the built documentation site: the text of cell outputs and of whole pages.

Shared by tests/test_docs_site.py and the per-chapter checks (tests/docs_checks_*.py).
"""
from __future__ import annotations

import html
import re
from pathlib import Path


def cell_outputs(page: Path) -> str:
    """The text of every cell output of a built page, tags stripped, whitespace collapsed."""
    parts = re.split(r'<div class="cell_output docutils container">', page.read_text())[1:]
    # each output block ends where the next cell or section starts; the following prose may be
    # included in a part, so callers look only for strings that cells print
    text = " ".join(re.sub(r"<[^>]+>", " ", p.split('<div class="cell docutils container"')[0].split("<section")[0])
                    for p in parts)
    return re.sub(r"\s+", " ", html.unescape(text))


def page_text(page: Path) -> str:
    """The whole page as text (highlighted source comes out token by token in <span>s)."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", page.read_text())))


def page_images(page: Path, site: Path) -> list[Path]:
    """The PNG figures a built page shows (cell outputs are written to site/_images)."""
    return [site / i for i in re.findall(r'<img[^>]+src="\.\./(_images/[^"]+\.png)"', page.read_text())]
