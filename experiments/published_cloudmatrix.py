"""CloudMatrix-Infer on Huawei CloudMatrix384 (arXiv 2506.12708): DeepSeek-R1 prefill and decode
throughput per NPU (Ascend 910C package = 2 dies), from ``sim.serve`` on the
``cloudmatrix-384-infer`` scenario.

Readings
  * Prefill per NPU: the prefill instances (16 NPUs, EP32 each) alone and saturated -- offered load
    above what they could compute at 100% of INT8 peak -- with 4,096-token prompts; the sim assumes
    balanced experts, as the paper's perfect-EPLB figure does.
  * Decode per NPU: the EP320 decode instance held full at 96 sequences per NPU (48 per die) with a
    mean KV length of 4,096 (3,584-token prompts + 1,024-token answers), fed by ``PREFILL_FOR_DECODE``
    prefill instances and a load above what it can hold. The paper's operating point has TPOT 49.4 ms
    (< 50 ms); the simulated TPOT of running requests (step time / tokens per step) is in the note.
Per NPU = per package: the per-die figures of the simulator x device_split.
"""

from __future__ import annotations

from dsref.experiments.published_sglang_h100 import (PEAK_MULTIPLE, saturated_decode, saturated_prefill,
                                                      saturation_note)
from dsref.experiments.registry import Record, record

SCENARIO = "cloudmatrix-384-infer"
OTHER_SIDE = 3               # x decode instances while prefill is under test
PREFILL_FOR_DECODE = 32      # prefill instances (512 NPUs) feeding the decode instance (160 NPUs)
DECODE_PROMPT = 3584         # + half of the 1,024-token answer = mean KV length 4,096
DECODE_STEP_FLOOR_S = 0.020  # decode offered load = slots / (output tokens x this): more than it can hold


def simulate(duration_s: float) -> dict:
    from dsref.sim import scenario
    sc = scenario.load(SCENARIO)
    pre, pre_rate = saturated_prefill(sc, duration_s, OTHER_SIDE)
    dec, dec_rate = saturated_decode(sc, duration_s, PREFILL_FOR_DECODE, DECODE_STEP_FLOOR_S,
                                     {"prompt_tokens": {"dist": "fixed", "mean": DECODE_PROMPT}})
    return {"prefill_sat": pre, "decode_sat": dec, "pre_rate": pre_rate, "dec_rate": dec_rate,
            "split": sc.device_split}


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    # 300 simulated s: the pool needs ~15-20 s to fill (prefill latency + 1,024-step requests), which the
    # whole-run average includes
    runs = simulate(30.0 if fast else 300.0)
    pre, dec, split = runs["prefill_sat"], runs["decode_sat"], runs["split"]
    p_dies = pre["roles"]["prefill"]["devices"]
    d = dec["roles"]["decode"]
    pre_npu = pre["input_tokens_per_s"] / p_dies * split
    dec_npu = dec["output_tokens_per_s"] / d["devices"] * split
    running_npu = dec["running_mean"] / d["devices"] * split
    tpot_running = running_npu / dec_npu if dec_npu else float("nan")  # s per token of a running request
    return [
        record(claims, "cloudmatrix_prefill_npu_tps", pre_npu,
               reading="prefill instances (16 NPUs, EP32) alone and saturated, 4,096-token prompts, balanced experts",
               note=(f"sim.serve {pre['duration_s']:.0f} simulated s, {runs['pre_rate']:.0f} req/s offered "
                     f"({PEAK_MULTIPLE}x the INT8-peak bound), {p_dies // split} prefill NPUs; per NPU = per die "
                     f"x {split}" + saturation_note(pre, "prefill"))),
        record(claims, "cloudmatrix_decode_npu_tps", dec_npu,
               reading=("EP320 decode instance held full at 96 sequences per NPU (48 per die), mean KV length 4,096, "
                        "MTP acceptance 0.7 (assumed); compared at the paper's TPOT < 50 ms operating point"),
               note=(f"mean running {running_npu:.0f} seqs/NPU; TPOT of a running request {tpot_running * 1e3:.1f} ms "
                     f"(paper: 49.4 ms); {dec['queue_decode_waiting_mean']:.0f} requests waiting for a decode slot "
                     f"on average; {dec['duration_s']:.0f} simulated s incl. the fill"
                     + saturation_note(dec, "decode"))),
    ]
