"""The reference on a GPU, in one short run: parity with the CPU, decode against the HBM
roofline, prefill against the dense peak, compile times.

A GPU is lent only now and then, for minutes, so this script is one prepared run that records
everything it managed to measure even if a part fails or the time runs out: each measurement is
written to --out as soon as it is taken, an error in one (say, out of memory at batch 256) is
recorded and the next one runs, and measurements past --budget-s are recorded as skipped.

Measured (on --device, default the first GPU JAX sees):
  parity      greedy decode of a few prompts on the device in float32 against the same run on
              the host CPU (jax.devices('cpu')), same checkpoint (--parity-preset, random
              weights written with save_checkpoint and read back with load_checkpoint): tokens
              equal, max |logit difference| of the first step (and its top-2 margin, which
              says how close a greedy tie was)
  prefill     one forward pass over --prefill-lens tokens (the reference's compiled prefill
              step): FLOPs from sim.costmodel.prefill_ops (attn_impl="masked": the full
              causal score matrix the reference computes, as benchmarks/bench_decode.py
              counts them; the causal half, attn_impl="flash", recorded beside it) per
              second, against the device's dense peak at the compute precision (bf16 for
              --dtype bfloat16) from the hwmodels catalog
  decode      one decode step (the reference's compiled step, greedy) at each --batches size
              with --context cached tokens: steps dispatched back to back, timed to the last
              block_until_ready, median of --runs; the bytes one step must read (weights of
              the experts routed to, KV cache of the context + 1 keys, activations) from
              sim.costmodel.decode_ops over the step time, against the catalog's HBM
              bandwidth. Recorded beside it: the bytes with the KV read over every cache slot
              generate() allocates (the reference attends over all, masked), and the step
              timed with the token fetched to the host after every step, as
              reference.decode.generate does.
  compile     lower + compile seconds of every prefill and decode program above
  checkpoint  seconds to write and to load the benchmark model's checkpoint

The benchmark model (--preset, default moonlight-16b-a3b: DeepSeek-V3 architecture at
published layer shapes, hidden 2048, 64 routed experts top-6, vocab 163840) is cut to
--num-layers layers (default 4: one dense, three MoE) so that random init, writing and loading
stay within a lease; per-layer shapes, and so each kernel, are the published model's.

    python benchmarks/bench_gpu.py --out gpu.json --markdown        # on a GPU machine
    python benchmarks/bench_gpu.py --device cpu --smoke --out s.json  # the CI smoke run

The device is mapped to the hwmodels catalog by JAX's device_kind (KNOWN_DEVICE_KINDS); an
unmapped device gets null fractions and a reason, never a guessed figure (--catalog-device ID
names the entry by hand). Exit status: 0 done, 1 parity failed or a measurement errored,
2 bad arguments or no such device.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# JAX device_kind (the CUDA device name) -> hwmodels catalog id; only names whose part is
# unambiguous enough for the figure compared against. "NVIDIA H100 80GB HBM3" is the SXM5 part,
# the PCIe part (2.0 TB/s) being "NVIDIA H100 PCIe" (karpathy/llm.c llmc/mfu.h, gpu_db:
# "HBM3 = SXM5"). "NVIDIA H200": the CUDA name of the H200 SXM (medium confidence: as reported
# by nvidia-smi and PyTorch on H200 SXM machines); one public source says the H200 NVL reports the same
# name: its HBM is the same 4.8 TB/s, its bf16 peak lower, so on an NVL the prefill fraction
# would be understated. Add a name here only with its source.
KNOWN_DEVICE_KINDS = {
    "NVIDIA H200": "h200",
    "NVIDIA H100 80GB HBM3": "h100",
}

# Smoke: every shape but decode batch 1 is one the parity run compiled already (prompts padded
# to 16, 32 cache slots, batch 2; float32 tiny-v3 from the same checkpoint), so the CPU smoke
# run of the test compiles three programs, not six: it checks the pipeline, not speed.
SMOKE = dict(preset="tiny-v3", num_layers=None, dtype="float32", parity_preset="tiny-v3", parity_prompt_lens=(5, 13),
             parity_new_tokens=4, batches=(1, 2), prefill_lens=(16,), prefill_batch=2, context=16, steps=3, runs=2)
FULL = dict(preset="moonlight-16b-a3b", num_layers=4, dtype="bfloat16", parity_preset="small-v3",
            parity_prompt_lens=(5, 17, 40), parity_new_tokens=16, batches=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            prefill_lens=(512, 2048), prefill_batch=1, context=1000, steps=20, runs=3)
# context 1000: generate() would allocate 1024 cache slots for it (kv_cache_length), so the
# slots the reference attends over are nearly all context
PEAK_PRECISION = {"bfloat16": "bf16", "float32": "fp32"}
QUANT = {"bfloat16": "bf16", "float32": "fp32"}  # sim.quant names: bytes per weight / activation / KV


class UsageError(Exception):
    """Bad arguments or a missing device: one line, exit 2."""


def _import_dsref():
    """dsref.* importable without an install (a GPU machine runs the bare working tree): the
    repository root is the namespace package dsref (pyproject maps dsref.reference -> reference/)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # benchmarks.* too
    try:
        import dsref.reference  # noqa: F401  (installed: pip install -e .)
    except ModuleNotFoundError:
        pkg = types.ModuleType("dsref")
        pkg.__path__ = [ROOT]
        sys.modules["dsref"] = pkg


# ------------------------------------------------------------------ device and catalog
def catalog_entry(device_kind: str, override: str | None = None) -> dict:
    """The catalog figures this run compares against: HBM bandwidth and dense peaks with their
    sources, or ``unknown_reason`` (figures None) when the device is not mapped."""
    from dsref.hwmodels.catalog import CatalogError, load_device
    cid = override or KNOWN_DEVICE_KINDS.get(device_kind)
    if cid is None:
        return {"catalog_id": None, "unknown_reason": f"device_kind {device_kind!r} is not mapped to a hwmodels "
                f"catalog entry (KNOWN_DEVICE_KINDS); fractions not computed (--catalog-device ID to name one)"}
    try:
        dev = load_device(cid)
    except CatalogError as e:
        raise UsageError(f"--catalog-device: {e}") from None
    bw = dev.figures["memory_bandwidth"]
    peaks = {}
    for prec in PEAK_PRECISION.values():
        try:
            used = dev.resolve_precision(prec)
        except CatalogError:
            continue
        f = dev.figures[f"flops.{used}"]
        peaks[prec] = {"flops_per_s": f.value, "rate_of": used, "source": f.source, "confidence": f.confidence}
    return {"catalog_id": dev.id, "catalog_name": dev.name, "mapped_by": "--catalog-device" if override else
            "device_kind", "hbm_bandwidth_Bps": bw.value, "hbm_source": bw.source, "hbm_confidence": bw.confidence,
            "peak": peaks, "unknown_reason": None}


def _fraction(x, ref):
    return None if ref is None or x is None else x / ref


# ------------------------------------------------------------------ helpers
def _compile(fn, *args, **static):
    """(lower seconds, compile seconds): jit keeps the executable for the calls that follow."""
    t = time.perf_counter()
    lowered = fn.lower(*args, **static)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t, time.perf_counter() - t1


def _model_cfg(preset: str, num_layers: int | None):
    from dsref.reference.presets import get_preset
    cfg = get_preset(preset)
    if num_layers is not None:
        if num_layers < 1:
            raise UsageError(f"--num-layers must be >= 1, got {num_layers}")
        cfg = dataclasses.replace(cfg, num_hidden_layers=num_layers,
                                  first_k_dense_replace=min(cfg.first_k_dense_replace, num_layers - 1 or 1))
        cfg.validate(f"--preset {preset} --num-layers {num_layers}")
    return cfg


def _write_checkpoint(cfg, dtype: str, d: str) -> float:
    """Random weights (seed 0) written with the project's writer; seconds to init and write."""
    import jax.numpy as jnp
    from flax import nnx

    from dsref.reference.checkpoint import save_checkpoint
    from dsref.reference.model import DeepseekModel
    t = time.perf_counter()
    model = DeepseekModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))
    save_checkpoint(model, cfg, d, dtype=dtype, max_shard_bytes=1 << 30)
    return time.perf_counter() - t


def _load(d: str, dtype: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsref.reference.checkpoint import load_checkpoint
    t = time.perf_counter()
    cfg, model = load_checkpoint(d, dtype=jnp.dtype(dtype))
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return cfg, model, time.perf_counter() - t


def _weights_device(model) -> str:
    import jax
    from flax import nnx
    return ", ".join(sorted({str(d) for a in jax.tree.leaves(nnx.state(model)) for d in a.devices()}))


# ------------------------------------------------------------------ measurements
def _first_logits(model, prompts, new_tokens: int):
    """Last-prompt-position logits [B, V] from the compiled prefill step, with the inputs
    generate() gives it (right-padded bucket, its cache length): the program generate()
    compiled, so this costs no compile."""
    import jax.numpy as jnp
    import numpy as np

    from dsref.reference.decode import bucket, compiled_steps, init_cache, kv_cache_length
    fns, state = compiled_steps(model)
    lens = np.array([len(p) for p in prompts])
    toks = np.zeros((len(prompts), bucket(int(lens.max()))), np.int32)
    for b, p in enumerate(prompts):
        toks[b, : len(p)] = p
    pos = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape)
    cache = init_cache(model, len(prompts), kv_cache_length(int(lens.max()), new_tokens))
    logits, _, _ = fns.prefill(state, jnp.asarray(toks), jnp.asarray(pos), cache, jnp.asarray(lens - 1, jnp.int32))
    return np.asarray(logits, np.float64)


def parity(ckpt: str, prompt_lens, new_tokens: int, run_dev, cpu_dev) -> dict:
    """Greedy float32 decode on run_dev against the host CPU, one checkpoint."""
    import jax
    import numpy as np

    from dsref.reference.checkpoint import read_config
    from dsref.reference.decode import generate
    cfg = read_config(ckpt)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in prompt_lens]
    side = {}
    for name, dev in (("device", run_dev), ("cpu", cpu_dev)):
        with jax.default_device(dev):
            _, model, _ = _load(ckpt, "float32")
            r = generate(model, prompts, new_tokens, measure_compile=True)
            side[name] = {"tokens": r.tokens, "logits": _first_logits(model, prompts, new_tokens),
                          "weights_on": _weights_device(model), "compile_s": r.compile_s}
            del model
    a, b = side["device"], side["cpu"]
    top2 = np.sort(b["logits"], axis=-1)[:, -2:]
    return {"preset": cfg.name, "dtype": "float32", "prompt_lens": list(prompt_lens), "new_tokens": new_tokens,
            "tokens_equal": a["tokens"] == b["tokens"], "device_tokens": a["tokens"], "cpu_tokens": b["tokens"],
            "first_step_max_abs_logit_diff": float(np.max(np.abs(a["logits"] - b["logits"]))),
            "first_step_min_top2_margin_cpu": float(np.min(top2[:, 1] - top2[:, 0])),
            "weights_on": {"device": a["weights_on"], "cpu": b["weights_on"]},
            # a device side that silently ran on the host would pass trivially
            "devices_as_intended": (a["weights_on"], b["weights_on"]) == (str(run_dev), str(cpu_dev)),
            "compile_s": {"device": a["compile_s"], "cpu": b["compile_s"]}}


def prefill(model, fns, state, batch: int, tokens: int, runs: int, dtype: str, cat: dict) -> dict:
    """The compiled prefill step over [batch, tokens] into an empty cache (a fresh one per run:
    the step donates it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsref.reference.decode import init_cache, kv_cache_length
    from dsref.sim.costmodel import prefill_ops, totals
    cfg = model.cfg
    S = kv_cache_length(tokens, 1)
    toks = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (batch, tokens)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
    last = jnp.full((batch,), tokens - 1, jnp.int32)
    lower_s, compile_s = _compile(fns.prefill, state, toks, pos, init_cache(model, batch, S), last)
    times = []
    for _ in range(runs + 1):  # the first run pays first-execution costs: dropped
        cache = jax.block_until_ready(init_cache(model, batch, S))
        t = time.perf_counter()
        jax.block_until_ready(fns.prefill(state, toks, pos, cache, last))
        times.append(time.perf_counter() - t)
    t = statistics.median(times[1:])
    flops = totals(prefill_ops(cfg, QUANT[dtype], batch, tokens, attn_impl="masked"))["flops"]
    causal = totals(prefill_ops(cfg, QUANT[dtype], batch, tokens, attn_impl="flash"))["flops"]
    peak = cat.get("peak", {}).get(PEAK_PRECISION[dtype], {}).get("flops_per_s")
    return {"batch": batch, "tokens": tokens, "cache_slots": S, "lower_s": lower_s, "compile_s": compile_s,
            "time_s": t, "times_s": times, "tokens_per_s": batch * tokens / t, "flops": flops,
            "flops_causal": causal,
            "flops_per_s": flops / t, "peak_precision": PEAK_PRECISION[dtype],
            "peak_fraction": _fraction(flops / t, peak)}


def decode(model, fns, state, batch: int, context: int, steps: int, runs: int, dtype: str, cat: dict) -> dict:
    """Steady-state decode steps at ``context`` cached tokens: every step writes position
    ``context`` (the context stays fixed) and feeds its greedy token to the next step. The
    cache is zeros: step cost does not depend on its values except through MoE routing, which
    the tokens decide."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsref.reference.decode import init_cache, kv_cache_length
    from dsref.sim.costmodel import decode_ops, totals
    cfg = model.cfg
    S = kv_cache_length(context, 1)
    tok = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (batch, 1)), jnp.int32)
    pos = jnp.full((batch, 1), context, jnp.int32)
    key = jax.random.key(0)
    cache = init_cache(model, batch, S)
    call = lambda t, c: fns.decode(state, t, pos, c, key, 0.0, 1.0, greedy=True, top_k=0)  # noqa: E731
    lower_s, compile_s = _compile(fns.decode, state, tok, pos, cache, key, 0.0, 1.0, greedy=True, top_k=0)
    nxt, cache = call(tok, cache)  # first execution
    nxt, cache = call(nxt[:, None], cache)
    jax.block_until_ready(nxt)
    piped, synced = [], []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(steps):  # back to back: the device never waits for the host
            nxt, cache = call(nxt[:, None], cache)
        jax.block_until_ready(nxt)
        piped.append((time.perf_counter() - t) / steps)
        t = time.perf_counter()
        for _ in range(steps):  # as generate(): the token comes back to the host every step
            nxt, cache = call(jnp.asarray(np.asarray(nxt)[:, None]), cache)
        np.asarray(nxt)
        synced.append((time.perf_counter() - t) / steps)
    step, step_sync = statistics.median(piped), statistics.median(synced)
    tot = totals(decode_ops(cfg, QUANT[dtype], batch, context, attn_impl="flash"))
    slots = totals(decode_ops(cfg, QUANT[dtype], batch, context, attn_impl="masked", key_slots=S))
    bw = cat.get("hbm_bandwidth_Bps")
    return {"batch": batch, "context": context, "cache_slots": S, "steps": steps, "runs": runs,
            "lower_s": lower_s, "compile_s": compile_s, "step_s": step, "steps_s": piped,
            "tokens_per_s": batch / step, "synced_step_s": step_sync, "synced_tokens_per_s": batch / step_sync,
            "bytes_per_step": tot["bytes"], "weight_bytes_per_step": tot["weight_bytes"],
            "kv_bytes_per_step": tot["kv_bytes"], "bytes_per_step_all_slots": slots["bytes"],
            "flops_per_step": tot["flops"], "achieved_Bps": tot["bytes"] / step,
            "hbm_fraction": _fraction(tot["bytes"] / step, bw)}


# ------------------------------------------------------------------ the run
def _pick_device(kind: str):
    import jax
    try:
        devs = jax.devices(kind)
    except RuntimeError:
        devs = []
    if not devs:
        raise UsageError(f"--device {kind}: JAX sees no {kind.upper()} (backends: "
                         f"{', '.join(sorted({d.platform for d in jax.devices()}))}; a CUDA-enabled jaxlib is needed)")
    return devs[0]


def run(a, out_path: str | None) -> dict:
    import jax
    import jaxlib

    preset = SMOKE if a.smoke else FULL
    p = {k: getattr(a, k) if getattr(a, k, None) is not None else v for k, v in preset.items()}
    dtype = p["dtype"]
    run_dev = _pick_device(a.device)
    cpu_dev = jax.devices("cpu")[0]
    cat = catalog_entry(run_dev.device_kind, a.catalog_device)
    cfg = _model_cfg(p["preset"], p["num_layers"])  # bad --preset / --num-layers before any work
    pc = cfg.param_counts()
    t0 = time.perf_counter()
    r = {"schema": "bench_gpu/1", "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "command": "python benchmarks/bench_gpu.py " + shlex.join(sys.argv[1:]), "smoke": a.smoke,
         "device": {"platform": run_dev.platform, "device_kind": run_dev.device_kind, **cat},
         "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__, "python": sys.version.split()[0],
         "preset": p["preset"], "num_layers": cfg.num_hidden_layers, "dtype": dtype,
         "params": pc["total_params"], "activated_params": pc["activated_params"],
         "budget_s": a.budget_s, "checkpoint": None, "parity": None, "prefill": [], "decode": [],
         "skipped": [], "errors": [], "wall_s": {}}

    from dsref.reference.atomic import atomic_write_text

    def save():
        r["elapsed_s"] = time.perf_counter() - t0
        if out_path:
            # a run killed mid-write leaves the last complete file
            atomic_write_text(out_path, json.dumps(r, indent=1))

    def step(name, fn):
        """Run one measurement unless the budget is spent; an error is recorded, not fatal."""
        if time.perf_counter() - t0 > a.budget_s:
            r["skipped"].append(f"{name}: --budget-s {a.budget_s} spent")
            print(f"  {name}: skipped (budget)", flush=True)
            return None
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - one failed measurement must not lose the others
            r["errors"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"  {name}: ERROR {r['errors'][-1]}", flush=True)
            out = None
        r["wall_s"][name] = time.perf_counter() - t  # what each part costs: sizes the next lease
        print(f"  [{name}: {r['wall_s'][name]:.1f} s, {time.perf_counter() - t0:.0f} s in]", flush=True)
        save()
        return out

    save()
    print(f"{run_dev.device_kind} ({run_dev.platform}), jax {jax.__version__}, catalog "
          f"{cat['catalog_id'] or 'none'}; {cfg.name} x{cfg.num_hidden_layers} layers {dtype}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as work:
        pd = os.path.join(work, "parity")

        def par():
            with jax.default_device(run_dev):  # random init is quicker there; the file is the same
                _write_checkpoint(_model_cfg(p["parity_preset"], None), "float32", pd)
            return parity(pd, p["parity_prompt_lens"], p["parity_new_tokens"], run_dev, cpu_dev)
        r["parity"] = step("parity", par)
        same = (p["parity_preset"], None, "float32") == (p["preset"], p["num_layers"], dtype)
        with jax.default_device(run_dev):
            d = pd if same and r["parity"] else os.path.join(work, "model")

            def load():
                w = None if d == pd else _write_checkpoint(cfg, dtype, d)  # None: the parity checkpoint
                _, model, load_s = _load(d, dtype)
                nbytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
                r["checkpoint"] = {"write_s": w, "load_s": load_s, "file_bytes": nbytes,
                                   "weights_on": _weights_device(model),
                                   "on_run_device": _weights_device(model) == str(run_dev)}
                return model
            model = step("checkpoint", load)
            if model is not None:
                from dsref.reference.decode import compiled_steps
                fns, state = compiled_steps(model)
                def do_prefill(n):
                    m = step(f"prefill {n}", lambda: prefill(model, fns, state, p["prefill_batch"], n, p["runs"],
                                                             dtype, cat))
                    if m:
                        r["prefill"].append(m)
                        print(f"  prefill {n:6d} tok: {m['time_s'] * 1e3:9.2f} ms  {m['flops_per_s'] / 1e12:8.2f} "
                              f"TFLOP/s  peak frac {_pct(m['peak_fraction'])}  compile {m['compile_s']:.1f} s", flush=True)

                def do_decode(b):
                    m = step(f"decode batch {b}", lambda: decode(model, fns, state, b, p["context"], p["steps"],
                                                                 p["runs"], dtype, cat))
                    if m:
                        r["decode"].append(m)
                        r["decode"].sort(key=lambda m: m["batch"])
                        print(f"  decode batch {b:4d}: {m['step_s'] * 1e3:8.3f} ms/step  {m['tokens_per_s']:10.1f} tok/s"
                              f"  {m['achieved_Bps'] / 1e9:8.1f} GB/s  HBM frac {_pct(m['hbm_fraction'])}  "
                              f"compile {m['compile_s']:.1f} s", flush=True)
                coarse, fine = coarse_to_fine(p["batches"])
                for b in coarse:  # the curve's shape first, should the budget end the run early
                    do_decode(b)
                for n in p["prefill_lens"]:
                    do_prefill(n)
                for b in fine:
                    do_decode(b)
    save()
    return r


def coarse_to_fine(batches) -> tuple[list[int], list[int]]:
    """(every third batch size and the largest, the rest), each ascending: measured in that
    order, a run cut short by its budget still spans the whole range."""
    bs = sorted(set(batches))
    coarse = sorted(set(bs[::3] + bs[-1:]))
    return coarse, [b for b in bs if b not in coarse]


def _pct(x) -> str:
    return "   n/a" if x is None else f"{x:6.1%}"


def markdown(r: dict) -> str:
    """The docs/performance.md section of one run."""
    dv, par, ck = r["device"], r["parity"], r["checkpoint"]
    lines = [f"### GPU: {dv['device_kind']}, {r['date_utc']}", "",
             f"`{r['command']}` -- jax {r['jax_version']}, {r['preset']} with {r['num_layers']} layers "
             f"({r['params'] / 1e9:.2f}B parameters, {r['activated_params'] / 1e9:.2f}B activated), {r['dtype']}, "
             f"random weights through save_checkpoint/load_checkpoint.", ""]
    if dv["catalog_id"]:
        lines.append(f"Roofline figures: hwmodels catalog `{dv['catalog_id']}` (HBM "
                     f"{dv['hbm_bandwidth_Bps'] / 1e12:.2f} TB/s: {dv['hbm_source']}).")
    else:
        lines.append(f"No roofline fractions: {dv['unknown_reason']}.")
    if par:
        lines.append(f"Parity ({par['preset']}, float32, prompts {par['prompt_lens']}, {par['new_tokens']} new tokens, "
                     f"weights on {par['weights_on']['device']} and {par['weights_on']['cpu']}): "
                     f"greedy tokens equal to the CPU run: **{par['tokens_equal']}**; first-step max |logit diff| "
                     f"{par['first_step_max_abs_logit_diff']:.2e} (smallest top-2 margin "
                     f"{par['first_step_min_top2_margin_cpu']:.3f}).")
    if ck:
        written = "the parity checkpoint" if ck["write_s"] is None else f"written in {ck['write_s']:.1f} s"
        lines.append(f"Checkpoint: {written}, loaded in {ck['load_s']:.1f} s ({ck['file_bytes'] / 1e9:.2f} GB).")
    lines += ["", "| prefill batch x tokens | ms | TFLOP/s | of dense peak | compile s |", "|---|---|---|---|---|"]
    lines += [f"| {m['batch']} x {m['tokens']} | {m['time_s'] * 1e3:.2f} | {m['flops_per_s'] / 1e12:.2f} | "
              f"{_pct(m['peak_fraction']).strip()} | {m['compile_s']:.1f} |" for m in r["prefill"]]
    lines += ["", f"| decode batch (context {r['decode'][0]['context'] if r['decode'] else '-'}) | ms/step | tok/s | "
              "tok/s host-synced | GB/s | of HBM roofline | compile s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['batch']} | {m['step_s'] * 1e3:.3f} | {m['tokens_per_s']:.1f} | {m['synced_tokens_per_s']:.1f} | "
              f"{m['achieved_Bps'] / 1e9:.1f} | {_pct(m['hbm_fraction']).strip()} | {m['compile_s']:.1f} |"
              for m in r["decode"]]
    if r["skipped"] or r["errors"]:
        lines += ["", f"Skipped: {'; '.join(r['skipped']) or 'none'}. Errors: {'; '.join(r['errors']) or 'none'}."]
    return "\n".join(lines)


def _int_list(s: str) -> tuple[int, ...]:
    try:
        v = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {s!r}")
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--smoke", action="store_true", help="tiny-v3, batches 1,2, short prompts: seconds on a CPU")
    ap.add_argument("--preset", default=None,
                    help=f"benchmark model (default {FULL['preset']}; smoke {SMOKE['preset']})")
    ap.add_argument("--num-layers", type=int, default=None, help=f"cut the preset to this many layers "
                    f"(default {FULL['num_layers']} for the full run, the preset's own for --smoke)")
    ap.add_argument("--parity-preset", default=None, help=f"float32 parity model (default {FULL['parity_preset']})")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                    help="benchmark model dtype (default bfloat16; float32 for --smoke)")
    ap.add_argument("--batches", type=_int_list, default=None, help="decode batch sizes, e.g. 1,2,4")
    ap.add_argument("--prefill-lens", type=_int_list, default=None, help="prefill lengths, e.g. 512,2048")
    ap.add_argument("--prefill-batch", type=int, default=None, help="sequences per prefill (default 1)")
    ap.add_argument("--context", type=int, default=None, help="cached tokens during the decode steps")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per timed run")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per measurement (median)")
    ap.add_argument("--parity-new-tokens", type=int, default=None)
    ap.add_argument("--catalog-device", default=None, help="hwmodels catalog id to compare against, instead "
                    "of the one mapped from JAX's device_kind")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no measurement after this many seconds")
    ap.add_argument("--out", default=None, help="JSON results, rewritten after every measurement")
    ap.add_argument("--markdown", action="store_true", help="print the docs/performance.md section")
    ap.add_argument("--from-json", default=None, metavar="FILE", help="measure nothing: print the "
                    "docs/performance.md section of a results file an earlier run wrote (say, one cut short)")
    a = ap.parse_args(argv)
    if a.from_json:
        try:
            with open(a.from_json) as f:
                print(markdown(json.load(f)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"bench_gpu: --from-json {a.from_json}: not a bench_gpu results file ({type(e).__name__}: {e})",
                  file=sys.stderr)
            return 2
        return 0
    for k in ("context", "steps", "runs", "parity_new_tokens", "prefill_batch"):
        v = getattr(a, k)
        if v is not None and v < 1:
            print(f"bench_gpu: --{k.replace('_', '-')} must be >= 1, got {v}", file=sys.stderr)
            return 2
    if a.out and not os.path.isdir(os.path.dirname(os.path.abspath(a.out))):
        print(f"bench_gpu: --out {a.out}: directory does not exist", file=sys.stderr)
        return 2
    _import_dsref()
    from dsref.reference.config import ConfigError
    try:
        r = run(a, a.out)
    except (UsageError, ConfigError) as e:
        print(f"bench_gpu: {e}", file=sys.stderr)
        return 2
    par = r["parity"]
    if a.markdown:
        print()
        print(markdown(r))
    else:
        print(f"parity tokens equal: {par and par['tokens_equal']}; errors: {len(r['errors'])}; "
              f"skipped: {len(r['skipped'])}; {r['elapsed_s']:.0f} s")
    ck = r["checkpoint"]
    ok = par and par["tokens_equal"] and par["devices_as_intended"] and ck and ck["on_run_device"]
    return 0 if ok and not r["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
