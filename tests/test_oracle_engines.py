"""Engines run through `dsref conformance run --engine-cmd` (docs/oracle.md, "Running an engine"):
the transformers adapter as a command grades like the in-process transformers engine, our own
`dsref golden` passes, and the command contract's UNSUPPORTED exit (status 3 + "unsupported:")."""
from __future__ import annotations

import json
import shlex
import sys

import pytest

from dsref.experiments.cli import main
from dsref.reference.oracle import conformance

# A subset keeps this under a minute (each command is a fresh Python importing torch), the cases
# they build on included: softmax-topk-norm fails (transformers ignores norm_topk_prob), mtp is
# unsupported (no MTP module), dense-first-k passes.
CASES = ["softmax-topk-norm", "mtp", "dense-first-k"]
PY = shlex.quote(sys.executable)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return conformance.write_kit(tmp_path_factory.mktemp("kit"), CASES)


def _run_json(argv, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(argv + ["--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_hf_adapter_command_grades_like_the_transformers_engine(kit, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cmd = f"{PY} -m dsref.reference.oracle.hf_adapter --checkpoint {{checkpoint}} --tokens {{tokens}} --out {{out}}"
    rc_cmd, by_cmd = _run_json(["conformance", "run", str(kit), "--engine-cmd", cmd], capsys)
    rc_eng, by_eng = _run_json(["conformance", "run", str(kit), "--engine", "transformers"], capsys)
    verdicts = {c["case"]: c["status"] for c in by_cmd["cases"]}
    assert verdicts == {c["case"]: c["status"] for c in by_eng["cases"]}, (by_cmd, by_eng)
    assert rc_cmd == rc_eng == 1
    assert verdicts == {"baseline": "pass", "softmax-router": "pass", "softmax-topk-norm": "fail",
                        "dense-first-k": "pass", "mtp": "unsupported"}
    first = {c["case"]: c["first_failure"] for c in by_cmd["cases"]}
    assert first["softmax-topk-norm"] == "layers.0.topk_weights"
    assert by_cmd["causes"] == ["softmax-topk-norm"] and by_cmd["engine"].startswith("transformers-")


def test_dsref_golden_as_an_engine_command_passes(kit, capsys):
    cmd = (f"{PY} -m dsref.experiments.cli golden --checkpoint {{checkpoint}} --tokens {{tokens}} "
           "--out {out}")
    rc, js = _run_json(["conformance", "run", str(kit), "--cases", "dense-first-k", "--engine-cmd", cmd], capsys)
    assert rc == 0 and js["ok"] and [c["status"] for c in js["cases"]] == ["pass", "pass"], js


@pytest.mark.parametrize("script,status", [
    ("echo 'unsupported: no FP8 here' >&2; exit 3", "unsupported"),
    ("echo 'segfault' >&2; exit 3", "error"),  # status 3 without the line is a crash, not a refusal
    ("exit 1", "error"),
])
def test_command_exit_status_contract(kit, script, status):
    eng = conformance.CommandEngine(f"sh -c {shlex.quote(script)} -- {{checkpoint}} {{tokens}} {{out}}")
    (_, r) = conformance.grade_kit(kit, eng, ["dense-first-k"])
    assert r.status == status, r
    if status == "unsupported":
        assert r.detail == "no FP8 here"


@pytest.fixture(scope="module")
def kit_v4(tmp_path_factory):
    return conformance.write_kit(tmp_path_factory.mktemp("kit_v4"), ["v4-hca"])  # + v4-baseline


def test_v4_cases_through_adapter_commands(kit_v4, capsys):
    """DeepSeek-V4 cases: the transformers adapter (deepseek_v4) passes them as a command; an adapter
    whose engine has no V4 model (torchtitan) answers UNSUPPORTED through the exit-3 contract."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cmd = f"{PY} -m dsref.reference.oracle.hf_adapter --checkpoint {{checkpoint}} --tokens {{tokens}} --out {{out}}"
    rc, js = _run_json(["conformance", "run", str(kit_v4), "--engine-cmd", cmd], capsys)
    assert rc == 0 and [(c["case"], c["status"]) for c in js["cases"]] == [("v4-baseline", "pass"),
                                                                          ("v4-hca", "pass")], js
    tt = f"{PY} -m dsref.reference.oracle.adapters.torchtitan --checkpoint {{checkpoint}} --tokens {{tokens}} --out {{out}}"
    (r,) = conformance.grade_kit(kit_v4, conformance.CommandEngine(tt), ["v4-baseline"])
    assert r.status == "unsupported" and "DeepSeek-V4" in r.detail, r
