"""Experiments vs published claims: every experiment runs (fast mode) and returns well-formed records."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from dsref.experiments import registry, validate
from dsref.experiments.registry import INPUT_IDS, Record, record, signed_error

CLAIMS = registry.load_claims()  # packaged: experiments/data/public_claims.json


@pytest.fixture(scope="module")
def records(validation_records):
    """validate's records, as docs/validation.json holds them (conftest: one run per session)."""
    return validation_records


def test_signed_error_formula():
    assert signed_error(110.0, 100.0) == pytest.approx(0.10)
    assert signed_error(90.0, 100.0) == pytest.approx(-0.10)
    assert signed_error(None, 100.0) is None
    assert signed_error(1.0, 0.0) is None
    r = Record("x", 3.0, 4.0, "u", "s")
    assert r.error == pytest.approx(-0.25)
    assert r.to_dict()["error"] == pytest.approx(-0.25)


def test_claims_ship_with_the_package():
    """The claims (each with its source and role) are package data of dsref.experiments, read through
    importlib.resources -- not a file outside the installed package."""
    res = registry.claims_resource()
    assert res.is_file()
    rows = json.loads(res.read_text(encoding="utf-8"))
    assert len(rows) == len(CLAIMS) >= 47  # ids are unique (load_claims checks)
    for c in rows:
        assert c["id"] and "value" in c and c["unit"] and c["source"] and c["role"] in registry.ROLES, c
    assert registry.load_claims(str(res)) == CLAIMS


def test_input_ids_exist_and_are_refused():
    for cid in INPUT_IDS:
        assert cid in CLAIMS
        with pytest.raises(ValueError, match="input"):
            record(CLAIMS, cid, 1.0)
    with pytest.raises(KeyError):
        record(CLAIMS, "no_such_claim", 1.0)


def test_every_experiment_returns_wellformed_records(records):
    assert records
    seen = set()
    for r in records:
        assert isinstance(r, Record)
        assert r.id in CLAIMS, r.id
        assert r.id not in INPUT_IDS, r.id
        assert r.status in registry.STATUSES
        assert r.key not in seen, f"duplicate record {r.key}"
        seen.add(r.key)
        assert r.unit and r.source and r.published is not None
        if r.status == "not_modelled":
            assert r.predicted is None and r.note
        else:
            assert r.predicted is not None and math.isfinite(r.predicted), r.key
            assert r.error == pytest.approx((r.predicted - r.published) / r.published)
    # every experiment in the registry contributed
    assert len(registry.EXPERIMENTS) == len(set(registry.experiment_names()))


def test_every_claim_is_accounted_for(records):
    """Each claim is either an input or has at least one record (predicted, derived or not modelled)."""
    covered = {r.id for r in records} | set(INPUT_IDS)
    assert covered == set(CLAIMS), sorted(set(CLAIMS) - covered)


def test_known_exact_figures(records):
    by = {r.key: r for r in records}
    assert by["isca_kv_v3"].error == pytest.approx(0.0, abs=1e-9)
    assert by["isca_kv_llama405b"].error == pytest.approx(0.0, abs=1e-9)
    assert abs(by["isca_flops_v3"].error) < 0.01
    assert by["d6_cost"].status == "derived" and by["d6_cost"].error == pytest.approx(0.0, abs=1e-9)


def test_validate_json_shape_and_docs(records, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(validate, "run_all", lambda **kw: records)
    assert validate.main(as_json=True, out_dir=str(tmp_path)) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"claims", "median_abs_error", "max_abs_error"}
    for c in data["claims"]:
        assert set(c) >= {"id", "predicted", "published", "unit", "error"}
    errs = [abs(c["error"]) for c in data["claims"] if c["status"] == "predicted" and c["role"] == "validation"]
    assert data["max_abs_error"] == pytest.approx(max(errs)) and data["n_predicted"] == len(errs)
    cal = [c for c in data["claims"] if c["role"] == "calibration"]
    assert cal and len(data["calibration"]) == len(cal) == data["n_calibration"]
    assert all(c["label"] == validate.CAL_LABEL and c["calibrates"] for c in data["calibration"])
    assert not any(c["id"] in INPUT_IDS for c in data["claims"])
    md = (tmp_path / "validation.md").read_text()
    assert "Claims treated as inputs" in md and "Closed loop on this machine" in md
    assert "Calibration claims (in-sample; not counted)" in md and "leak test" in md
    assert (tmp_path / "img" / "validation_scatter.png").stat().st_size > 1000
    assert (tmp_path / "img" / "validation_errors.png").stat().st_size > 1000
    assert json.loads((tmp_path / "validation.json").read_text())["claims"]


def test_cli_registers_validate():
    from dsref.experiments import cli
    ap = argparse.ArgumentParser()
    cli.register(ap.add_subparsers())
    a = ap.parse_args(["validate", "--json", "--out-dir", "x", "--closed-loop", "--whatif", "--fast"])
    assert a.json and a.out_dir == "x" and a.closed_loop and a.whatif and a.fast and a.func is cli.cmd_validate
    assert ap.parse_args(["validate"]).out_dir is None  # default: write nothing


def test_validate_writes_nothing_without_out_dir(records, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(validate, "run_all", lambda **kw: records)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()  # even where a docs/ folder exists
    assert validate.main() == 0
    out = capsys.readouterr().out
    assert "nothing written" in out and "closed loop: not run" in out
    assert validate.main(as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["claims"] and data["closed_loop"] is None and data["closed_loop_origin"] is None
    assert list(tmp_path.rglob("*")) == [tmp_path / "docs"]
    assert validate.main(whatif=True) == 2  # the what-if pages need --out-dir
    assert list(tmp_path.rglob("*")) == [tmp_path / "docs"]


def test_validate_labels_the_stored_closed_loop(records, tmp_path, monkeypatch, capsys):
    """Without --closed-loop, the closed loop kept in <out-dir>/validation.json is carried over and
    printed as stored, with the date it was measured."""
    monkeypatch.setattr(validate, "run_all", lambda **kw: records)
    cl = {"measured": "2026-11-23",
          "prefill": {"measured_tokens_per_s": 250.0, "predicted_tokens_per_s": 257.0, "error": 0.028},
          "decode": {"measured_tokens_per_s": 34.0, "predicted_tokens_per_s": 36.0, "error": 0.059}}
    (tmp_path / "validation.json").write_text(json.dumps({"closed_loop": cl}))
    monkeypatch.setattr(validate, "write_outputs", lambda recs, out, c: {**validate.to_json(recs), "closed_loop": c})
    assert validate.main(out_dir=str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"STORED closed loop (stored in {tmp_path / 'validation.json'}, measured 2026-11-23" in out
    assert "decode: measured 34.0 tok/s" in out
    assert validate.main(out_dir=str(tmp_path), as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["closed_loop"]["measured"] == "2026-11-23"
    assert data["closed_loop_origin"].startswith("stored in ") and "2026-11-23" in data["closed_loop_origin"]


def test_closed_loop_tiny_runs(tmp_path):
    from dsref.experiments.closed_loop import run_closed_loop
    cl = run_closed_loop(fast=True, progress=False, probe_dir=str(tmp_path))
    for k in ("prefill", "decode"):
        for f in ("measured_tokens_per_s", "predicted_tokens_per_s", "error"):
            assert math.isfinite(cl[k][f])
        assert cl[k]["measured_tokens_per_s"] > 0 and cl[k]["predicted_tokens_per_s"] > 0
    assert cl["probe"]["memory_bandwidth_GBps"] > 0
    # each round pairs a probe with a measurement; the headline error is the median of theirs
    assert cl["rounds"] == len(cl["by_round"]) == len(cl["probes"]) == 1
    rd = cl["by_round"][0]["decode"]
    assert cl["decode"]["error"] == pytest.approx(
        (rd["predicted_tokens_per_s"] - rd["measured_tokens_per_s"]) / rd["measured_tokens_per_s"])


def test_identities_are_listed_but_not_counted(validation_records):
    """KV bytes per token and parameter counts are arithmetic on the preset, exact by construction
    (issue 20): status 'identity', listed in validation.md, outside the error statistics."""
    from dsref.experiments.validate import counted, markdown, summary
    ids = {r.key for r in validation_records if r.status == "identity"}
    assert {"isca_kv_v3", "isca_kv_qwen72b", "isca_kv_llama405b", "dsv3_tr_params:total",
            "dsv3_tr_params:active"} <= ids
    assert not ids & {r.key for r in counted(validation_records)}
    s = summary(validation_records)
    assert s["n_identity"] == len(ids) and s["n_predicted"] == len(counted(validation_records))
    assert "| `isca_kv_v3` | 70.27 | 70.27 | KB/token (KB=1000 B) | +0.0% | identity |" in markdown(validation_records)
