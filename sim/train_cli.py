"""`dsref sim train`: the training-step simulator on the command line (registered by sim/cli.py)."""

from __future__ import annotations



def _print_train(r: dict) -> None:
    print(f"{r['scenario']}: {r['model']} on {r['devices']:,} x {r['device']}, {r['schedule']} PP{r['pp']} "
          f"DP{r['dp']} EP{r['ep']} TP{r['tp']}, {r['micro_batches_per_step']} micro-batches of "
          f"{r['micro_batch_sequences']} x {r['seq_len']} tokens per DP rank")
    print(f"  step time        {r['step_time_s']:.3f} s (pipeline {r['pipeline_time_s']:.3f} s, "
          f"bubble {r['bubble_fraction']:.1%})")
    print(f"  MFU              {r['mfu']:.1%} of {r['mfu_peak']}; {r['mfu_vs_fp8_peak']:.1%} of the fp8 peak")
    print(f"  throughput       {r['tokens_per_s']:,.0f} tokens/s, {r['tokens_per_day'] / 1e9:,.1f}B tokens/day")
    cost = "n/a" if r["cost_usd"] is None else f"${r['cost_usd'] / 1e6:,.3f}M"
    print(f"  token budget     {r['token_budget'] / 1e12:,.2f}T tokens: {r['device_hours'] / 1e6:,.3f}M device-hours, "
          f"{r['days']:.1f} days, {cost}")
    b = r["breakdown"]
    print(f"  per micro-batch  stage 1 forward {b['stage_forward_compute_s'][1] * 1e3:.1f} ms compute + "
          f"{b['stage_forward_comm_s'][1] * 1e3:.1f} ms all-to-all; p2p send {b['p2p_send_s'] * 1e3:.2f} ms")
    _print_audit(r)
    print(f"  simulator        {r['events']:,} events in {r['sim_wall_s']:.3f} s")


def _print_audit(r: dict) -> None:
    """Where the critical rank's step time goes, and what each kernel mechanism adds."""
    b = r["breakdown"]
    a = b.get("step_attribution")
    if not a:
        return
    step = r["step_time_s"]

    def line(label, v):
        print(f"    {label:<30} {v:8.3f} s  {v / step:6.1%}")
    parts = b.get("stage_compute_by_kind_s")
    if parts:
        print("  per micro-batch  stage (layers): F / B / recompute / W compute, all-to-all each way [ms]")
        seen = set()
        for i, (p, (lo, hi)) in enumerate(zip(parts, b["stage_layers"])):
            row = tuple(round(sum(p[ph].values()) * 1e3, 2) for ph in ("F", "B", "R", "W"))
            if (row, hi - lo) in seen:
                continue
            seen.add((row, hi - lo))
            print(f"    stage {i:>2} ({lo}-{hi - 1}): " + " / ".join(f"{v:.1f}" for v in row)
                  + f", {b['stage_forward_comm_s'][i] * 1e3:.1f}")
    print(f"  step of rank {a['rank']} (the last to finish), {step:.3f} s:")
    for k, v in a["compute_by_kind_s"].items():
        line(f"compute: {k}", v)
    line("SMs held by the all-to-all", a["sm_reserved_for_ep_s"])
    line("all-to-all exposed", a["ep_comm_exposed_s"])
    line("pipeline idle (bubble, waits)", a["pipeline_idle_s"])
    line("DP reduce-scatter exposed", a["dp_reduce_scatter_exposed_s"])
    line("optimizer", a["optimizer_s"])
    line("DP all-gather", a["dp_all_gather_s"])
    print(f"    (all-to-all hidden under compute: {a['ep_comm_hidden_s']:.3f} s)")
    busy = b["rank_busy_s"]
    print(f"  rank busy        max {max(busy):.3f} s, mean {sum(busy) / len(busy):.3f} s")
    f = b.get("dualpipe_bubble_formula_s")
    if f is not None:
        print(f"  DualPipe bubble  TR formula (PP/2-1)(F&B+B-3W) = {f:.3f} s per rank (middle-stage chunks); "
              f"simulated idle on rank {a['rank']}: {a['pipeline_idle_s']:.3f} s")
    ratio = b.get("middle_stage_forward_compute_to_all_to_all")
    if ratio is not None:
        print(f"  compute : a2a    {ratio:.2f} : 1 in a middle stage's forward chunk (TR sec. 3.2.1: about 1:1)")
    if b.get("ep_busiest_rank_load_factor", 1.0) != 1.0:
        print(f"  EP load          busiest rank's routed rows = {b['ep_busiest_rank_load_factor']:.3f} x the mean")
    eff = r.get("mechanism_effects")
    if eff:
        parts = ", ".join(f"{k} +{v:.3f} s ({eff['added_fraction'][k]:+.1%})" for k, v in eff["added_s"].items())
        print(f"  mechanisms       {parts}; plain cost model {eff['plain_cost_model_step_time_s']:.3f} s")


def cmd_train(args) -> int:
    from dsref.sim import scenario as scn
    from dsref.sim import train
    if not args.scenario:
        raise scn.ScenarioError("<command line>: field 'scenario': give --scenario NAME|FILE")
    from dsref.sim.cli import check_out_path
    check_out_path("--trace", args.trace)
    check_out_path("--plot", args.plot)
    over: dict = {}
    if args.nodes is not None:
        over["nodes"] = args.nodes
    if args.schedule:
        over["schedule"] = args.schedule
    sc = scn.load(args.scenario)
    if sc.kind != "train":
        raise scn.ScenarioError(f"{sc.source}: field 'kind': '{sc.kind}' scenario; use `dsref sim {sc.kind}`")
    if args.nodes is not None:
        from dsref.sim.deployment import resolve
        cluster = resolve(sc).cluster
        if cluster is not None and args.nodes > cluster.num_nodes:
            raise ValueError(f"--nodes {args.nodes}: system {sc.system} has {cluster.num_nodes} nodes "
                             f"(--nodes 1..{cluster.num_nodes}; default: all of them)")
    if over:
        sc = sc.with_overrides(over)
    sim = train.TrainSim(sc, record=bool(args.trace or args.plot))
    r = sim.run()
    r["mechanism_effects"] = train.mechanism_effects(sc, r)
    from dsref.sim import trace
    from dsref.sim.cli import emit_outputs
    return emit_outputs(args, r, _print_train, lambda path: trace.write(path, trace.train_trace(sim)),
                        lambda path: _plot(sim, path))


def _plot(sim, path):
    from dsref.sim.sim_plots import plot_train_timeline  # matplotlib only when a plot is asked for
    plot_train_timeline(sim, path)


def register(sim_subparsers) -> None:
    from dsref.reference.cli_common import HelpFormatter
    p = sim_subparsers.add_parser(
        "train", help="discrete-event simulation of one training step (1F1B / DualPipe pipelines)",
        description="""\
Simulate one training step of SCENARIO (a built-in name such as deepseek-v3-pretrain, or a TOML
file; see docs/simulator.md) at micro-batch granularity, then extrapolate to the scenario's
token budget: step time, pipeline bubble, MFU, device-hours and cost.""",
        epilog="example:\n  dsref sim train --scenario deepseek-v3-pretrain",
        formatter_class=HelpFormatter)
    p.add_argument("--scenario", help="built-in scenario name or path to a .toml file")
    from dsref.reference.cli_common import positive_int
    p.add_argument("--nodes", type=positive_int, default=None,
                   help="number of nodes, >= 1 and at most the system's (default: the whole system)")
    p.add_argument("--schedule", choices=("dualpipe", "1f1b"), help="override the pipeline schedule (default: the scenario's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trace", metavar="OUT.json", help="write a Chrome/Perfetto trace of the pipeline")
    p.add_argument("--plot", metavar="OUT.png", help="pipeline timeline plot")
    p.set_defaults(func=cmd_train)
