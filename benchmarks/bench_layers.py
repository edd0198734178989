"""Layer scan against unrolled layers: compile time and decode rate, in one run.

The reference runs each stack of same-kind layers as one ``jax.lax.scan`` over stacked weights
(compile time independent of depth) or, with ``layers="unrolled"``, unrolled over per-layer
and per-expert arrays that alias the stacks (reference/unrolled.py; weights read in place,
faster batch-1 decode on XLA:CPU, compile time growing with layers x experts). This script
measures both on the same model in one process, alternating, and prints the ratios, plus the
micro-benchmark that explains the difference (a GEMV on separate arrays, on a dynamic slice of
a stacked array, and on static slices).

    python benchmarks/bench_layers.py [--preset small-v3] [--dtype float32] [--runs 3] [--json]

Random weights (``DeepseekModel(cfg, rngs=nnx.Rngs(0))``), batch 1, a 128-token prompt, 32 new
tokens, greedy. Decode tok/s is the steady state (decode steps after the first), compile
excluded (``measure_compile``). Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def slice_gemv(L: int = 16, F: int = 704, D: int = 1024, runs: int = 30) -> dict:
    """Median ms of L one-row GEMVs of [F, D] float32: separate arrays, a dynamic slice of a
    stacked [L, F, D] array in a loop, static slices of it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    W = jnp.asarray(np.random.default_rng(0).standard_normal((L, F, D), np.float32))
    Ws = [jnp.array(W[i]) for i in range(L)]
    x = jnp.ones((D,), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    fs = {
        "separate": (jax.jit(lambda ws, x: sum(jnp.dot(w, x, precision=hi) for w in ws)), Ws),
        "dynamic_slice": (jax.jit(lambda W, x: jax.lax.fori_loop(
            0, L, lambda i, a: a + jnp.dot(jax.lax.dynamic_index_in_dim(W, i, 0, False), x, precision=hi),
            jnp.zeros(F))), W),
        "static_slices": (jax.jit(lambda W, x: sum(jnp.dot(W[i], x, precision=hi) for i in range(L))), W),
    }
    for f, a in fs.values():
        f(a, x).block_until_ready()
    times = {k: [] for k in fs}
    for _ in range(runs):  # alternate: the machine's load moves between runs
        for k, (f, a) in fs.items():
            t = time.perf_counter()
            f(a, x).block_until_ready()
            times[k].append(time.perf_counter() - t)
    nbytes = L * F * D * 4
    return {k: {"ms": statistics.median(v) * 1e3, "GB_per_s": nbytes / statistics.median(v) / 1e9}
            for k, v in times.items()}


def layers(preset: str, dtype: str, runs: int, prompt_len: int = 128, new_tokens: int = 32) -> dict:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dsref.reference.decode import generate
    from dsref.reference.model import DeepseekModel
    from dsref.reference.presets import get_preset
    cfg = get_preset(preset)
    model = DeepseekModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, prompt_len).tolist()
    out = {}
    for mode in ("scan", "unrolled"):
        r = generate(model, [prompt], new_tokens, measure_compile=True, layers=mode)
        out[mode] = {"compile_s": r.compile_s, "tokens": r.tokens[0], "decode_tok_s": [], "prefill_tok_s": []}
    for _ in range(runs):  # alternate the two modes
        for mode in ("scan", "unrolled"):
            r = generate(model, [prompt], new_tokens, layers=mode)
            out[mode]["decode_tok_s"].append(r.steady_decode_tokens_per_s)
            out[mode]["prefill_tok_s"].append(r.prefill_tokens_per_s)
    for v in out.values():
        v["decode_median"] = statistics.median(v["decode_tok_s"])
        v["prefill_median"] = statistics.median(v["prefill_tok_s"])
    return {"preset": preset, "dtype": dtype, "runs": runs, "modes": out,
            "same_tokens": out["scan"]["tokens"] == out["unrolled"]["tokens"],
            "decode_unrolled_over_scan": out["unrolled"]["decode_median"] / out["scan"]["decode_median"],
            "compile_unrolled_over_scan": sum(out["unrolled"]["compile_s"].values())
            / sum(out["scan"]["compile_s"].values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small-v3")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    r = {"slice_gemv": slice_gemv(), "layers": layers(a.preset, a.dtype, a.runs), "loadavg_1min_start": load0}
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"1-min load at start: {load0}")
    for k, v in r["slice_gemv"].items():
        print(f"  GEMV x16, {k:14s} {v['ms']:7.2f} ms  {v['GB_per_s']:6.1f} GB/s")
    lr = r["layers"]
    for mode, v in lr["modes"].items():
        c = v["compile_s"]
        print(f"  {lr['preset']} {lr['dtype']} {mode:9s} compile prefill {c['prefill']:6.1f} s decode {c['decode']:6.1f} s"
              f"   decode {v['decode_median']:6.2f} tok/s   prefill {v['prefill_median']:7.1f} tok/s")
    print(f"  unrolled / scan: decode x{lr['decode_unrolled_over_scan']:.2f}, compile x{lr['compile_unrolled_over_scan']:.2f},"
          f" same greedy tokens: {lr['same_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
