"""benchmarks/bench_gpu.py, the prepared GPU run, checked on the CPU: its smoke mode produces every
field, the parity check runs and passes, the roofline fractions are the cost model's bytes and
FLOPs over the measured times against the catalog's figures (or null with a reason for a device
the catalog does not map), and --device gpu on a machine without one stops with one line."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_PATH = ROOT / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bg():
    spec = importlib.util.spec_from_file_location("bench_gpu", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=120):
    # the smoke run checks the pipeline, not speed: XLA's cheapest optimisation level compiles
    # the tiny programs about twice as fast
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(_PATH), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "tmp.json"
    p = _run("--device", "cpu", "--smoke", "--catalog-device", "h200", "--out", str(out), "--markdown")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(out.read_text()), p.stdout


def test_smoke_json_has_every_field(smoke):
    r, _ = smoke
    for k in ("schema", "date_utc", "command", "device", "jax_version", "jaxlib_version", "preset", "num_layers",
              "dtype", "params", "activated_params", "checkpoint", "parity", "prefill", "decode", "skipped",
              "errors", "elapsed_s", "budget_s", "wall_s"):
        assert k in r, k
    assert r["smoke"] is True and r["errors"] == [] and r["skipped"] == []
    assert set(r["wall_s"]) == {"parity", "checkpoint", "prefill 16", "decode batch 1", "decode batch 2"}
    assert r["device"]["platform"] == "cpu" and r["device"]["catalog_id"] == "h200"
    assert r["checkpoint"]["load_s"] > 0 and r["checkpoint"]["file_bytes"] > 0
    assert [m["batch"] for m in r["decode"]] == [1, 2]
    assert [m["tokens"] for m in r["prefill"]] == [16]
    for m in r["decode"]:
        for k in ("context", "cache_slots", "compile_s", "lower_s", "step_s", "tokens_per_s", "synced_step_s",
                  "synced_tokens_per_s", "bytes_per_step", "weight_bytes_per_step", "kv_bytes_per_step",
                  "achieved_Bps", "hbm_fraction"):
            assert k in m, k
        assert m["step_s"] > 0 and m["tokens_per_s"] == pytest.approx(m["batch"] / m["step_s"])
    for m in r["prefill"]:
        for k in ("batch", "compile_s", "time_s", "flops", "flops_per_s", "peak_fraction", "peak_precision"):
            assert k in m, k


def test_smoke_parity_passed(smoke):
    par = smoke[0]["parity"]
    assert par["tokens_equal"] is True
    assert par["device_tokens"] == par["cpu_tokens"] and len(par["cpu_tokens"]) == len(par["prompt_lens"])
    assert all(len(t) == par["new_tokens"] for t in par["cpu_tokens"])
    # CPU against CPU here: the same program on the same device, bit for bit
    assert par["first_step_max_abs_logit_diff"] == 0.0
    assert par["devices_as_intended"] is True and smoke[0]["checkpoint"]["on_run_device"] is True


def test_smoke_fractions_are_cost_model_over_time_against_the_catalog(smoke):
    from dsref.hwmodels.catalog import load_device
    from dsref.reference.decode import kv_cache_length
    from dsref.reference.presets import get_preset
    from dsref.sim.costmodel import decode_ops, prefill_ops, totals
    r = smoke[0]
    cfg, dev = get_preset(r["preset"]), load_device("h200")
    quant = {"float32": "fp32", "bfloat16": "bf16"}[r["dtype"]]
    for m in r["decode"]:
        assert m["cache_slots"] == kv_cache_length(m["context"], 1)
        want = totals(decode_ops(cfg, quant, m["batch"], m["context"]))  # must-read: context + 1 keys
        slots = totals(decode_ops(cfg, quant, m["batch"], m["context"], attn_impl="masked", key_slots=m["cache_slots"]))
        assert m["bytes_per_step"] == pytest.approx(want["bytes"])
        assert m["bytes_per_step_all_slots"] == pytest.approx(slots["bytes"])
        assert slots["bytes"] > want["bytes"]  # 32 slots for 16 + 1 keys
        assert m["hbm_fraction"] == pytest.approx(want["bytes"] / m["step_s"] / dev.memory_bandwidth)
        assert math.isfinite(m["hbm_fraction"]) and m["hbm_fraction"] > 0
    for m in r["prefill"]:
        flops = totals(prefill_ops(cfg, quant, m["batch"], m["tokens"], attn_impl="masked"))["flops"]
        assert m["flops"] == pytest.approx(flops)
        assert m["flops_causal"] < m["flops"]
        assert m["peak_fraction"] == pytest.approx(flops / m["time_s"] / dev.peak(m["peak_precision"]))
        assert math.isfinite(m["peak_fraction"]) and m["peak_fraction"] > 0


def test_smoke_markdown_section(smoke):
    r, out = smoke
    md = out[out.index("### GPU: "):]
    assert r["date_utc"] in md and r["jax_version"] in md and "bench_gpu.py --device cpu --smoke" in md
    assert md.count("\n| 1 |") == 1 and md.count("\n| 2 |") == 1 and "| 2 x 16 |" in md


def test_from_json_prints_the_same_section(smoke, tmp_path):
    r, out = smoke
    f = tmp_path / "r.json"
    f.write_text(json.dumps(r))
    p = _run("--from-json", str(f), timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == out[out.index("### GPU: "):].strip()
    f.write_text("{}")
    p = _run("--from-json", str(f), timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("bench_gpu: --from-json") and len(p.stderr.splitlines()) == 1


def test_unknown_device_gets_null_fractions_and_a_reason(bg):
    bg._import_dsref()
    cat = bg.catalog_entry("cpu")
    assert cat["catalog_id"] is None and "not mapped" in cat["unknown_reason"]
    assert bg._fraction(1.0, cat.get("hbm_bandwidth_Bps")) is None
    h200 = bg.catalog_entry("NVIDIA H200")
    assert h200["catalog_id"] == "h200" and h200["mapped_by"] == "device_kind"
    assert h200["hbm_bandwidth_Bps"] == pytest.approx(4.8e12)
    assert h200["peak"]["bf16"]["flops_per_s"] == pytest.approx(989e12)
    with pytest.raises(bg.UsageError, match="--catalog-device"):
        bg.catalog_entry("cpu", "no-such-device")


def test_coarse_to_fine_covers_every_batch_once(bg):
    coarse, fine = bg.coarse_to_fine((1, 2, 4, 8, 16, 32, 64, 128, 256))
    assert coarse == [1, 8, 64, 256] and sorted(coarse + fine) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert bg.coarse_to_fine((1, 2)) == ([1, 2], [])


def test_device_gpu_without_a_gpu_exits_2_with_one_line():
    import jax
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this machine has a GPU")
    p = _run("--device", "gpu", "--smoke", timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench_gpu: --device gpu: JAX sees no GPU"), p.stderr
    assert p.stdout == ""
