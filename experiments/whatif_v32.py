"""What if: DeepSeek Sparse Attention (V3.2) vs dense MLA (V3 / V3.1-Terminus) serving cost by token position.

Writes docs/whatif-v32-sparse-attention.md and docs/img/whatif_v32_cost.png. Every number on
the page is computed here, from the simulator (sim.serve's step costs: sim.stepcost ->
sim.costmodel + sim.roofline) in the day-6 deployment shape on H800 nodes, priced at the V3
report's $2 per GPU-hour (claim dsv3_tr_gpu_price) -- the conventions of the serving-cost
what-if (experiments/whatif.py). Nothing is fitted to DeepSeek's published V3.2 cost figure:
it is what the page compares against, qualitatively (its text gives no numbers).

``python -m dsref.experiments.whatif_v32 [--out-dir docs] [--fast]``.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from dsref.experiments.whatif import MEAN_KV, SLO_TOKENS_PER_S
from dsref.reference.atomic import atomic_path, atomic_write_text

MODELS = (("V3 / V3.1-Terminus (dense MLA)", "deepseek-v3"), ("V3.2 (DSA)", "deepseek-v3.2"))
CONTEXTS = (4096, 8192, 16384, 32768, 65536, 131072)
FAST_CONTEXTS = (4096, 131072)
SYSTEM, QUANT = "h800-node", "fp8"   # the serving-cost what-if's H800 row (catalog peaks, FP8 GEMMs)
# The same with an FP8 KV cache for both models: DeepSeek's V3.2 inference code keeps the indexer
# keys in FP8 (inference/model.py Indexer k_cache float8_e4m3fn); a decode variant, not the headline.
QUANT_KV8 = "fp8+kv-fp8"
# Prefill "at token position L": each sequence prefills the chunk of positions [L - c, L),
# c = min(L, PREFILL_CHUNK), after L - c cached tokens (chunked prefill), so the cost is that of
# tokens near position L, the x axis of DeepSeek's figure, rather than a whole prompt's average.
PREFILL_CHUNK = 4096
PLOT_GRID = (1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 81920, 98304,
             114688, 131072)
CROSS_GRID = tuple(range(512, 32768 + 1, 512))   # scanned for the first context where V3.2 is cheaper
FIGURE = ("DeepSeek-V3.2-Exp technical report (github.com/deepseek-ai/DeepSeek-V3.2-Exp, DeepSeek_V3_2.pdf, "
          "Figure 3 'Inference costs of DeepSeek-V3.1-Terminus and DeepSeek-V3.2-Exp on H800 clusters'; the "
          "same plot is cost.jpg in that repository's README)")


def price_per_gpu_hour() -> float:
    from dsref.experiments.registry import load_claims
    return float(load_claims()["dsv3_tr_gpu_price"]["value"])


@lru_cache(maxsize=None)
def _setup(model: str, quant: str = QUANT):
    """(ServeSim, prefill Instance, decode Instance, {form: prefill StepCost}) of the day-6 instance
    shapes (one prefill EP32 instance, one decode EP144 instance) serving ``model`` on H800 nodes.
    Forms: 'naive' (MLA's MHA mode: V3's prefill; for V3.2 the masked-MHA mode with the indexer)
    and, for V3.2, 'absorbed' (DSA in MLA's MQA mode) -- sim.deployment.serve_phases."""
    import simpy

    from dsref.sim import scenario, serve
    sc = scenario.load("deepseek-day6", {"model": model, "system": SYSTEM, "quant": quant,
                                         "prefill": {"instances": 1}, "decode": {"instances": 1}})
    sim = serve.ServeSim(sc, duration_s=1.0)
    sim.env = simpy.Environment()
    pre, dec = serve.Instance(sim, "prefill", 0), serve.Instance(sim, "decode", 0)
    cost = sim.cost["prefill"]
    forms = ({"absorbed": cost["prefill"], "naive": cost["prefill_mha"]} if sim.cfg.has_indexer
             else {"naive": cost["prefill"]})
    return sim, pre, dec, forms


def prefill_at(model: str, L: int) -> dict:
    """Prefill chip-seconds per token at position L, per MLA form; 'best' = the cheaper form."""
    from dsref.sim.stepcost import uniform
    sim, pre, _, forms = _setup(model, QUANT)
    c = min(L, PREFILL_CHUNK)
    kv_cap = sim.capacity["prefill"]["kv_tokens_per_instance"]
    n_req = int(max(1, min(pre.budget // c, kv_cap // L)))   # the batch's KV must fit while it prefills
    dp = pre.par.dp
    if n_req >= dp:  # whole sequences per DP rank: the busiest rank sets the step (StepCost.prefill)
        n_req -= n_req % dp
    x = uniform(n_req, c, L - c, sim.topk)
    chips = pre.par.devices
    out = {"sequences": n_req}
    for form, cost in forms.items():
        t, _, _ = cost.prefill(x, two_microbatch=pre.two_mb)
        out[form] = t * chips / (n_req * c)
    out["best_form"] = min(forms, key=lambda f: out[f])
    out["best"] = out[out["best_form"]]
    return out


def decode_at(model: str, L: int, quant: str = QUANT) -> dict:
    """Decode chip-seconds per output token with every sequence at context L: the largest batch per
    device (<= max_batch_per_device) whose KV cache fits and that keeps >= SLO_TOKENS_PER_S per request
    (the serving-cost what-if's rule)."""
    sim, _, dec, _ = _setup(model, quant)
    kv_dev = sim.capacity["decode"]["kv_tokens_per_instance"] / dec.par.dp
    cap = int(min(sim.sc.decode.max_batch_per_device, kv_dev // L))
    def run(b):
        n = b * dec.par.dp
        step, _ = dec.decode_time(n, float(n * L))
        return (b, step, n * dec.tps / step) if dec.tps / step >= SLO_TOKENS_PER_S else None

    # the step time grows with the batch, so the per-request rate falls: bisect for the largest
    # batch that keeps the SLO (the same batch as the serving-cost what-if's linear scan)
    best, lo, hi = None, 1, cap
    while lo <= hi:
        mid = (lo + hi) // 2
        r = run(mid)
        if r is None:
            hi = mid - 1
        else:
            best, lo = r, mid + 1
    if best is None:
        return {"batch_per_device": 0, "kv_batch_limit": cap, "chip_s_per_token": None}
    return {"batch_per_device": best[0], "kv_batch_limit": cap, "step_s": best[1],
            "chip_s_per_token": dec.par.devices / best[2]}


def decode_attributed_at(model: str, L: int) -> float:
    """Decode chip-seconds for a token at position L in a day-6 batch: every DP rank runs the batch that
    decode_at finds at the day-6 mean KV length (MEAN_KV); the token costs the batch's average plus the
    difference its own context makes: the step with one of its sequences at L instead of at MEAN_KV,
    charged to that sequence's tokens. This is how a mixed production batch would split its cost by
    position; decode_at instead puts every sequence at L, so KV capacity limits the batch."""
    from dsref.sim.stepcost import uniform
    sim, _, dec, _ = _setup(model, QUANT)
    base = decode_at(model, MEAN_KV)
    b, T, k = base["batch_per_device"], 1.0 + dec.mtp_depth, sim.topk
    rest = uniform(b - 1, T, MEAN_KV, k)

    def step(ctx):
        x = rest + uniform(1, T, ctx, k)
        t = sim.cost["decode"]["decode"].decode(x, two_microbatch=dec.two_mb)[0]
        if dec.mtp:  # drafting: the MTP module runs mtp_depth times on one token per sequence
            t += dec.mtp_depth * sim.cost["decode"]["mtp"].decode_compute_s(
                uniform(b - 1, 1.0, MEAN_KV, k) + uniform(1, 1.0, ctx, k))
        return t

    extra = (step(L) - step(MEAN_KV)) * dec.par.devices / (dec.par.dp * dec.tps)  # one sequence per rank
    return base["chip_s_per_token"] + extra


def usd_per_million(chip_s: float | None, price: float) -> float | None:
    return None if chip_s is None else chip_s * 1e6 / 3600.0 * price


def per_token_work(model: str, L: int) -> dict:
    """Cost-model work of one decode token at context L (batch 1, no MTP): matmul FLOPs, KV bytes."""
    from dsref.reference.presets import load_config
    from dsref.sim import costmodel as cm
    ops = cm.decode_ops(load_config(model), QUANT, 1, L)
    t = cm.totals(ops)
    return {"flops": t["flops"], "kv_bytes": t["kv_bytes"],
            "attn_flops": sum(o.flops * o.count for o in ops if o.kind == "attention")}


def cost_table(contexts, price: float) -> list[dict]:
    rows = []
    (_, v3), (_, v32) = MODELS
    for L in contexts:
        p3, p32 = prefill_at(v3, L), prefill_at(v32, L)
        d3, d32 = decode_at(v3, L), decode_at(v32, L)
        row = {"context": L,
               "prefill_v3": usd_per_million(p3["best"], price),
               "prefill_v32": usd_per_million(p32["best"], price), "prefill_v32_form": p32["best_form"],
               "prefill_v32_mqa": usd_per_million(p32["absorbed"], price),
               "prefill_v32_masked_mha": usd_per_million(p32["naive"], price),
               "decode_v3": usd_per_million(d3["chip_s_per_token"], price),
               "decode_v32": usd_per_million(d32["chip_s_per_token"], price),
               "decode_batch_v3": d3["batch_per_device"], "decode_batch_v32": d32["batch_per_device"],
               "prefill_seqs_v3": p3["sequences"], "prefill_seqs_v32": p32["sequences"]}
        e3, e32 = decode_at(v3, L, QUANT_KV8), decode_at(v32, L, QUANT_KV8)
        row.update(decode_kv8_v3=usd_per_million(e3["chip_s_per_token"], price),
                   decode_kv8_v32=usd_per_million(e32["chip_s_per_token"], price),
                   decode_kv8_batch_v3=e3["batch_per_device"], decode_kv8_batch_v32=e32["batch_per_device"])
        row.update(decode_attr_v3=usd_per_million(decode_attributed_at(v3, L), price),
                   decode_attr_v32=usd_per_million(decode_attributed_at(v32, L), price))
        for ph in ("prefill", "decode", "decode_kv8", "decode_attr"):
            a, b = row[f"{ph}_v3"], row[f"{ph}_v32"]
            row[f"{ph}_ratio"] = None if not a or b is None else b / a
        rows.append(row)
    return rows


def crossover(phase: str, grid=CROSS_GRID) -> int | None:
    """Smallest context on ``grid`` from which on V3.2 is cheaper than V3 for ``phase``
    ('prefill', 'decode' or 'decode_kv8')."""
    (_, v3), (_, v32) = MODELS
    quant = QUANT_KV8 if phase == "decode_kv8" else QUANT
    f = ((lambda m, L: prefill_at(m, L)["best"]) if phase == "prefill" else decode_attributed_at
         if phase == "decode_attr" else (lambda m, L: decode_at(m, L, quant)["chip_s_per_token"]))
    last_dearer = None
    for L in grid:
        a, b = f(v3, L), f(v32, L)
        if a is None or b is None:
            continue
        if b >= a:
            last_dearer = L
    if last_dearer is None:
        return grid[0]
    nxt = [L for L in grid if L > last_dearer]
    return nxt[0] if nxt else None


# ------------------------------------------------------------------ page
def _plot(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, ph, title in ((axes[0], "prefill", "(a) Prefill"), (axes[1], "decode", "(b) Decode, every sequence at L"),
                          (axes[2], "decode_attr", "(c) Decode, one sequence at L in a day-6 batch")):
        for (label, pts), (ls, c, lw) in zip(curves[ph].items(), (("-", "tab:blue", 1.5), ("-", "tab:blue", 0.8),
                                                                   ("--", "tab:orange", 1.5), ("--", "tab:orange", 0.8))
                                              if ph == "decode" else (("-", "tab:blue", 1.5), ("--", "tab:orange", 1.5))):
            xs, ys = zip(*[(L, v) for L, v in pts if v is not None])
            ax.plot([x / 1024 for x in xs], ys, ls=ls, color=c, lw=lw, marker="o", ms=3 if lw > 1 else 2, label=label)
        ax.set_xlabel("token position (K)")
        ax.set_ylabel("USD per million tokens")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Simulated H800 serving cost by token position, day-6 shape, $2/GPU-hour", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a killed run leaves the old plot, not half a PNG
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def half(rows) -> str:
    """Where each simulated V3.2/V3 ratio first drops to 0.5 or below, as text."""
    out = []
    for key, lab in (("prefill_ratio", "prefill"), ("decode_ratio", "decode"),
                     ("decode_kv8_ratio", "decode, FP8 KV"), ("decode_attr_ratio", "decode in a day-6 batch")):
        hit = [r["context"] for r in rows if r[key] is not None and r[key] <= 0.5]
        out.append(f"{lab} {hit[0] // 1024}K" if hit else f"{lab} not up to {rows[-1]['context'] // 1024}K")
    return ", ".join(out)


def _f(v, d=3):
    return "--" if v is None else f"{v:.{d}f}"


def write_page(out_dir: Path, fast: bool = False) -> dict:
    price = price_per_gpu_hour()
    contexts = FAST_CONTEXTS if fast else CONTEXTS
    rows = cost_table(contexts, price)
    grid = tuple(range(2048, 16384 + 1, 2048)) if fast else CROSS_GRID
    cross = {ph: crossover(ph, grid) for ph in ("prefill", "decode", "decode_kv8", "decode_attr")}
    plot_grid = FAST_CONTEXTS if fast else PLOT_GRID
    curves = {"prefill": {}, "decode": {}, "decode_attr": {}}
    for label, m in MODELS:
        curves["prefill"][label] = [(L, usd_per_million(prefill_at(m, L)["best"], price)) for L in plot_grid]
        curves["decode"][label] = [(L, usd_per_million(decode_at(m, L)["chip_s_per_token"], price)) for L in plot_grid]
        curves["decode_attr"][label] = [(L, usd_per_million(decode_attributed_at(m, L), price)) for L in plot_grid]
        curves["decode"][label + ", FP8 KV"] = [(L, usd_per_million(decode_at(m, L, QUANT_KV8)["chip_s_per_token"],
                                                                     price)) for L in plot_grid]
    _plot(curves, out_dir / "img" / "whatif_v32_cost.png")
    work = {L: {m: per_token_work(m, L) for _, m in MODELS} for L in contexts}

    from dsref.reference.presets import load_config
    c32 = load_config(MODELS[1][1])
    c3 = load_config(MODELS[0][1])
    I, J, K = c32.index_n_heads, c32.index_head_dim, c32.index_topk
    _, _, dec32, _ = _setup(MODELS[1][1], QUANT)
    L = ["# What if: DeepSeek Sparse Attention (V3.2) vs dense MLA (V3 / V3.1-Terminus), serving cost by context\n",
         "Generated by `python -m dsref.experiments.whatif_v32 --out-dir docs` (experiments/whatif_v32.py); every "
         "number below is computed by that script. V3.1-Terminus has V3's architecture, so `deepseek-v3` stands "
         "for it; `deepseek-v3.2` adds the lightning indexer "
         f"({I} heads x {J} dims, top-{K}) in every layer (the V3.2-Exp preset has the same shapes).\n",
         "## Set-up\n",
         f"- Deployment: the serving-cost what-if's conventions (docs/whatif-serving-cost.md): the day-6 instance "
         f"shapes (prefill: one EP32 instance, 16K new tokens per device per step, two-micro-batch overlap; decode: "
         f"one EP144 instance, MTP acceptance 0.85) on `{SYSTEM}` nodes with `{QUANT}` weights (bf16 KV cache, the "
         f"quantisation's default), step times from sim.serve's step costs. Price: ${price:g} per GPU-hour "
         "(`dsv3_tr_gpu_price`, the V3 report's rental price; DeepSeek's V3.2 figure uses the same).",
         f"- Prefill at token position L: every sequence prefills the {PREFILL_CHUNK}-token chunk ending at L "
         f"(the whole prompt when L <= {PREFILL_CHUNK}), as many sequences as the step's token budget and the "
         "instance's KV capacity allow. V3 prefills in MLA's MHA (naive) form, as DeepSeek does. V3.2: the "
         "cheaper of DSA in MLA's MQA (absorbed) form -- what the V3.2-Exp paper says DSA is built on (sec. 1, "
         "'Instantiate DSA under MLA') and what `dsref sim serve` uses for V3.2 -- and the paper's 'masked MHA "
         "mode' for short prefills (V3's MHA form with the selection as a mask, plus the indexer); the table "
         "gives both.",
         f"- Decode at context L: every sequence at context L; the batch per device is the largest (<= 256) whose "
         f"KV cache fits ({c3.kv_cache_bytes_per_token(2):,.0f} B/token for V3, "
         f"{c32.kv_cache_bytes_per_token(2):,.0f} B/token for V3.2 incl. the indexer keys) and that keeps >= "
         f"{SLO_TOKENS_PER_S:.0f} tokens/s per request.",
         "- Cost model of the indexer and of sparse MLA: docs/simulator.md ('DeepSeek-V3.2'). Nothing here is "
         "fitted to DeepSeek's published V3.2 costs.\n",
         "## Cost per million tokens (simulated)\n",
         "| context | prefill V3 $ | prefill V3.2 $ (mode) | V3.2/V3 | V3.2 MQA-sparse $ | V3.2 masked-MHA $ | "
         "prefill seqs/step V3, V3.2 | decode V3 $ (batch/dev) | decode V3.2 $ (batch/dev) | V3.2/V3 |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mode = "MQA" if r["prefill_v32_form"] == "absorbed" else "masked MHA"
        L.append(f"| {r['context'] // 1024}K | {_f(r['prefill_v3'])} | {_f(r['prefill_v32'])} ({mode}) | "
                 f"{_f(r['prefill_ratio'], 2)} | {_f(r['prefill_v32_mqa'])} | {_f(r['prefill_v32_masked_mha'])} | "
                 f"{r['prefill_seqs_v3']}, {r['prefill_seqs_v32']} | {_f(r['decode_v3'])} ({r['decode_batch_v3']}) | "
                 f"{_f(r['decode_v32'])} ({r['decode_batch_v32']}) | "
                 f"{_f(r['decode_ratio'], 2)} |")
    L.append("\nPrefill sequences per step: the token budget's, fewer once their KV cache (prefix + chunk) no "
             "longer fits the prefill instance (rounded down to whole sequences per DP rank) -- smaller steps "
             "amortise weights and communication over fewer tokens.")
    L.append(f"\nDecode with an FP8 KV cache for both models (`{QUANT_KV8}`; more sequences fit at long context):\n")
    L.append("| context | decode V3 $ (batch/dev) | decode V3.2 $ (batch/dev) | V3.2/V3 |")
    L.append("|---:|---:|---:|---:|")
    for r in rows:
        L.append(f"| {r['context'] // 1024}K | {_f(r['decode_kv8_v3'])} ({r['decode_kv8_batch_v3']}) | "
                 f"{_f(r['decode_kv8_v32'])} ({r['decode_kv8_batch_v32']}) | {_f(r['decode_kv8_ratio'], 2)} |")
    L.append(f"\nDecode, a token at position L in a day-6 batch (each DP rank runs the batch that fits at the "
             f"day-6 mean KV length, {MEAN_KV:,} tokens; the token costs that batch's average plus the step-time "
             "difference its own sequence makes at L instead of the mean -- how a mixed production batch would "
             "split its cost by position; one reading of the figure's \"token position\", whose method is not "
             "described beyond \"benchmarking the actual service\"):\n")
    L.append("| context | decode V3 $ | decode V3.2 $ | V3.2/V3 |")
    L.append("|---:|---:|---:|---:|")
    for r in rows:
        L.append(f"| {r['context'] // 1024}K | {_f(r['decode_attr_v3'])} | {_f(r['decode_attr_v32'])} | "
                 f"{_f(r['decode_attr_ratio'], 2)} |")
    step = grid[1] - grid[0]
    cx = lambda c: "none on the grid" if c is None else f"{c:,} tokens"  # noqa: E731
    L.append(f"\nCrossover (first context on a {step}-token grid from {grid[0]:,} to {grid[-1]:,} from which on "
             f"V3.2 is cheaper): prefill {cx(cross['prefill'])}, decode {cx(cross['decode'])} (FP8 KV cache: "
             f"{cx(cross['decode_kv8'])}; in a day-6 batch: {cx(cross['decode_attr'])}). Below it the indexer "
             "(its projections, its O(L^2) FP8 scores and top-k, "
             f"and its {J}-element key per token and layer, which also shrinks the decode batch that fits) costs "
             f"more than the attention it saves: with at most {K} visible keys the selection is every key, so "
             "MLA's work is V3's exactly. In prefill, sparse MLA in the MQA form also costs "
             f"{(2 * c3.num_attention_heads * (2 * c3.kv_lora_rank + c3.qk_rope_head_dim)):,} FLOPs per selected "
             f"key and query against {2 * c3.num_attention_heads * (c3.qk_head_dim + c3.v_head_dim):,} per key in "
             "V3's MHA form, so it pays off only once a query sees several times top-k keys; until then the "
             "masked-MHA mode (dense, plus the indexer) is the cheaper V3.2 prefill.\n")
    L.append("![V3 vs V3.2 cost by position](img/whatif_v32_cost.png)\n")
    L.append("Per decode token (batch 1, cost model, no MTP): forward FLOPs and KV-cache bytes read:\n")
    L.append("| context | FLOPs V3 (G) | FLOPs V3.2 (G) | attention FLOPs V3.2/V3 | KV bytes V3 (MB) | "
             "KV bytes V3.2 (MB) |")
    L.append("|---:|---:|---:|---:|---:|---:|")
    for ctx in contexts:
        a, b = work[ctx][MODELS[0][1]], work[ctx][MODELS[1][1]]
        L.append(f"| {ctx // 1024}K | {a['flops'] / 1e9:,.1f} | {b['flops'] / 1e9:,.1f} | "
                 f"{b['attn_flops'] / a['attn_flops']:.2f} | {a['kv_bytes'] / 1e6:,.1f} | {b['kv_bytes'] / 1e6:,.1f} |")
    L.append("\n## What DeepSeek published (compared, not fitted)\n")
    L.append(f"- {FIGURE}: cost per million tokens vs token position (0-128K) on H800 at $2 per GPU-hour, "
             "'estimated from benchmarking the actual service', for (a) prefilling and (b) decoding. The text gives "
             "no numbers, so none are read off the plot here; its shape: V3.1-Terminus rises linearly with position "
             "in both panels (decode to near the top of its 0-2.4$ axis at 128K, prefill to near the top of its "
             "0-0.7$ axis); V3.2-Exp is nearly flat past a few thousand tokens (its prefill curve with a kink there), far "
             "below Terminus at 128K; at "
             "the shortest positions the two curves start close together, V3.2-Exp slightly above in decode. The "
             "caption notes the masked-MHA mode for short prefills.")
    (_, v3), (_, v32) = MODELS
    d6 = {ph: f(v32, MEAN_KV) / f(v3, MEAN_KV) for ph, f in (
        ("prefill", lambda m, x: prefill_at(m, x)["best"]),
        ("decode", lambda m, x: decode_at(m, x)["chip_s_per_token"]))}
    L.append("- The V3.2-Exp release (DeepSeek API news, 2025-09-29) cut API prices by '50%+', effective "
             "immediately (as reported, with the announcement cited, by https://skywork.ai/blog/?p=10736; the "
             "official notice itself was not retrieved here). A price is not a cost: it covers DeepSeek's whole "
             "traffic mix, cache hits and margins. For scale: at the day-6 traffic's mean KV length per output "
             f"token ({MEAN_KV:,} tokens, docs/whatif-serving-cost.md) the simulated V3.2/V3 ratio is "
             f"{d6['prefill']:.2f} for prefill and {d6['decode']:.2f} for decode: the simulator does not "
             f"explain a halving at that context. Ratio <= 0.5 first at: {half(rows)}.")
    r1 = rows[-1]
    L.append(f"\nReading: from first principles the simulator gives the figure's shape -- V3's cost grows linearly "
             f"with position, V3.2's slowly -- and at {r1['context'] // 1024}K a V3.2/V3 ratio of "
             f"{_f(r1['prefill_ratio'], 2)} for prefill and {_f(r1['decode_ratio'], 2)} for decode "
             f"({_f(r1['decode_kv8_ratio'], 2)} with an FP8 KV cache, {_f(r1['decode_attr_ratio'], 2)} for a "
             "token in a day-6 batch). With every sequence at L, decode at long context is bounded by the KV cache "
             "that fits per device (the batch column) for both models, and V3.2's indexer keys make its cache "
             "larger per token, so its cost still grows with L; attributed within a mixed batch (panel c), V3.2's "
             "decode cost is nearly flat in L, V3's linear -- the shape of DeepSeek's decoding panel. The "
             "figure's text gives no numbers, so dollars are not compared.\n")
    L.append("## Uncertain\n")
    L.append("- Sparse-MLA latent reads are counted as min(top-k, S) rows per sequence and step (exact for one "
             "query per sequence; for a prefill chunk it assumes the chunk's queries' selections overlap and their "
             "gathers hit in cache -- prefill is compute-bound, so this matters little).")
    L.append("- The indexer's score product runs at the device's FP8 rate with the attention efficiency; its "
             "top-k is counted as 4 operations per score (a radix select); neither is a measured kernel time.")
    L.append(f"- KV cache in bf16 for both models (the `fp8` quantisation's default). DeepSeek's V3.2 inference "
             f"code keeps the indexer keys in FP8 ({c32.index_cache_bytes_per_token(None):,.0f} B/token over all "
             f"layers instead of {c32.index_cache_bytes_per_token(2):,.0f}); the FP8-KV table shows what a "
             "smaller cache does to the long-context decode batches.")
    L.append("- `sim serve` costs a decode step at its batch's mean context; this page builds each step's "
             "features from its sequences' own contexts (exact sums), so that approximation is not used here.")
    L.append("- How DeepSeek attributes cost to a 'token position' is not described; panels (b) and (c) are two "
             "readings (every sequence at L; one sequence at L in a day-6 batch) and differ a lot for decode.\n")
    atomic_write_text(out_dir / "whatif-v32-sparse-attention.md", "\n".join(L) + "\n")
    return {"rows": rows, "crossover": cross, "price": price, "decode_tps": dec32.tps, "day6_ratio": d6}


def main(out_dir: str = "docs", fast: bool = False) -> dict:
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    res = write_page(out, fast)
    print(f"wrote {out}/whatif-v32-sparse-attention.md, {out}/img/whatif_v32_cost.png", file=sys.stderr)
    return res


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out-dir", default="docs")
    ap.add_argument("--fast", action="store_true", help="two contexts and a coarse crossover grid (tests)")
    a = ap.parse_args()
    main(a.out_dir, a.fast)
