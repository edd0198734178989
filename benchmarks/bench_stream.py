"""`dsref golden --stream` against the in-memory golden: peak RSS and seconds per layer, one run.

Writes a V3-shaped checkpoint of several GB (random weights, bf16, sharded like a release) to a
scratch directory, then runs `dsref golden` on it in child processes, one per measurement:
--stream and in-memory, float64 and float32. Each child reports its own peak resident set
(getrusage RUSAGE_SELF ru_maxrss at exit, so each number belongs to one run); the stream dumps
carry their per-layer seconds in their metadata. The stream dumps are compared with the
in-memory ones (float64: bit-identical; float32: max relative error per tensor).

    python benchmarks/bench_stream.py [--dir /tmp/bench_stream] [--runs 3] [--json] [--keep]

The checkpoint goes to --dir (default under /tmp, never the repository); it is deleted at the
end unless --keep. Needs ~2x its size in free disk for the write (checked first) and ~12 GB of
RAM for the in-memory float64 run. Results: docs/performance.md, "Streaming golden dumps".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# V3's shape (MLA with q/kv LoRA, sigmoid noaux_tc router with groups, one dense layer first,
# one shared expert) at widths that make ~2.7 GB of bf16: 1 dense + 3 MoE layers of 64 experts.
BENCH = dict(name="bench-v3-2.7g", vocab_size=32000, hidden_size=2048, intermediate_size=8192,
             moe_intermediate_size=1024, num_hidden_layers=4, first_k_dense_replace=1,
             num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768, kv_lora_rank=512,
             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
             n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
             routed_scaling_factor=2.5, rope_scaling=None, max_position_embeddings=4096,
             num_nextn_predict_layers=0)
TOKENS = (1, 32)


class _Lazy:
    """A random tensor made only when the writer asks for its values (the writer holds one
    source tensor at a time, so the whole model is never in memory while it is written)."""

    def __init__(self, name: str, shape: tuple[int, ...], seed: int):
        self.name, self.shape, self.seed = name, shape, seed
        self.ndim = len(shape)

    def __array__(self, dtype=None, copy=None):
        rng = np.random.default_rng(self.seed)
        if self.name.endswith("norm.weight"):
            a = 1 + 0.1 * rng.standard_normal(self.shape, dtype=np.float32)
        else:
            a = 0.02 * rng.standard_normal(self.shape, dtype=np.float32)
        return a if dtype is None else a.astype(dtype)


def config():
    from dsref.reference.presets import get_preset
    return dataclasses.replace(get_preset("deepseek-v3"), **BENCH)


def write_checkpoint(d: Path) -> Path:
    from dsref.reference.checkpoint import save_checkpoint
    from dsref.reference.params import tensors
    cfg = config()
    lazy = {t.name: _Lazy(t.name, t.shape, k) for k, t in enumerate(tensors(cfg))}
    return save_checkpoint(lazy, cfg, d, dtype="bfloat16", max_shard_bytes=1 << 30)


# The child reports VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of this
# process would start at this process's resident set (measured: every run read 2.01 GiB).
_CHILD = """
import sys
from dsref.experiments.cli import main
from dsref.reference.oracle.stream import peak_rss_bytes
rc = main(sys.argv[1:])
print("PEAK_RSS_KIB", peak_rss_bytes() // 1024, file=sys.stderr)
sys.exit(rc)
"""


def golden_run(ck: Path, tokens: Path, out: Path, dtype: str, stream: bool) -> dict:
    cmd = [sys.executable, "-c", _CHILD, "golden", "--checkpoint", str(ck), "--tokens", str(tokens),
           "--out", str(out), "--dtype", dtype] + (["--stream"] if stream else [])
    env = dict(os.environ, DSREF_NO_COMPILE_CACHE="1", JAX_PLATFORMS="cpu")  # compile time counted each run
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"golden {'--stream ' if stream else ''}{dtype} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    peak = next(int(ln.split()[1]) for ln in p.stderr.splitlines() if ln.startswith("PEAK_RSS_KIB"))
    rec = {"dtype": dtype, "stream": stream, "wall_s": wall, "peak_rss_gib": peak / 2**20}
    if stream:
        from dsref.reference.oracle.golden import read_metadata
        steps = json.loads(read_metadata(out)["step_seconds"])
        rec["layer_s"] = {k: v for k, v in steps.items() if k.startswith("layer")}
        rec["head_s"] = steps.get("lm head")
    return rec


def max_rel(a: Path, b: Path) -> dict[str, float]:
    from dsref.reference.oracle.golden import read_dump
    ta, _ = read_dump(a)
    tb, _ = read_dump(b)
    out = {}
    for k in ta:
        x, y = ta[k].astype(np.float64), tb[k].astype(np.float64)
        out[k] = float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-300))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/bench_stream", help="scratch directory (not in the repository)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each --stream measurement (median)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--write-only", metavar="DIR", help=argparse.SUPPRESS)  # the child that writes it
    a = ap.parse_args(argv)
    if a.write_only:
        write_checkpoint(Path(a.write_only))
        return 0
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    cfg = config()
    from dsref.reference.params import tensors
    need = 2 * sum(int(np.prod(t.shape)) for t in tensors(cfg)) * 2  # bf16, written then renamed
    free = shutil.disk_usage(d).free
    if free < need + (1 << 30):
        raise SystemExit(f"--dir {d}: {free / 2**30:.1f} GiB free, the benchmark needs {need / 2**30:.1f} GiB")
    ck = d / "checkpoint"
    t0 = time.perf_counter()
    # written by a child, so that this process stays small while it starts the measured ones
    subprocess.run([sys.executable, __file__, "--write-only", str(ck)], check=True)
    write_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
    tok = d / "tokens.npy"
    np.save(tok, np.random.default_rng(0).integers(0, cfg.vocab_size, TOKENS).astype(np.int32))
    rows = []
    try:
        for dtype in ("float64", "float32"):
            runs = [golden_run(ck, tok, d / f"stream-{dtype}.safetensors", dtype, True) for _ in range(a.runs)]
            mem = golden_run(ck, tok, d / f"mem-{dtype}.safetensors", dtype, False)
            rel = max_rel(d / f"mem-{dtype}.safetensors", d / f"stream-{dtype}.safetensors")
            med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "peak_rss_gib")}
            layers = {k: statistics.median(r["layer_s"][k] for r in runs) for k in runs[0]["layer_s"]}
            rows.append({"dtype": dtype, "stream": {**med, "runs": len(runs), "layer_s": layers,
                                                    "head_s": statistics.median(r["head_s"] for r in runs),
                                                    "peak_rss_gib_all": [r["peak_rss_gib"] for r in runs]},
                         "in_memory": mem, "max_rel_stream_vs_in_memory": max(rel.values()),
                         "bit_identical": all(v == 0 for v in rel.values())})
    finally:
        if not a.keep:
            shutil.rmtree(ck, ignore_errors=True)
    res = {"checkpoint_bytes": size, "write_s": write_s, "tokens": list(TOKENS), "config": BENCH,
           "params": sum(int(np.prod(t.shape)) for t in tensors(cfg)), "cpus": os.cpu_count(),
           "load_avg_end": os.getloadavg(), "rows": rows}
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"checkpoint: {size / 2**30:.2f} GiB bf16, {res['params'] / 1e9:.2f} B params; tokens {TOKENS}; "
          f"written in {write_s:.0f} s; {os.cpu_count()} CPUs, load average at the end "
          f"{res['load_avg_end'][0]:.1f}; medians of {a.runs} stream runs, 1 in-memory run")
    print(f"{'dtype':8} {'mode':10} {'peak RSS GiB':>12} {'wall s':>8} {'s/layer (median per layer)':>40}")
    for r in rows:
        s, m = r["stream"], r["in_memory"]
        per = " ".join(f"{v:.2f}" for v in s["layer_s"].values())
        print(f"{r['dtype']:8} {'stream':10} {s['peak_rss_gib']:12.2f} {s['wall_s']:8.1f} {per:>40}")
        print(f"{r['dtype']:8} {'in-memory':10} {m['peak_rss_gib']:12.2f} {m['wall_s']:8.1f}")
        print(f"{'':8} stream vs in-memory: max rel error {r['max_rel_stream_vs_in_memory']:.2e}"
              f"{' (bit-identical)' if r['bit_identical'] else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
