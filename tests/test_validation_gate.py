"""docs/validation.json is a regression gate.

The predicted figures are recomputed on validate's default path (every experiment, full-length
simulations, no closed loop -- the ``validation_records`` session fixture of conftest.py, shared
with tests/test_experiments.py) and compared with the committed docs/validation.json. A figure
that moves by more than 1% fails: a change of behaviour must regenerate the file, from the
repository root, in the same commit:

    dsref validate --out-dir docs
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dsref.experiments.registry import Record

DOC = Path(__file__).resolve().parent.parent / "docs" / "validation.json"
REL_TOL = 0.01
REGENERATE = ("docs/validation.json is out of date. If the change is intended, regenerate it (and "
              "validation.md and img/validation_*.png) in the same commit, from the repository root:\n"
              "    dsref validate --out-dir docs\n"
              "(keeps the stored closed loop; add --closed-loop to remeasure it)")


def _moved(old: float | None, new: float | None, rel_tol: float) -> float | None:
    """Signed relative move from ``old`` to ``new`` when it exceeds ``rel_tol`` (else None);
    inf when only one of them is a number or ``old`` is 0 and ``new`` is not."""
    if old is None and new is None:
        return None
    if old is None or new is None or not (math.isfinite(old) and math.isfinite(new)):
        return None if old == new else math.inf
    if old == 0:
        return None if abs(new) <= 1e-12 else math.inf
    rel = (new - old) / abs(old)
    return rel if abs(rel) > rel_tol else None


def _fmt(x) -> str:
    return "None" if x is None else f"{x:,.6g}"


def gate_failures(stored: list[dict], records: list[Record], rel_tol: float = REL_TOL) -> list[str]:
    """One line per claim whose figure moved (or appeared, vanished, changed status, role or published
    value) between the stored claims of validation.json and freshly computed records."""
    old = {c["key"]: c for c in stored}
    new = {r.key: r for r in records}
    out = [f"{k}: in docs/validation.json but no longer computed" for k in old if k not in new]
    out += [f"{k}: computed ({new[k].status}, predicted {_fmt(new[k].predicted)}) but not in "
            "docs/validation.json" for k in new if k not in old]
    for k in (k for k in new if k in old):
        o, r = old[k], new[k]
        if o["status"] != r.status:
            out.append(f"{k}: status {o['status']} -> {r.status}")
        if o.get("role", "validation") != r.role:  # a claim moved in or out of the statistics
            out.append(f"{k}: role {o.get('role', 'validation')} -> {r.role}")
        if _moved(o["published"], r.published, 1e-9) is not None:
            out.append(f"{k}: published {_fmt(o['published'])} -> {_fmt(r.published)} (claims file changed)")
        rel = _moved(o["predicted"], r.predicted, rel_tol)
        if rel is not None:
            by = "" if math.isinf(rel) else f" ({rel:+.2%}; limit ±{rel_tol:.0%})"
            out.append(f"{k}: predicted {_fmt(o['predicted'])} -> {_fmt(r.predicted)} {r.unit}{by}")
    return out


def test_gate_message_names_the_claim_and_the_move():
    rec = Record("x", 103.0, 90.0, "tok/s", "src")
    stored = [{**rec.to_dict(), "predicted": 100.0}]
    assert gate_failures(stored, [rec]) == ["x: predicted 100 -> 103 tok/s (+3.00%; limit ±1%)"]
    assert gate_failures(stored, [Record("x", 100.9, 90.0, "tok/s", "src")]) == []
    assert gate_failures([], [rec])[0].startswith("x: computed")
    assert gate_failures(stored, [])[0] == "x: in docs/validation.json but no longer computed"
    cal = Record("x", 100.0, 90.0, "tok/s", "src", role="calibration")
    assert gate_failures(stored, [cal]) == ["x: role validation -> calibration"]
    nm = Record("x", None, 90.0, "tok/s", "src", status="not_modelled")
    assert gate_failures(stored, [nm]) == ["x: status predicted -> not_modelled",
                                           "x: predicted 100 -> None tok/s"]


@pytest.mark.slow
def test_docs_validation_json_matches_the_code(validation_records):
    stored = json.loads(DOC.read_text())["claims"]
    failures = gate_failures(stored, validation_records)
    assert not failures, (f"{len(failures)} figure(s) moved by more than {REL_TOL:.0%} from "
                          "docs/validation.json:\n  " + "\n  ".join(failures) + "\n" + REGENERATE)
