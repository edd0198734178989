"""Jeff Geerling's single-user llama.cpp / Ollama decode rates (Jan 2025), from
``sim.local.estimate`` (weights and KV streamed at the catalog's memory bandwidth x the
efficiency factor; compute at peak x efficiency; llama.cpp's real Q4_K_M tensor mix).

Reading: the 'eval rate' of ollama-benchmark (prompt "Why is the blue sky blue?", one
answer). R1-family answers with their thinking run to ~1-2K tokens, so the mean KV
length during decode is taken as 1,024 tokens; the prompt is ~16 tokens.

Targets
  * Pi 5 16 GB, CPU only: device ``raspberry-pi-5``, qwen2.5-14b (= R1-Distill-Qwen-14B).
  * Pi 5 + Radeon PRO W7700 (Vulkan, all layers on the GPU): node ``raspberry-pi-5-w7700``.
  * AmpereOne A192-32X, 512 GB, DeepSeek-R1 671B Q4_K_M: the *device*
    ``ampereone-a192-32x``. The ``ampereone-server`` node preset names the same CPU as
    host_cpu, and sim.local then counts its memory twice and places the embedding on a
    'host' behind a PCIe link the node does not have (ValueError) -- reported as a bug.
"""

from __future__ import annotations

from experiments.registry import Record, record

CONTEXT = 1024
PROMPT = 16
QUANT = "q4_k_m"

CASES = (
    ("geer_pi5_r1_14b", "qwen2.5-14b", "raspberry-pi-5"),
    ("geer_pi5_w7700_r1_14b", "qwen2.5-14b", "raspberry-pi-5-w7700"),
    ("geer_ampereone_671b", "deepseek-r1", "ampereone-a192-32x"),
)


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    from sim.local import estimate
    out = []
    for cid, model, target in CASES:
        r = estimate(model, target, QUANT, context=CONTEXT, prompt_tokens=PROMPT)
        step = r["decode_step_s"]
        bd = r["decode_breakdown"]
        mem = sum(d["memory_bound_time_s"] for d in bd.values())
        note = (f"sim.local.estimate({model}, {target}, {QUANT}): {r['decode_bytes_per_step'] / 1e9:.1f} GB read "
                f"per token, {mem / step:.0%} of the step memory-bound; {r['message']}")
        reading = f"eval rate at mean KV length {CONTEXT} (short prompt, ~1-2K-token answer)"
        if cid == "geer_ampereone_671b":
            reading += ("; absorbed-MLA latent cache (llama.cpp of Jan 2025 cached expanded K/V: "
                        "not representable in sim.local)")
        out.append(record(claims, cid, r["decode_tokens_per_s"], reading=reading, note=note))
    return out
