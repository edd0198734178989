"""The result dict of a serving run (ServeSim.metrics): throughput per device and node, TTFT/TPOT
percentiles, queues, cost and energy, plus the steady-state report (sim.serve_report).

Split out of sim/serve.py to keep that file under 1,000 lines; ``sim`` is the finished ServeSim.
"""

from __future__ import annotations

import numpy as np

from dsref.sim.stepcost import uniform

SECONDS_PER_HOUR = 3600.0
TOKENS_PER_MILLION = 1e6


def run_metrics(sim) -> dict:
    """The result dict of a finished ServeSim run (ServeSim.metrics)."""
    sc, sh, wl = sim.sc, sim.sh, sim.wl
    D = sim.duration
    node_devs = sim.node.devices_per_node * sc.device_split
    roles = {}
    for inst in sim.instances:
        r = roles.setdefault(inst.role, {"instances": 0, "devices": 0, "busy_s": 0.0, "compute_s": 0.0,
                                         "steps": 0})
        r["instances"] += 1
        r["devices"] += inst.par.devices
        r["busy_s"] += inst.busy_s
        r["compute_s"] += inst.compute_s
        r["steps"] += inst.steps
    for name, r in roles.items():
        r["nodes"] = r["devices"] / node_devs
        r["utilization"] = r["busy_s"] / (r["instances"] * D)
        r["compute_fraction_of_busy"] = r["compute_s"] / r["busy_s"] if r["busy_s"] else 0.0
        r["kv_tokens_per_instance"] = sim.capacity[name]["kv_tokens_per_instance"]
        r["weight_bytes_per_device"] = sim.capacity[name]["weight_bytes_per_device"]
    devices = sum(r["devices"] for r in roles.values())
    nodes = devices / node_devs
    in_nodes = roles.get("prefill", roles.get("aggregated"))["nodes"]
    out_nodes = roles.get("decode", roles.get("aggregated"))["nodes"]
    in_rate = sh.tokens_in / D
    out_rate = sh.tokens_out / D
    started = ~np.isnan(sh.first)
    ttft = (sh.first - wl.t)[started]
    fin = ~np.isnan(sh.done) & (wl.output > 1)
    tpot = ((sh.done - sh.first) / np.maximum(wl.output - 1, 1))[fin]

    def pct(a):  # p50, p90, p99 from one partition (the same floats as one call per quantile)
        return [float(v) for v in np.percentile(a, [50, 90, 99])] if len(a) else [None] * 3
    tt, tp = pct(ttft), pct(tpot)
    price = sim.device.price_usd_per_hour
    power = sim.device.power_w
    dev_hours = devices * D / SECONDS_PER_HOUR
    out_tokens = sh.tokens_out
    cost = price * dev_hours if price is not None else None
    q = np.array(sim.samples) if sim.samples else np.zeros((0, 4))
    res = {
        "scenario": sc.name, "mode": sc.mode, "model": sim.cfg.name, "device": sim.device.id,
        "seed": sim.seed, "duration_s": D, "requests_arrived": int(wl.n),
        "requests_started": int(started.sum()), "requests_finished": int((~np.isnan(sh.done)).sum()),
        "devices": devices, "nodes": nodes,
        "input_tokens_per_s": in_rate, "output_tokens_per_s": out_rate,
        "input_tokens_per_s_per_device": in_rate / devices, "output_tokens_per_s_per_device": out_rate / devices,
        "input_tokens_per_s_per_node": in_rate / in_nodes, "output_tokens_per_s_per_node": out_rate / out_nodes,
        "input_tokens_per_s_per_node_all": in_rate / nodes, "output_tokens_per_s_per_node_all": out_rate / nodes,
        "device_split": sc.device_split,
        "input_tokens_per_s_per_package": in_rate / devices * sc.device_split,
        "output_tokens_per_s_per_package": out_rate / devices * sc.device_split,
        "offered_input_tokens_per_s": float(wl.prompt.sum()) / D,
        "offered_output_tokens_per_s": float(wl.output.sum()) / D,
        "ttft_mean_s": float(ttft.mean()) if len(ttft) else None,
        "ttft_p50_s": tt[0], "ttft_p90_s": tt[1], "ttft_p99_s": tt[2],
        "tpot_mean_s": float(tpot.mean()) if len(tpot) else None,
        "tpot_p50_s": tp[0], "tpot_p90_s": tp[1], "tpot_p99_s": tp[2],
        "preemptions": sh.preemptions, "kv_blocked_steps": sh.kv_blocked_steps,
        "rejected": sh.rejected,
        "queue_prefill_mean": float(q[:, 1].mean()) if len(q) else 0.0,
        "queue_prefill_max": int(q[:, 1].max()) if len(q) else 0,
        "queue_decode_waiting_mean": float(q[:, 2].mean()) if len(q) else 0.0,
        "running_mean": float(q[:, 3].mean()) if len(q) else 0.0,
        "queue_samples": [list(map(float, r)) for r in q[:: max(1, len(q) // 200)]],
        "roles": roles,
        "device_hours": dev_hours,
        "cost_usd": cost,
        "cost_usd_per_day": price * devices * 24 if price is not None else None,
        "cost_usd_per_million_output_tokens": (cost / (out_tokens / TOKENS_PER_MILLION)
                                               if cost is not None and out_tokens else None),
        "price_source": f"hwmodels catalog: {sim.device.id} price_usd_per_hour = {price}",
        "energy_j_per_output_token": (power * devices * D / out_tokens if power and out_tokens else None),
        "energy_note": "device board power x devices x wall time / output tokens (all devices at TDP)",
    }
    if len(wl.t):
        from dsref.sim.serve_report import steady_metrics
        res.update(steady_metrics(wl.t, wl.prompt, wl.output, sh.first, sh.done, D,
                                  roles=_role_breakdown(sim, roles, q)))
    return res

def _role_breakdown(sim, roles: dict, q: np.ndarray) -> dict:
    """Per role, its instance time split into compute / memory / network / floor / idle seconds
    (sim.serve_report.binding_resource's input): the busy time is split as one representative
    step splits (StepCost.breakdown at the role's mean batch; with two-micro-batch overlap only
    the exposed part of the communication counts as network)."""
    sc, sh, wl, D = sim.sc, sim.sh, sim.wl, sim.duration
    mean_prompt = float(wl.prompt.mean()) if len(wl.prompt) else 1.0
    mean_out = float(wl.output.mean()) if len(wl.output) else 1.0
    running = float(q[:, 3].mean()) if len(q) else 0.0
    out = {}
    for name, r in roles.items():
        inst = [i for i in sim.instances if i.role == name]
        par, cfg = inst[0].par, sc.instance(name)
        total = r["instances"] * D
        steps = sum(i.steps for i in inst)
        if name == "prefill":
            feats = uniform(1, max(1.0, cfg.token_budget_per_device), 0.0, sim.topk)
            cost = sim.cost[name]["prefill"]
            util = r["busy_s"] / total if total else 0.0
        else:
            per = max(1.0, running / max(r["instances"] * par.dp, 1))
            cost = sim.cost[name]["decode"]
            feats = uniform(per, 1.0 + inst[0].mtp_depth, mean_prompt + mean_out / 2, sim.topk)
            cap = cfg.max_batch_per_device * par.dp * r["instances"]
            util = min(1.0, running / cap) if cap else 0.0
        parts = cost.breakdown(feats, two_microbatch=cfg.two_microbatch_overlap)
        busy_parts = {k: float(parts.get(k, 0.0)) for k in ("compute_s", "memory_s", "floor_s", "comm_s", "host_s")}
        step = sum(busy_parts.values()) or 1.0
        frac = r["busy_s"] / step
        kv_cap = sim.capacity[name]["kv_tokens_per_instance"] * r["instances"]
        kv_used = running * (mean_prompt + mean_out / 2) if name != "prefill" else 0.0
        out[name] = {"compute_s": busy_parts["compute_s"] * frac, "memory_s": busy_parts["memory_s"] * frac,
                     "comm_s": busy_parts["comm_s"] * frac,
                     "floor_s": (busy_parts["floor_s"] + busy_parts["host_s"]) * frac,
                     "idle_s": max(0.0, total - r["busy_s"]),
                     "kv_blocked_steps": sh.kv_blocked_steps if name != "prefill" else 0, "steps": steps,
                     "kv_utilization": min(1.0, kv_used / kv_cap) if kv_cap else 0.0,
                     "utilization": util}
    return out
