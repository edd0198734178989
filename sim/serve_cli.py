"""`dsref sim serve`: the serving simulator on the command line (added to `dsref sim` by sim/cli.py)."""

from __future__ import annotations

import json
import math
import sys

from dsref.sim.scenario import MAX_DURATION_S

# Most requests one run may draw (rate x duration): the workload arrays and the per-request
# bookkeeping grow with them (deepseek-day6 for an hour: 5.8M requests, ~80 s, a few hundred MB).
MAX_REQUESTS = 50_000_000
MAX_SCALE = 1024  # --scale: instances and rate x 1024 is beyond any deployed system
# Steady-state check: a run whose admitted requests are still more than this share unfinished
# at the end reports warm-up (or overload) figures.
UNFINISHED_WARN = 0.10


def steady_state_warnings(r: dict) -> list[str]:
    """Warnings about a run too short (or too loaded) to reach steady state; no number changes."""
    admitted = r["requests_arrived"] - r.get("rejected", 0)
    if admitted <= 0:
        return []
    unfinished = (admitted - r["requests_finished"]) / admitted
    # the steady-state window's verdict (sim/serve_report.py) comes after the unfinished-share check
    out = [f"not steady: {r['steady_state_note']}"] if r.get("steady_state_reached") is False else []
    if unfinished <= UNFINISHED_WARN:
        return out
    d = r["duration_s"]
    want = d * unfinished / (UNFINISHED_WARN / 2)  # unfinished share ~ request time / duration
    mag = 10.0 ** math.floor(math.log10(want))
    longer = min(MAX_DURATION_S, next(m * mag for m in (1, 2, 5, 10) if m * mag >= want))
    hint = (f"try --duration {longer:g} (the figures average over the warm-up: the run is too short for "
            "steady state), or lower the load if it exceeds capacity" if longer > d else
            "the load exceeds capacity (queues still growing) or requests take longer than the run")
    return [f"{unfinished:.0%} of the {admitted:,} admitted requests were unfinished when the {d:g} s run "
            f"ended: {hint}"] + out


def _fmt(x, unit="", scale=1.0, digits=1):
    return "n/a" if x is None else f"{x * scale:,.{digits}f}{unit}"


def _print_serve(r: dict) -> None:
    print(f"{r['scenario']}: {r['model']} on {r['devices']} x {r['device']} ({r['nodes']:g} nodes, {r['mode']}), "
          f"{r['duration_s']:g} s simulated, seed {r['seed']}")
    for role, d in r["roles"].items():
        print(f"  {role:10s} {d['instances']} instance(s), {d['devices']} devices, utilization "
              f"{d['utilization']:.1%}, {d['steps']:,} steps, KV cache {d['kv_tokens_per_instance']:,.0f} tokens/instance")
    print(f"  requests   {r['requests_arrived']:,} arrived, {r['requests_started']:,} got a first token, "
          f"{r['requests_finished']:,} finished; preemptions {r['preemptions']}, KV-blocked steps "
          f"{r['kv_blocked_steps']}, rejected {r['rejected']}")
    print(f"  input      {_fmt(r['input_tokens_per_s'], ' tok/s', digits=0)}  = "
          f"{_fmt(r['input_tokens_per_s_per_node'], ' tok/s per prefill node', digits=0)}")
    print(f"  output     {_fmt(r['output_tokens_per_s'], ' tok/s', digits=0)}  = "
          f"{_fmt(r['output_tokens_per_s_per_node'], ' tok/s per decode node', digits=0)}")
    print(f"  TTFT       p50 {_fmt(r['ttft_p50_s'], ' ms', 1e3)}  p90 {_fmt(r['ttft_p90_s'], ' ms', 1e3)}  "
          f"p99 {_fmt(r['ttft_p99_s'], ' ms', 1e3)}")
    print(f"  TPOT       p50 {_fmt(r['tpot_p50_s'], ' ms', 1e3, 2)}  p90 {_fmt(r['tpot_p90_s'], ' ms', 1e3, 2)}  "
          f"p99 {_fmt(r['tpot_p99_s'], ' ms', 1e3, 2)}")
    print(f"  queues     prefill mean {r['queue_prefill_mean']:.1f} (max {r['queue_prefill_max']}), decode waiting "
          f"mean {r['queue_decode_waiting_mean']:.1f}, running mean {r['running_mean']:.0f}")
    print(f"  cost       ${_fmt(r['cost_usd_per_million_output_tokens'], '', digits=3)} per million output tokens, "
          f"${_fmt(r['cost_usd_per_day'], '', digits=0)} per day; energy "
          f"{_fmt(r['energy_j_per_output_token'], ' J', digits=2)} per output token")
    if "steady_state_reached" in r:
        from dsref.sim.serve_report import format_report
        for line in format_report(r):
            print(line)
    print(f"  simulator  {r['events']:,} events in {r['sim_wall_s']:.2f} s")


def cmd_serve(args) -> int:
    from dsref.sim import scenario as scn
    from dsref.sim import serve
    if args.list:
        for name in scn.builtin_names():
            raw, _, _ = scn.load_raw(name)
            print(f"{name:24s} [{raw.get('kind', 'serve')}] {raw.get('description', '')}")
        return 0
    if not args.scenario:
        raise scn.ScenarioError("<command line>: field 'scenario': give --scenario NAME|FILE (see --list)")
    from dsref.sim.cli import check_out_path
    check_out_path("--trace", args.trace)
    check_out_path("--plot", args.plot)
    over: dict = {}
    if args.rate is not None:
        over["workload"] = {"rate_per_s": args.rate}
    if args.model is not None:
        over["model"] = args.model
    sc = scn.load(args.scenario, over or None)
    if sc.kind != "serve":
        raise scn.ScenarioError(f"{sc.source}: field 'kind': '{sc.kind}' scenario; use `dsref sim {sc.kind}`")
    if args.scale != 1:
        sc = serve.scaled(sc, args.scale)
    _check_requests(args, sc)
    progress = not args.json
    if args.sweep:
        res = serve.sweep(sc, duration_s=args.duration, seed=args.seed, progress=progress)
        if args.plot:
            from dsref.sim.sim_plots import plot_sweep
            plot_sweep(res, args.plot)
        for r in res:
            r["warnings"] = steady_state_warnings(r)
            for w in r["warnings"]:
                print(f"dsref: warning: rate x {r['rate_factor']:g}: {w}", file=sys.stderr)
        if args.json:
            print(json.dumps([{k: v for k, v in r.items() if k != "queue_samples"} for r in res], default=float))
        else:
            print(f"{'rate x':>7s} {'req/s':>9s} {'out tok/s/dev':>14s} {'TPOT p50 ms':>12s} {'TPOT p99 ms':>12s} "
                  f"{'TTFT p50 ms':>12s}")
            for r in res:
                print(f"{r['rate_factor']:7.2f} {r['rate_per_s']:9.1f} {r['output_tokens_per_s_per_device']:14.1f} "
                      f"{_fmt(r['tpot_p50_s'], '', 1e3, 2):>12s} {_fmt(r['tpot_p99_s'], '', 1e3, 2):>12s} "
                      f"{_fmt(r['ttft_p50_s'], '', 1e3, 1):>12s}")
        return 0
    sim = serve.ServeSim(sc, duration_s=args.duration, seed=args.seed, record=bool(args.trace or args.plot),
                         progress=progress)
    r = sim.run()
    r["warnings"] = steady_state_warnings(r)
    for w in r["warnings"]:
        print(f"dsref: warning: {w}", file=sys.stderr)
    from dsref.sim import trace
    from dsref.sim.cli import emit_outputs
    return emit_outputs(args, r, _print_serve, lambda path: trace.write(path, trace.serve_trace(sim)),
                        lambda path: _plot(sim, r, path))


def _check_requests(args, sc) -> None:
    """Refuse a run that would draw more than MAX_REQUESTS requests (rate x duration), before drawing."""
    if sc.workload.arrival == "trace":
        return  # the trace file bounds the requests
    duration = args.duration if args.duration is not None else sc.duration_s
    factor = 1.0
    if args.sweep:  # the sweep's runs draw the rate x each factor, one after the other
        from dsref.sim.serve import SWEEP_FACTORS
        factor = float(sum(SWEEP_FACTORS))
    n = sc.workload.rate_per_s * factor * duration
    if n > MAX_REQUESTS:
        opts = "--rate x --duration" + (" x --scale" if args.scale != 1 else "") + (
            f" x {factor:g} (--sweep: the sum of its rate factors)" if args.sweep else "")
        raise ValueError(f"{opts}: {sc.workload.rate_per_s * factor:,.4g} requests/s for {duration:,g} s draws "
                         f"{n:,.4g} requests, more than the {MAX_REQUESTS:,} one run takes (memory and time grow "
                         "with the requests); shorten --duration or lower --rate")


def _plot(sim, r, path):
    from dsref.sim.sim_plots import plot_serve_timeline  # matplotlib only when a plot is asked for
    plot_serve_timeline(sim, r, path)


def register(sim_subparsers) -> None:
    from dsref.reference.cli_common import HelpFormatter
    # Every scenario field is documented in sim/scenario.py and docs/simulator.md.
    p = sim_subparsers.add_parser(
        "serve", help="discrete-event simulation of serving (prefill/decode instances, continuous batching)",
        description="""\
Simulate serving a model on a deployment described by SCENARIO (a built-in name, see --list, or
a TOML file; its fields are described in docs/simulator.md): requests arrive, are prefilled and
decoded in continuous batches on prefill/decode instances. Prints throughput per node, TTFT and
TPOT percentiles, utilisation, queues and cost.""",
        epilog="example:\n  dsref sim serve --scenario single-node-h800",
        formatter_class=HelpFormatter)
    p.add_argument("--scenario", help="built-in scenario name or path to a .toml file")
    p.add_argument("--list", action="store_true", help="list the built-in scenarios")
    from dsref.reference.cli_common import integer, nonneg_int, number
    p.add_argument("--duration", type=number(0.0, MAX_DURATION_S, low_open=True,
                                             why="one simulated day; the simulation's cost grows with every "
                                                 "step and request"),
                   default=None, help=f"simulated seconds, > 0 and <= {MAX_DURATION_S:,.0f} (default: the scenario's)")
    p.add_argument("--model", default=None,
                   help="model preset name or config.json, replacing the scenario's (e.g. deepseek-v3.2, "
                        "deepseek-v4-flash; V4 runs at its release's fp8 + FP4 storage, without MTP)")
    p.add_argument("--seed", type=nonneg_int, default=None, help="random seed >= 0 (default: the scenario's)")
    p.add_argument("--rate", type=number(0.0, low_open=True), default=None,
                   help="request rate per second, > 0 (overrides the scenario)")
    p.add_argument("--scale", type=integer(1, MAX_SCALE, "beyond any deployed system"), default=1,
                   help=f"multiply the instances and the request rate (1..{MAX_SCALE})")
    p.add_argument("--sweep", action="store_true", help="load sweep (0.25x..1.5x the rate): throughput vs TPOT")
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    p.add_argument("--trace", metavar="OUT.json", help="write a Chrome/Perfetto trace of the run")
    p.add_argument("--plot", metavar="OUT.png", help="timeline plot (or, with --sweep, throughput vs TPOT)")
    p.set_defaults(func=cmd_serve)
