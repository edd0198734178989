"""DeepSeek open-infra-index Day 6 (2025-03-01) serving claims, from ``sim.serve`` on the
``deepseek-day6`` scenario (24 prefill units of 4 nodes EP32 + 7 decode units of 18 nodes
EP144, H800, the published daily load: 1,605 requests/s, 56.3% prefix-cache hits).

Readings
  * Per-node throughputs are *capacities*: the scenario's pools are sized from the
    published per-node figures, so at the published load the per-node throughput is
    load / nodes by construction (reported in the note as a consistency check). The
    prediction is the throughput per node when the pool is saturated: prefill at 1.6x the
    published request rate; decode at 2x the rate with 3x the prefill units so that the
    decode pool, not prefill, is the bottleneck.
  * Prefill tokens count cache hits, as the claim says (sim.serve counts every prompt
    token a prefill instance completes, cached or computed).
  * Output speed per request: decode tokens/s / running sequences in the decode-saturation
    run -- the same operating point as d6_decode_node_tps, so both decode figures describe
    one state of the pool. (1 / TPOT of that run would also count the wait for a decode
    slot that the deliberately overloaded run creates; at the published load the pool is
    under-used in the model and requests run faster; both reported in the note.)
  * d6_cost and d6_revenue are arithmetic on published inputs (nodes, price, token
    volumes, R1 list prices): status 'derived', excluded from the error statistics.
"""

from __future__ import annotations

from dsref.experiments.registry import Record, record

SCENARIO = "deepseek-day6"
PREFILL_SAT_RATE = 1.6        # x published rate: prefill queue grows (saturated)
DECODE_SAT_RATE = 2.0
DECODE_SAT_PREFILL_UNITS = 3  # x prefill units so decode is the bottleneck
HOURS_PER_DAY = 24
GPUS_PER_NODE = 8
# DeepSeek-R1 API list prices quoted in the Day-6 post (USD per million tokens).
R1_PRICE_INPUT_HIT = 0.14
R1_PRICE_INPUT_MISS = 0.55
R1_PRICE_OUTPUT = 2.19


def simulate_day6(duration_s: float, saturation_s: float) -> dict:
    """At-load run and the two saturation runs (which need longer to fill the decode pool's KV
    cache: at 120 s it is still ramping); returns the three metric dicts."""
    from dsref.sim import scenario, serve
    sc = scenario.load(SCENARIO)
    rate = sc.workload.rate_per_s
    load = serve.simulate(sc, duration_s=duration_s)
    pre = serve.simulate(sc.with_overrides({"workload": {"rate_per_s": rate * PREFILL_SAT_RATE}}),
                         duration_s=saturation_s)
    dec_sc = sc.with_overrides({"workload": {"rate_per_s": rate * DECODE_SAT_RATE},
                                "prefill": {"instances": sc.prefill.instances * DECODE_SAT_PREFILL_UNITS}})
    dec = serve.simulate(dec_sc, duration_s=saturation_s)
    return {"load": load, "prefill_sat": pre, "decode_sat": dec}


def revenue_usd_per_day(input_b: float, hit_b: float, output_b: float) -> float:
    """Theoretical daily revenue at R1 list prices (token volumes in billions)."""
    return 1e3 * (hit_b * R1_PRICE_INPUT_HIT + (input_b - hit_b) * R1_PRICE_INPUT_MISS + output_b * R1_PRICE_OUTPUT)


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    from dsref.hwmodels.catalog import load_device
    runs = simulate_day6(20.0, 20.0) if fast else simulate_day6(120.0, 300.0)
    load, pre, dec = runs["load"], runs["prefill_sat"], runs["decode_sat"]
    dur = f"{pre['duration_s']:.0f} simulated s"
    out = [
        record(claims, "d6_prefill_node_tps", pre["input_tokens_per_s_per_node"],
               reading="saturated prefill capacity per prefill node; counts prefix-cache hits (as the claim)",
               note=(f"sim.serve, EP32 units, 2-micro-batch overlap, 16K-token budget/GPU; at the published load "
                     f"{load['input_tokens_per_s_per_node']:.0f}/node (= load / 96 nodes); {dur}")),
        record(claims, "d6_decode_node_tps", dec["output_tokens_per_s_per_node"],
               reading="saturated decode capacity per decode node (MTP acceptance 0.85), KV-cache limited batch",
               note=(f"mean running {dec['running_mean'] / dec['roles']['decode']['devices']:.0f} seqs/GPU, "
                     f"TPOT {dec['tpot_mean_s'] * 1e3:.1f} ms; at the published load "
                     f"{load['output_tokens_per_s_per_node']:.0f}/node (= load / 126 nodes)")),
    ]
    lo, hi = claims["d6_output_speed"]["value"]
    speed = dec["output_tokens_per_s"] / dec["running_mean"]
    # The at-load TPOT rises while the decode batch fills (~400 s on day-6, docs/serve-report.md):
    # quote the steady-state window's mean when sim/serve_report finds one, else say the figure
    # is the whole run's and still ramping (the 120 s run is too short to be steady).
    if load.get("steady_state_reached"):
        load_tpot = load["steady_tpot_mean_s"]
        load_tpot_label = f"steady-state TPOT (from {load['steady_start_s']:.0f} s)"
    else:
        load_tpot = load["tpot_mean_s"]
        load_tpot_label = (f"TPOT over the whole {load['duration_s']:.0f} s run, still ramping (not steady: the "
                           "decode batch is still filling; a 1,200 s run's steady value is in docs/serve-report.md)")
    out.append(record(claims, "d6_output_speed", speed, part="mid", published=(lo + hi) / 2,
                      reading=("output speed of a running request at the decode-saturation operating point (the "
                               "d6_decode_node_tps run): decode output tokens/s / mean running sequences, compared "
                               "with the midpoint of 20-22. Not 1 / TPOT: that run offers 2x the load on purpose, so "
                               "its TPOT also counts the wait for a decode slot, which a stable deployment does not have"),
                      note=(f"{speed:.1f} tokens/s while running (MTP: 1.85 tokens per decode step); mean TPOT incl. "
                            f"the admission wait {dec['tpot_mean_s'] * 1e3:.1f} ms; at the published load on the 126 "
                            f"decode nodes: {load_tpot_label} {load_tpot * 1e3:.1f} ms = {1 / load_tpot:.0f} "
                            "tokens/s per request")))
    nodes = claims["d6_nodes"]["value"]["avg"]
    price = load_device("h800").price_usd_per_hour
    cost = nodes * GPUS_PER_NODE * HOURS_PER_DAY * price
    sim_nodes = (load["offered_input_tokens_per_s"] / pre["input_tokens_per_s_per_node"]
                 + load["offered_output_tokens_per_s"] / dec["output_tokens_per_s_per_node"])
    out.append(record(claims, "d6_cost", cost, status="derived",
                      reading="226.75 average nodes x 8 GPUs x 24 h x catalog h800 price",
                      note=(f"arithmetic on inputs; the simulator's saturated capacities would need {sim_nodes:.0f} "
                            f"nodes for the published load (${sim_nodes * 8 * 24 * price:,.0f}/day)")))
    tok = claims["d6_input_tokens"]["value"]
    rev = revenue_usd_per_day(tok["input_B"], tok["cache_hit_B"], float(claims["d6_output_tokens"]["value"]))
    pub = claims["d6_revenue"]["value"]
    out.append(record(claims, "d6_revenue", rev, part="revenue_usd", published=pub["revenue_usd"], unit="USD/day",
                      status="derived", note="published token volumes x R1 list prices ($0.14/$0.55/$2.19 per M)"))
    out.append(record(claims, "d6_revenue", (rev / cost - 1) * 100, part="margin_pct", published=pub["margin_pct"],
                      unit="%", status="derived", note="revenue / cost - 1"))
    return out
