"""experiments/peer_aiconfigurator: the deployment list, the table with aiconfigurator absent or
refusing a shape, the CLI's bad-option handling, and (only where aiconfigurator is installed)
one real prediction."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from dsref.experiments import peer_aiconfigurator as pa
from dsref.experiments.registry import Record, load_claims
from dsref.sim.scenario import builtin_names

def test_deployments_refer_to_existing_claims_scenarios_and_experiments():
    claims = load_claims()
    deps = pa.deployments()
    assert len({d.claim for d in deps}) == len(deps)
    missing = {d.claim for d in deps} - set(claims)
    assert not missing, f"deployments name claims not in public_claims.json: {missing}"
    scenarios = set(builtin_names())
    for d in deps:
        assert claims[d.claim]["role"] == "validation", d.claim
        if d.scenario is not None:
            assert d.scenario in scenarios, d
            assert importlib.util.find_spec(f"dsref.experiments.{d.experiment}") is not None, d
        for p in (d.aic, d.aic_standin):
            if p is not None:
                assert p.mode in ("static_ctx", "static_gen") and p.metric in (
                    "input_tps_per_node", "output_tps_per_node", "output_tps_per_gpu", "output_tps_per_user")
                assert p.dp * p.tp >= p.ep and p.batch > 0 and p.isl > p.prefix
        if d.aic_standin is not None:
            assert "STAND-IN" in d.aic_standin.label  # a substitute is always labelled
    for cid in pa.NOT_COMPARED:
        assert cid in claims, cid


def _fake_ours(experiments, claims, fast):
    # what the experiments would return, without minutes of simulation
    out = {}
    for d in pa.deployments():
        if d.experiment in experiments and d.claim in claims:
            pub = d.published if d.published is not None else float(claims[d.claim]["value"])
            out.setdefault(d.experiment, {})[f"{d.claim}:{d.part}" if d.part else d.claim] = Record(
                d.claim, pub * 1.1, pub, "u", "s", part=d.part, reading="fake reading")
    return out


def test_table_says_not_installed_when_aiconfigurator_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "aiconfigurator", None)  # import aiconfigurator -> ImportError
    monkeypatch.setattr(pa, "ours_records", _fake_ours)

    def no_child(*a, **k):
        raise AssertionError("no aiconfigurator process may be started when it is not installed")
    monkeypatch.setattr(subprocess, "Popen", no_child)
    claims = load_claims()
    rows = pa.run(claims)
    assert [r["claim"] for r in rows] == [d.claim for d in pa.deployments() if d.claim in claims]
    for r in rows:
        assert r["aiconfigurator"] is None and r["aiconfigurator_error"] is None
        assert r["aiconfigurator_why"].startswith("not installed"), r
        if r["scenario"] is not None:
            assert r["ours_error"] == pytest.approx(0.1)
    text = pa.markdown(rows, "cmd", {"aiconfigurator": "not installed"})
    assert "not installed" in text and "| `d6_prefill_node_tps` |" in text and "+10%" in text


def test_refused_shape_falls_back_to_the_labelled_standin(monkeypatch):
    monkeypatch.setattr(pa, "ours_records", _fake_ours)
    ok = {"ttft_ms": 0.0, "tpot_ms": 100.0, "backend_version": "x", "kv_cache_warning": None, "comm_fallbacks": [],
          "raw": {"tokens/s/gpu": 2000.0, "tokens/s/user": 10.0, "seq/s": 1.0, "num_total_gpus": 64}}

    def fake_start(points):  # no handle: the answers themselves (as when nothing can run)
        return None, {n: ({"ok": ok} if n.endswith(":standin") else {"error": "PerfDataNotAvailableError: no EP144"})
                      for n in points}
    monkeypatch.setattr(pa, "start_aiconfigurator", fake_start)
    rows = {r["claim"]: r for r in pa.run(load_claims(), only=["d6_decode_node_tps", "d6_prefill_node_tps"])}
    dec = rows["d6_decode_node_tps"]
    assert dec["aiconfigurator"] == pytest.approx(2000.0 * 8)  # per GPU x 8 GPUs per node
    assert "refused the published shape" in dec["notes"] and "STAND-IN EP64" in dec["notes"]
    assert dec["aiconfigurator_standin"].startswith("EP64 for EP144")  # shown in the table, not only the notes
    pre = rows["d6_prefill_node_tps"]  # no stand-in: the refusal is the answer
    assert pre["aiconfigurator"] is None and "no EP144" in pre["aiconfigurator_why"]


def test_metric_conversions():
    p = pa.AicPoint("h100_sxm", "sglang", "static_ctx", isl=2000, osl=1, batch=8, dp=32, ep=32,
                    metric="input_tps_per_node")
    # 32 GPUs x 8 prompts in 4 s -> 64 seq/s x 2000 tokens / 32 GPUs x 8 GPUs per node
    assert pa.aic_metric(p, {"raw": {"seq/s": 64.0, "num_total_gpus": 32}}) == pytest.approx(32000.0)
    with pytest.raises(ValueError, match="metric"):
        pa.aic_metric(pa.AicPoint("h100_sxm", "sglang", "static_gen", 1, 1, 1, 1, 1, metric="bogus"),
                      {"raw": {"tokens/s/gpu": 1.0}})


@pytest.mark.parametrize("argv", [["--bogus"], ["--timeout", "0"], ["--claim", "nope"], ["--out", ""],
                                  ["--out", "/nonexistent-dir/x.md"]])
def test_cli_bad_options_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        pa.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err


# ~10 s of CPU (aiconfigurator imports pandas/pyarrow and loads its h100_sxm tables); marked slow
# because on a busy 2-core machine the wall time is several times that.
@pytest.mark.slow
def test_real_aiconfigurator_prediction():
    pytest.importorskip("aiconfigurator")
    # one node, EP8 decode: small and inside aiconfigurator's measured tables
    p = pa.AicPoint("h100_sxm", "sglang", "static_gen", isl=1000, osl=8, batch=32, dp=8, ep=8,
                    metric="output_tps_per_gpu")
    res = pa.run_aiconfigurator({"x": p}, timeout_s=120)["x"]
    assert "ok" in res, res
    v = pa.aic_metric(p, res["ok"])
    # 32 sequences per GPU at TPOT tens of ms: hundreds to a few thousand tokens/s per GPU
    assert 100 < v < 10000, v
    assert res["ok"]["tpot_ms"] == pytest.approx(32 / v * 1e3, rel=1e-3)


def test_dsref_peer_cli_wiring(capsys):
    from dsref.experiments.cli import main
    assert main(["peer", "aiconfigurator", "--claim", "no-such-claim"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsref peer aiconfigurator: error: --claim no-such-claim")
    with pytest.raises(SystemExit) as e:
        main(["peer", "no-such-tool"])
    assert e.value.code == 2
