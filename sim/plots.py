"""Roofline plot of DeepSeek-V3's operations on three machines.

    python -m dsref.sim.plots [OUT.png]   (default: roofline_v3.png in the current directory;
                                           the repo's figure: docs/img/roofline_v3.png)

One panel per device (H800, Ascend 910C, Raspberry Pi 5). Roofs: achievable
peak (catalog peak x catalog gemm efficiency) per precision and achievable
memory bandwidth (x memory efficiency). Points: DeepSeek-V3 operations grouped
by name over all layers, at their arithmetic intensity and the FLOP/s the
roofline model gives them, for a batch-1 decode step and a batch-128 decode
step at 4096 tokens of context (absorbed MLA) and a 4096-token prefill (naive
MLA). Precision plan per device: fp8 on H800 (DeepSeek's own), bf16 on Ascend
910C (no FP8 units in the catalog), q4_k_m on the Raspberry Pi (llama.cpp).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from dsref.reference.atomic import atomic_path
from dsref.reference.presets import get_preset
from dsref.sim import costmodel, roofline

#: Default output, relative to the current directory (never a path into the installed package).
DEFAULT_OUT = "roofline_v3.png"
DEVICES = (("h800", "fp8"), ("ascend-910c", "bf16"), ("raspberry-pi-5", "q4_k_m"))
CONTEXT = 4096
PREFILL_TOKENS = 4096
DECODE_BATCHES = (1, 128)
_SCENARIO_STYLE = {"decode B=1": ("o", "tab:blue"), "decode B=128": ("s", "tab:green"),
                   "prefill T=4096": ("^", "tab:red")}


def _rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:,.0f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:,.0f} GFLOP/s"


def _grouped(ops):
    """Sum FLOPs and bytes of same-named ops across layers."""
    g = defaultdict(lambda: [0.0, 0.0, None])
    for op in ops:
        e = g[op.name]
        e[0] += op.flops * op.count
        e[1] += op.bytes * op.count
        e[2] = op
    return g


def scenario_points(cfg, device, quant: str) -> dict[str, list[tuple[str, float, float]]]:
    """{scenario: [(op name, intensity FLOP/B, achieved FLOP/s)]} from the roofline model."""
    scen = {f"decode B={b}": costmodel.decode_ops(cfg, quant, b, CONTEXT) for b in DECODE_BATCHES}
    scen[f"prefill T={PREFILL_TOKENS}"] = costmodel.prefill_ops(cfg, quant, 1, PREFILL_TOKENS)
    effs = roofline.device_efficiencies(device)
    out = {}
    for name, ops in scen.items():
        pts = []
        for op_name, (fl, by, op) in _grouped(ops).items():
            if fl <= 0 or by <= 0:
                continue
            t = sum(roofline.op_time(o, device, effs=effs).time_s for o in ops if o.name == op_name)
            pts.append((op_name, fl / by, fl / t))
        out[name] = pts
    return out


def write_roofline_v3(path: str | Path = DEFAULT_OUT) -> Path:
    """Write the figure to ``path`` (relative paths: from the current directory); returns it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dsref.hwmodels.catalog import load_device
    cfg = get_preset("deepseek-v3")
    fig, axes = plt.subplots(1, len(DEVICES), figsize=(6 * len(DEVICES), 5.2))
    for ax, (dev_id, quant) in zip(axes, DEVICES):
        dev = load_device(dev_id)
        effs = roofline.device_efficiencies(dev)
        bw = dev.require("memory_bandwidth") * effs["memory"]
        x = np.logspace(-1, 4.5, 200)
        for prec, ls in (("fp8", "-"), ("bf16", "--"), ("int8", "-."), ("fp32", ":")):
            if prec not in dev.peak_flops:
                continue
            peak = dev.peak_flops[prec] * effs["gemm"]  # roof = achievable peak (the label shows it)
            ridge = roofline.ridge_point(dev, prec)  # where the two roofs meet: peak / bandwidth
            ax.loglog(x, np.minimum(peak, bw * x), ls, color="black", lw=1,
                      label=f"{prec}: {_rate(peak)}, {bw / 1e9:,.1f} GB/s (peak x eff.), ridge {ridge:,.0f} FLOP/B")
        for scen, pts in scenario_points(cfg, dev, quant).items():
            marker, color = _SCENARIO_STYLE[scen]
            xs = [p[1] for p in pts]
            ys = [p[2] for p in pts]
            ax.scatter(xs, ys, marker=marker, color=color, s=22, alpha=0.8, label=scen)
            for n, xi, yi in pts:
                if n in ("routed_experts", "mla_attention", "attention", "kv_b_expand", "lm_head"):
                    ax.annotate(n, (xi, yi), fontsize=6, alpha=0.7, xytext=(3, -8), textcoords="offset points")
        ax.set_title(f"DeepSeek-V3 on {dev.name} ({quant})", fontsize=9)
        ax.set_xlabel("arithmetic intensity (FLOP/byte)")
        ax.set_ylabel("attained FLOP/s (roofline model)")
        ax.grid(True, which="both", alpha=0.2)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"DeepSeek-V3 operations (grouped over layers): decode at context {CONTEXT}, "
                 f"prefill of {PREFILL_TOKENS} tokens; efficiencies from hwmodels/data/efficiency.toml",
                 fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # a killed run leaves the old plot, not half a PNG
        fig.savefig(tmp, dpi=130)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(write_roofline_v3(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT))
