"""`dsref plan` / sim.plan: closed forms of the per-device memory plan, the fit verdicts on real
systems, bad input as one line with exit 2, and the docs' printed plans rerun and diffed."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from dsref.experiments.cli import main
from dsref.hwmodels.catalog import load_device
from dsref.reference.mesh import MeshShape
from dsref.reference.params import EMBED, ROUTED_EXPERT, tensors
from dsref.reference.presets import get_preset
from dsref.sim.plan import (Hardware, PlanError, activation_bytes, check_mesh, meshes, plan, resolve_hardware,
                            search_meshes, shard_divisor, weight_bytes)
from dsref.sim.quant import get_quant, model_weight_bytes, tensor_bytes

DOC = Path(__file__).resolve().parent.parent / "docs" / "memory-plan.md"
V3 = get_preset("deepseek-v3")
SMALL = get_preset("small-v3")
FP8 = get_quant("fp8")


def _hw(n: int, device: str = "h200") -> Hardware:
    return Hardware("test", load_device(device), n, 1, n)


def test_mesh_of_ones_holds_the_cost_models_weight_bytes():
    for cfg, q in ((V3, FP8), (SMALL, get_quant("bf16")), (get_preset("llama-3.1-8b"), get_quant("q4_k_m"))):
        w = weight_bytes(cfg, q, MeshShape())
        assert w["per_device"] == pytest.approx(model_weight_bytes(cfg, q)["total"], rel=1e-12)
        assert w["sum_over_devices"] == pytest.approx(w["model"], rel=1e-12)
    # V3 in DeepSeek's FP8 recipe: ~671B params at ~1 byte, BF16 embedding/head/router/norms
    assert 660e9 < weight_bytes(V3, FP8, MeshShape())["per_device"] < 690e9


def test_expert_axis_divides_routed_experts_by_exactly_its_size():
    one = weight_bytes(V3, FP8, MeshShape())["groups"]
    eight = weight_bytes(V3, FP8, MeshShape(expert=8))["groups"]
    assert eight[ROUTED_EXPERT] == pytest.approx(one[ROUTED_EXPERT] / 8, rel=1e-12)
    for g in one:  # the expert axis splits nothing else (attention DP: the rest is replicated)
        if g != ROUTED_EXPERT:
            assert eight[g] == pytest.approx(one[g], rel=1e-12)


def test_data_axis_splits_no_weight():
    assert weight_bytes(V3, FP8, MeshShape(data=4, expert=2))["groups"] == \
        pytest.approx(weight_bytes(V3, FP8, MeshShape(expert=2))["groups"], rel=1e-12)


def test_a_dimension_the_tensor_axis_does_not_divide_stays_replicated():
    emb = next(t for t in tensors(SMALL) if t.name == EMBED)  # [32000, 1024] split on the vocabulary
    assert emb.spec[0] == "tensor" and SMALL.vocab_size % 3 and SMALL.vocab_size % 2 == 0
    assert shard_divisor(emb, MeshShape(tensor=3)) == 1
    assert shard_divisor(emb, MeshShape(tensor=2)) == 2
    w3 = weight_bytes(SMALL, FP8, MeshShape(tensor=3))
    full = sum(tensor_bytes(SMALL, FP8, t) for t in tensors(SMALL) if t.group == "global")
    assert w3["groups"]["global"] == pytest.approx(full)  # embedding and head replicated, not cut to 1/3


def test_sum_over_devices_is_at_least_the_model():
    for m in meshes(32, V3):
        w = weight_bytes(V3, FP8, m)
        assert w["sum_over_devices"] >= w["model"] * (1 - 1e-12)
        assert w["max_over_devices"] == w["per_device"]
    # everything split over 8 (tensor) except what is replicated: more than 1/8 of the model
    w = weight_bytes(V3, FP8, MeshShape(tensor=8))
    assert w["model"] / 8 < w["per_device"] < w["model"] / 8 * 1.02


def test_kv_cache_split_over_data_times_expert_not_tensor():
    per_tok = V3.kv_cache_bytes_per_token(FP8.kv_bytes)
    assert per_tok == 70_272
    kw = dict(batch=10, context=1000, chunk=512)
    p = plan(V3, FP8, _hw(8), MeshShape(data=2, expert=4), **kw)
    assert p.kv == math.ceil(10 / 8) * 1000 * per_tok  # 2 sequences per replica (rounded up)
    t = plan(V3, FP8, _hw(8), MeshShape(tensor=8), **kw)
    assert t.kv == 10 * 1000 * per_tok  # MLA latent: replicated over tensor
    mtp = plan(V3, FP8, _hw(8), MeshShape(expert=8), mtp=True, **kw)
    assert mtp.kv_per_token == pytest.approx(per_tok * 62 / 61)
    assert mtp.weights["groups"]["mtp"] > 0


def test_gqa_kv_cache_splits_over_tensor_when_it_divides_the_kv_heads():
    cfg = get_preset("llama-3.1-8b")  # 8 KV heads
    q = get_quant("bf16")
    base = cfg.kv_cache_bytes_per_token(2.0)
    assert plan(cfg, q, _hw(4), MeshShape(tensor=4)).kv_per_token == base / 4
    assert plan(cfg, q, _hw(3), MeshShape(tensor=3)).kv_per_token == base


def test_activation_bound_terms():
    a = activation_bytes(V3, FP8, MeshShape(expert=8), chunk=100, context=50)
    D, V = V3.hidden_size, V3.vocab_size
    assert a["residual"] == 3 * 100 * D * 4
    assert a["logits"] == 100 * V * 4
    assert a["mlp"] == (2 * 800 * D + 800 * 2 * 2048) * 2
    assert a["attention"] == (100 * 128 * 192 + 100 * 128 * 320) * 2  # context < chunk: the chunk's keys
    assert a["total"] == sum(v for k, v in a.items() if k != "total")
    t8 = activation_bytes(V3, FP8, MeshShape(tensor=8), chunk=100, context=50)
    assert t8["logits"] == a["logits"] / 8 and t8["residual"] == a["residual"]


def test_v3_fp8_fits_8x_h200_and_not_8x_h100():
    h200 = resolve_hardware("h200-node")
    assert h200.n_devices == 8 and h200.memory_bytes == 141e9
    assert plan(V3, FP8, h200, MeshShape(expert=8)).fits
    h100 = resolve_hardware("h100-node")
    # 673 GB of FP8 weights > 8 x 80 = 640 GB: no split can fit, whatever the fraction
    assert not any(p.fits for p in search_meshes(V3, FP8, h100, memory_fraction=1.0))
    assert resolve_hardware("h800-node", 2).n_devices == 16
    assert resolve_hardware("tpu-v5p-64").n_devices == 32


def test_search_enumerates_every_valid_mesh_fitting_first():
    plans = search_meshes(V3, FP8, resolve_hardware("h200-node"))
    assert len(plans) == 10  # ordered factorisations of 8 into three axes
    assert all(p.mesh.size == 8 for p in plans)
    fits = [p.fits for p in plans]
    assert fits[0] and fits == sorted(fits, reverse=True)
    assert {p.mesh for p in plans if not p.fits} >= {MeshShape(data=8)}


def test_expert_axis_must_divide_the_routed_experts():
    with pytest.raises(PlanError, match="expert=3 does not divide the 64 routed experts"):
        check_mesh(get_preset("deepseek-v2-lite"), MeshShape(expert=3, tensor=2), _hw(6))
    assert all(64 % m.expert == 0 for m in meshes(12, get_preset("deepseek-v2-lite")))


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_plan_and_search(capsys):
    rc, out, _ = _run(["plan", "--model", "deepseek-v3", "--system", "h200-node", "--mesh", "expert=8"], capsys)
    assert rc == 0 and "fits" in out and "routed_expert" in out
    rc, out, _ = _run(["plan", "--model", "deepseek-v3", "--system", "h200-node", "--search", "--json"], capsys)
    rows = json.loads(out)
    assert rc == 0 and rows and rows[0]["fits"] and rows[0]["devices"] == 8
    rc, out, _ = _run(["plan", "--model", "deepseek-v3", "--system", "h100-node", "--mesh", "tensor=8"], capsys)
    assert rc == 1 and "DOES NOT FIT" in out


V3_H200 = ["--model", "deepseek-v3", "--system", "h200-node"]


@pytest.mark.parametrize("argv, needle", [
    (V3_H200 + ["--mesh", "data=3"], "--mesh data=3: 3 devices"),
    (V3_H200 + ["--mesh", "foo=8"], "--mesh 'foo=8': unknown axis"),
    (V3_H200 + ["--mesh", "expert=8", "--search"], "--mesh and --search"),
    (V3_H200 + ["--mesh", "expert=8", "--quant", "fp7"], "--quant fp7"),
    (V3_H200, "--mesh: give a mesh"),
    (["--model", "deepseek-v3", "--system", "no-such-node", "--search"], "unknown system 'no-such-node'"),
    (["--model", "deepseek-v2", "--system", "h200-node", "--search", "--mtp"], "--mtp"),
    (["--system", "h200-node", "--search"], "--model or --config"),
    (["--model", "no-such-model", "--system", "h200-node", "--search"], "--model 'no-such-model'"),
    (["--model", "deepseek-v3", "--system", "h800-node", "--nodes", "2", "--mesh", "expert=8"], "16"),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, argv, needle):
    rc, out, err = _run(["plan", *argv], capsys)
    assert rc == 2 and not out
    assert err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("argv", [["--nodes", "0"], ["--memory-fraction", "0"], ["--memory-fraction", "1.5"],
                                  ["--batch", "-1"]])
def test_cli_bad_numbers_exit_2_naming_the_option(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "deepseek-v3", "--system", "h200-node", "--mesh", "expert=8", *argv])
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_docs_printed_plans_are_current_output(capsys):
    """Every ```text block of docs/memory-plan.md that starts with `$ dsref plan` is rerun and diffed."""
    blocks = re.findall(r"```text\n\$ dsref (plan [^\n]*)\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 3, "docs/memory-plan.md lost its printed plans"
    for cmd, want in blocks:
        main(cmd.split())
        got = capsys.readouterr().out
        assert got == want, f"docs/memory-plan.md: `dsref {cmd}` output changed; paste the new output"
