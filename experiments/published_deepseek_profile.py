"""DeepSeek's inference profile (github.com/deepseek-ai/profile-data): prefill throughput per H800
node as SGLang derived it from DeepSeek's prefill trace (LMSYS blog 2025-05-05, Profile Results,
'DeepSeek Profile' column), from ``sim.serve`` on the ``deepseek-profile`` scenario.

Reading: the profiled prefill configuration -- EP32 over 4 H800 nodes, 4K prompts, 16K tokens per GPU
per batch, two micro-batches, balanced expert routing -- alone and saturated (offered load above
what the pool could compute at 100% of FP8 peak; decode given ``OTHER_SIDE`` x its instances). The
profile's decode figure is not predicted: its MTP acceptance is not stated (docs/validation.md).
"""

from __future__ import annotations

from dsref.experiments.published_sglang_h100 import PEAK_MULTIPLE, saturated_prefill, saturation_note
from dsref.experiments.registry import Record, record

SCENARIO = "deepseek-profile"
OTHER_SIDE = 3


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    from dsref.sim import scenario
    sc = scenario.load(SCENARIO)
    pre, rate = saturated_prefill(sc, 20.0 if fast else 120.0, OTHER_SIDE)
    return [record(claims, "dsprofile_prefill_node_tps", pre["input_tokens_per_s_per_node"],
                   reading=("profiled prefill configuration alone and saturated: EP32 on 4 H800 nodes, 4,096-token "
                            "prompts, 16,384 tokens per GPU, two micro-batches, balanced routing"),
                   note=(f"sim.serve {pre['duration_s']:.0f} simulated s at {rate:.0f} req/s offered ({PEAK_MULTIPLE}x "
                         f"the FP8-peak bound); prefill queue mean {pre['queue_prefill_mean']:.0f} requests"
                         + saturation_note(pre, "prefill")))]
