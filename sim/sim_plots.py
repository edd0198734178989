"""PNG plots of simulator results (matplotlib, Agg backend; imported lazily by the CLIs)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsref.reference.atomic import atomic_path  # noqa: E402

MS_PER_S = 1e3
DPI = 120


def plot_sweep(results: list[dict], path) -> None:
    """Output tokens/s per device against TPOT (p50 and p99) over a load sweep."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pts = [r for r in results if r["tpot_p50_s"] is not None]
    x50 = [r["tpot_p50_s"] * MS_PER_S for r in pts]
    x99 = [r["tpot_p99_s"] * MS_PER_S for r in pts]
    y = [r["output_tokens_per_s_per_device"] for r in pts]
    ax.plot(x50, y, "o-", label="TPOT p50")
    ax.plot(x99, y, "s--", alpha=0.7, label="TPOT p99")
    for r, xx, yy in zip(pts, x50, y):
        ax.annotate(f"{r['rate_factor']:g}x", (xx, yy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("time per output token (ms)")
    ax.set_ylabel("output tokens/s per device")
    name = results[0]["scenario"] if results else ""
    ax.set_title(f"{name}: throughput vs latency over a load sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a killed run leaves the old plot, not half a PNG
        fig.savefig(tmp, dpi=DPI)
    plt.close(fig)


def plot_serve_timeline(sim, result: dict, path) -> None:
    """Queue lengths over time and the step durations of each instance role."""
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    q = result["queue_samples"]
    if q:
        t = [r[0] for r in q]
        ax1.plot(t, [r[1] for r in q], label="prefill queue")
        ax1.plot(t, [r[2] for r in q], label="decode waiting / in transfer")
        ax1.plot(t, [r[3] for r in q], label="running (decoding)")
    ax1.set_ylabel("requests")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    by_role: dict = {}
    for role, _inst, _name, start, dur, _args in sim.rec.spans:
        by_role.setdefault(role, ([], []))
        by_role[role][0].append(start)
        by_role[role][1].append(dur * MS_PER_S)
    for role, (s, d) in by_role.items():
        ax2.plot(s, d, ".", ms=2, label=f"{role} step")
    ax2.set_ylabel("step time (ms)")
    ax2.set_xlabel("simulated time (s)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{result['scenario']}: timeline")
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a killed run leaves the old plot, not half a PNG
        fig.savefig(tmp, dpi=DPI)
    plt.close(fig)


_COLORS = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green", "d": "tab:gray", "o": "tab:red"}


def plot_train_timeline(tsim, path) -> None:
    """Gantt chart of the pipeline schedule: one row per rank."""
    fig, ax = plt.subplots(figsize=(10, 0.35 * tsim.par.pp + 1.5))
    for rank, name, start, dur, _stream in tsim.spans:
        color = _COLORS.get(name[0], "tab:purple")
        if "+" in name:
            color = "tab:purple"
        ax.broken_barh([(start, dur)], (rank - 0.4, 0.8), facecolors=color, edgecolor="none")
    ax.set_yticks(range(tsim.par.pp))
    ax.set_yticklabels([f"rank {r}" for r in range(tsim.par.pp)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time in the step (s)")
    ax.set_title(f"{tsim.sc.name}: {tsim.sc.schedule} (blue F, orange B, green W, purple F&B, "
                 f"grey/red DP sync/optimizer)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a killed run leaves the old plot, not half a PNG
        fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
