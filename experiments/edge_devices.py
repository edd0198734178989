"""Jeff Geerling's single-user llama.cpp / Ollama decode rates (Jan 2025), from
``sim.local.estimate``: weights and KV cache streamed at the catalog's memory bandwidth x
the device's memory efficiency, compute at peak x efficiency, llama.cpp's real Q4_K_M
tensor mix, plus llama.cpp's per-graph-node overhead (sim/llama_cpp.py).

Targets and readings
  * Pi 5 16 GB, CPU only (Ollama): device ``raspberry-pi-5``, qwen2.5-14b
    (= R1-Distill-Qwen-14B). Eval rate of ollama-benchmark ("Why is the blue sky blue?");
    R1-family answers with their thinking run to ~1-2K tokens: mean KV length 1,024.
  * Pi 5 + Radeon PRO W7700 (llama.cpp Vulkan, all layers on the GPU): node
    ``raspberry-pi-5-w7700``. ai-benchmarks issue #9 ran llama-bench, whose tg128 test
    generates 128 tokens after an empty context: mean KV length 64.
  * AmpereOne A192-32X, 512 GB, DeepSeek-R1 671B Q4_K_M (Ollama, CPU): the CPU-only node
    ``ampereone-server``, with the KV layout llama.cpp had in January 2025: expanded K/V
    (MLA support came with ggml-org/llama.cpp PR #12801, April 2025).

Device calibration (not the claims): the memory efficiency and the per-node overhead of
each target come from Geerling's own *other* measurements on the same hardware and runtime
(``CALIBRATION``: Llama 3.2 3B and Llama 3.1 8B, two equations, two unknowns, solved by
``calibrate``); the stored values in the data files are these solutions, and
tests/test_sim_local.py checks that they still are. Where more measurements exist they are
held out (``held_out``) and reported in the notes.
"""

from __future__ import annotations

from dsref.experiments.registry import Record, record

QUANT = "q4_k_m"
# Mean KV length while decoding: R1-family answers (with thinking) run to ~1-2K tokens.
R1_ANSWER_KV = 1024
# llama-bench tg128: 128 tokens generated after an empty context.
LLAMA_BENCH_TG_KV = 64
# ollama-benchmark's Llama answers to its one prompt are a few hundred tokens.
LLAMA_ANSWER_KV = 256
PROMPT = 16

CASES = (
    # claim id, model, target, mean KV length, KV layout
    ("geer_pi5_r1_14b", "qwen2.5-14b", "raspberry-pi-5", R1_ANSWER_KV, "absorbed"),
    ("geer_pi5_w7700_r1_14b", "qwen2.5-14b", "raspberry-pi-5-w7700", LLAMA_BENCH_TG_KV, "absorbed"),
    ("geer_ampereone_671b", "deepseek-r1", "ampereone-server", R1_ANSWER_KV, "expanded_cache"),
)

_README = ("Jeff Geerling, geerlingguy/ollama-benchmark README 'Findings / Llama' table (commit 0cc8abb), "
           "Ollama default tags = Q4_K_M")
#: Independent measurements on the same hardware and runtime, per sim.local target: the (model,
#: calibration claim id) pairs solved for (memory efficiency, per-node overhead) -- their tokens/s
#: live once, in public_claims.json (role 'calibration'; ``fit_rates``) --, held-out (model,
#: tokens/s) runs, KV length.
CALIBRATION = {
    "raspberry-pi-5": {
        "fit": (("llama-3.2-3b", "geer_cal_pi5_llama32_3b"), ("llama-3.1-8b", "geer_cal_pi5_llama31_8b")),
        "held_out": (),
        "context": LLAMA_ANSWER_KV,
        "source": _README + "; Pi 5 16GB rows = ai-benchmarks issue #7 test 1b (firmware 8 Jan 2025), Ollama CPU",
    },
    "ampereone-server": {
        "fit": (("llama-3.2-3b", "geer_cal_ampereone_llama32_3b"), ("llama-3.1-8b", "geer_cal_ampereone_llama31_8b")),
        "held_out": (("llama-3.1-70b", 3.86), ("llama-3.1-405b", 0.90)),
        "context": LLAMA_ANSWER_KV,
        "source": _README + "; AmpereOne A192-32X (512GB) rows, Ollama CPU",
    },
    "raspberry-pi-5-w7700": {
        "fit": (("llama-3.2-3b", "geer_cal_pi5w7700_llama32_3b"), ("llama-3.1-8b", "geer_cal_pi5w7700_llama31_8b")),
        "held_out": (),
        "context": LLAMA_BENCH_TG_KV,
        "source": _README + "; 'Pi 5 - 8GB (AMD Pro W7700)' rows, llama.cpp Vulkan (footnote 1), all layers on the GPU",
    },
}


def fit_rates(target: str) -> tuple[tuple[str, float], ...]:
    """((model, measured tokens/s), ...) that calibrate ``target``, read from the claims file."""
    from dsref.experiments.registry import load_claims
    claims = load_claims()
    return tuple((model, float(claims[cid]["value"])) for model, cid in CALIBRATION[target]["fit"])


def _parts(model: str, target: str, context: int) -> dict:
    """What the step time is made of, independent of the two calibrated unknowns."""
    from dsref.sim.local import estimate, resolve_target
    r = estimate(model, target, QUANT, context=context, prompt_tokens=PROMPT)
    bw = resolve_target(target).device.require("memory_bandwidth")
    return {"stream_s_at_eff1": r["decode_bytes_per_step"] / bw, "nodes": r["graph_nodes"],
            "fixed_s": r["decode_comm_s"] + r["decode_host_s"]}


def calibrate(target: str) -> dict:
    """Solve t = stream_s / eff + nodes * per_node + fixed for the two 'fit' measurements.

    Assumes every op is memory-bound (true for batch-1 decode on these targets; the test
    then re-runs sim.local with the stored values). Returns eff and per_node in seconds.
    """
    cal = CALIBRATION[target]
    (m1, r1), (m2, r2) = fit_rates(target)
    a, b = _parts(m1, target, cal["context"]), _parts(m2, target, cal["context"])
    y1, y2 = 1 / r1 - a["fixed_s"], 1 / r2 - b["fixed_s"]
    det = a["stream_s_at_eff1"] * b["nodes"] - b["stream_s_at_eff1"] * a["nodes"]
    inv_eff = (y1 * b["nodes"] - y2 * a["nodes"]) / det
    per_node = (a["stream_s_at_eff1"] * y2 - b["stream_s_at_eff1"] * y1) / det
    return {"memory_efficiency": 1 / inv_eff, "per_node_s": per_node}


def held_out_errors(target: str) -> list[tuple[str, float, float]]:
    """(model, predicted tok/s, measured tok/s) for every calibration measurement of ``target``."""
    from dsref.sim.local import estimate
    cal = CALIBRATION[target]
    out = []
    for model, rate in fit_rates(target) + cal["held_out"]:
        r = estimate(model, target, QUANT, context=cal["context"], prompt_tokens=PROMPT)
        out.append((model, r["decode_tokens_per_s"], rate))
    return out


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    from dsref.sim.local import estimate
    out = []
    for cid, model, target, context, form in CASES:
        r = estimate(model, target, QUANT, context=context, prompt_tokens=PROMPT, mla_form=form)
        step = r["decode_step_s"]
        bd = r["decode_breakdown"]
        mem = sum(d["memory_bound_time_s"] for d in bd.values())
        checks = "; ".join(f"{m} {p:.2f} vs {meas:.2f} ({p / meas - 1:+.0%})"
                           for m, p, meas in held_out_errors(target)[len(CALIBRATION[target]["fit"]):])
        note = (f"sim.local.estimate({model}, {target}, {QUANT}, mla_form={form}): "
                f"{r['decode_bytes_per_step'] / 1e9:.1f} GB read per token (memory-bound {mem / step:.0%} of the step), "
                f"{r['graph_nodes']} llama.cpp graph nodes x {r['decode_overhead_s'] / r['graph_nodes'] * 1e6:.1f} us "
                f"= {r['decode_overhead_s'] * 1e3:.1f} ms ({r['decode_overhead_s'] / step:.0%}); {r['message']}. "
                f"Device calibrated on Geerling's Llama 3.2 3B / 3.1 8B runs on the same hardware"
                + (f"; held out: {checks}" if checks else ""))
        reading = f"eval rate at mean KV length {context}"
        if form == "expanded_cache":
            reading += (f"; expanded K/V cache ({r['kv_cache_bytes'] / context / 1e6:.1f} MB/token), as llama.cpp "
                        "cached DeepSeek before PR #12801 (Apr 2025)")
        out.append(record(claims, cid, r["decode_tokens_per_s"], reading=reading, note=note))
    return out
