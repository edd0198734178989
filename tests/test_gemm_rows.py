"""GEMM rate against the row count M: the probed curve is parsed, the roofline uses it for
ops that record their GEMM rows, and devices without a curve are unchanged."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dsref.hwmodels.catalog import CatalogError, GemmRowsCurve, list_devices, load_device
from dsref.reference.presets import get_preset
from dsref.sim import costmodel, roofline

BASE = """
id = "{id}"
name = "Test CPU"
vendor = "Test"
device_class = "cpu"

[flops.fp32]
value = 100
unit = "GFLOP/s"
source = "test"
confidence = "measured"

[memory_capacity]
value = 16
unit = "GB"
source = "test"
confidence = "high"

[memory_bandwidth]
value = 50
unit = "GB/s"
source = "test"
confidence = "high"

[power]
value = "unknown"
unit = "W"
source = "test"
confidence = "low"
"""

CURVE = """
[gemm_rows_efficiency]
rows = [1, 16, 256]
value = [0.05, 0.4, 0.9]
unit = "fraction"
source = "test curve"
confidence = "measured"
"""


def _device(tmp_path: Path, curve: str | None = CURVE, name: str = "t"):
    path = tmp_path / f"{name}.toml"
    path.write_text(BASE.format(id=name) + (curve or ""))
    return load_device(path)


def test_curve_parsed_and_interpolated_in_log_rows(tmp_path):
    dev = _device(tmp_path)
    c = dev.gemm_rows_curve
    assert isinstance(c, GemmRowsCurve) and c.rows == (1, 16, 256) and c.source == "test curve"
    assert dev.gemm_rows_efficiency(16) == pytest.approx(0.4)
    assert dev.gemm_rows_efficiency(4) == pytest.approx(0.05 + 0.5 * (0.4 - 0.05))  # log2 4 is half way to 16
    assert dev.gemm_rows_efficiency(64) == pytest.approx(0.4 + 0.5 * (0.9 - 0.4))
    assert dev.gemm_rows_efficiency(0.5) == 0.05 and dev.gemm_rows_efficiency(4096) == 0.9  # clamped
    with pytest.raises(ValueError, match="positive"):
        dev.gemm_rows_efficiency(0)


def test_device_without_curve_has_none(tmp_path):
    dev = _device(tmp_path, None)
    assert dev.gemm_rows_curve is None and dev.gemm_rows_efficiency(3) == 1.0
    assert all(d.gemm_rows_curve is None for d in list_devices())  # the bundled catalog cites no curve


@pytest.mark.parametrize("old, new, field", [
    ("rows = [1, 16, 256]", "rows = [1, 256, 16]", "gemm_rows_efficiency.rows"),
    ("rows = [1, 16, 256]", "rows = [0, 16, 256]", "gemm_rows_efficiency.rows"),
    ("rows = [1, 16, 256]", "rows = []", "gemm_rows_efficiency.rows"),
    ("value = [0.05, 0.4, 0.9]", "value = [0.05, 0.4]", "gemm_rows_efficiency.value"),
    ("value = [0.05, 0.4, 0.9]", "value = [0.05, -0.4, 0.9]", "gemm_rows_efficiency.value"),
    ('unit = "fraction"', 'unit = "GFLOP/s"', "gemm_rows_efficiency.unit"),
    ('source = "test curve"\n', "", "gemm_rows_efficiency.source"),
    ('confidence = "measured"\n', 'confidence = "sure"\n', "gemm_rows_efficiency.confidence"),
    ('confidence = "measured"\n', 'confidence = "measured"\nk = 3\n', "gemm_rows_efficiency"),
])
def test_bad_curve_rejected_with_file_and_field(tmp_path, old, new, field):
    assert old in CURVE
    with pytest.raises(CatalogError) as exc:
        _device(tmp_path, CURVE.replace(old, new))
    assert f"field '{field}" in str(exc.value) and "t.toml" in str(exc.value)


def test_roofline_uses_curve_at_the_ops_rows(tmp_path):
    dev = _device(tmp_path)
    op = costmodel.Op("g", 0, "gemm", 2e9, 1e3, precision="fp32", gemm_rows=16.0, gemm_padding=1.5)
    eff = dev.efficiency("gemm")  # the class value; the curve multiplies it
    t = roofline.op_time(op, dev)
    assert t.compute_s == pytest.approx(2e9 * 1.5 / (100e9 * eff * 0.4))
    # no rows recorded, or not a GEMM (attention has its own efficiency): no curve
    plain = roofline.op_time(replace(op, gemm_rows=None), dev)
    assert plain.compute_s == pytest.approx(2e9 / (100e9 * eff))
    attn = roofline.op_time(replace(op, kind="attention"), dev)
    assert attn.compute_s == pytest.approx(2e9 / (100e9 * dev.efficiency("attention")))


def test_devices_without_curve_unchanged_by_rows_fields():
    cfg = get_preset("deepseek-v3")
    ops = costmodel.prefill_ops(cfg, "bf16", 2, 300) + costmodel.decode_ops(cfg, "bf16", 8, 4096)
    for dev_id in ("h800", "raspberry-pi-5"):
        dev = load_device(dev_id)
        for op in ops:
            a, b = roofline.op_time(op, dev), roofline.op_time(replace(op, gemm_rows=None, gemm_padding=1.0), dev)
            assert (a.compute_s, a.memory_s) == (b.compute_s, b.memory_s)


def test_costmodel_records_gemm_rows():
    cfg = get_preset("small-v3")
    T = 128
    ops = {(op.layer, op.name): op for op in costmodel.prefill_ops(cfg, "fp32", 1, T, logits="last")}
    assert ops[(0, "q_a_proj")].gemm_rows == T and ops[(0, "kv_b_expand")].gemm_rows == T
    assert ops[(None, "lm_head")].gemm_rows == 1  # the last position only
    assert ops[(1, "router")].gemm_rows == T
    assert ops[(0, "input_layernorm")].gemm_rows is None and ops[(0, "attention")].gemm_rows is None
    dec = {(op.layer, op.name): op for op in costmodel.decode_ops(cfg, "fp32", 1, 100)}
    assert dec[(0, "q_absorb")].gemm_rows == 1  # one [M, N] x [N, R] product per head
    # routed experts: windows of block_size rows, padded to whole windows per expert
    moe = ops[(1, "routed_experts")]
    assert moe.gemm_rows == 16 and 1.0 < moe.gemm_padding < 2.0
    assert dec[(1, "routed_experts")].gemm_rows == 1 and dec[(1, "routed_experts")].gemm_padding == 1.0


def test_expert_windows_follow_the_reference():
    """One window size for the JAX model and the cost model (reference.dispatch): the mean rows
    per expert rounded down to a power of two, in [1, 128]."""
    import math

    from dsref.reference import model
    from dsref.reference.dispatch import expert_window_rows
    assert model.block_size is expert_window_rows
    for A in (1, 3, 4, 31, 32, 100, 512, 4096, 10**5):
        for E in (1, 8, 32, 256):
            mean = max(1, A // E)
            assert expert_window_rows(A, E) == min(128, 2 ** math.floor(math.log2(mean)))
    # expected windows vs a seeded Monte-Carlo of uniform top-k routing
    rng = np.random.default_rng(0)
    E, k, M = 32, 4, 128
    C = expert_window_rows(M * k, E)
    sampled = []
    for _ in range(400):
        ids = np.argsort(rng.random((M, E)), axis=1)[:, :k]
        sampled.append(np.sum(-(-np.bincount(ids.ravel(), minlength=E) // C)))
    model = costmodel.expected_expert_windows(None, E, k, M, C)
    assert model == pytest.approx(np.mean(sampled), rel=0.02)
    assert costmodel.expected_expert_windows(None, E, k, 1, 1) == pytest.approx(k)  # decode: one row per expert
    assert costmodel.expected_expert_windows(None, E, k, 0, 4) == 0.0


def test_quick_probe_writes_a_loadable_curve(tmp_path):
    from dsref.hwmodels.probe import QUICK, write_probe
    dev = load_device(write_probe(tmp_path / "host.toml", quick=True))
    c = dev.gemm_rows_curve
    assert c is not None and c.rows == tuple(QUICK["rows"]) and c.confidence == "measured"
    assert all(v > 0 and math.isfinite(v) for v in c.values)
    assert "GFLOP/s: M=1 " in c.source
    g = dev.gemv_bandwidth_curve
    assert g is not None and g.rows == tuple(4 * o * QUICK["gemv_k"] for o in QUICK["gemv_outs"])
    assert all(v > 0 and math.isfinite(v) for v in g.values) and "GB/s: " in g.source


# ------------------------------------------------------- one-row products by matrix size
GEMV = """
[gemv_bandwidth_efficiency]
bytes = [262144, 4194304]
value = [0.3, 0.8]
unit = "fraction"
source = "test gemv curve"
confidence = "measured"
"""


def test_gemv_curve_sets_the_bandwidth_of_gemms_by_matrix_size(tmp_path):
    dev = _device(tmp_path, CURVE + GEMV)
    g = dev.gemv_bandwidth_curve
    assert g.rows == (262144, 4194304) and g.at(1048576) == pytest.approx(0.3 + 0.5 * (0.8 - 0.3))
    op = costmodel.Op("g", 0, "gemm", 2e3, 1048576, precision="fp32", gemm_rows=1.0, gemm_matrix_bytes=1048576)
    assert roofline.op_time(op, dev).memory_s == pytest.approx(1048576 / (50e9 * 0.55))
    # an op without a matrix size (KV cache, norms) keeps efficiency.memory; so does a device without the curve
    no_size = roofline.op_time(replace(op, gemm_matrix_bytes=None), dev)
    assert no_size.memory_s == pytest.approx(1048576 / (50e9 * dev.efficiency("memory")))
    plain = _device(tmp_path, CURVE, name="u")
    assert roofline.op_time(op, plain).memory_s == pytest.approx(no_size.memory_s)
    assert all(d.gemv_bandwidth_curve is None for d in list_devices())  # the bundled catalog cites none


@pytest.mark.parametrize("old, new, field", [
    ("bytes = [262144, 4194304]", "bytes = [4194304, 262144]", "gemv_bandwidth_efficiency.bytes"),
    ("bytes = [262144, 4194304]", "bytes = [0.5, 4194304]", "gemv_bandwidth_efficiency.bytes"),
    ("bytes = [262144, 4194304]", "rows = [262144, 4194304]", "gemv_bandwidth_efficiency"),
    ("value = [0.3, 0.8]", "value = [0.3]", "gemv_bandwidth_efficiency.value"),
])
def test_bad_gemv_curve_rejected_with_file_and_field(tmp_path, old, new, field):
    with pytest.raises(CatalogError) as exc:
        _device(tmp_path, GEMV.replace(old, new))
    assert f"field '{field}" in str(exc.value) and "t.toml" in str(exc.value)


def test_costmodel_records_matrix_bytes_per_call():
    cfg = get_preset("small-v3")
    dec = {(op.layer, op.name): op for op in costmodel.decode_ops(cfg, "fp32", 1, 100)}
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    assert dec[(1, "routed_experts")].gemm_matrix_bytes == D * F * 4  # one expert matrix per call
    assert dec[(0, "q_a_proj")].gemm_matrix_bytes == D * cfg.q_lora_rank * 4
    assert dec[(None, "lm_head")].gemm_matrix_bytes == cfg.vocab_size * D * 4
    assert dec[(0, "input_layernorm")].gemm_matrix_bytes is None


def test_hw_show_prints_the_curves(tmp_path, capsys):
    from dsref.hwmodels.cli import _show_device
    dev = _device(tmp_path, CURVE + GEMV)
    _show_device(dev, as_json=False)
    out = capsys.readouterr().out
    assert "[gemm_rows_efficiency]" in out and "16: 0.4" in out and "test curve" in out
    assert "[gemv_bandwidth_efficiency]" in out and "test gemv curve" in out
    _show_device(dev, as_json=True)
    import json
    d = json.loads(capsys.readouterr().out)
    assert d["gemv_bandwidth_efficiency"]["bytes"] == [262144, 4194304]
    assert d["gemm_rows_efficiency"]["value"] == [0.05, 0.4, 0.9]
