"""Checks of the training-cost chapter (docs/chapters/training-cost.md) and the at-home chapter
(docs/chapters/at-home.md) on a built site.

Run by tests/test_docs_site.py::test_chapter (every ``check_*(site)`` here). Each check recomputes
with the project's code (the claims file, sim.costmodel, experiments/whatif.py's pretrain_check,
experiments/dsv3_training.py's simulator run, sim.local.estimate, experiments/edge_devices.py's
calibration) what a cell of the page printed, and looks for it in the cell outputs, never in the
prose. Published figures that the prose quotes and the project does not hold are constants below,
with their sources, and are checked against the page's source text.
"""
from __future__ import annotations

import re
from pathlib import Path

from tests.docs_html import cell_outputs, page_images, page_text

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Published figures the training-cost prose quotes that experiments/data/public_claims.json does not hold
BERNSTEIN_USD = 5e6  # Bernstein research note (late Jan 2025, as reported by the press, e.g. the
#                      Economic Times): DeepSeek did not "build OpenAI for $5M"
SEMIANALYSIS_HARDWARE_USD = 500e6  # SemiAnalysis, "DeepSeek Debates" (2025-01-31): hardware spend
#                                    "well higher than $500M" over DeepSeek's history (their estimate)
# ... and that the at-home prose quotes: DeepSeek's own activated-parameter breakdown
# (deepseek-ai/DeepSeek-V3 README_WEIGHTS.md): "36.7B (including 0.9B for Embedding and 0.9B for the
# output Head)"
DS_README_ACTIVE_B, DS_README_EMBED_B = 36.7, 0.9


def _cost(site: Path) -> Path:
    return site / "chapters" / "training-cost.html"


def _home(site: Path) -> Path:
    return site / "chapters" / "at-home.html"


def _src(name: str) -> str:
    return re.sub(r"\s+", " ", (DOCS / "chapters" / name).read_text())


def _claims():
    from dsref.experiments.registry import load_claims
    return load_claims()


# ------------------------------------------------------------------ training cost
def check_table1_arithmetic(site: Path) -> None:
    """The three stages add up to the report's total; priced at the report's $2 they give $5.576M."""
    c = _claims()
    val = lambda k: float(c[k]["value"])
    p = val("dsv3_tr_gpu_price")
    stages = [val(k) for k in ("dsv3_tr_pretrain_gpuh", "dsv3_tr_ctxext_gpuh", "dsv3_tr_posttrain_gpuh")]
    G = sum(stages)
    assert G == val("dsv3_tr_total_gpuh") and round(G * p / 1e6, 3) == val("dsv3_tr_cost_total")
    out = cell_outputs(_cost(site))
    for g in stages:
        assert f"{g:,.0f} {g / G:.1%} ${g * p / 1e6:.3f}M" in out, g
    assert f"total {G:,.0f} 100% ${G * p / 1e6:.3f}M" in out
    assert f"total ${G * p / 1e6:.3f}M, i.e. ${G * p / 1e6:.1f}M" in out  # the title's $5.6M
    gpus = int(val("dsv3_tr_cluster"))
    assert f"{G:,.0f} GPU-hours = {G / gpus / 24:.1f} days of the {gpus:,}-GPU cluster" in out
    T = val("dsv3_tr_tokens")
    assert T == 14.8 and f"pre-training: {T:.1f}T tokens in {stages[0]:,.0f} GPU-hours" in out  # prose: 14.8T
    assert f"{stages[0] / T:,.0f} GPU-hours per trillion tokens (report, section 1: {val('dsv3_tr_gpuh_per_T'):,.0f})" in out
    # prose: "the two later stages together are under a twentieth of the hours"
    assert (stages[1] + stages[2]) / G < 1 / 20 and "under a twentieth of the hours" in _src("training-cost.md")
    assert "<table" in _cost(site).read_text()


def check_flop_check(site: Path) -> None:
    """ISCA'25 Table 2 is a training count (6N, not 2N); the implied MFU is pretrain_check's."""
    from dsref.experiments.whatif import pretrain_check
    from dsref.hwmodels.catalog import load_device
    from dsref.reference.presets import get_preset
    from dsref.sim.costmodel import training_flops_per_token
    c = _claims()
    out = cell_outputs(_cost(site))
    assert "GFLOP per token at sequence length 4,096" in out
    for cid, preset in (("isca_flops_v3", "deepseek-v3"), ("isca_flops_v2", "deepseek-v2"),
                        ("isca_flops_llama405b", "llama-3.1-405b")):
        cfg = get_preset(preset)
        n_act = cfg.param_counts()["activated_params"]
        f = training_flops_per_token(cfg, 4096)
        pub = float(c[cid]["value"])
        assert abs(f / 1e9 / pub - 1) < 0.02, (preset, f, pub)  # prose: "agrees with the published one"
        assert f"{preset} {n_act / 1e9:,.2f} {pub:,.0f} {f / 1e9:,.1f} {f / 1e9 / pub - 1:+.1%}" in out, preset
        if preset == "llama-3.1-405b":  # prose: close to 6N, not 2N
            assert abs(pub - 6 * n_act / 1e9) < abs(pub - 2 * n_act / 1e9) and abs(pub / (6 * n_act / 1e9) - 1) < 0.05
    pre = float(c["dsv3_tr_pretrain_gpuh"]["value"])
    chk = pretrain_check(pre)
    h800 = load_device("h800")
    assert 0.35 < chk["frac_bf16"] < 0.45  # "an ordinary utilisation ... not an impossible one"
    assert f"over {pre:,.0f} GPU-hours: {chk['tflops_per_gpu']:.0f} TFLOP/s per GPU" in out
    assert (f"U = {chk['frac_bf16']:.1%} of the H800's {h800.peak('bf16') / 1e12:,.0f} TFLOP/s dense BF16 peak; "
            f"{chk['frac_fp8']:.1%} of its {h800.peak('fp8') / 1e12:,.0f} TFLOP/s dense FP8 peak") in out
    text = page_text(_cost(site))  # included from the source files, not pasted
    assert "def training_flops_per_token(" in text and "def pretrain_check(" in text and "def pretrain(" in text


def check_simulator_prediction(site: Path) -> None:
    """sim.train's pre-training GPU-hours, MFU and error against the report, as printed."""
    from dsref.experiments import dsv3_training
    sim = dsv3_training.pretrain()
    pub = float(_claims()["dsv3_tr_pretrain_gpuh"]["value"])
    out = cell_outputs(_cost(site))
    assert (f"pre-training GPU-hours: simulated {sim['device_hours'] / 1e6:.3f}M, published {pub / 1e6:.3f}M, "
            f"error {sim['device_hours'] / pub - 1:+.1%}") in out
    assert f"simulated MFU {sim['mfu']:.1%} of BF16 peak ({sim['mfu_vs_fp8_peak']:.1%} of FP8)" in out
    assert f"DP{sim['dp']} x PP{sim['pp']}, EP{sim['ep']}" in out
    # prose: 2048 H800s, 16 pipeline stages, 64-way EP, fewer simulated hours than published, goodput 1
    assert (sim["devices"], sim["pp"], sim["ep"], sim["goodput"]) == (2048, 16, 64, 1.0)
    assert sim["device_hours"] < pub
    src = _src("training-cost.md")
    assert "2048 simulated H800s" in src and "16 pipeline stages" in src and "64-way expert" in src


def check_r1_and_critiques(site: Path) -> None:
    """R1's published RL cost is arithmetic on its claim; the critiques' figures are the constants above."""
    c = _claims()
    r1 = c["r1_rl_cost"]["value"]
    gpuh = (r1["r1_zero_hours"] + r1["r1_hours"]) * r1["gpus"] + r1["sft_data_gpuh"]
    p = float(c["dsv3_tr_gpu_price"]["value"])
    G = float(c["dsv3_tr_total_gpuh"]["value"])
    out = cell_outputs(_cost(site))
    assert f"of SFT data: {gpuh:,} GPU-hours" in out
    assert f"${gpuh * p / 1e3:,.1f}K (stated: ${r1['cost_usd'] / 1e3:,.0f}K); {gpuh / G:.1%} of V3's" in out
    src = _src("training-cost.md")
    assert f'"build OpenAI for \\${BERNSTEIN_USD / 1e6:.0f}M"' in src
    assert f'"well higher than \\${SEMIANALYSIS_HARDWARE_USD / 1e6:.0f}M"' in src
    assert "Bernstein" in src and "SemiAnalysis" in src and "DeepSeek Debates" in src


def check_cost_figure_and_exercises(site: Path) -> None:
    """The figure is there; the hidden answers are the formulas' values."""
    from dsref.experiments.whatif import pretrain_check
    from dsref.hwmodels.catalog import load_device
    page = _cost(site)
    imgs = page_images(page, site)
    assert imgs and all(i.stat().st_size > 10_000 for i in imgs), imgs
    c = _claims()
    pre, G, p = (float(c[k]["value"]) for k in ("dsv3_tr_pretrain_gpuh", "dsv3_tr_total_gpuh", "dsv3_tr_gpu_price"))
    chk = pretrain_check(pre)
    h800 = load_device("h800")
    F, T = chk["gflop_per_token"] * 1e9, chk["tokens"]
    g30 = F * T / (3600 * 0.30 * h800.peak("bf16"))
    out = cell_outputs(page)
    assert f"1. at U = 30%: {g30 / 1e6:.3f}M GPU-hours, ${g30 * p / 1e6:.3f}M" in out
    assert f"2. at $3/GPU-hour: {G:,.0f} x $3 = ${G * 3 / 1e6:.3f}M" in out
    assert f"{T * h800.peak('fp8') / h800.peak('bf16') / 1e12:.1f}T tokens" in out


# ------------------------------------------------------------------ at home
def check_moe_parameters(site: Path) -> None:
    """Total and activated counts from the preset; DeepSeek's README convention quoted with its source."""
    from dsref.reference.presets import get_preset
    from dsref.sim import costmodel
    from dsref.sim.quant import get_quant, model_weight_bytes
    v3 = get_preset("deepseek-v3")
    pc = v3.param_counts()
    embed = v3.vocab_size * v3.hidden_size
    out = cell_outputs(_home(site))
    assert (f"counted: {pc['total_params'] / 1e9:.2f}B total, {pc['activated_params'] / 1e9:.2f}B activated "
            f"(head in, embedding out), {(pc['activated_params'] + embed) / 1e9:.2f}B with the embedding") in out
    assert f"= {embed / 1e9:.2f}B parameters each" in out
    assert f"k = {v3.num_experts_per_tok} of E = {v3.n_routed_experts} per MoE layer" in out
    q4 = get_quant("q4_k_m")
    held = model_weight_bytes(v3, q4)["total"]
    read = costmodel.totals(costmodel.decode_ops(v3, q4, 1, 1))["weight_bytes"]
    assert f"R1 holds {held / 1e9:.1f} GB and reads {read / 1e9:.2f} GB per token" in out
    assert held > 400e9  # prose: "more than 400 GB"
    # the README's figures as the prose quotes them; its 0.9B embedding is our vocab x hidden, rounded
    src = _src("at-home.md")
    assert f"gives {DS_README_ACTIVE_B}B" in src and f"including {DS_README_EMBED_B}B for Embedding" in src
    assert round(embed / 1e9, 1) == DS_README_EMBED_B
    assert "8 of the 256 routed experts" in src and (v3.num_experts_per_tok, v3.n_routed_experts) == (8, 256)
    assert "<table" in _home(site).read_text()


def check_capacity(site: Path) -> None:
    """Which machines hold R1: only the two 512 GB machines, at every quantisation but Q8_0."""
    from dsref.experiments import edge_devices as ed
    from dsref.sim.local import estimate, resolve_target
    assert ed.R1_ANSWER_KV == 1024  # the prose's "1,024 tokens"
    targets = ("raspberry-pi-5", "raspberry-pi-5-w7700", "ampereone-server", "m3-ultra")
    out = cell_outputs(_home(site))
    for qn in ("q8_0", "q4_k_m", "q2_k", "iq1_s"):
        rs = [estimate("deepseek-r1", t, qn, context=ed.R1_ANSWER_KV, prompt_tokens=ed.PROMPT) for t in targets]
        cells = " ".join("fits" if r["fits"] else "no" for r in rs)
        assert (f"{qn.upper()} {rs[0]['weights_bits_per_weight']:.2f} {rs[0]['memory_required_bytes'] / 1e9:,.1f} "
                f"{cells}") in out, qn
        assert not rs[0]["fits"] and not rs[1]["fits"]  # "no quantisation ... within reach of the Pi"
        if qn == "q4_k_m":
            assert [r["fits"] for r in rs] == [False, False, True, True]
    assert all(resolve_target(t).device.memory_bytes == 512e9 for t in targets[2:])  # "the two machines with 512 GB"


def _mem_share(r: dict) -> float:
    """Share of a sim.local decode step's roofline time spent in memory-bound operations."""
    bd = r["decode_breakdown"].values()
    return sum(d["memory_bound_time_s"] for d in bd) / sum(d["time_s"] for d in bd)


def check_predictions_against_geerling(site: Path) -> None:
    """sim.local's prediction and its error for each of Geerling's validation measurements."""
    from dsref.experiments import edge_devices as ed
    from dsref.sim.local import estimate, resolve_target
    c = _claims()
    out = cell_outputs(_home(site))
    for cid, model, target, ctx, form in ed.CASES:
        assert c[cid]["role"] == "validation"
        r = estimate(model, target, ed.QUANT, context=ctx, prompt_tokens=ed.PROMPT, mla_form=form)
        pred, pub = r["decode_tokens_per_s"], float(c[cid]["value"])
        assert f"{pred:,.2f} {pub:,.2f} ( {cid} ) {pred / pub - 1:+.0%}" in out, cid
        tgt = resolve_target(target).device
        bound = tgt.efficiency("memory") * tgt.memory_bandwidth / r["decode_bytes_per_step"]
        assert f"yes {_mem_share(r):.0%} {bound:,.2f} {pred:,.2f} {pub:,.2f}" in out, cid
        assert (f"{cid}: n tau = {r['decode_overhead_s'] * 1e3:.1f} ms of a {r['decode_step_s'] * 1e3:.1f} ms step") in out
    # prose: "on every machine below ... almost all of the step is bound by memory"
    for t in ("raspberry-pi-5", "raspberry-pi-5-w7700", "ampereone-server", "m3-ultra"):
        for model in ("deepseek-r1", "qwen2.5-14b", "llama-3.1-8b"):
            r = estimate(model, t, ed.QUANT, context=ed.R1_ANSWER_KV, prompt_tokens=ed.PROMPT)
            assert not r["fits"] or _mem_share(r) > 0.9, (t, model)
    # the M3 Ultra has no measured per-node cost: its row is streaming only (prose: "optimistic")
    r = estimate("qwen2.5-14b", "m3-ultra", ed.QUANT, context=ed.R1_ANSWER_KV, prompt_tokens=ed.PROMPT)
    assert r["decode_overhead_s"] == 0.0 and "not measured" in out


def check_calibration_roles(site: Path) -> None:
    """Calibration claims set the data files (re-solved here); validation claims set nothing."""
    from dsref.experiments import edge_devices as ed
    c = _claims()
    out = cell_outputs(_home(site))
    for cid, cl in c.items():
        if cid.startswith("geer"):
            assert f"{cid} {cl['role']} {cl['model']} {float(cl['value']):,.2f}" in out, cid
            assert cl["role"] == ("calibration" if cid.startswith("geer_cal_") else "validation")
    for t in ed.CALIBRATION:
        sol = ed.calibrate(t)
        assert f"{t}: solved eta_m = {sol['memory_efficiency']:.3f}, tau = {sol['per_node_s'] * 1e6:.2f} us" in out, t
    for m, pred, meas in ed.held_out_errors("ampereone-server")[2:]:
        assert f"{m}: simulated {pred:.2f} vs measured {meas:.2f} tokens/s ({pred / meas - 1:+.1%}, held out)" in out


def check_home_figure_and_exercises(site: Path) -> None:
    """The bandwidth figure is there; the hidden answers are the cost model's."""
    from dsref.reference.presets import get_preset
    from dsref.sim import costmodel
    from dsref.sim.quant import get_quant, model_weight_bytes
    page = _home(site)
    imgs = page_images(page, site)
    assert imgs and all(i.stat().st_size > 10_000 for i in imgs), imgs
    v3, q4 = get_preset("deepseek-v3"), get_quant("q4_k_m")
    Q = costmodel.totals(costmodel.decode_ops(v3, q4, 1, 1024))["bytes"]
    out = cell_outputs(page)
    assert f"1. Q = {Q / 1e9:.2f} GB per token -> at most {800e9 / Q:.1f} tokens/s at 800 GB/s" in out
    Qd = model_weight_bytes(v3, q4)["total"] + v3.kv_cache_bytes_per_token() * 1024
    assert f"2. dense: Q = {Qd / 1e9:.1f} GB per token -> at most {800e9 / Qd:.2f} tokens/s" in out
    sizes = {qn: model_weight_bytes(v3, get_quant(qn))["total"] for qn in ("q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k")}
    best = max((qn for qn, b in sizes.items() if b <= 256e9), key=sizes.get)
    assert f"largest that fits in 256 GB is {best}" in out
