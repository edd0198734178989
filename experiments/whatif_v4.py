"""What if: four DeepSeek generations side by side -- V3 (dense MLA), V3.2 (DSA), V4-Flash and V4-Pro
(sliding window + CSA/HCA compressed attention) -- KV cache per token and per sequence, and decode
cost per million output tokens at 8K / 128K / 1M context on H800, H20, B200 and Ascend 910C.

Writes docs/whatif-v4-generations.md, docs/img/whatif_v4_kv.png and docs/img/whatif_v4_cost.png.
Every number on the page is computed here from the op lists (sim/costmodel.py for V3 / V3.2,
sim/costmodel_v4.py for V4) and the roofline (sim/roofline.py) with catalog peaks; nothing is fitted
to DeepSeek's published V4 efficiency ratios, which the page only quotes next to ours.

Decode instance (the same for every model and device, day-6 decode's shape as in the other what-ifs):
DECODE_DEVICES = 144 devices (18 nodes of 8), attention data-parallel (every device holds the
non-expert weights and its own sequences' cache), routed experts spread over all 144 (EP144; the
32 redundant experts of day-6 are left out), EP dispatch / combine over the node's fabric and
NICs, overlapped with compute (two micro-batches: step = max(compute, communication)). Batch per
device: the largest <= 256 (day-6's cap) whose cache fits next to the weights and that keeps >= 20
tokens/s per request (the serving-cost what-if's SLO). No MTP for any model (V4's MTP is not
costed), bf16 cache for all four (the element size `dsref info` uses).

``python -m dsref.experiments.whatif_v4 [--out-dir docs] [--fast]``.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from dsref.experiments.whatif import SLO_TOKENS_PER_S
from dsref.reference.atomic import atomic_path, atomic_write_text

MODELS = (("V3", "deepseek-v3"), ("V3.2", "deepseek-v3.2"), ("V4-Flash", "deepseek-v4-flash"),
          ("V4-Pro", "deepseek-v4-pro"))
DEVICES = (("H800", "h800-node"), ("H20", "h20-node"), ("B200", "b200-node"), ("Ascend 910C", "ascend-910c-node"))
CONTEXTS = (8192, 131072, 1048576)
PLOT_CONTEXTS = (8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)
DECODE_DEVICES = 144          # day-6 decode instance: 18 nodes x 8 GPUs, EP144 (sim/scenarios/deepseek-day6.toml)
MAX_BATCH_PER_DEVICE = 256    # day-6 decode cap (same file)
QUANT = "fp8"                 # DeepSeek's FP8 recipe (V4: its release's FP8 + FP4 experts), bf16 cache
PUBLISHED = ("DeepSeek-V4 model card / technical report 'DeepSeek-V4: Towards Highly Efficient Million-Token "
             "Context Intelligence' (huggingface.co/deepseek-ai/DeepSeek-V4-Pro), as quoted in secondary coverage "
             "(e.g. davidborish.com 'DeepSeek V4 Released with Million-Token Architecture'; Hugging Face blog "
             "'deepseekv4' summary): at 1M context V4-Pro needs 27% of V3.2's single-token inference FLOPs and 10% "
             "of its KV cache; V4-Flash 10% and 7%")
PUB_RATIOS = {"V4-Pro": (0.27, 0.10), "V4-Flash": (0.10, 0.07)}


@lru_cache(maxsize=None)
def _cfg(model: str):
    from dsref.reference.cli import load_model
    return load_model(model, "model", v4=True)


def _v4(cfg) -> bool:
    return cfg.arch == "deepseek_v4"


def max_context(model: str) -> int:
    return _cfg(model).max_position_embeddings


def kv_per_sequence(model: str, L: int, kv_bytes: float = 2.0) -> float:
    """Cache bytes of one sequence of L tokens (V4: windows + compressed entries + indexer keys)."""
    from dsref.sim import costmodel_v4
    cfg = _cfg(model)
    if _v4(cfg):
        return costmodel_v4.kv_cache_bytes(cfg, kv_bytes, L)
    return cfg.kv_cache_bytes_per_token(kv_bytes) * L


def kv_per_token(model: str) -> float:
    """Bytes one more token of context adds (V4: beyond the fixed windows), bf16."""
    return _cfg(model).kv_cache_bytes_per_token(2.0)


def _decode_ops(model: str, b: int, L: int):
    from dsref.sim import costmodel, costmodel_v4
    cfg = _cfg(model)
    if _v4(cfg):
        return costmodel_v4.decode_ops(cfg, QUANT, b, L)
    return costmodel.decode_ops(cfg, QUANT, b, L, mla_form="absorbed")


@lru_cache(maxsize=None)
def _weights_per_device(model: str) -> float:
    """Non-expert weights (replicated: data-parallel attention) + 1/N of the routed experts."""
    from dsref.reference.params import ROUTED_EXPERT, tensors
    from dsref.sim import costmodel_v4
    from dsref.sim.quant import get_quant, tensor_bytes
    cfg = _cfg(model)
    if _v4(cfg):
        from dsref.reference.params_v4 import tensors as tensors_v4
        rows = [(t.group, costmodel_v4.release_row_bytes(t, cfg.n_routed_experts)) for t in tensors_v4(cfg)]
    else:
        q = get_quant(QUANT)
        rows = [(t.group, tensor_bytes(cfg, q, t)) for t in tensors(cfg)]
    experts = sum(b for g, b in rows if g == ROUTED_EXPERT)
    return sum(b for _, b in rows) - experts + experts / DECODE_DEVICES


@lru_cache(maxsize=None)
def _node(system: str):
    from dsref.hwmodels.systems import load_system
    s = load_system(system)
    return getattr(s, "node", s)


def _reserve(model: str) -> float:
    """Activation working set: the decode step's largest op at the batch cap, plus fp32 logits."""
    ops = _decode_ops(model, MAX_BATCH_PER_DEVICE, 8192)
    return max(o.act_bytes_read + o.act_bytes_written for o in ops) + MAX_BATCH_PER_DEVICE * _cfg(model).vocab_size * 4


@lru_cache(maxsize=None)
def step_s(model: str, system: str, b: int, L: int, comm: bool = True) -> tuple[float, float, float]:
    """One decode step on one device of the instance, b sequences at context L each: (step seconds,
    compute + memory seconds, EP communication seconds); the step is the larger of the two plus the
    host overhead. comm=False: the same without the EP communication (the attention and weights alone)."""
    from dsref.sim import moe_stats, roofline
    from dsref.sim.comm import CommOp, ep_dispatch_per_token
    from dsref.sim.local import Target, framework_floors
    from dsref.sim.parallel import Parallelism
    from dsref.sim.quant import get_quant
    cfg, node = _cfg(model), _node(system)
    N = DECODE_DEVICES
    touched = moe_stats.expected_distinct(None, cfg.n_routed_experts, cfg.num_experts_per_tok, N * b)
    ops = []
    for op in _decode_ops(model, b, L):
        if op.name == "routed_experts":  # EP: the instance's whole batch touches experts spread over N devices
            op = replace(op, weight_bytes=touched * op.gemm_matrix_bytes * 3 / N)
        ops.append(op)
    par = Parallelism(devices=N, dp=N, ep=N, devices_per_node=node.devices_per_node,
                      node_limit=None if _v4(cfg) else cfg.topk_group)
    per = ep_dispatch_per_token(cfg, par)
    moe_layers = cfg.num_hidden_layers if _v4(cfg) else cfg.num_moe_layers
    comm = [CommOp(f"ep_{kind}_{leg}", b * per[f"{kind}_{leg}"], leg, "all_to_all", count=moe_layers,
                   participants=N, group=kind) for kind in ("dispatch", "combine") for leg in ("intra", "inter")
            if comm]
    fl = framework_floors(get_quant(QUANT), Target(system, node.device, n_devices=node.devices_per_node, node=node))
    t = roofline.step_time(ops, node.device, comm, node=node, overlap=True, kernel_floor_s=fl["decode_kernel_s"])
    return t.time_s + fl["decode_host_s"], t.compute_time_s, t.comm_time_s


def decode_at(model: str, system: str, L: int, comm: bool = True) -> dict:
    """Largest batch per device (<= 256) whose cache fits and that keeps the SLO; chip-seconds per token."""
    node = _node(system)
    free = node.device.require("memory_bytes") - _weights_per_device(model) - _reserve(model)
    kv_cap = int(max(0.0, free) // kv_per_sequence(model, L))
    cap = min(MAX_BATCH_PER_DEVICE, kv_cap)
    out = {"kv_batch_limit": kv_cap, "weights_per_device_gb": _weights_per_device(model) / 1e9}
    if L > max_context(model):
        return {**out, "batch_per_device": 0, "chip_s_per_token": None, "why": f"beyond the model's "
                f"{max_context(model):,}-token context"}
    if cap < 1:
        return {**out, "batch_per_device": 0, "chip_s_per_token": None, "why": "cache does not fit"}
    best, lo, hi = None, 1, cap
    while lo <= hi:  # per-request rate falls as the batch grows: bisect for the largest within the SLO
        mid = (lo + hi) // 2
        s = step_s(model, system, mid, L, comm)
        if 1.0 / s[0] >= SLO_TOKENS_PER_S:
            best, lo = (mid, s), mid + 1
        else:
            hi = mid - 1
    if best is None:
        return {**out, "batch_per_device": 0, "chip_s_per_token": None, "why": f"< {SLO_TOKENS_PER_S:g} tok/s at batch 1"}
    b, (t, tc, tm) = best
    return {**out, "batch_per_device": b, "step_s": t, "compute_s": tc, "comm_s": tm, "comm_bound": tm > tc,
            "chip_s_per_token": t / b}


def single_token_flops(model: str, L: int) -> float:
    """Matmul FLOPs of one decode token at context L (the convention of published per-token figures)."""
    from dsref.sim import costmodel
    return costmodel.matmul_flops(_decode_ops(model, 1, L))


def prices() -> dict[str, tuple[float | None, str]]:
    """Catalog price per device-hour and its source (None where the catalog has none)."""
    from dsref.hwmodels.catalog import load_device
    out = {}
    for label, system in DEVICES:
        dev = _node(system).device
        d = load_device(dev.id)
        src = d.figures["price"].source if "price" in d.figures else "not in the catalog (no citable rental price)"
        out[label] = (d.price_usd_per_hour, src)
    return out


# ------------------------------------------------------------------------------- page
def _plots(kv_curves, cost_curves, img: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in kv_curves.items():
        ax.loglog([x for x, _ in pts], [y / 1e9 for _, y in pts], marker="o", ms=3, label=label)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV cache per sequence (GB, bf16)")
    ax.set_title("KV cache per sequence (sim/costmodel_v4.py, config KV sizes)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(img / "whatif_v4_kv.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), sharex=True)
    for ax, (dev, curves) in zip(axes.flat, cost_curves.items()):
        for label, pts in curves.items():
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.loglog([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, label=label)
        ax.set_title(dev)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylabel("chip-hours / M output tokens")
    for ax in axes[-1]:
        ax.set_xlabel("context (tokens)")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Decode cost, 144-device EP instance, batch <= 256/device at >= 20 tok/s (roofline)")
    fig.tight_layout()
    with atomic_path(img / "whatif_v4_cost.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _ctx(L: int) -> str:
    return f"{L // 1048576}M" if L % 1048576 == 0 else f"{L // 1024}K"


def _f(v, d=3):
    return "--" if v is None else f"{v:,.{d}f}"


def write_page(out_dir: Path, fast: bool = False) -> dict:
    img = out_dir / "img"
    img.mkdir(parents=True, exist_ok=True)
    plot_ctx = CONTEXTS if fast else PLOT_CONTEXTS
    price = prices()
    res = {"kv": {}, "cost": {}, "flops": {}}
    for label, model in MODELS:
        res["kv"][label] = {"per_token": kv_per_token(model),
                            **{L: kv_per_sequence(model, L) for L in CONTEXTS}}
        res["flops"][label] = {L: single_token_flops(model, L) for L in CONTEXTS}
    for dev, system in DEVICES:
        for label, model in MODELS:
            res["cost"][(dev, label)] = {L: decode_at(model, system, L) for L in plot_ctx}
            res.setdefault("cost_no_comm", {})[(dev, label)] = {L: decode_at(model, system, L, False) for L in CONTEXTS}
    kv_curves = {label: [(L, kv_per_sequence(model, L)) for L in PLOT_CONTEXTS] for label, model in MODELS}
    cost_curves = {dev: {label: [(L, None if (c := res["cost"][(dev, label)][L])["chip_s_per_token"] is None
                                  else c["chip_s_per_token"] * 1e6 / 3600) for L in plot_ctx]
                         for label, _ in MODELS} for dev, _ in DEVICES}
    _plots(kv_curves, cost_curves, img)

    L1 = 1048576
    L = ["# What if: V3 vs V3.2 vs V4-Flash vs V4-Pro -- KV cache and decode cost by context\n",
         "Generated by `python -m dsref.experiments.whatif_v4` (also `dsref validate --whatif`); every number "
         "below is computed by that script from the op lists (`sim/costmodel.py` for V3 and V3.2, "
         "`sim/costmodel_v4.py` for V4) and the roofline with catalog peaks. Nothing is fitted to DeepSeek's "
         "published V4 ratios: they are quoted next to ours at the end.\n",
         "## KV cache\n",
         "bf16 elements (the size `dsref info` reports). V3: MLA latent (512 + 64) per token and layer; V3.2 adds "
         "the indexer's 128-wide key; V4: per CSA layer one (512 + 128)-wide entry per 4 tokens, per HCA layer one "
         "512-wide entry per 128 tokens, plus a fixed 128-token window of 512-wide entries in every layer.\n",
         "| model | bytes/token (beyond the windows) | per sequence at 8K | at 128K | at 1M |",
         "|---|---:|---:|---:|---:|"]
    for label, _ in MODELS:
        k = res["kv"][label]
        L.append(f"| {label} | {k['per_token']:,.0f} | {k[8192] / 1e9:.3f} GB | {k[131072] / 1e9:.2f} GB | "
                 f"{k[L1] / 1e9:.2f} GB |")
    L.append("\nV3 and V3.2 support 160K tokens (max_position_embeddings 163,840); their 1M column is the formula "
             "extrapolated, for the comparison with DeepSeek's figure only.\n")
    L.append("![KV cache per sequence](img/whatif_v4_kv.png)\n")
    L.append("## Decode cost per million output tokens\n")
    L.append(f"One decode instance per device type: {DECODE_DEVICES} devices (day-6's 18 nodes x 8), data-parallel "
             f"attention, routed experts over all {DECODE_DEVICES} (EP), EP dispatch/combine overlapped with compute; "
             f"batch per device = the largest <= {MAX_BATCH_PER_DEVICE} whose cache fits next to the weights and "
             f"that keeps >= {SLO_TOKENS_PER_S:g} tokens/s per request. FP8 GEMMs (V4: its release's FP8 + FP4 "
             "experts; Ascend 910C has no FP8 units and runs them at its bf16 rate), bf16 cache, no MTP. "
             "Cells: chip-hours per million output tokens (batch per device); `--` = beyond the model's context "
             "or the cache does not fit. The 'no comm.' columns are the same instance with the EP communication left "
             "out: what the attention design and the weights alone cost.\n")
    for dev, _ in DEVICES:
        p, _src = price[dev]
        L.append(f"\n**{dev}** (price: {'$%.2f/h' % p if p else 'none in the catalog'})\n")
        L.append("| model | 8K | 128K | 1M |" + (" $/M tokens 8K | 128K | 1M |" if p else "")
                 + " no comm. 8K | 128K | 1M |")
        L.append("|---|---:|---:|---:|" + ("---:|---:|---:|" if p else "") + "---:|---:|---:|")
        for label, _ in MODELS:
            row = res["cost"][(dev, label)]
            cells, usd = [], []
            for Lc in CONTEXTS:
                c = row[Lc]
                h = None if c["chip_s_per_token"] is None else c["chip_s_per_token"] * 1e6 / 3600
                cells.append("--" if h is None else f"{h:.3f} ({c['batch_per_device']})")
                usd.append("--" if h is None or not p else f"{h * p:.3f}")
            nc = []
            for Lc in CONTEXTS:
                c = res["cost_no_comm"][(dev, label)][Lc]
                nc.append("--" if c["chip_s_per_token"] is None else
                          f"{c['chip_s_per_token'] * 1e6 / 3600:.3f} ({c['batch_per_device']})")
            L.append(f"| {label} | " + " | ".join(cells) + " |" + ((" " + " | ".join(usd) + " |") if p else "")
                     + " " + " | ".join(nc) + " |")
    cb = [f"{label} on {dev} at {_ctx(Lc)}" for dev, _ in DEVICES for label, _ in MODELS for Lc in CONTEXTS
          if res["cost"][(dev, label)][Lc].get("comm_bound")]
    L.append("\nWhere the EP dispatch/combine (sim/comm.py over the node's fabric and NICs) takes longer than the "
             "compute and memory traffic of the step, communication sets the step time and, through the 20 tokens/s "
             "SLO, the batch: " + (", ".join(cb) if cb else "nowhere") + ". V4 has no node-limited routing (no "
             "expert groups), so each token's k experts may sit on k different nodes; V3 / V3.2 send to at most "
             "4 nodes. These cells depend on the communication model more than on the attention design.\n")
    L.append("\n![decode cost](img/whatif_v4_cost.png)\n")
    L.append("Per-token decode cost at 128K relative to V3.2 (with communication / without):\n")
    for dev, _ in DEVICES:
        parts = []
        for label in ("V4-Flash", "V4-Pro"):
            r = [res[key][(dev, label)][131072]["chip_s_per_token"] / res[key][(dev, "V3.2")][131072]["chip_s_per_token"]
                 for key in ("cost", "cost_no_comm")]
            res.setdefault("rel_128k", {})[(dev, label)] = r
            parts.append(f"{label} {r[0]:.0%} / {r[1]:.0%}")
        L.append(f"- {dev}: " + ", ".join(parts))
    L.append("")
    L.append("Prices: " + "; ".join(f"{d}: " + (f"${p:.2f}/h, {s}" if p else s) for d, (p, s) in price.items())
             + ". Where there is none, USD = chip-hours x the price you pay.\n")
    L.append("## Against DeepSeek's published V4 efficiency\n")
    L.append(f"Published ({PUBLISHED}).\n")
    L.append("| at 1M context | ours: single-token matmul FLOPs vs V3.2 | published | ours: KV cache vs V3.2 | published |")
    L.append("|---|---:|---:|---:|---:|")
    for label in ("V4-Pro", "V4-Flash"):
        fr = res["flops"][label][L1] / res["flops"]["V3.2"][L1]
        kr = res["kv"][label][L1] / res["kv"]["V3.2"][L1]
        pf, pk = PUB_RATIOS[label]
        res.setdefault("ratios", {})[label] = {"flops": fr, "kv": kr}
        L.append(f"| {label} | {fr:.0%} | {pf:.0%} | {kr:.0%} | {pk:.0%} |")
    L.append("\nOurs count every matmul of one decode token at 1M context (indexer, compressors, hyper-connection "
             "mixing and LM head included) from the configs; the KV ratio uses bf16 for every cached element of both "
             "models. DeepSeek does not say which precision or which ops its ratios count (its code keeps "
             "parts of the cache in FP8 / FP4), so agreement within a few points is what to expect, not equality.\n")
    L.append("## Uncertain\n")
    L += ["- **Cache precision.** All four caches are costed in bf16 (what `dsref info` reports). DeepSeek's "
          "inference code stores the V3.2 indexer keys in FP8 and rounds V4's indexer q/keys to FP4; an FP8 cache "
          "would roughly halve every KV figure and move the batch limits.",
          "- **FP4 experts' compute rate.** V4's FP4 expert GEMMs are costed at the FP8 rate (FP8 activations x "
          "FP4 weights); decode here is bound by memory traffic or communication, so this matters little. The indexer's score product is "
          "costed at the fp4 rate (H800, H20 and 910C fall back to their next wider format).",
          "- **Hyper-connections.** The n=4 residual streams are moved at the activation size (bf16) three reads "
          "and one write per sub-layer; the mixing matmul and Sinkhorn (20 iterations) are costed in FP32. Fused "
          "kernels could move less.",
          "- **CSA at prefill** reads every compressed entry (the union of many queries' top-k); at decode only "
          "the top-k. The compressors' pending state (projections of an unfinished block: up to 2 x 4 tokens in a "
          "CSA layer, 127 in an HCA layer, per sequence) is neither counted in memory nor read back when a block "
          "closes.",
          "- **Instance shape.** The same 144-device EP instance for every model and device is a convention, not "
          "DeepSeek's V4 deployment (unpublished); redundant experts, MTP and prefill are left out, and "
          "communication is assumed fully overlapped (max of compute and communication).",
          "- **Hash-routed layers** are costed with uniform expert load, like the learned ones.",
          "- **Published ratios** are quoted from secondary coverage of DeepSeek's model card / technical report; "
          "the primary text was not available here, and those quotes do not say what its FLOPs count.",
          "- **V3 / V3.2 at 1M** exceed their 160K context: shown for the KV/FLOPs comparison only; no decode cost.",
          ]
    atomic_write_text(out_dir / "whatif-v4-generations.md", "\n".join(L) + "\n")
    return res


def main(out_dir: str = "docs", fast: bool = False) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = write_page(out, fast)
    print(f"wrote {out / 'whatif-v4-generations.md'}", file=sys.stderr)
    return res


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out-dir", default="docs")
    ap.add_argument("--fast", action="store_true", help="only the 8K / 128K / 1M contexts (tests)")
    a = ap.parse_args()
    main(a.out_dir, a.fast)
