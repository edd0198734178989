"""Benchmark of the serving simulator: wall time and simulated events/s at 1x, 4x, 16x DeepSeek's
day-6 deployment (instances and request rate multiplied), plus the training-step simulator.

    python benchmarks/bench_sim.py [--duration 60] [--scales 1 4 16] [--hour] [--repeat 3] [--json]

--hour additionally simulates one full hour of the 1x deployment (target: <= 10 s of CPU on one core).
--repeat N runs each configuration N times and reports the median run CPU (and the range): on a
shared machine one run's CPU time moves by +-20%.
Prints a Markdown table (the "Simulator" section of docs/performance.md is made from it).
One process, one core; the load average at start and end is printed because other work on the
machine inflates the wall times (and, through shared caches and cores, the CPU times).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from dsref.sim import serve, train
from dsref.sim.scenario import load


def bench_serve(scale: int, duration: float, seed: int = 0) -> dict:
    t0 = time.perf_counter()  # setup: reading and resolving the scenario (load does it) and the simulator
    sc = load("deepseek-day6")
    if scale != 1:
        sc = serve.scaled(sc, scale)
    sim = serve.ServeSim(sc, duration_s=duration, seed=seed)
    setup = time.perf_counter() - t0
    r = sim.run()
    return {"scale": scale, "simulated_s": duration, "nodes": r["nodes"], "requests": r["requests_arrived"],
            "events": r["events"], "setup_s": setup, "run_wall_s": r["sim_wall_s"],
            "total_wall_s": setup + r["sim_wall_s"], "run_cpu_s": r["sim_cpu_s"],
            "events_per_s": r["events"] / r["sim_wall_s"], "events_per_cpu_s": r["events"] / r["sim_cpu_s"],
            "simulated_s_per_wall_s": duration / r["sim_wall_s"],
            "output_tokens_per_s_per_node": r["output_tokens_per_s_per_node"],
            "input_tokens_per_s_per_node": r["input_tokens_per_s_per_node"]}


def bench_serve_repeated(scale: int, duration: float, repeat: int) -> dict:
    """bench_serve ``repeat`` times (same seed: the same simulation); the median run's figures,
    with every run's CPU seconds in ``run_cpu_s_all``."""
    rows = [bench_serve(scale, duration) for _ in range(max(1, repeat))]
    cpu = [r["run_cpu_s"] for r in rows]
    med = sorted(rows, key=lambda r: r["run_cpu_s"])[(len(rows) - 1) // 2]
    return {**med, "run_cpu_s": statistics.median(cpu), "run_cpu_s_all": cpu}


def bench_train() -> dict:
    t0 = time.perf_counter()
    r = train.simulate(load("deepseek-v3-pretrain"))
    return {"scenario": "deepseek-v3-pretrain", "events": r["events"], "wall_s": time.perf_counter() - t0,
            "run_wall_s": r["sim_wall_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="simulated seconds per scaled run")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--hour", action="store_true", help="also simulate one hour of the 1x deployment")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the median CPU is reported")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat: must be >= 1, got {args.repeat}")

    def loadavg():
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    load0 = loadavg()
    runs = [(s, args.duration) for s in args.scales] + ([(1, 3600.0)] if args.hour else [])
    if args.json:
        rows = [bench_serve_repeated(s, d, args.repeat) for s, d in runs]
        print(json.dumps({"serve": rows, "train": bench_train(), "loadavg_1min": load0,
                          "loadavg_1min_end": loadavg()}, indent=1))
        return 0
    print(f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"1-min load average at start {load0:.2f} on {os.cpu_count()} cores\n")
    print("| deployment | nodes | simulated | requests | events | setup (s) | run wall (s) | run CPU (s) | "
          "events per CPU-s | simulated s per wall s |" + (" CPU of each run (s) |" if args.repeat > 1 else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if args.repeat > 1 else ""), flush=True)
    for s, d in runs:
        r = bench_serve_repeated(s, d, args.repeat)
        each = f" {', '.join(f'{c:.1f}' for c in r['run_cpu_s_all'])} |" if args.repeat > 1 else ""
        print(f"| {r['scale']}x day-6 | {r['nodes']:.0f} | {r['simulated_s']:.0f} s | {r['requests']:,} | "
              f"{r['events']:,} | {r['setup_s']:.1f} | {r['run_wall_s']:.1f} | {r['run_cpu_s']:.1f} | "
              f"{r['events'] / r['run_cpu_s']:,.0f} | {r['simulated_s_per_wall_s']:.1f} |{each}", flush=True)
    print(f"\n1-min load average at end {loadavg():.2f}")
    tr = bench_train()
    print(f"\nTraining step (deepseek-v3-pretrain, 2,048 GPUs, 120 micro-batches, DualPipe): "
          f"{tr['events']:,} events, {tr['wall_s']:.2f} s including the cost-table fit "
          f"({tr['run_wall_s']:.3f} s of simulation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
