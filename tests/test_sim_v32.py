"""DeepSeek-V3.2 (DeepSeek Sparse Attention) in the cost model and the simulator: closed forms.

tiny-v32 is tiny-v3 plus an indexer of 2 heads x 16 dims, top-5 (reference/presets.py), so
contexts past the top-k are a few tokens long and every formula can be checked by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsref.hwmodels.catalog import load_device
from dsref.reference.presets import load_config
from dsref.sim import costmodel as cm
from dsref.sim import roofline
from dsref.sim.parallel import Parallelism
from dsref.sim.stepcost import RequestTable, StepCost, request, uniform

V3, V32 = load_config("tiny-v3"), load_config("tiny-v32")
FORMS = ("absorbed", "naive", "expanded_cache")


def _ops(cfg, sh, quant="bf16"):
    return cm.forward_ops(cfg, quant, sh)


def _layer0(ops, prefix=""):
    return {o.name: o for o in ops if o.layer == 0 and o.name.startswith(prefix)}


def _visible_pairs(T, prefix, topk):
    """Brute force: sum over the T causal queries of min(topk, keys visible to the query)."""
    return sum(min(topk, prefix + t) for t in range(1, T + 1))


def test_causal_excess_matches_brute_force():
    for T in (1, 2, 7, 40):
        for p in (0, 3, 4, 5, 6, 100):
            for K in (1, 5, 64):
                brute = sum(max(0, p + t - K) for t in range(1, T + 1))
                assert cm.causal_excess(T, p, K) == brute
    sh = cm.StepShape(3, 7, 2)
    assert sh.topk_excess(None) == (0.0, 0.0)
    assert sh.topk_excess(5) == (3 * cm.causal_excess(7, 2, 5), 3 * (9 - 5))


@pytest.mark.parametrize("b,t,p", [(1, 1, 0), (2, 3, 1), (3, 1, 40), (2, 9, 30)])
def test_indexer_flops_and_cache_bytes_are_the_hand_formula(b, t, p):
    c = V32
    D, Q, P = c.hidden_size, c.q_lora_rank, c.qk_rope_head_dim
    I, J, K = c.index_n_heads, c.index_head_dim, c.index_topk
    sh = cm.StepShape(b, t, p)
    M, S, Se = b * t, p + t, p + (t + 1) / 2
    ix = _layer0(_ops(c, sh), "index_")
    want = {"index_wq_b": 2 * M * Q * I * J, "index_wk": 2 * M * D * J, "index_weights_proj": 2 * M * D * I,
            "index_k_norm": 7 * M * J, "index_rope": 3 * M * (I + 1) * P,
            "index_rotate_quant": (4 + 2) * M * (I + 1) * J,   # log2(16) Hadamard stages + FP8 quantisation
            "index_scores": 2 * M * Se * I * J, "index_relu_sum": 3 * M * Se * I, "index_topk": 4 * M * Se}
    assert {n: o.flops for n, o in ix.items()} == pytest.approx(want, rel=1e-12)
    s = ix["index_scores"]
    assert (s.kv_bytes_read, s.kv_bytes_written) == (b * S * J * 2, M * J * 2)  # bf16 key cache, every key read
    assert s.precision == "bf16"  # no FP8 GEMMs in a bf16 run: the attention precision
    assert ix["index_topk"].act_bytes_written == 4 * b * _visible_pairs(t, p, K)  # int32 ids of the selection
    fp8 = _layer0(_ops(c, sh, "fp8"), "index_")
    assert fp8["index_scores"].precision == cm.INDEX_SCORE_PRECISION == "fp8"
    assert fp8["index_weights_proj"].precision == "bf16"  # unquantised in the FP8 release


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("b,t,p", [(1, 1, 0), (2, 3, 2), (3, 1, 4), (1, 5, 0)])
def test_within_topk_everything_but_the_indexer_is_v3_exactly(form, b, t, p):
    """S = p + t <= index_topk (5): the selection is every key, so each op of V3 is unchanged."""
    sh = cm.StepShape(b, t, p, mla_form=form)
    a = [(o.name, o.layer, o.flops, o.bytes, o.precision) for o in _ops(V3, sh)]
    c = [(o.name, o.layer, o.flops, o.bytes, o.precision) for o in _ops(V32, sh) if not o.name.startswith("index_")]
    assert a == c
    assert len(_ops(V32, sh)) == len(a) + 9 * V32.num_hidden_layers


def test_decode_attention_grows_with_topk_the_indexer_with_context():
    c, B = V32, 4
    H, R, P, K, J = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.index_topk, c.index_head_dim
    at = {}
    for ctx in (50, 500):
        ops = _layer0(cm.decode_ops(c, "bf16", B, ctx))
        at[ctx] = ops
        mla = ops["mla_attention"]
        assert mla.flops == 2.0 * B * H * K * (R + P) + 2.0 * B * H * K * R
        assert mla.kv_bytes_read == B * K * (R + P) * 2
        assert ops["softmax"].flops == B * H * K * cm.SOFTMAX_FLOPS_PER_ELEM
    assert at[50]["mla_attention"].flops == at[500]["mla_attention"].flops
    assert at[500]["index_scores"].flops / at[50]["index_scores"].flops == pytest.approx(501 / 51)
    assert at[500]["index_scores"].kv_bytes_read == B * 501 * J * 2
    # V3 (no index fields): dense attention over every key
    v3 = _layer0(cm.decode_ops(V3, "bf16", B, 500))
    assert v3["mla_attention"].flops == 2.0 * B * H * 501 * (R + P) + 2.0 * B * H * 501 * R
    assert not any(n.startswith("index_") for n in v3)


def test_sparse_prefill_counts_each_querys_selection():
    c, b, t, p = V32, 2, 9, 3
    H, R, P, K = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.index_topk
    ops = _layer0(_ops(c, cm.StepShape(b, t, p, mla_form="absorbed")))
    pairs = b * _visible_pairs(t, p, K)
    assert ops["mla_attention"].flops == pytest.approx(2.0 * H * pairs * (2 * R + P), rel=1e-12)
    assert ops["mla_attention"].kv_bytes_read == b * K * (R + P) * 2   # min(top-k, S) latent rows per sequence
    naive = _layer0(_ops(c, cm.StepShape(b, t, p, mla_form="naive")))   # masked MHA: dense + the indexer
    dense = _layer0(_ops(V3, cm.StepShape(b, t, p, mla_form="naive")))
    assert naive["attention"].flops == dense["attention"].flops


def test_stepcost_reproduces_the_cost_model_past_the_topk():
    """The affine step-cost features (two extra columns past the top-k) are exact for V3.2."""
    dev = load_device("h800")
    for form, logits in (("absorbed", "all"), ("absorbed", "last"), ("naive", "last")):
        sc = StepCost(V32, "fp8", dev, Parallelism(), mla_form=form, logits=logits, kernel_floors=False)
        for b, t, p in ((1, 1, 0), (3, 1, 2), (2, 4, 3), (1, 30, 0), (5, 2, 700), (2, 64, 1000)):
            ops = cm.forward_ops(V32, "fp8", cm.StepShape(b, t, p, logits=logits, mla_form=form))
            ref = roofline.step_time(ops, dev).time_s
            assert sc.compute_s(uniform(b, t, p, V32.index_topk), b * t) == pytest.approx(ref, rel=1e-9)


def test_request_features_sum_with_topk():
    K = 5
    a, b = request(3, 1, K), request(7, 20, K)
    tab = RequestTable(np.array([3.0, 7.0]), np.array([1.0, 20.0]), K)
    assert tab.span(0, 2) == a + b
    assert uniform(3, 4, 6, K) == request(4, 6, K) + request(4, 6, K) + request(4, 6, K)
    assert request(3, 1) == request(3, 1, None) and request(3, 1).pair_excess == 0.0
    assert len(uniform(1, 1, 1).vector()) == 5 and len(uniform(1, 1, 1, K).sparse_vector()) == 7


def test_kv_capacity_counts_the_indexer_keys_once():
    from dsref.sim import scenario
    from dsref.sim.deployment import resolve
    over = {"model": "deepseek-v3.2", "system": "h800-node", "prefill": {"instances": 1}, "decode": {"instances": 1}}
    dep = resolve(scenario.load("deepseek-day6", over))
    c = dep.cfg
    per_layer = c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim
    kv = dep.capacity["decode"]["kv_bytes_per_token"]
    assert kv == per_layer * c.num_hidden_layers * dep.quant.kv_bytes / dep.par["decode"].pp
    assert set(dep.step_costs("prefill")) >= {"prefill", "prefill_mha"}


def test_cli_local_and_serve_accept_v32(capsys):
    from dsref.experiments.cli import main
    assert main(["sim", "local", "--model", "deepseek-v3.2", "--device", "h200-node", "--quant", "fp8",
                 "--context", "65536", "--batch", "4", "--prompt-tokens", "8192", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    c = load_config("deepseek-v3.2")
    assert r["fits"] and r["kv_cache_bytes"] == c.kv_cache_bytes_per_token(2.0) * 65536 * 4
    assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    assert main(["sim", "local", "--model", "deepseek-v3", "--device", "h200-node", "--quant", "fp8",
                 "--context", "65536", "--batch", "4", "--prompt-tokens", "8192", "--json"]) == 0
    v3 = json.loads(capsys.readouterr().out)
    assert r["decode_kv_bytes_per_step"] < 0.5 * v3["decode_kv_bytes_per_step"]  # 64K keys vs top-2048 + indexer
    assert main(["sim", "serve", "--scenario", "deepseek-day6", "--model", "deepseek-v3.2", "--duration", "3",
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["model"] == "deepseek-v3.2" and s["output_tokens_per_s_per_device"] > 0


def test_whatif_v32_fast_path(tmp_path):
    from dsref.experiments import whatif_v32
    res = whatif_v32.main(str(tmp_path), fast=True)
    assert (tmp_path / "whatif-v32-sparse-attention.md").is_file()
    assert (tmp_path / "img" / "whatif_v32_cost.png").stat().st_size > 0
    short, long_ = res["rows"][0], res["rows"][-1]
    assert long_["context"] == 131072 and long_["prefill_ratio"] < 0.5 and long_["decode_ratio"] < 1.0
    assert short["prefill_ratio"] > 1.0   # 4K: the indexer costs more than the sparse attention saves
    text = (tmp_path / "whatif-v32-sparse-attention.md").read_text()
    assert f"{long_['prefill_ratio']:.2f}" in text
