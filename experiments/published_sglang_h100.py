"""SGLang's large-scale-EP deployment of DeepSeek-V3 on 96 H100 (LMSYS blog 2025-05-05), from
``sim.serve`` on the ``sglang-h100-4p9d`` scenario (prefill 4 nodes EP32, decode 9 nodes EP72).

Readings (the blog's own method, section Evaluation: each phase is measured alone, "assuming
unlimited resources for the non-tested phase to isolate and maximize the load on the tested
nodes -- mirroring the setup used by DeepSeek")
  * Prefill per node: the prefill pool saturated by an offered load above what it could compute
    at 100% of its FP8 peak (so the queue grows whatever the efficiency factors are); the decode
    side gets ``OTHER_SIDE`` x its instances so it never holds prefill back.
  * Decode per node: the decode pool held full (256 sequences per GPU, KV length ~2,000: 2,000-token
    inputs, 100-token outputs as in the reproduction command of sglang issue #6017) with prefill
    instances and load well above what the decode pool can take (the blog used a slow-down API to
    fill the pool). The run must show requests waiting for a decode slot, else the note says so.
Nothing here is set from the published figures: the offered loads come from the hardware's peak
and the scenario's shapes, and saturation is checked on the simulated queues.
"""

from __future__ import annotations

from dsref.experiments.registry import Record, record

SCENARIO = "sglang-h100-4p9d"
PEAK_MULTIPLE = 1.5     # offered prefill tokens/s = this x the pool's FP8-peak bound
OTHER_SIDE = 3          # x instances of the role not under test
DECODE_PREFILL_INSTANCES = 40   # 160 prefill nodes feeding 9 decode nodes
DECODE_STEP_FLOOR_S = 0.040     # decode offered load = slots / (output tokens x this): a step shorter than
                                # any the pool takes at 256 seqs/GPU, so more requests come than it can hold
MIN_BUSY = 0.95         # utilization below which the tested pool is reported as not saturated


def peak_bound_tokens_per_s(sc, role: str) -> float:
    """Tokens/s the role's devices could process at 100% of peak: devices x peak / (2 x activated
    parameters) -- an upper bound no efficiency factor can exceed (split devices: dies x per-die peak)."""
    from dsref.reference.params import param_counts
    from dsref.sim.deployment import resolve
    dep = resolve(sc)
    inst = sc.instance(role)
    devices = inst.devices or inst.nodes * dep.node.devices_per_node * sc.device_split
    return inst.instances * devices * dep.device.peak(sc.quant) / (2 * param_counts(dep.cfg)["activated_params"])


def saturation_note(res: dict, role: str) -> str:
    """'' when the tested pool was saturated (busy and with requests queued for it), else a warning."""
    u = res["roles"][role]["utilization"]
    queued = res["queue_prefill_mean"] if role == "prefill" else res["queue_decode_waiting_mean"]
    if u >= MIN_BUSY and queued > 0:
        return ""
    return f"; WARNING: {role} pool not saturated (busy {u:.0%}, mean queue {queued:.0f})"


def saturated_prefill(sc, duration_s: float, other_side: int = OTHER_SIDE) -> tuple[dict, float]:
    """(metrics, offered req/s) of the prefill pool alone and saturated: offered PEAK_MULTIPLE x its
    peak bound, ``other_side`` x the decode instances so decode never holds it back."""
    from dsref.sim import serve
    rate = PEAK_MULTIPLE * peak_bound_tokens_per_s(sc, "prefill") / sc.workload.prompt_tokens.mean
    res = serve.simulate(sc.with_overrides({"workload": {"rate_per_s": rate},
                                            "decode": {"instances": sc.decode.instances * other_side}}),
                         duration_s=duration_s)
    return res, rate


def saturated_decode(sc, duration_s: float, prefill_instances: int, step_floor_s: float,
                     workload: dict | None = None) -> tuple[dict, float]:
    """(metrics, offered req/s) of the decode pool held full: ``prefill_instances`` feed it and the offered
    load is slots / (output tokens x ``step_floor_s``), more than it can hold (the run's queue shows it)."""
    from dsref.sim import serve
    from dsref.sim.deployment import resolve
    d = sc.decode
    devices = d.devices or d.nodes * resolve(sc).node.devices_per_node * sc.device_split
    rate = d.max_batch_per_device * devices * d.instances / (sc.workload.output_tokens.mean * step_floor_s)
    res = serve.simulate(sc.with_overrides({"workload": {**(workload or {}), "rate_per_s": rate},
                                            "prefill": {"instances": prefill_instances}}),
                         duration_s=duration_s)
    return res, rate


def simulate(duration_s: float) -> dict:
    from dsref.sim import scenario
    sc = scenario.load(SCENARIO)
    pre, pre_rate = saturated_prefill(sc, duration_s)
    dec, dec_rate = saturated_decode(sc, duration_s, DECODE_PREFILL_INSTANCES, DECODE_STEP_FLOOR_S)
    return {"prefill_sat": pre, "decode_sat": dec, "pre_rate": pre_rate, "dec_rate": dec_rate}


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    runs = simulate(20.0 if fast else 120.0)
    pre, dec = runs["prefill_sat"], runs["decode_sat"]
    ddev = dec["roles"]["decode"]["devices"]
    return [
        record(claims, "sglang_h100_prefill_node_tps", pre["input_tokens_per_s_per_node"],
               reading=("prefill pool (4 nodes, EP32) alone and saturated, 2,000-token prompts, 16,384 tokens "
                        "per device per step, two-batch overlap; headline figure of the blog"),
               note=(f"sim.serve {pre['duration_s']:.0f} simulated s at {runs['pre_rate']:.0f} req/s offered "
                     f"({PEAK_MULTIPLE}x what the pool could do at 100% of FP8 peak); prefill queue mean "
                     f"{pre['queue_prefill_mean']:.0f} requests; the blog's Evaluation section lists 54,543 per "
                     f"node for 2K prompts on the same 4 nodes" + saturation_note(pre, "prefill"))),
        record(claims, "sglang_h100_decode_node_tps", dec["output_tokens_per_s_per_node"],
               reading=("decode pool (9 nodes, EP72) alone and held full: up to 256 sequences per GPU, 2,000-token "
                        "inputs + 100-token outputs (KV ~2,000), two-batch overlap, no MTP"),
               note=(f"mean running {dec['running_mean'] / ddev:.0f} seqs/GPU; TPOT of a running request "
                     f"{dec['running_mean'] / dec['output_tokens_per_s'] * 1e3:.1f} ms (mean TPOT incl. the wait for a "
                     f"slot {dec['tpot_mean_s'] * 1e3:.0f} ms); "
                     f"{dec['queue_decode_waiting_mean']:.0f} requests waiting for a decode slot on average "
                     f"({DECODE_PREFILL_INSTANCES} prefill instances, {runs['dec_rate']:.0f} req/s offered); "
                     f"{dec['duration_s']:.0f} simulated s incl. the fill" + saturation_note(dec, "decode"))),
    ]
