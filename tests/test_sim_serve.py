"""The serving simulator: closed forms, queueing theory, reproducibility, errors, traces, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dsref.hwmodels.catalog import load_device
from dsref.hwmodels.systems import load_system
from dsref.reference.presets import get_preset
from dsref.sim import costmodel, roofline, trace
from dsref.sim.comm import CommOp, kv_transfer_bytes
from dsref.sim.scenario import ScenarioError, from_dict, load
from dsref.sim.serve import ServeSim, simulate
from dsref.sim.deployment import resolve
from dsref.sim.parallel import Parallelism
from dsref.sim.stepcost import OpTable, StepCost, StepFeatures, request, uniform

SMALL = "deepseek-v2-lite"   # fits one H800 in bf16 (~31 GB)


def _one_device(mode: str, prompt=1000, output=8, hit=0.3, **extra) -> dict:
    inst = {"instances": 1, "devices": 1, "ep": 1, "token_budget_per_device": 4096}
    d = {"kind": "serve", "model": SMALL, "quant": "bf16", "system": "h800-node", "mode": mode,
         "duration_s": 50.0, "ctx_quantum_tokens": 0, "kernel_floors": False,
         "workload": {"arrival": "constant", "rate_per_s": 0.01, "prefix_cache_hit_rate": hit,
                      "prompt_tokens": {"dist": "fixed", "mean": prompt},
                      "output_tokens": {"dist": "fixed", "mean": output}}}
    if mode == "disaggregated":
        d["prefill"], d["decode"] = dict(inst), dict(inst)
    else:
        d["aggregated"] = dict(inst)
    d.update(extra)
    return d


def _expected(prompt, output, hit):
    cfg, dev = get_preset(SMALL), load_device("h800")
    cached = math.floor(prompt * hit)
    prefill = roofline.step_time(costmodel.prefill_ops(cfg, "bf16", 1, prompt - cached, cached), dev).time_s
    steps = [roofline.step_time(costmodel.decode_ops(cfg, "bf16", 1, prompt + i), dev).time_s
             for i in range(output - 1)]
    node = load_system("h800-node")
    kv = roofline.comm_time(CommOp("kv", kv_transfer_bytes(cfg, prompt, 2.0), "inter", "p2p"), dev, node=node)
    return prefill, float(np.mean(steps)), kv


def test_stepcost_reproduces_cost_model():
    cfg, dev = get_preset("deepseek-v3"), load_device("h800")
    for form, logits, shapes in (("naive", "last", [(1, 1000, 0), (3, 512, 2048)]),
                                 ("absorbed", "all", [(1, 1, 100), (64, 1, 5000)])):
        sc = StepCost(cfg, "fp8", dev, Parallelism(), mla_form=form, logits=logits, kernel_floors=False)
        for b, t, p in shapes:
            ops = costmodel.forward_ops(cfg, "fp8", costmodel.StepShape(b, t, p, logits=logits, mla_form=form))
            ref = roofline.step_time(ops, dev).time_s
            assert sc.compute_s(uniform(b, t, p), b * t) == pytest.approx(ref, rel=1e-9)


def test_two_microbatch_overlap_uses_the_catalog_share():
    """TBO step = max(C', M) + min(C', M) / n_moe_layers with C' = C / overlap: the EP kernels hold
    1 - overlap of the device while they run (gpu.overlap in efficiency.toml); overlap = 1 is the
    perfect-overlap limit."""
    from dataclasses import replace

    from dsref.hwmodels.catalog import Figure
    cfg, dev = get_preset("deepseek-v3"), load_device("h800")
    par = Parallelism(devices=72, dp=72, ep=72, expert_slots=288, devices_per_node=8)
    per = 128
    x = uniform(per, 1, 4000)
    moe = per * 72
    kw = dict(mla_form="absorbed", logits="all", node=load_system("h800-node"), kernel_floors=False)
    sc = StepCost(cfg, "fp8", dev, par, **kw)
    tot, c, m = sc.decode(x, two_microbatch=True)
    eta = dev.efficiency("overlap")
    n = cfg.num_moe_layers
    assert 0 < eta < 1 and c > 0 and m > 0
    assert tot == pytest.approx(max(c / eta, m) + min(c / eta, m) / n, rel=1e-12)
    perfect = replace(dev, efficiency_overrides={"overlap": Figure(1.0, "", "test", "high")}, id="h800-perfect")
    sc1 = StepCost(cfg, "fp8", perfect, par, **kw)
    assert sc1.decode(x, two_microbatch=True)[0] == pytest.approx(max(c, m) + min(c, m) / n, rel=1e-9)
    assert sc.decode(x)[0] == pytest.approx(sc.compute_s(x, moe) + m, rel=1e-12)
    assert m == sc.comm_s(per)


def test_step_features_sum_over_requests():
    """A batch's features are the sum of its requests'; a uniform batch is B equal requests."""
    b = request(100, 20) + request(100, 20) + request(100, 20)
    assert b == uniform(3, 100, 20)
    assert StepFeatures() + b == b and b.scaled(2.0) == b + b
    assert list(b.vector()) == [1.0, b.tokens, b.seqs, b.attn, b.keys]


def test_training_table_reproduces_cost_model():
    cfg, dev = get_preset(SMALL), load_device("h800")
    table = OpTable.build(cfg, "bf16", dev, mla_form="naive", logits="all", training=True)
    sc = StepCost(cfg, "bf16", dev, Parallelism(), mla_form="naive", logits="all", table=table, kernel_floors=False)
    for b, t in ((1, 4096), (2, 1000)):
        ref = roofline.step_time(costmodel.training_ops(cfg, "bf16", b, t, include_optimizer=False), dev).time_s
        assert sc.compute_s(uniform(b, t, 0), b * t) == pytest.approx(ref, rel=1e-9)


def test_single_request_disaggregated_matches_roofline():
    prompt, output, hit = 1000, 8, 0.3
    sc = from_dict(_one_device("disaggregated", prompt, output, hit))
    sim = ServeSim(sc)
    r = sim.run()
    assert r["requests_arrived"] == 1 and r["requests_finished"] == 1
    prefill, tpot, kv = _expected(prompt, output, hit)
    assert r["ttft_p50_s"] == pytest.approx(prefill + kv, rel=1e-9)
    assert kv > 0
    assert r["tpot_p50_s"] == pytest.approx(tpot, rel=1e-9)


def test_single_request_aggregated_matches_roofline():
    prompt, output, hit = 777, 5, 0.0
    r = simulate(from_dict(_one_device("aggregated", prompt, output, hit)))
    prefill, tpot, _ = _expected(prompt, output, hit)
    assert r["ttft_p50_s"] == pytest.approx(prefill, rel=1e-9)
    assert r["tpot_p50_s"] == pytest.approx(tpot, rel=1e-9)


def test_md1_mean_wait_matches_pollaczek_khinchine():
    """Poisson arrivals, one server, deterministic service S, one request per step: M/D/1.
    Pollaczek-Khinchine: W_q = rho * S / (2 (1 - rho))."""
    S, lam = 0.01, 60.0
    d = _one_device("aggregated", prompt=100, output=1, hit=0.0)
    d["workload"]["arrival"] = "poisson"
    d["workload"]["rate_per_s"] = lam
    d["aggregated"]["max_requests_per_step"] = 1
    d["duration_s"] = 500.0
    sc = from_dict(d)
    rho = lam * S
    wq = rho * S / (2 * (1 - rho))
    sim = ServeSim(sc, seed=7, prefill_service=lambda x: S)
    r = sim.run()
    assert r["requests_finished"] > 25_000
    assert r["ttft_mean_s"] - S == pytest.approx(wq, rel=0.06)
    # a real discrete-event run: every arrival and every service completion is an event
    assert r["events"] >= 2 * r["requests_finished"]


def test_same_seed_same_result_and_seed_matters():
    sc = load("single-node-h800")
    a = simulate(sc, duration_s=15, seed=3)
    b = simulate(sc, duration_s=15, seed=3)
    c = simulate(sc, duration_s=15, seed=4)
    for k in ("output_tokens_per_s", "ttft_p99_s", "tpot_p50_s", "events", "requests_arrived"):
        assert a[k] == b[k]
    assert a["requests_arrived"] != c["requests_arrived"]


def test_kv_cache_limits_force_waits_and_preemptions():
    d = _one_device("aggregated", prompt=2000, output=3000, hit=0.0)
    d["workload"]["arrival"] = "poisson"
    d["workload"]["rate_per_s"] = 5.0
    d["aggregated"]["activation_reserve_bytes"] = 79.5e9 - 31.4e9 - 0.7e9  # leave a ~20k-token KV cache
    d["duration_s"] = 40.0
    sc = from_dict(d)
    cap = resolve(sc).capacity["aggregated"]["kv_tokens_per_instance"]
    assert 0 < cap < 40_000
    r = simulate(sc)
    assert r["preemptions"] > 0 or r["kv_blocked_steps"] > 0


@pytest.mark.parametrize("patch, field", [
    ({"model": "deepseek-v3", "aggregated": {"devices": 8, "ep": 8}}, "aggregated.nodes"),
    ({"aggregated": {"devices": 1, "ep": 3}}, "aggregated.ep"),
    ({"aggregated": {"devices": 0, "nodes": 0}}, "aggregated.nodes"),
    ({"workload": {"rate_per_s": -1.0}}, "workload.rate_per_s"),
    ({"system": "no-such-device"}, "system"),
    ({"model": "no-such-model"}, "model"),
    ({"aggregated": {"tokens": 3}}, "aggregated.tokens"),
])
def test_scenario_errors_name_the_field(patch, field):
    d = _one_device("aggregated")
    for k, v in patch.items():
        if isinstance(v, dict):
            d[k] = {**d.get(k, {}), **v}
        else:
            d[k] = v
    with pytest.raises(ScenarioError) as e:
        from_dict(d, "test.toml")
    assert str(e.value).startswith(f"test.toml: field '{field}'")


def test_model_too_big_message():
    d = _one_device("aggregated")
    d["model"] = "deepseek-v3"
    d["aggregated"].update(devices=8, ep=8)
    with pytest.raises(ScenarioError, match="does not fit in memory"):
        from_dict(d, "big.toml")


def test_builtin_scenarios_validate():
    from dsref.sim.scenario import builtin_names
    names = builtin_names()
    assert {"cloudmatrix-384", "deepseek-day6", "deepseek-v3-pretrain", "sglang-h100", "single-node-h800"} <= set(names)
    for name in names:  # every shipped scenario resolves (model, hardware, layout, memory)
        assert load(name).kind in ("serve", "train")


def test_day6_short_run_is_plausible():
    r = simulate(load("deepseek-day6"), duration_s=20)
    assert r["nodes"] == 222
    assert r["input_tokens_per_s_per_node"] > 10_000
    assert r["output_tokens_per_s_per_node"] > 1_000
    assert r["cost_usd_per_million_output_tokens"] > 0
    assert r["events"] > 1000


def test_serve_trace_structure(tmp_path):
    sim = ServeSim(load("single-node-h800"), duration_s=10, record=True)
    sim.run()
    tr = trace.serve_trace(sim)
    trace.validate(tr)
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert xs and all(e["dur"] > 0 for e in xs)
    assert any(e["ph"] == "C" for e in tr["traceEvents"])
    p = tmp_path / "t.json"
    trace.write(p, tr)
    trace.validate(json.loads(p.read_text()))
    with pytest.raises(ValueError):
        trace.validate({"traceEvents": [{"name": "x", "ph": "X", "pid": 1, "tid": 1, "ts": 0}]})


def test_cli_json_is_clean(capsys):
    from dsref.experiments.cli import main
    assert main(["sim", "serve", "--scenario", "single-node-h800", "--duration", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for k in ("input_tokens_per_s_per_node", "output_tokens_per_s_per_node", "ttft_p50_s", "ttft_p99_s",
              "tpot_p50_s", "tpot_p99_s", "cost_usd_per_million_output_tokens", "events", "sim_wall_s"):
        assert k in r


def test_cli_error_names_field(capsys):
    from dsref.experiments.cli import main
    assert main(["sim", "serve", "--scenario", "no-such-scenario"]) == 2
    assert "field 'scenario'" in capsys.readouterr().err


def test_jsonl_trace_workload(tmp_path):
    p = tmp_path / "reqs.jsonl"
    rows = [{"t": 0.0, "prompt_tokens": 500, "output_tokens": 4, "cached_tokens": 200},
            {"t": 5.0, "prompt_tokens": 300, "output_tokens": 2},
            {"t": 99.0, "prompt_tokens": 100, "output_tokens": 2}]   # after the window: ignored
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = _one_device("aggregated")
    d["workload"] = {"arrival": "trace", "trace": str(p)}
    d["duration_s"] = 20.0
    r = simulate(from_dict(d))
    assert r["requests_arrived"] == 2 and r["requests_finished"] == 2
    cfg, dev = get_preset(SMALL), load_device("h800")
    first = roofline.step_time(costmodel.prefill_ops(cfg, "bf16", 1, 300, 200), dev).time_s
    second = roofline.step_time(costmodel.prefill_ops(cfg, "bf16", 1, 300, 0), dev).time_s
    assert r["ttft_p50_s"] == pytest.approx((first + second) / 2, rel=1e-9)
    p.write_text('{"t": 0, "prompt_tokens": 0, "output_tokens": 1}\n')
    with pytest.raises(ScenarioError, match="line 1"):
        simulate(from_dict(d))


def test_weight_bytes_per_device_uses_the_tied_head_rule():
    """A tied embedding is stored as the output layer under llama.cpp quantisations (Q4_K_M -> Q6_K),
    so one device holding everything holds what sim.quant.model_weight_bytes counts."""
    from dsref.reference.presets import get_preset
    from dsref.sim.quant import get_quant, model_weight_bytes
    for name in ("llama-3.2-3b", "qwen2.5-14b"):
        cfg = get_preset(name)
        for quant in ("q4_k_m", "bf16"):
            got = Parallelism().weight_bytes_per_device(cfg, get_quant(quant))["total"]
            assert got == pytest.approx(model_weight_bytes(cfg, get_quant(quant))["total"]), (name, quant)


def _same_result(a: dict, b: dict, path: str = "") -> list:
    """Fields that differ (exactly: floats compared bit for bit, NaN equal to NaN); machine-speed
    fields skipped."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        return [d for k in a if k not in ("sim_wall_s", "sim_cpu_s", "events_per_s")
                for d in _same_result(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same_result(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if (type(a) is type(b) and a == b) else [path]


@pytest.mark.parametrize("case", ["day6", "kv-pressure"])
def test_fast_admission_matches_one_request_at_a_time(monkeypatch, case):
    """The decode admission's fast path (a cohort that fits joins without per-request bucket
    updates; its finish buckets are added later in join order with np.add.at) must give the same
    result, bit for bit, as admitting one request at a time. day6: disaggregated, the fast path
    throughout; kv-pressure: aggregated near a full KV cache, both paths, waits and preemptions
    (a preemption flushes the pending buckets first). Exact decode contexts in both, so a context
    sum off by one rounding changes the step times."""
    from dsref.sim import serve
    if case == "day6":
        # exact decode contexts (no step-time cache quantum): a context sum off by one ulp moves a step time
        sc, kw = load("deepseek-day6", {"ctx_quantum_tokens": 0}), {"duration_s": 4.0, "seed": 2}
    else:
        d = _one_device("aggregated", prompt=2000, output=3000, hit=0.0)
        d["workload"].update(arrival="poisson", rate_per_s=5.0)
        d["aggregated"]["activation_reserve_bytes"] = 79.5e9 - 31.4e9 - 0.7e9  # a ~20k-token KV cache
        d["duration_s"] = 40.0
        d["workload"]["output_tokens"] = {"dist": "lognormal", "mean": 3000, "cv": 1.0, "min": 1, "max": 20000}
        sc, kw = from_dict(d), {}
    flushed = []
    real_flush = serve.Instance._flush

    def counting_flush(self):
        flushed.append(len(self._pend_f))
        real_flush(self)
    monkeypatch.setattr(serve.Instance, "_flush", counting_flush)
    sim = ServeSim(sc, **kw)
    fast = sim.run()
    assert sum(flushed) > 0  # the fast path was taken
    if case == "kv-pressure":
        assert fast["preemptions"] > 0 and fast["kv_blocked_steps"] > 0
    monkeypatch.setattr(serve.Instance, "fast_admission", False)
    flushed.clear()
    ref_sim = ServeSim(sc, **kw)
    ref = ref_sim.run()
    assert sum(flushed) == 0  # ... and here never
    assert _same_result(fast, ref) == []
    # the decode state itself, bit for bit: running requests, their summed context terms (a float
    # chain the results see only through rounded step times) and the finish buckets
    for d, r in zip(sim.decoders, ref_sim.decoders):
        d._flush()
        assert (d.n_run, d.s0, d.step_idx) == (r.n_run, r.s0, r.step_idx)
        assert d._fin_n == r._fin_n and d._fin_c == r._fin_c


def test_generated_at_matches_generated():
    """serve_report._generated_at (two points from one set of per-request arrays) returns exactly
    generated(...)[0] at each point, ties at the point and unfinished requests included."""
    from dsref.sim.serve_report import _generated_at, generated
    rng = np.random.default_rng(5)
    n = 20_000
    first = np.round(rng.uniform(0, 100, n), 1)       # rounded: many ties with the points
    done = first + np.round(rng.uniform(0, 30, n), 1)
    output = rng.integers(1, 400, n).astype(float)
    first[rng.random(n) < 0.05] = np.nan
    done[rng.random(n) < 0.2] = np.nan
    done[:50] = first[:50]                            # done with the first token: no ramp
    points = [(50.0, "left"), (50.0, "right"), (first[3], "left"), (done[7], "right"), (0.0, "left"),
              (130.0, "right")]
    for tpot in (None, 0.037):
        got = _generated_at(first, done, output, tpot, points)
        want = [float(generated(first, done, output, tpot, x, side)[0]) for x, side in points]
        assert got == want
