"""SGLang's decode throughput per GPU on GB200 NVL72 (LMSYS blog 2025-09-25, Part II), original
precision (FP8 MoE, BF16 attention), from ``sim.serve`` on the ``sglang-gb200-decode`` scenario.

Reading: the decode pool (48 GPUs, EP48) alone and held full -- the blog's rule "the batch size is
chosen to make KV cache roughly full", so the simulated batch is whatever the KV capacity holds --
with 2,000-token inputs and 100-token outputs, fed by ``PREFILL_INSTANCES`` prefill instances and a
load above what the pool can hold. Part I's figure (7,583 tokens/s per GPU, June 2025) is not
predicted: its decode batch is not stated in the text.
"""

from __future__ import annotations

from dsref.experiments.published_sglang_h100 import saturated_decode, saturation_note
from dsref.experiments.registry import Record, record

SCENARIO = "sglang-gb200-decode"
PREFILL_INSTANCES = 200      # 1,600 prefill GPUs: a ~1,000-sequence batch per GPU turns over every ~10 s
DECODE_STEP_FLOOR_S = 0.05   # offered load = slots / (output tokens x this): slots are the 4,096 cap, far
                             # above the KV-bound batch, so more requests come than the pool can hold


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    from dsref.sim import scenario
    sc = scenario.load(SCENARIO)
    dec, rate = saturated_decode(sc, 15.0 if fast else 60.0, PREFILL_INSTANCES, DECODE_STEP_FLOOR_S)
    d = dec["roles"]["decode"]
    tps = dec["output_tokens_per_s"] / d["devices"]
    running = dec["running_mean"] / d["devices"]
    kv_seqs = d["kv_tokens_per_instance"] / d["devices"] / (sc.workload.prompt_tokens.mean
                                                               + sc.workload.output_tokens.mean)
    return [record(claims, "lmsys_gb200_p2_decode_gpu_tps", tps,
                   reading=("decode pool (48 GPUs, EP48) alone with a KV-full batch, 2,000-token inputs, 100-token "
                            "outputs, FP8 MoE, BF16 KV cache, no micro-batch overlap"),
                   note=(f"mean running {running:.0f} seqs/GPU (KV cache holds ~{kv_seqs:.0f} at 2,100 tokens); TPOT "
                         f"of a running request {running / tps * 1e3:.0f} ms; {PREFILL_INSTANCES} prefill instances, "
                         f"{rate:.0f} req/s offered; {dec['duration_s']:.0f} simulated s incl. the fill"
                         + saturation_note(dec, "decode")))]
