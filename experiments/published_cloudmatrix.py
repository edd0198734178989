"""CloudMatrix-Infer on Huawei CloudMatrix384 (arXiv 2506.12708): DeepSeek-R1 prefill and decode
throughput per NPU (Ascend 910C package = 2 dies), from ``sim.serve`` on the
``cloudmatrix-384-infer`` scenario.

Readings
  * Prefill per NPU: the prefill instances (16 NPUs, EP32 each) alone and saturated -- offered load
    above what they could compute at 100% of INT8 peak -- with 4,096-token prompts and 16,384 tokens
    per NPU per batch; the sim assumes balanced experts, as the paper's perfect-EPLB figure does.
  * Decode per NPU: the EP320 decode instance (160 NPUs) held full at 96 sequences per NPU (48 per die),
    4,096-token inputs and 256-token outputs, MTP acceptance 0.7, fed by ``PREFILL_FOR_DECODE`` prefill
    instances and a load above what it can hold. The paper's operating point has TPOT 49.4 ms (< 50 ms);
    the simulated TPOT of a running request (sequences / tokens per s) is in the note.
  * Decode per NPU under the 15 ms TPOT constraint: the same instance at 8 sequences per NPU (4 per
    die), the paper's batch for its TPOT 14.9 ms point.
Per NPU = per package: the per-die figures of the simulator x device_split.
"""

from __future__ import annotations

from dsref.experiments.published_sglang_h100 import (PEAK_MULTIPLE, saturated_decode, saturated_prefill,
                                                      saturation_note)
from dsref.experiments.registry import Record, record

SCENARIO = "cloudmatrix-384-infer"
OTHER_SIDE = 3               # x decode instances while prefill is under test
PREFILL_FOR_DECODE = 80      # prefill instances (1,280 NPUs) feeding the decode instance (160 NPUs): 4K-token
                             # prompts for 256-token answers need ~16 input tokens per output token
DECODE_STEP_FLOOR_S = 0.020  # decode offered load = slots / (output tokens x this): more than it can hold
LOW_LATENCY_BATCH_PER_DIE = 4  # the paper's 8 sequences per NPU at TPOT 14.9 ms
LOW_LATENCY_STEP_FLOOR_S = 0.005


def simulate(duration_s: float) -> dict:
    from dsref.sim import scenario
    sc = scenario.load(SCENARIO)
    pre, pre_rate = saturated_prefill(sc, duration_s, OTHER_SIDE)
    dec, dec_rate = saturated_decode(sc, duration_s, PREFILL_FOR_DECODE, DECODE_STEP_FLOOR_S)
    low_sc = sc.with_overrides({"decode": {"max_batch_per_device": LOW_LATENCY_BATCH_PER_DIE}})
    low, _ = saturated_decode(low_sc, duration_s, PREFILL_FOR_DECODE // 4, LOW_LATENCY_STEP_FLOOR_S)
    return {"prefill_sat": pre, "decode_sat": dec, "decode_low": low, "pre_rate": pre_rate, "dec_rate": dec_rate,
            "split": sc.device_split}


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    runs = simulate(30.0 if fast else 120.0)
    pre, dec, split = runs["prefill_sat"], runs["decode_sat"], runs["split"]
    p_dies = pre["roles"]["prefill"]["devices"]
    pre_npu = pre["input_tokens_per_s"] / p_dies * split

    def per_npu(res):
        """(output tokens/s per NPU, running sequences per NPU, TPOT of a running request in s)."""
        dies = res["roles"]["decode"]["devices"]
        tps, run_ = res["output_tokens_per_s"] / dies * split, res["running_mean"] / dies * split
        return tps, run_, (run_ / tps if tps else float("nan"))
    dec_npu, running_npu, tpot_running = per_npu(dec)
    low_npu, low_running, low_tpot = per_npu(runs["decode_low"])
    return [
        record(claims, "cloudmatrix_prefill_npu_tps", pre_npu,
               reading=("prefill instances (16 NPUs, EP32) alone and saturated, 4,096-token prompts, 16,384 tokens "
                        "per NPU per batch, balanced experts (the paper's perfect-EPLB figure)"),
               note=(f"sim.serve {pre['duration_s']:.0f} simulated s, {runs['pre_rate']:.0f} req/s offered "
                     f"({PEAK_MULTIPLE}x the INT8-peak bound), {p_dies // split} prefill NPUs; per NPU = per die "
                     f"x {split}" + saturation_note(pre, "prefill"))),
        record(claims, "cloudmatrix_decode_npu_tps", dec_npu,
               reading=("EP320 decode instance (160 NPUs) held full at 96 sequences per NPU (48 per die), 4,096-token "
                        "inputs, 256-token outputs, MTP acceptance 0.7: the paper's TPOT 49.4 ms operating point"),
               note=(f"mean running {running_npu:.0f} seqs/NPU; TPOT of a running request {tpot_running * 1e3:.1f} ms "
                     f"(paper: 49.4 ms); {dec['queue_decode_waiting_mean']:.0f} requests waiting for a decode slot "
                     f"on average; {dec['duration_s']:.0f} simulated s incl. the fill"
                     + saturation_note(dec, "decode"))),
        record(claims, "cloudmatrix_decode_npu_tps_15ms", low_npu,
               reading=("the same decode instance at 8 sequences per NPU (4 per die): the paper's operating point "
                        "under the 15 ms TPOT constraint (TPOT 14.9 ms)"),
               note=(f"mean running {low_running:.1f} seqs/NPU; TPOT of a running request {low_tpot * 1e3:.1f} ms "
                     f"(paper: 14.9 ms)" + saturation_note(runs["decode_low"], "decode"))),
    ]
