"""Reference pages written by code are what the code writes today (issue 20: no number in the prose
that a cell does not compute or a test does not check against the code).

The what-if pages are regenerated into a temporary directory and compared byte for byte with the
committed ones; a change of behaviour must regenerate them in the same commit (the command is in
each failure message). docs/validation.md is gated by tests/test_validation_gate.py (1% per figure).
The V4 page takes about 25 s of simulation, the others a few seconds.
"""
from __future__ import annotations

from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _same(page: str, out: Path, command: str) -> None:
    new, old = (out / page).read_text(), (DOCS / page).read_text()
    if new != old:
        diff = next(f"line {i + 1}:\n  committed: {a}\n  code now:  {b}"
                    for i, (a, b) in enumerate(zip(old.splitlines() + [""], new.splitlines() + [""])) if a != b)
        pytest.fail(f"docs/{page} is not what the code writes now ({diff}).\nRegenerate it from the "
                    f"repository root:\n    {command}")


def test_whatif_pages_are_current(tmp_path):
    from dsref.experiments import whatif
    whatif.main(str(tmp_path))
    for page in ("whatif-serving-cost.md", "whatif-ascend-training.md", "whatif-six-million.md"):
        _same(page, tmp_path, "python -m dsref.experiments.whatif --out-dir docs")


def test_v32_whatif_page_is_current(tmp_path):
    from dsref.experiments import whatif_v32
    whatif_v32.main(str(tmp_path))
    _same("whatif-v32-sparse-attention.md", tmp_path, "python -m dsref.experiments.whatif_v32 --out-dir docs")


def test_v4_whatif_page_is_current(tmp_path):
    from dsref.experiments import whatif_v4
    whatif_v4.main(str(tmp_path))
    _same("whatif-v4-generations.md", tmp_path, "python -m dsref.experiments.whatif_v4 --out-dir docs")


def test_the_check_sees_a_changed_number(tmp_path):
    """The comparison fails on one changed digit."""
    page = "whatif-six-million.md"
    text = (DOCS / page).read_text()
    i = next(i for i, ch in enumerate(text) if ch.isdigit())
    (tmp_path / page).write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])
    with pytest.raises(pytest.fail.Exception, match="is not what the code writes now"):
        _same(page, tmp_path, "cmd")
