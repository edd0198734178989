"""Measure this machine and write it as a catalog device file (``dsref hw probe``).

Method (all results are medians over several timed repetitions):

* memory read bandwidth: numpy ``sum`` over a float64 array far larger than
  the last-level cache, split into one contiguous slice per usable core and
  summed concurrently in threads (numpy releases the GIL inside reductions),
  so the figure approximates the multi-core DRAM read bandwidth (STREAM-like
  "sum" kernel).  Bytes read / wall time.
* matmul FLOP/s: ``jax.jit(jnp.matmul)`` on square n x n matrices, float32 and
  bfloat16, timed after a warm-up call with ``block_until_ready``;
  FLOPs = 2 n^3.  This is an achieved rate, not a datasheet peak.
* GEMM rate against the row count M: one jitted chain of ``chain`` float32
  products x <- x W_i^T, x [M, K], W_i [K, K] distinct and stored [out, in] as
  reference/model.py ``linear`` reads its weights, for each M in ``rows``;
  FLOPs = 2 M K^2 per product.  The chain's weights (64 MiB in full mode) exceed
  common last-level caches, so each product streams its weight from memory as a
  model's layers do, and one dispatch covers the chain.  Written as the fraction
  of the square fp32 rate (``[gemm_rows_efficiency]``, see hwmodels/catalog.py):
  small-M products pay the weight traffic and per-call costs that a 2048-square
  matmul hides, which is what a prefill of a few hundred tokens or a
  mixture-of-experts window of a few rows runs into.
* streaming rate of one-row products by matrix size: jitted chains of x [1, K] W^T
  over distinct W of O x K floats (alternating [O, K] and [K, O], at least 48 MiB of
  weights per chain), for O from 128 to 32768 at K = 1024 (0.5-128 MiB per matrix);
  weight bytes / time, written as a fraction of the measured read bandwidth
  (``[gemv_bandwidth_efficiency]``): a decode step is a sequence of such products,
  and on a small CPU the small ones stream far slower than the large ones
  (2-vCPU EPYC VM: ~12 GB/s at 0.5 MiB, ~28 GB/s from 8 MiB up).
* cores: ``os.sched_getaffinity`` (falls back to ``os.cpu_count``).
* memory capacity: ``MemTotal`` from /proc/meminfo.

The written file has ``device_class = "cpu"``, ``confidence = "measured"``
and efficiency overrides stating that the measured rates already include the
achievable fraction (gemm = 1.0; memory relative to a STREAM-like read).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dsref.reference.atomic import atomic_write_text

from .catalog import host_device_path

_KIB = 1024

# Probe sizes: (array bytes for the bandwidth test, matmul n, repetitions; GEMM-rows chain).
# Full mode: 1 GiB array (>> any CPU cache), n=2048, 5 repeats; row counts from a decode
# step (1) through mixture-of-experts windows (4-64) and prefill chunks (128-2048), K=1024
# (the hidden size of the small presets), 16 distinct 4 MiB weights = 64 MiB per chain.
# Quick mode (tests): 64 MiB array, n=256, 3 repeats, a short small chain -- rough figures only.
# rows_min_s: a row count's chain is timed over at least this many seconds of calls (at least
# `repeats` calls, at most _MAX_REPEATS), in rows_rounds round-robin passes over the row counts;
# memory_min_s likewise for the bandwidth sweeps. A small-M chain or one 1 GiB sweep takes
# milliseconds, and on a shared machine a median of 5 such calls moved by tens of percent
# between runs; timed this way, four back-to-back runs agreed within ~10% at every M.
FULL = {"array_bytes": 2**30, "matmul_n": 2048, "repeats": 5, "memory_min_s": 1.0,
        "rows": (1, 4, 8, 16, 32, 64, 128, 256, 512, 2048), "rows_k": 1024, "rows_chain": 16, "rows_min_s": 0.5,
        "rows_rounds": 10, "gemv_outs": (128, 256, 512, 1024, 2048, 8192, 32768), "gemv_k": 1024,
        "gemv_chain_bytes": 48 * 2**20}
QUICK = {"array_bytes": 64 * 2**20, "matmul_n": 256, "repeats": 3, "memory_min_s": 0.0,
         "rows": (1, 16, 128), "rows_k": 256, "rows_chain": 4, "rows_min_s": 0.0, "rows_rounds": 1,
         "gemv_outs": (64, 512), "gemv_k": 256, "gemv_chain_bytes": 4 * 2**20}
_MAX_REPEATS = 500

#: llama.cpp-class CPU decode reaches ~60-80% of STREAM bandwidth; the probe
#: measures a STREAM-like read, so the host's memory efficiency is this
#: midpoint (see efficiency.toml cpu.memory for the source).
_DECODE_VS_STREAM = 0.7


@dataclass(frozen=True)
class ProbeResult:
    cores: int
    memory_bytes: float
    memory_bandwidth: float  # B/s
    matmul_flops: dict[str, float]  # dtype name -> FLOP/s
    cpu_model: str
    vendor: str
    date: str
    quick: bool
    gemm_rows_flops: dict[int, float] | None = None  # row count M -> fp32 FLOP/s (see module docstring)
    gemv_bandwidth: dict[int, float] | None = None  # bytes of one weight matrix -> B/s streamed at M = 1


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def total_memory_bytes(meminfo: str | os.PathLike = "/proc/meminfo") -> float:
    """MemTotal in bytes (falls back to sysconf when /proc is unavailable)."""
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * _KIB  # value is in kB
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cpu_identity(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> tuple[str, str]:
    """(model name, vendor) from /proc/cpuinfo, else platform strings."""
    model, vendor = "", ""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key in ("model name", "Model") and not model:
                    model = val
                elif key in ("vendor_id", "CPU implementer") and not vendor:
                    vendor = val
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown CPU", vendor or "unknown"


def measure_memory_bandwidth(array_bytes: int, repeats: int, threads: int, min_s: float = 0.0) -> float:
    """Multi-threaded numpy read bandwidth in B/s (see module docstring): the median of at
    least ``repeats`` sweeps and of at least ``min_s`` seconds of sweeps."""
    a = np.ones(array_bytes // np.dtype(np.float64).itemsize, dtype=np.float64)
    chunks = np.array_split(a, threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        def run() -> None:
            list(pool.map(np.sum, chunks))
        t = _round_robin_median({"sweep": run}, repeats, min_s, 1)["sweep"]  # its warm-up pages in
    return a.nbytes / t


def measure_matmul_flops(n: int, repeats: int) -> dict[str, float]:
    """Achieved matmul FLOP/s per dtype through JAX jit."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(jnp.matmul)
    out = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
        a = jax.random.normal(key_a, (n, n), dtype=dtype)
        b = jax.random.normal(key_b, (n, n), dtype=dtype)
        f(a, b).block_until_ready()  # compile + warm-up
        t = _median_time(lambda: f(a, b).block_until_ready(), repeats)
        out[name] = 2.0 * n**3 / t
    return out


@functools.lru_cache(maxsize=1)
def _matmul_chain():
    """jitted x -> x W_1^T ... W_n^T over a list of weights stored [out, in] (reference/model.py linear)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def run(x, ws):
        for w in ws:
            x = jnp.einsum("mi,oi->mo", x, w, precision=jax.lax.Precision.HIGHEST)
        return x
    return run


def measure_gemm_rows_flops(rows, k: int, chain: int, repeats: int, min_s: float = 0.0,
                            rounds: int = 1) -> dict[int, float]:
    """Achieved fp32 FLOP/s of x [M, k] times ``chain`` distinct [k, k] weights, per M in ``rows``.

    Each M's rate is the median of at least ``repeats`` calls and of at least ``min_s``
    seconds of calls, spread over ``rounds`` round-robin passes over all M: on a shared
    machine a slow spell of a second or two then lands on every M a little instead of
    on one M entirely (timed M by M, one point of the curve came out at half its
    neighbours' rate in some runs and not in others).
    """
    import jax
    import jax.numpy as jnp

    if not rows or any(int(m) < 1 for m in rows) or k < 1 or chain < 1 or rounds < 1:
        raise ValueError(f"GEMM-rows probe needs row counts >= 1, k >= 1, chain >= 1 and rounds >= 1 "
                         f"(got {rows}, {k}, {chain}, {rounds})")

    run = _matmul_chain()
    keys = jax.random.split(jax.random.PRNGKey(1), chain + 1)
    # N(0, 1/k) entries keep the activations' scale along the chain (no overflow or denormals)
    ws = [jax.random.normal(key, (k, k), jnp.float32) / np.sqrt(k) for key in keys[1:]]
    xs = {int(m): jax.random.normal(keys[0], (int(m), k), jnp.float32) for m in rows}
    t = _round_robin_median({m: (lambda x=x: run(x, ws).block_until_ready()) for m, x in xs.items()},
                            repeats, min_s, rounds)
    return {m: 2.0 * m * k * k * chain / t[m] for m in xs}


def measure_gemv_bandwidth(outs, k: int, chain_bytes: int, repeats: int, min_s: float = 0.0,
                           rounds: int = 1) -> dict[int, float]:
    """Weight bytes/s that one-row fp32 products x [1, k] W^T stream, by the bytes of W.

    For each o in ``outs``, a jitted chain alternates distinct W [o, k] and [k, o] (stored
    [out, in] like reference/model.py ``linear``) to at least ``chain_bytes`` of weights,
    more than a last-level cache holds, so every product streams its matrix from memory, as
    a decode step does. Timed as measure_gemm_rows_flops (round-robin passes).
    Returns {bytes of one W: weight bytes per second}.
    """
    import jax
    import jax.numpy as jnp

    if not outs or any(int(o) < 1 for o in outs) or k < 1 or chain_bytes < 1:
        raise ValueError(f"GEMV probe needs output sizes >= 1, k >= 1 and chain_bytes >= 1 (got {outs}, {k}, "
                         f"{chain_bytes})")

    run = _matmul_chain()
    x = jax.random.normal(jax.random.PRNGKey(2), (1, k), jnp.float32)
    chains, total = {}, {}
    for o in outs:
        o = int(o)
        n = 2 * max(1, math.ceil(chain_bytes / (2 * 4 * o * k)))  # pairs, so x comes back to [1, k]
        keys = jax.random.split(jax.random.PRNGKey(3 + o), n)
        ws = [jax.random.normal(key, (o, k) if j % 2 == 0 else (k, o), jnp.float32)
              / np.sqrt(k if j % 2 == 0 else o) for j, key in enumerate(keys)]
        chains[4 * o * k], total[4 * o * k] = ws, 4 * o * k * n
    t = _round_robin_median({b: (lambda ws=ws: run(x, ws).block_until_ready()) for b, ws in chains.items()},
                            repeats, min_s, rounds)
    return {b: total[b] / t[b] for b in chains}


def _round_robin_median(calls: dict, repeats: int, min_s: float, rounds: int) -> dict:
    """Median wall time of each of ``calls`` (zero-argument functions): after one warm-up
    call each, at least ``repeats`` calls and ``min_s`` seconds of calls (at most
    _MAX_REPEATS), spread over ``rounds`` round-robin passes over all of them."""
    n = {}
    for key, fn in calls.items():
        fn()  # compile + warm-up
        t1 = _median_time(fn, 1)
        n[key] = math.ceil(max(repeats, min(_MAX_REPEATS, math.ceil(min_s / t1))) / rounds)
    times: dict = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            for _ in range(n[key]):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t) for key, t in times.items()}


def run_probe(*, quick: bool = False) -> ProbeResult:
    cfg = QUICK if quick else FULL
    cores = core_count()
    model, vendor = cpu_identity()
    return ProbeResult(
        cores=cores,
        memory_bytes=total_memory_bytes(),
        memory_bandwidth=measure_memory_bandwidth(cfg["array_bytes"], cfg["repeats"], cores, cfg["memory_min_s"]),
        matmul_flops=measure_matmul_flops(cfg["matmul_n"], cfg["repeats"]),
        cpu_model=model,
        vendor=vendor,
        date=_dt.date.today().isoformat(),
        quick=quick,
        gemm_rows_flops=measure_gemm_rows_flops(cfg["rows"], cfg["rows_k"], cfg["rows_chain"], cfg["repeats"],
                                                cfg["rows_min_s"], cfg["rows_rounds"]),
        gemv_bandwidth=measure_gemv_bandwidth(cfg["gemv_outs"], cfg["gemv_k"], cfg["gemv_chain_bytes"],
                                              cfg["repeats"], cfg["rows_min_s"], cfg["rows_rounds"]),
    )


def _q(s: str) -> str:
    """TOML basic string (JSON string escapes are valid TOML escapes)."""
    return json.dumps(s, ensure_ascii=True)


def _figure(name: str, value: float, unit: str, source: str, confidence: str = "measured") -> str:
    return (
        f"\n[{name}]\nvalue = {value!r}\nunit = {_q(unit)}\n"
        f"source = {_q(source)}\nconfidence = {_q(confidence)}\n"
    )


def _curve_table(name: str, x_key: str, xs, values, source: str) -> str:
    """A measured curve as a TOML table (hwmodels.catalog.parse_gemm_rows_curve reads it)."""
    return (f"\n[{name}]\n{x_key} = [{', '.join(str(x) for x in xs)}]\n"
            f"value = [{', '.join(format(v, '.4g') for v in values)}]\n"
            f'unit = "fraction"\nsource = {_q(source)}\nconfidence = "measured"\n')


def to_toml(r: ProbeResult) -> str:
    """Render a probe result as a device TOML document (catalog schema)."""
    mode = "quick mode, rough" if r.quick else "full mode"
    src = f"measured by dsref hw probe on {r.date} ({mode})"
    cfg = QUICK if r.quick else FULL
    parts = [
        "# Written by `dsref hw probe`; re-run it to refresh.\n",
        'id = "host"\n',
        f"name = {_q('This machine: ' + r.cpu_model)}\n",
        f"vendor = {_q(r.vendor)}\n",
        'device_class = "cpu"\n',
        f"cores = {r.cores}\n",
        "notes = " + _q(f"{r.cores} usable cores; FLOP/s are achieved JAX matmul rates (n={cfg['matmul_n']}), not datasheet peaks.") + "\n",
    ]
    for prec, flops in r.matmul_flops.items():
        parts.append(_figure(f"flops.{prec}", flops / 1e9, "GFLOP/s",
                             f"{src}: jax.jit matmul {cfg['matmul_n']}x{cfg['matmul_n']} {prec}, median of {cfg['repeats']}"))
    parts.append(_figure("memory_capacity", r.memory_bytes / 2**30, "GiB", f"{src}: MemTotal from /proc/meminfo"))
    parts.append(_figure("memory_bandwidth", r.memory_bandwidth / 1e9, "GB/s",
                         f"{src}: {r.cores}-thread numpy sum over {cfg['array_bytes'] // 2**20} MiB float64, median of >= {cfg['repeats']} sweeps and >= {cfg['memory_min_s']} s"))
    parts.append('\n[power]\nvalue = "unknown"\nunit = "W"\nsource = "not measured by dsref hw probe"\nconfidence = "low"\n')
    parts.append(_figure("efficiency.gemm", 1.0, "fraction",
                         "the host peak is the measured matmul rate, so no further derating", "medium"))
    parts.append(_figure("efficiency.memory", _DECODE_VS_STREAM, "fraction",
                         "llama.cpp CPU decode reaches ~60-80% of STREAM bandwidth; the probe measures a STREAM-like read", "low"))
    if r.gemm_rows_flops:
        ref = r.matmul_flops["fp32"]
        rows = sorted(r.gemm_rows_flops)
        k, chain = cfg["rows_k"], cfg["rows_chain"]
        rates = ", ".join(f"M={m} {r.gemm_rows_flops[m] / 1e9:.1f}" for m in rows)
        curve_src = (f"{src}: fp32 jax.jit chains of {chain} products [M,{k}]x[{k},{k}] (distinct weights "
                     f"stored [out,in], {chain * k * k * 4 // 2**20} MiB per chain), median of >= {cfg['repeats']} "
                     f"calls and >= {cfg['rows_min_s']} s in {cfg['rows_rounds']} round-robin passes, "
                     f"as a fraction of flops.fp32; GFLOP/s: {rates}")
        parts.append(_curve_table("gemm_rows_efficiency", "rows", rows,
                                  [r.gemm_rows_flops[m] / ref for m in rows], curve_src))
    if r.gemv_bandwidth:
        sizes = sorted(r.gemv_bandwidth)
        rates = ", ".join(f"{b / 2**20:.2f} MiB {r.gemv_bandwidth[b] / 1e9:.1f}" for b in sizes)
        gemv_src = (f"{src}: fp32 jax.jit chains of one-row products x[1,K] W^T, W alternating [O,K] and [K,O] "
                    f"(K={cfg['gemv_k']}, distinct weights, >= {cfg['gemv_chain_bytes'] // 2**20} MiB per chain), "
                    f"weight bytes streamed per second as a fraction of memory_bandwidth; median of >= "
                    f"{cfg['repeats']} calls and >= {cfg['rows_min_s']} s in {cfg['rows_rounds']} round-robin "
                    f"passes; GB/s: {rates}")
        parts.append(_curve_table("gemv_bandwidth_efficiency", "bytes", sizes,
                                  [r.gemv_bandwidth[b] / r.memory_bandwidth for b in sizes], gemv_src))
    return "".join(parts)


def write_probe(path: str | os.PathLike | None = None, *, quick: bool = False) -> Path:
    """Probe this machine and write the device file (default: host path)."""
    out = Path(path) if path is not None else host_device_path()
    text = to_toml(run_probe(quick=quick))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)  # beside, fsync, rename: a killed probe leaves the old file
    return out
