"""`dsref sim serve`: the serving simulator on the command line (registered by sim/cli.py)."""

from __future__ import annotations

import json


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
    over: dict = {}
    if args.rate is not None:
        over["workload"] = {"rate_per_s": args.rate}
    sc = scn.load(args.scenario, over or None)
    if sc.kind != "serve":
        raise scn.ScenarioError(f"{sc.source}: field 'kind': '{sc.kind}' scenario; use `dsref sim {sc.kind}`")
    if args.scale != 1:
        sc = serve.scaled(sc, args.scale)
    progress = not args.json
    if args.sweep:
        res = serve.sweep(sc, duration_s=args.duration, seed=args.seed, progress=progress)
        if args.plot:
            from dsref.sim.sim_plots import plot_sweep
            plot_sweep(res, args.plot)
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
    from dsref.sim import trace
    from dsref.sim.cli import emit_outputs
    return emit_outputs(args, r, _print_serve, lambda path: trace.write(path, trace.serve_trace(sim)),
                        lambda path: _plot(sim, r, path))


def _plot(sim, r, path):
    from dsref.sim.sim_plots import plot_serve_timeline  # matplotlib only when a plot is asked for
    plot_serve_timeline(sim, r, path)


def register(sim_subparsers) -> None:
    p = sim_subparsers.add_parser(
        "serve", help="discrete-event simulation of serving (prefill/decode instances, continuous batching)",
        description="Simulate serving SCENARIO (a built-in name, see --list, or a TOML file; every field is "
                    "documented in sim/scenario.py and docs/simulator.md). Prints throughput per node, TTFT/TPOT "
                    "percentiles, utilisation, queues and cost.")
    p.add_argument("--scenario", help="built-in scenario name or path to a .toml file")
    p.add_argument("--list", action="store_true", help="list the built-in scenarios")
    p.add_argument("--duration", type=float, default=None, help="simulated seconds (default: the scenario's)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the scenario's)")
    p.add_argument("--rate", type=float, default=None, help="request rate per second (overrides the scenario)")
    p.add_argument("--scale", type=int, default=1, help="multiply the instances and the request rate")
    p.add_argument("--sweep", action="store_true", help="load sweep (0.25x..1.5x the rate): throughput vs TPOT")
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    p.add_argument("--trace", metavar="OUT.json", help="write a Chrome/Perfetto trace of the run")
    p.add_argument("--plot", metavar="OUT.png", help="timeline plot (or, with --sweep, throughput vs TPOT)")
    p.set_defaults(func=cmd_serve)
