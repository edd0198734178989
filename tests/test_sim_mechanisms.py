"""Simulator mechanisms of issue 17, each against a closed form: kernel launch floors and host
overhead, collective latency, kernel-table GEMM curves, EP load imbalance, tensor-parallel experts,
multi-token MTP, the two-micro-batch overlap, and the scenario fields that switch them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from dsref.hwmodels.catalog import load_device
from dsref.reference.presets import get_preset
from dsref.sim import moe_stats, roofline
from dsref.sim.comm import CommOp
from dsref.sim.deployment import mtp_tokens_per_step, resolve
from dsref.sim.parallel import Parallelism
from dsref.sim.scenario import ScenarioError, from_dict
from dsref.sim.stepcost import StepCost, uniform


@dataclass(frozen=True)
class FakeProfile:
    """A kernel profile with round numbers, so step times have closed forms."""

    name: str = "fake"
    launch_eager_s: float = 5e-6
    launch_graph_s: float = 2e-6
    step_overhead_s: dict = field(default_factory=lambda: {"decode": 1e-3, "prefill": 3e-3})
    alpha: float = 10e-6
    gemm: tuple | None = None  # (compute, bandwidth) fractions for every row count
    ll: tuple | None = None

    def collective_latency_s(self, link, collective, participants):
        return self.alpha

    def gemm_efficiency(self, rows, grouped):
        return self.gemm

    def ep_low_latency_s(self, ep, tokens_per_rank):
        return self.ll

    def attention_efficiency(self, kind):
        return None


@pytest.fixture
def fake_profile(monkeypatch):
    import dsref.hwmodels.kernels as kernels

    def use(**kw):
        prof = FakeProfile(**kw)
        monkeypatch.setattr(kernels, "kernel_profile", lambda device: prof)
        return prof
    return use


V3, H800 = "deepseek-v3", "h800"


def _cost(par=Parallelism(), *, phase="decode", graph=True, floors=True, **kw):
    return StepCost(get_preset(V3), "fp8", load_device(H800), par, mla_form="absorbed", logits="all",
                    phase=phase, cuda_graph=graph, kernel_floors=floors, **kw)


# ------------------------------------------------------------------ floors and host overhead
def test_every_kernel_takes_at_least_the_launch_floor(fake_profile):
    prof = fake_profile(launch_graph_s=1e-3)  # a floor far above any op of a batch-1 step
    sc = _cost()
    x = uniform(1, 1, 100)
    n_kernels = float(sc._count.sum()) + sc._n_moe_kernels
    assert sc.compute_s(x, 1.0) == pytest.approx(n_kernels * prof.launch_graph_s, rel=1e-12)
    # the step adds the host overhead once
    total, comp, comm = sc.decode(x)
    assert total == pytest.approx(comp + comm + prof.step_overhead_s["decode"], rel=1e-12)


def test_graph_floor_below_eager_and_floors_off_is_the_roofline(fake_profile):
    fake_profile()
    x = uniform(1, 1, 1000)
    graph, eager, off = _cost(graph=True), _cost(graph=False), _cost(floors=False)
    assert off.compute_s(x, 1.0) < graph.compute_s(x, 1.0) < eager.compute_s(x, 1.0)
    assert off.decode(x)[0] == pytest.approx(off.compute_s(x, 1.0))  # no host overhead without floors


def test_breakdown_names_the_floor_at_batch_one(fake_profile):
    fake_profile(launch_graph_s=1e-3)
    parts = _cost().breakdown(uniform(1, 1, 100))
    assert parts["floor_s"] > 0 and parts["compute_s"] == 0 and parts["memory_s"] == 0
    assert parts["host_s"] == pytest.approx(1e-3)


def test_collective_latency_is_charged_per_call(fake_profile):
    prof = fake_profile(alpha=50e-6)
    dev = load_device(H800)
    c = CommOp("tp", 1.0, "intra", "all_reduce", count=122, participants=8)
    bw = roofline.link_bandwidth(dev, "intra") * dev.efficiency("all_reduce")
    assert roofline.comm_time(c, dev) == pytest.approx(122 * (1.0 / bw + prof.alpha))
    # a cluster's larger network latency wins over the profile's
    assert roofline.comm_time(c, dev, latency_s={"intra": 1e-3}) == pytest.approx(122 * (1.0 / bw + 1e-3))


def test_multi_node_tp_batch_one_pays_two_allreduce_latencies_per_layer(fake_profile):
    prof = fake_profile(alpha=30e-6)
    cfg = get_preset(V3)
    par = Parallelism(devices=16, dp=1, tp=16, ep=1, devices_per_node=8, moe_tp=16)
    m = _cost(par).comm_s(1.0)
    assert m >= 2 * cfg.num_hidden_layers * prof.alpha
    assert m < 2 * cfg.num_hidden_layers * prof.alpha * 1.5  # one token: latency-bound


# ------------------------------------------------------------------ kernel-table GEMM curves
def test_gemm_curve_replaces_the_flat_efficiencies(fake_profile):
    dev = load_device(H800)
    eg, em = dev.efficiency("gemm"), dev.efficiency("memory")
    fake_profile(gemm=(eg, em), launch_graph_s=0.0, launch_eager_s=0.0)
    same = _cost().compute_s(uniform(1, 1, 100), 1.0)
    fake_profile(gemm=(eg / 2, em / 2), launch_graph_s=0.0, launch_eager_s=0.0)
    slow = _cost().compute_s(uniform(1, 1, 100), 1.0)
    fake_profile(gemm=None, launch_graph_s=0.0, launch_eager_s=0.0)
    assert same == pytest.approx(_cost().compute_s(uniform(1, 1, 100), 1.0), rel=1e-12)
    assert slow > 1.5 * same  # GEMMs (most of a decode step's bytes) at half the bandwidth


# ------------------------------------------------------------------ EP load imbalance
def _inclusion_sampler(p, n, rng):
    """k-subsets per token with inclusion probabilities exactly p (systematic sampling over a random order)."""
    k = int(round(p.sum()))
    out = np.empty((n, k), int)
    for t in range(n):
        order = rng.permutation(len(p))
        c = np.cumsum(p[order])
        u = rng.random() + np.arange(k)
        out[t] = order[np.searchsorted(c, u, side="right")]
    return out


@pytest.mark.parametrize("n,ep", [(16, 8), (128, 32), (512, 64), (1024, 128)])
def test_expected_max_rank_load_uniform_matches_monte_carlo(n, ep):
    rng = np.random.default_rng(0)
    mc = moe_stats.monte_carlo(256, 8, n, ep, 200, rng)["max_load"]
    assert moe_stats.expected_max_rank_load(n, 256, 8, ep) == pytest.approx(mc, rel=0.05)


@pytest.mark.parametrize("s", [0.5, 1.0])
def test_expected_max_rank_load_skewed_matches_monte_carlo(s):
    rng = np.random.default_rng(1)
    E, k, n, ep = 256, 8, 256, 32
    p = moe_stats.capped_pick_probabilities(moe_stats.zipf_shares(E, s), k)
    assert p.sum() == pytest.approx(k) and p.max() <= 1.0
    loads = []
    for _ in range(100):
        ids = _inclusion_sampler(p, n, rng)
        loads.append(np.bincount(ids.ravel(), minlength=E).reshape(ep, -1).sum(axis=1).max())
    assert moe_stats.expected_max_rank_load(n, E, k, ep, moe_stats.zipf_shares(E, s)) == pytest.approx(
        np.mean(loads), rel=0.08)


def test_imbalance_slows_the_busiest_rank_and_eplb_evens_the_means():
    cfg = get_preset(V3)
    par = Parallelism(devices=64, dp=64, tp=1, ep=64, devices_per_node=8)
    uni = _cost(par, floors=False)
    skew = _cost(par, floors=False, routing_shares=moe_stats.zipf_shares(256, 1.0))
    eplb = _cost(Parallelism(devices=64, dp=64, ep=64, expert_slots=256 + 64, devices_per_node=8), floors=False,
                 routing_shares=moe_stats.zipf_shares(256, 1.0))
    t = 64 * 128.0  # 128 sequences per rank
    mean = t / 64
    assert mean < uni.rank_tokens(t) < eplb.rank_tokens(t) * 1.001 < skew.rank_tokens(t)
    assert uni.rank_tokens(t) == pytest.approx(
        moe_stats.expected_max_rank_load(t, 256, cfg.num_experts_per_tok, 64) / cfg.num_experts_per_tok)


# ------------------------------------------------------------------ tensor-parallel experts
def _serve(**decode):
    inst = {"instances": 1, "nodes": 1, "max_batch_per_device": 64, **decode}
    return from_dict({"kind": "serve", "model": V3, "quant": "fp8", "system": "h200-node", "mode": "aggregated",
                      "duration_s": 5.0, "aggregated": inst,
                      "workload": {"rate_per_s": 1.0, "prompt_tokens": {"mean": 1000},
                                   "output_tokens": {"mean": 100}}})


def test_tp_moe_splits_every_expert_over_the_tp_group():
    cfg = get_preset(V3)
    dep = resolve(_serve(tp=8))  # EP off: auto moe_tp = 8 (vLLM/SGLang's TP-sharded experts)
    par = dep.par["aggregated"]
    assert par.moe_tp == 8 and par.ep == 1
    w_tp = par.weight_bytes_per_device(cfg, dep.quant)
    w_ep = Parallelism(devices=8, dp=1, tp=8, ep=8, devices_per_node=8).weight_bytes_per_device(cfg, dep.quant)
    assert w_tp["experts"] == pytest.approx(w_ep["experts"], rel=1e-12)
    assert w_tp["total"] < 141e9  # V3 in FP8 fits 8 x H200 only with its experts split


def test_moe_tp_must_divide_the_devices():
    with pytest.raises(ScenarioError, match="moe_tp"):
        resolve(_serve(tp=8, moe_tp=3))


# ------------------------------------------------------------------ MTP with several drafts
def test_mtp_tokens_per_step_closed_form():
    assert mtp_tokens_per_step(()) == 1.0
    assert mtp_tokens_per_step((0.8,)) == pytest.approx(1.8)
    assert mtp_tokens_per_step((0.9, 0.8, 0.5)) == pytest.approx(1 + 0.9 + 0.72 + 0.36)


def test_mtp_depth_costs_a_longer_verify_and_d_draft_passes():
    from dsref.sim.serve import ServeSim
    sim1 = ServeSim(_serve(ep=8, mtp_acceptance=0.8), progress=False)
    sim3 = ServeSim(_serve(ep=8, mtp_acceptance_per_depth=[0.8, 0.6, 0.4]), progress=False)
    for s in (sim1, sim3):
        s.run()
    i1, i3 = sim1.instances[0], sim3.instances[0]
    assert (i1.mtp_depth, i3.mtp_depth) == (1, 3)
    assert i3.tps == pytest.approx(1 + 0.8 + 0.48 + 0.192)
    assert i3.decode_time(64, 64 * 1000)[0] > i1.decode_time(64, 64 * 1000)[0]


@pytest.mark.parametrize("patch,field", [({"mtp_acceptance_per_depth": [0.5, 1.5]}, "mtp_acceptance_per_depth"),
                                         ({"mtp_acceptance_per_depth": "0.5"}, "mtp_acceptance_per_depth"),
                                         ({"cuda_graph": "maybe"}, "cuda_graph"),
                                         ({"routing_zipf": -1.0}, "routing_zipf")])
def test_new_fields_are_checked(patch, field):
    with pytest.raises(ScenarioError, match=field):
        resolve(_serve(ep=8, **patch))


# ------------------------------------------------------------------ two-micro-batch overlap
def test_two_microbatch_overlap_closed_form(fake_profile):
    fake_profile(launch_graph_s=0.0, launch_eager_s=0.0, step_overhead_s={})
    par = Parallelism(devices=32, dp=32, ep=32, devices_per_node=8)
    sc = _cost(par)
    x = uniform(64, 1, 2000)
    c = 2.0 * sc._compute(x.vector() / 2.0, sc._decode_ep_tokens(x) / 2.0)
    m = sc.comm_s(x.tokens)
    o = load_device(H800).efficiency("overlap")
    n = get_preset(V3).num_moe_layers
    want = max(c / o, m) + min(c / o, m) / n
    assert sc.decode(x, two_microbatch=True)[0] == pytest.approx(want, rel=1e-12)
    assert math.isclose(o, 112 / 132, rel_tol=1e-3)  # 20 of 132 SMs held by the EP kernels


# ------------------------------------------------------------------ KV-cache dtype and offload nodes
def test_fp8_kv_cache_doubles_the_kv_capacity():
    base = _serve(ep=8)
    fp8 = base.with_overrides({"kv_dtype": "fp8"})
    cap_b, cap_f = resolve(base).capacity["aggregated"], resolve(fp8).capacity["aggregated"]
    assert cap_f["kv_bytes_per_token"] == pytest.approx(cap_b["kv_bytes_per_token"] / 2)
    assert cap_f["kv_tokens_per_device"] == pytest.approx(2 * cap_b["kv_tokens_per_device"], rel=1e-6)
    with pytest.raises(ScenarioError, match="kv_dtype"):
        resolve(base.with_overrides({"kv_dtype": "fp7"}))


def test_pcie_copies_pay_the_profile_latency():
    dev = load_device("rtx-4090")
    c = CommOp("pcie_hidden_state", 1.0, "pcie", "pcie", count=2)
    from dsref.hwmodels.kernels import kernel_profile
    alpha = kernel_profile(dev).collective_latency_s("pcie", "p2p", 2)
    assert alpha > 0
    t = roofline.comm_time(c, dev, node=_node("epyc-9135-rtx-4090"))
    assert t >= 2 * alpha


def _node(name):
    from dsref.hwmodels.systems import load_system
    return load_system(name)


def test_offload_node_estimate_runs_with_floors():
    from dsref.sim.local import estimate
    r = estimate("llama-3.1-8b", "epyc-9135-rtx-4090", "q4_k_m", context=2048)
    assert r["decode_tokens_per_s"] > 0
    r = estimate("llama-3.1-8b", "rtx-4090", "bf16", context=2048)
    fl = r["framework_floors"]
    assert fl["decode_kernel_s"] > 0 and fl["decode_host_s"] > 0  # a framework on a GPU pays the floors


def test_hw_kernels_cli(capsys):
    from dsref.experiments.cli import main
    assert main(["hw", "kernels", "h800"]) == 0
    out = capsys.readouterr().out
    assert "kernel profile 'hopper'" in out and "launch floor" in out and "source" not in out.splitlines()[0]
    assert main(["hw", "kernels", "h800", "--json"]) == 0
    import json
    js = json.loads(capsys.readouterr().out)
    assert js["profile"] == "hopper" and js["sources"] and js["launch_graph_s"] < js["launch_eager_s"]
    assert main(["hw", "kernels", "no-such-device"]) == 2
    assert "no-such-device" in capsys.readouterr().err


def test_fp4_recipe_keeps_mla_projections_at_bf16_rate():
    from dsref.sim import costmodel
    cfg = get_preset(V3)
    ops = {o.name: o for o in costmodel.forward_ops(cfg, "nvfp4", costmodel.StepShape(1, 16, 0, mla_form="naive"))
           if o.layer == 3}
    assert ops["q_a_proj"].precision == "bf16" and ops["kv_b_expand"].precision == "bf16"
    assert ops["routed_experts"].precision == "fp4"
    ops8 = {o.name: o for o in costmodel.forward_ops(cfg, "fp8", costmodel.StepShape(1, 16, 0)) if o.layer == 3}
    assert ops8["q_a_proj"].precision == "fp8"
    # a Hopper device has no fp4 rate: the catalog falls back to fp8 (weight-only FP4)
    assert load_device("h800").resolve_precision("fp4") == "fp8"


def test_expert_offload_places_routed_experts_on_the_host():
    from dsref.reference.params import ROUTED_EXPERT, tensors
    from dsref.sim.local import estimate
    from dsref.sim.quant import get_quant, tensor_bytes
    cfg, q = get_preset(V3), get_quant("q4_k_m")
    r = estimate(cfg, "epyc-9654-2s-rtx-4090", "q4_k_m", context=2048, offload="experts")
    experts = sum(tensor_bytes(cfg, q, t) for t in tensors(cfg) if t.group == ROUTED_EXPERT)
    assert experts < r["bytes_on_host"] < experts * 1.01  # + the input embedding
    assert r["bytes_on_device"] + r["bytes_on_host"] == pytest.approx(r["memory_required_bytes"])
    assert r["fits"] and r["decode_tokens_per_s"] > 0
    # the host's expert GEMMs are in the host part of the step; the device runs the rest
    assert r["decode_host_s"] > 0 and "moe_gemm" in r["decode_breakdown"]
    with pytest.raises(ValueError, match="offload"):
        estimate("llama-3.1-8b", "rtx-4090", "q4_k_m", offload="experts")
    with pytest.raises(ValueError, match="offload"):
        estimate(cfg, "epyc-9654-2s-rtx-4090", "q4_k_m", offload="gpu")


def test_breakdown_adds_up_to_the_step_with_and_without_overlap(fake_profile):
    fake_profile()
    sc = _cost(Parallelism(devices=32, dp=32, ep=32, devices_per_node=8))
    x = uniform(64, 1, 2000)
    for tbo in (False, True):
        parts = sc.breakdown(x, two_microbatch=tbo)
        assert sum(parts.values()) == pytest.approx(sc.decode(x, two_microbatch=tbo)[0], rel=1e-9)
