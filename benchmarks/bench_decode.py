"""Decode and prefill speed of the JAX reference against transformers, same model, same CPU.

Scenario: the `small-v3` preset (DeepSeek-V3 structure: MLA with q_lora, 32 routed experts in
4 groups, top-4, 1 shared, 1 dense layer, MTP off; 0.59B parameters, 0.16B activated), random
weights, float32, batch 1. Both engines get the same weights and the same threads
(torch.set_num_threads = XLA's CPU threads = the cores this process may use).

Measured, median of --repeats runs after a warm-up:
  prefill tokens/s   one forward pass over a --prompt-len prompt (ours: jit, bucketed)
  decode tokens/s    greedy generation of --new-tokens tokens, minus the prefill
  prefill vs sgemm   a --prefill-len (512) token prefill's FLOPs (sim.costmodel.prefill_ops) per
                     second, against XLA:CPU's float32 GEMM rate on [512, 2048] x [2048, 2048]
  achieved bandwidth activated weight bytes per token (every weight a token multiplies,
                     k of E experts, LM head; float32) x decode tokens/s, against the
                     machine's read bandwidth measured by hwmodels.probe (numpy sum over a
                     1 GiB array, one thread per core)
  load peak memory   peak RSS growth while loading a checkpoint written by our writer, in a
                     fresh process, against the bytes of the weights in memory

Run:  python benchmarks/bench_decode.py [--layers scan|unrolled] [--llamacpp] [--json]
(--llamacpp: llama.cpp on the same weights, written with save_pretrained and converted by its
own converter, see benchmarks/bench_llamacpp.py; skipped when it is not installed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def sgemm_flops_per_s(m: int = 512, k: int = 2048, n: int = 2048, repeats: int = 10) -> float:
    """The machine's float32 GEMM rate through XLA:CPU (what the reference's matmuls run on):
    median of ``repeats`` [m, k] x [k, n] products at full float32 precision."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((k, n), np.float32))
    f = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    f(a, b).block_until_ready()
    t, _ = _median_time(lambda: f(a, b).block_until_ready(), repeats)
    return 2.0 * m * k * n / t


def bench_prefill(model, cfg, prompt_len: int, repeats: int, layers: str) -> dict:
    """Prefill of one prompt_len-token prompt (generate with one new token: the prefill and one
    sampling), against the sgemm rate: FLOPs from the cost model's prefill operations
    (sim.costmodel.prefill_ops: naive MLA, the causal scores computed in full as the reference
    does, LM head at the last position)."""
    import numpy as np

    from dsref.reference.decode import generate
    from dsref.sim.costmodel import prefill_ops
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, prompt_len).tolist()
    generate(model, [prompt], 1, layers=layers)
    t = statistics.median(generate(model, [prompt], 1, layers=layers).prefill_s for _ in range(repeats))
    flops = sum(op.flops * op.count for op in prefill_ops(cfg, "bf16", 1, prompt_len, attn_impl="masked"))
    rate = sgemm_flops_per_s()
    return {"prompt_len": prompt_len, "prefill_s": t, "prefill_tokens_per_s": prompt_len / t, "prefill_flops": flops,
            "prefill_flops_per_s": flops / t, "sgemm_flops_per_s": rate, "prefill_fraction_of_sgemm": flops / t / rate}


def bench(preset: str, prompt_len: int, new_tokens: int, repeats: int, layers: str = "scan",
          llamacpp: bool = False, prefill_len: int = 512) -> dict:
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from dsref.hwmodels.probe import core_count, measure_memory_bandwidth
    from dsref.reference.decode import generate
    from dsref.reference.model import DeepseekModel
    from dsref.reference.presets import get_preset
    from tests.conftest import hf_state_to_ours, make_hf_model

    threads = core_count()
    torch.set_num_threads(threads)
    cfg = get_preset(preset)
    hf = make_hf_model(cfg, seed=0, std=0.02, bias_scale=0.01)
    ours = DeepseekModel(cfg, rngs=nnx.Rngs(0)).load_hf(hf_state_to_ours(hf.state_dict(), cfg))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len).tolist()
    pt = torch.as_tensor([prompt])

    # ours: warm-up compiles the prefill bucket and the decode step
    generate(ours, [prompt], new_tokens, layers=layers)
    runs = [generate(ours, [prompt], new_tokens, layers=layers) for _ in range(repeats)]
    ours_prefill = statistics.median(r.prefill_tokens_per_s for r in runs)
    ours_decode = statistics.median(r.decode_tokens_per_s for r in runs)
    ours_tokens = runs[0].tokens[0]

    # transformers: prefill = one forward; decode = (generate(n) - generate(1)) / (n - 1)
    with torch.no_grad():
        hf(pt)
        t_pre, _ = _median_time(lambda: hf(pt), repeats)
        gen = lambda n: hf.generate(pt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
        hf_tokens = gen(new_tokens)[0, prompt_len:].tolist()
        t_gen, _ = _median_time(lambda: gen(new_tokens), repeats)
        t_one, _ = _median_time(lambda: gen(1), repeats)
    hf_prefill = prompt_len / t_pre
    hf_decode = (new_tokens - 1) / (t_gen - t_one)

    prefill = bench_prefill(ours, cfg, prefill_len, repeats, layers)
    peer = None
    if llamacpp:  # the same weights through llama.cpp's converter (benchmarks/bench_llamacpp.py)
        from benchmarks.bench_llamacpp import measure
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            peer = measure(d, "float32", prompt, new_tokens, repeats)
    bw = measure_memory_bandwidth(1 << 30, 5, threads)
    active_bytes = cfg.param_counts()["activated_params"] * 4
    return {
        "preset": preset, "layers": layers, "llamacpp": peer, "prefill_long": prefill, "params": cfg.param_counts()["total_params"],
        "activated_params": cfg.param_counts()["activated_params"], "dtype": "float32",
        "threads": threads, "jax": jax.__version__, "torch": torch.__version__,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "ours_prefill_tokens_per_s": ours_prefill, "ours_decode_tokens_per_s": ours_decode,
        "hf_prefill_tokens_per_s": hf_prefill, "hf_decode_tokens_per_s": hf_decode,
        "decode_speedup": ours_decode / hf_decode, "prefill_speedup": ours_prefill / hf_prefill,
        "same_greedy_tokens": ours_tokens == hf_tokens,
        "activated_bytes_per_token": active_bytes,
        "measured_read_bandwidth_Bps": bw,
        "ours_decode_bandwidth_Bps": active_bytes * ours_decode,
        "ours_decode_bandwidth_fraction": active_bytes * ours_decode / bw,
    }


_LOAD_SNIPPET = """
import json, sys
import jax.numpy as jnp
from dsref.reference.checkpoint import load_checkpoint
hwm = lambda: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
base = hwm()
cfg, model = load_checkpoint(sys.argv[1], dtype=jnp.float32)
peak = hwm()
weights = sum(p[...].nbytes for _, p in model.hf_items())
print(json.dumps({"rss_before_load": base, "rss_peak": peak, "weights_in_memory_bytes": weights}))
"""


def bench_load(preset: str) -> dict:
    from flax import nnx

    from dsref.reference.checkpoint import save_checkpoint
    from dsref.reference.model import DeepseekModel
    from dsref.reference.presets import get_preset
    cfg = get_preset(preset)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(DeepseekModel(cfg, rngs=nnx.Rngs(0)), cfg, d, dtype="float32", max_shard_bytes=256 << 20)
        files = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
        out = subprocess.run([sys.executable, "-c", _LOAD_SNIPPET, d], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["checkpoint_file_bytes"] = files
    r["peak_growth_over_weights"] = (r["rss_peak"] - r["rss_before_load"]) / r["weights_in_memory_bytes"]
    r["method"] = "VmHWM from /proc/self/status in a fresh process, before and after load_checkpoint"
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-v3")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill-len", type=int, default=512, help="prompt of the prefill-vs-sgemm measurement")
    ap.add_argument("--layers", choices=("scan", "unrolled"), default="scan",
                    help="the reference's layer mode (reference/unrolled.py)")
    ap.add_argument("--llamacpp", action="store_true",
                    help="also time llama.cpp on the same weights (skipped when it is not installed)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = bench(a.preset, a.prompt_len, a.new_tokens, a.repeats, a.layers, a.llamacpp, a.prefill_len)
    r["load"] = bench_load(a.preset)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['preset']}: {r['params'] / 1e9:.2f}B params ({r['activated_params'] / 1e9:.3f}B activated), "
          f"float32, {r['threads']} threads, median of {r['repeats']}")
    print(f"  prefill ({r['prompt_len']} tok): ours {r['ours_prefill_tokens_per_s']:8.1f} tok/s   "
          f"transformers {r['hf_prefill_tokens_per_s']:8.1f} tok/s   x{r['prefill_speedup']:.2f}")
    print(f"  decode (batch 1):   ours {r['ours_decode_tokens_per_s']:8.2f} tok/s   "
          f"transformers {r['hf_decode_tokens_per_s']:8.2f} tok/s   x{r['decode_speedup']:.2f}")
    print(f"  decode moves {r['ours_decode_bandwidth_Bps'] / 1e9:.1f} GB/s of activated weights = "
          f"{r['ours_decode_bandwidth_fraction']:.0%} of the measured {r['measured_read_bandwidth_Bps'] / 1e9:.1f} GB/s")
    print(f"  same greedy tokens as transformers: {r['same_greedy_tokens']}")
    pl = r["prefill_long"]
    print(f"  prefill ({pl['prompt_len']} tok): {pl['prefill_tokens_per_s']:.1f} tok/s = "
          f"{pl['prefill_flops_per_s'] / 1e9:.1f} GFLOP/s = {pl['prefill_fraction_of_sgemm']:.0%} of the measured "
          f"sgemm {pl['sgemm_flops_per_s'] / 1e9:.1f} GFLOP/s")
    peer = r["llamacpp"]
    if peer is not None and "skipped" in peer:
        print(f"  llama.cpp: skipped ({peer['skipped']})")
    elif peer is not None:
        print(f"  llama.cpp (f32 GGUF):  prefill {peer['prefill_tokens_per_s']:8.1f} tok/s   decode "
              f"{peer['decode_tokens_per_s']:8.2f} tok/s   ours / llama.cpp decode "
              f"x{r['ours_decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}")
    ld = r["load"]
    print(f"  load: weights {ld['weights_in_memory_bytes'] / 1e9:.2f} GB, peak RSS growth "
          f"{(ld['rss_peak'] - ld['rss_before_load']) / 1e9:.2f} GB ({ld['peak_growth_over_weights']:.2f}x weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
