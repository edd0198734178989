"""Checks of the chapters docs/chapters/communication.md and docs/chapters/serving.md (issue 20).

Each check recomputes, with the project's code, a number a cell of the built page prints and
looks for it, formatted the same way, in the page's cell outputs (never in the prose). Run by
tests/test_docs_site.py::test_chapter against the suite's one site build.
"""
from __future__ import annotations

import json
from pathlib import Path

from tests.docs_html import cell_outputs, page_images, page_text

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _page(site: Path, name: str) -> Path:
    page = site / "chapters" / f"{name}.html"
    assert page.is_file(), f"{page} was not built"
    return page


def _figures(site: Path, page: Path, n: int) -> None:
    imgs = page_images(page, site)
    assert len(imgs) >= n, f"{page.name}: {len(imgs)} figures, expected {n}"
    for i in imgs:
        assert i.stat().st_size > 10_000, f"{i}: too small for a matplotlib figure"


def _row(*cells) -> str:
    """A Markdown table row as cell_outputs renders it (tags stripped, whitespace collapsed)."""
    return " ".join(str(c) for c in cells)


def _decode_instance(two_mb: bool = True, units: int = 1):
    import simpy

    from dsref.sim import scenario, serve
    sc = scenario.load("deepseek-day6", {"prefill": {"instances": 1},
                                         "decode": {"instances": units, "two_microbatch_overlap": two_mb}})
    sim = serve.ServeSim(sc, duration_s=1.0)
    sim.env = simpy.Environment()
    return sc, sim, serve.Instance(sim, "decode", 0)


# ------------------------------------------------------------------ communication.md
def check_comm_code_is_included(site: Path) -> None:
    src = page_text(_page(site, "communication"))
    for sig in ("def ep_dispatch_per_token(", "def ep_comm(", "def layer_comm_s(", "def tpot_s(",
                "def _step(self, x: np.ndarray", "def dualpipe_bubble_formula_s(self)"):
        assert sig in src, f"communication page lacks the included {sig!r}"


def check_comm_bytes_per_token(site: Path) -> None:
    from dsref.reference.presets import get_preset
    from dsref.sim import comm
    from dsref.sim.parallel import Parallelism
    v3 = get_preset("deepseek-v3")
    k, D = v3.num_experts_per_tok, v3.hidden_size
    assert (D, k, v3.topk_group) == (7168, 8, 4)  # the prose's D, k and M
    out = cell_outputs(_page(site, "communication"))
    assert f"= {k * D * comm.DISPATCH_FP8_BYTES:,.0f} B per token per layer" in out
    assert f"= {k * D * comm.BF16_BYTES:,.0f} B per token per layer" in out
    assert f"= {16 * k:,.0f} B more = {k} x 16 B" in out
    page = _page(site, "communication").read_text()
    assert "<table" in page
    for ep, limit in ((32, None), (64, None), (64, 4), (144, 4), (256, 4)):
        par = Parallelism(devices=ep, dp=ep, ep=ep, devices_per_node=8, node_limit=limit)
        b = comm.ep_dispatch_per_token(v3, par)
        row = _row(ep, ep // 8, "-" if limit is None else limit,
                   *(f"{b[key] / 1e3:,.1f}" for key in ("dispatch_inter", "dispatch_intra",
                                                         "combine_inter", "combine_intra")))
        assert row in out, row
    # exercise 1: EP64 on 8 nodes, M = 4
    b = comm.ep_dispatch_per_token(v3, Parallelism(devices=64, dp=64, ep=64, devices_per_node=8, node_limit=4))
    assert f"= {b['dispatch_inter']:,.0f} B" in out


def check_comm_links(site: Path) -> None:
    from dsref.experiments.registry import load_claims
    from dsref.hwmodels.catalog import load_device
    from dsref.hwmodels.systems import load_system
    claims = load_claims()
    out = cell_outputs(_page(site, "communication"))
    h800 = load_device("h800")
    assert f"= {h800.intra_node_bandwidth / 1e9:.0f} GB/s per direction" in out
    assert f"= {load_system('h800-node').network_bandwidth_per_device / 1e9:.0f} GB/s per GPU per direction" in out
    nv, ib = claims["dsv3_tr_nvlink_vs_ib"]["value"]
    assert f"NVLink {nv} GB/s, IB {ib} GB/s, ratio {nv / ib:.1f}" in out
    assert f"= {4 * nv / ib:.1f} experts" in out
    assert f"NVLink {claims['isca_h800_nvlink']['value']} GB/s NVLink (bidirectional)" in out


def check_comm_isca_bound(site: Path) -> None:
    from dsref.experiments import isca_tpot
    from dsref.experiments.registry import load_claims
    from dsref.reference.presets import get_preset
    from dsref.sim import comm
    out = cell_outputs(_page(site, "communication"))
    records = isca_tpot.run(load_claims())
    assert len(records) == 3
    for r in records:
        row = _row(r.id, r.unit, f"{r.published:,.2f}", f"{r.predicted:,.2f}", f"{r.error:+.1%}")
        assert row in out, row
    ratio = (get_preset("deepseek-v3").hidden_size / 7000) * (comm.DISPATCH_FP8_BYTES + comm.BF16_BYTES) / 3
    assert f"= {ratio:.4f}: explains the {records[0].error:+.2%} exactly" in out
    # exercise 2: an 800 Gb/s NIC halves the bound
    from dsref.hwmodels.systems import load_system
    fast = isca_tpot.tpot_s(get_preset("deepseek-v3"), 2 * load_system("h800-node").network_bandwidth_per_device)
    assert f"2. {fast * 1e3:.2f} ms" in out


def check_comm_two_microbatch_overlap(site: Path) -> None:
    out = cell_outputs(_page(site, "communication"))
    _, _, on = _decode_instance(True)
    _, _, off = _decode_instance(False)
    ctx = 4989
    for b in (8, 64, 256):
        n = b * on.par.dp
        t_on, _ = on.decode_time(n, float(n * ctx))
        t_off, c_off = off.decode_time(n, float(n * ctx))
        assert t_on < t_off  # the overlap shortens the step
        row = _row(b, f"{c_off * 1e3:.1f}", f"{(t_off - c_off) * 1e3:.1f}", f"{t_off * 1e3:.1f}",
                   f"{t_on * 1e3:.1f}", f"{t_off / t_on:.2f}")
        assert row in out, row
    assert f"{on.par.devices} GPUs = {on.par.devices // 8} nodes, EP{on.par.ep}" in out


def check_comm_pipeline_bubbles(site: Path) -> None:
    page = _page(site, "communication")
    out = cell_outputs(page)
    pp = 16
    for F, B, W, FB in ((1, 2, 1, 3), (1, 2, 1, 2), (1, 2, 0.5, 3)):
        one_f_one_b = (pp - 1) * (F + B)
        zb1p = (pp - 1) * (F + B - 2 * W)
        dualpipe = (pp / 2 - 1) * (FB + B - 3 * W)
        row = _row(f"{F:g}", f"{B:g}", f"{W:g}", f"{FB:g}", f"{one_f_one_b:g}", f"{zb1p:g}", f"{dualpipe:g}")
        assert row in out, row
    # the prose quotes 45, 15, 14 and 7 for B = 2F, W = F
    assert _row(1, 2, 1, 3, 45, 15, 14) in out and _row(1, 2, 1, 2, 45, 15, 7) in out
    # the 1F1B timeline: span m(F+B) + (PP-1)(F+B) for PP = 4, m = 8, F = 1, B = 2
    assert f"span {8 * 3 + 3 * 3:g} = 8 x (F + B) + bubble {3 * 3:g}" in out
    _figures(site, page, 1)
    # exercise 3: (PP/2 - 1)(F&B + B - 3W) = ZB1P's bubble
    fb = 15 / 7 - 2 + 3
    assert f"3. F&B = {fb:.3f}" in out


# ------------------------------------------------------------------ serving.md
def check_serving_code_is_included(site: Path) -> None:
    src = page_text(_page(site, "serving"))
    for sig in ("def revenue_usd_per_day(", "def serving_capacity("):
        assert sig in src, f"serving page lacks the included {sig!r}"


def check_serving_cost_and_revenue(site: Path) -> None:
    from dsref.experiments import day6_serving
    from dsref.experiments.registry import load_claims
    from dsref.hwmodels.catalog import load_device
    claims = load_claims()
    out = cell_outputs(_page(site, "serving"))
    nodes = claims["d6_nodes"]["value"]["avg"]
    price = load_device("h800").price_usd_per_hour
    cost = 24 * 8 * nodes * price
    assert cost == claims["d6_cost"]["value"]
    out_b = float(claims["d6_output_tokens"]["value"])
    assert f"= ${cost:,.0f} per day" in out
    assert f"= ${cost / (out_b * 1e3):.3f}" in out  # $ per million output tokens
    tok = claims["d6_input_tokens"]["value"]
    rev = day6_serving.revenue_usd_per_day(tok["input_B"], tok["cache_hit_B"], out_b)
    assert f"${rev:,.0f} per day" in out
    assert f"cost-profit margin: {rev / cost - 1:.1%}" in out
    # the implied prefill / decode node counts
    n_pre = tok["input_B"] * 1e9 / 86400 / claims["d6_prefill_node_tps"]["value"]
    n_dec = out_b * 1e9 / 86400 / claims["d6_decode_node_tps"]["value"]
    assert f"= {n_pre:.1f} prefill nodes" in out and f"= {n_dec:.1f} decode nodes" in out
    assert f"sum {n_pre + n_dec:.1f} nodes" in out
    # exercises 1 and 2
    assert f"${24 * 8 * nodes * 1.5 / (out_b * 1e3):.3f} per million output tokens" in out
    rev_30 = day6_serving.revenue_usd_per_day(tok["input_B"], 0.3 * tok["input_B"], out_b)
    assert f"2. revenue ${rev_30:,.0f} per day, margin {rev_30 / cost - 1:.0%}" in out


def check_serving_rows_per_expert(site: Path) -> None:
    from dsref.hwmodels.catalog import load_device
    from dsref.reference.presets import get_preset
    from dsref.sim import roofline
    out = cell_outputs(_page(site, "serving"))
    _, _, dec = _decode_instance()
    v3 = get_preset("deepseek-v3")
    G, S, k = dec.par.devices, dec.par.slots(v3), v3.num_experts_per_tok
    assert (G, S - v3.n_routed_experts) == (144, 32)  # the prose's 144 GPUs and 32 redundant copies
    ridge = roofline.ridge_point(load_device("h800"), "fp8")
    for B in (16, 128):
        r = B * G * k / S
        assert f"r = {r:,.0f} rows per expert, intensity ~{2 * r:,.0f} FLOP/B (FP8 ridge {ridge:,.0f})" in out


def check_serving_capacity_against_published(site: Path) -> None:
    from dsref.experiments import whatif
    from dsref.experiments.registry import load_claims
    claims = load_claims()
    page = _page(site, "serving")
    out = cell_outputs(page)
    assert page.read_text().count("<table") >= 2  # the claims table and the comparison
    sc, sim, dec = _decode_instance()
    cap = whatif.serving_capacity(sc.system, sc.quant, 1)
    stored = {r["id"]: r for r in json.loads((DOCS / "validation.json").read_text())["claims"]}
    for cid, key in (("d6_prefill_node_tps", "prefill_tokens_per_s_per_chip"),
                     ("d6_decode_node_tps", "decode_tokens_per_s_per_chip")):
        p = claims[cid]["value"]
        model = cap[key] * 8
        s = stored[cid]["predicted"]
        assert f"{p:,} {model:,.0f} {model / p - 1:+.0%} {s:,.0f} {s / p - 1:+.0%}" in out, cid
    assert f"decode batch {cap['decode_batch_per_device']} per GPU" in out
    assert f"{cap['per_request_tokens_per_s']:.1f} tokens/s per request" in out
    # the step breakdown at that batch: compute-bound ops dominate (the prose says so)
    from dsref.sim.stepcost import uniform
    parts = sim.cost["decode"]["decode"].breakdown(
        uniform(cap["decode_batch_per_device"], 1.0 + dec.mtp_depth, float(whatif.MEAN_KV), sim.topk),
        two_microbatch=True)
    total = sum(parts.values())
    assert parts["compute_s"] > parts["memory_s"]
    assert f"{total * 1e3:.1f} ms = compute {parts['compute_s'] / total:.0%}, memory {parts['memory_s'] / total:.0%}" in out
    # exercise 3
    assert f"{cap['decode_tokens_per_s_per_chip']:,.0f} tokens/s per GPU" in out


def check_serving_ramp_and_figures(site: Path) -> None:
    from dsref.sim import scenario, serve
    page = _page(site, "serving")
    out = cell_outputs(page)
    run = serve.simulate(scenario.load("deepseek-day6"), duration_s=20.0)
    assert not run["steady_state_reached"]
    assert "steady state reached: False" in out
    assert f"TPOT over this ramp: {run['tpot_mean_s'] * 1e3:.1f} ms: not a steady-state figure" in out
    _figures(site, page, 2)  # throughput / speed vs batch, and the ramp
