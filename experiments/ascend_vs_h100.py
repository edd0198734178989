"""'Ascend 910C delivers ~60% of H100 inference performance' (Tom's Hardware, Feb 2025,
relaying a DeepSeek researcher; no workload given).

Reading (ours): DeepSeek-R1 decode throughput *per chip* in the same deployment shape --
the day-6 decode instance (EP144 over 144 devices, DP attention, two-micro-batch overlap,
MTP acceptance 0.85, KV length 4,989) -- with each chip's native 8-bit format: H100 with
FP8 GEMMs (h100-node), Ascend 910C with INT8 W8A8 (the format DeepSeek/Huawei deploy on
Ascend, which has no FP8 units; ascend-910c-node, each package run as its 2 dies:
device_split = 2, 72 packages). Both serve the same number of sequences per chip
(``PER_CHIP_BATCH``); the ratio is tokens/s per 910C package / tokens/s per H100.
Step times come from sim.serve's decode step (sim.stepcost over sim.costmodel,
peaks/bandwidths from the catalog, npu vs gpu efficiency factors from efficiency.toml).
"""

from __future__ import annotations

from dsref.experiments.registry import Record, record

PER_CHIP_BATCH = 64
CONTEXT = 4989
EP = 144


def decode_tokens_per_s_per_chip(system: str, quant: str, split: int, batch_per_chip: int = PER_CHIP_BATCH,
                                 context: int = CONTEXT) -> dict:
    import simpy

    from dsref.sim import scenario, serve
    sc = scenario.load("deepseek-day6", {
        "system": system, "quant": quant, "device_split": split,
        "decode": {"nodes": 0, "devices": EP, "instances": 1},
        "prefill": {"nodes": 0, "devices": 32, "instances": 1}})
    sim = serve.ServeSim(sc, duration_s=1.0)
    sim.env = simpy.Environment()
    inst = serve.Instance(sim, "decode", 0)
    chips = EP // split
    n = batch_per_chip * chips
    step, comp = inst.decode_time(n, float(n * context))
    tokens = n * inst.tps
    return {"tokens_per_s_per_chip": tokens / step / chips, "step_s": step, "compute_s": comp, "chips": chips}


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    h = decode_tokens_per_s_per_chip("h100-node", "fp8", 1)
    a = decode_tokens_per_s_per_chip("ascend-910c-node", "int8", 2)
    ratio = a["tokens_per_s_per_chip"] / h["tokens_per_s_per_chip"]
    small_h = decode_tokens_per_s_per_chip("h100-node", "fp8", 1, batch_per_chip=8)
    small_a = decode_tokens_per_s_per_chip("ascend-910c-node", "int8", 2, batch_per_chip=8)
    small = small_a["tokens_per_s_per_chip"] / small_h["tokens_per_s_per_chip"]
    return [record(
        claims, "asc_910c_60pct", ratio,
        reading=(f"per-chip R1 decode throughput, day-6 decode shape (EP{EP}, {PER_CHIP_BATCH} sequences per chip, "
                 f"KV {CONTEXT}); H100 FP8 vs 910C INT8 (2 dies per package)"),
        note=(f"H100 {h['tokens_per_s_per_chip']:.0f} tok/s/chip (step {h['step_s'] * 1e3:.1f} ms), 910C "
              f"{a['tokens_per_s_per_chip']:.0f} (step {a['step_s'] * 1e3:.1f} ms); at 8 sequences per chip "
              f"the ratio is {small:.2f}"))]
