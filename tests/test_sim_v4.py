"""DeepSeek-V4 in the cost model (sim/costmodel_v4.py) and `dsref sim local`: each op's FLOPs and
bytes against the hand formula on a tiny V4, cache bytes against `dsref info`'s per-token figures,
weights against the release layout of reference/params_v4.py."""

import json
import subprocess
import sys

import pytest

from dsref.reference.cli import info_dict_v4
from dsref.reference.config_v4 import CSA, HCA, SLIDING
from dsref.reference.params_v4 import release_bytes, tensors
from dsref.reference.presets import get_preset
from dsref.sim import costmodel, costmodel_v4 as c4
from dsref.sim.local import estimate, estimate_v4
from dsref.sim.quant import get_quant

Q = get_quant("fp8")


@pytest.fixture(scope="module")
def tiny():
    # tiny-v4 with an expert width that has an FP4 release layout (a multiple of 32 inputs)
    return get_preset("tiny-v4").replace(moe_intermediate_size=32)


def _op(ops, name, layer):
    (op,) = [o for o in ops if o.name == name and o.layer == layer]
    return op


def test_release_bytes_one_source(tiny):
    for cfg in (tiny, get_preset("deepseek-v4-flash")):
        rows = sum(c4.release_row_bytes(t, cfg.n_routed_experts) for t in tensors(cfg, mtp=True))
        assert rows == release_bytes(cfg)
    # FP4 expert: 0.5 byte per weight + one scale byte per 32 inputs
    D, F, E = tiny.hidden_size, tiny.moe_intermediate_size, tiny.n_routed_experts
    (t,) = [t for t in tensors(tiny) if t.layer == 0 and t.rel == "mlp.experts.down_proj"]
    assert c4.release_row_bytes(t, E) == E * (D * F / 2 + D * F / 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        c4.weight_bytes(get_preset("tiny-v4"))  # expert width 24


def test_pair_sums_match_brute_force():
    for P, T, W, m, K in ((0, 1, 6, 4, 3), (5, 17, 6, 4, 3), (100, 1, 128, 4, 2), (3, 40, 6, 8, 100), (63, 9, 4, 4, 5)):
        assert c4.window_pairs(P, T, W) == sum(min(W, p + 1) for p in range(P, P + T))
        assert c4.entry_pairs(P, T, m) == sum((p + 1) // m for p in range(P, P + T))
        assert c4.entry_pairs(P, T, m, K) == sum(min(K, (p + 1) // m) for p in range(P, P + T))


def test_decode_ops_hand_formulas(tiny):
    c = tiny
    B, S = 3, 50                      # the new token at position 50: 51 // 4 = 12 CSA entries > top-3
    ops = c4.decode_ops(c, Q, B, S)
    D, H, d, Qr, g, dg = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank, c.o_groups, c.o_lora_rank
    I, J, K, W, n = c.index_n_heads, c.index_head_dim, c.index_topk, c.sliding_window, c.hc_mult
    M = B
    assert _op(ops, "q_b_proj", 1).flops == 2 * M * Qr * H * d
    assert _op(ops, "o_a_proj", 1).flops == 2 * M * H * d * dg       # g blocks of H*d/g -> d_g
    assert _op(ops, "o_b_proj", 1).flops == 2 * M * g * dg * D
    assert _op(ops, "compressor_kv_proj", 1).flops == 2 * M * D * 2 * d   # CSA: two overlapping series
    assert _op(ops, "compressor_kv_proj", 2).flops == 2 * M * D * d       # HCA: one
    nc, nh = (S + 1) // 4, (S + 1) // 8
    assert _op(ops, "index_scores", 1).flops == 2 * B * nc * I * J
    assert _op(ops, "index_scores", 1).kv_bytes_read == B * nc * J * Q.kv_bytes
    # attention: window W + top-K entries (CSA) / all entries (HCA) / window only; K = V, d dims each
    assert _op(ops, "attention", 1).flops == 2 * 2 * B * H * (W + K) * d
    assert _op(ops, "attention", 2).flops == 2 * 2 * B * H * (W + nh) * d
    assert _op(ops, "attention", 0).flops == 2 * 2 * B * H * W * d
    # hyper-connections: mixing matmul and the stream update
    assert _op(ops, "attn_hc_fn", 0).flops == 2 * M * n * D * (2 + n) * n
    assert _op(ops, "attn_hc_post", 0).flops == M * n * (2 * n + 1) * D
    assert _op(ops, "attn_hc_post", 0).act_bytes_written == M * n * D * Q.act_bytes
    # hash layer 0 reads k int64 ids per token; layer 2 routes by the biased scores
    assert _op(ops, "router_hash", 0).weight_bytes == M * c.num_experts_per_tok * 8
    assert not [o for o in ops if o.name == "router_hash" and o.layer == 2]
    re = _op(ops, "routed_experts", 2)
    assert re.flops == M * c.num_experts_per_tok * 3 * 2 * D * c.moe_intermediate_size
    per_expert = 3 * (D * c.moe_intermediate_size / 2 + D * c.moe_intermediate_size / 32)
    assert re.weight_bytes <= min(c.n_routed_experts, M * c.num_experts_per_tok) * per_expert + 1e-6
    assert re.weight_bytes >= per_expert * c.num_experts_per_tok


def test_decode_kv_read_matches_info_per_token(tiny):
    for cfg in (tiny, get_preset("deepseek-v4-flash")):
        info = info_dict_v4(cfg)
        per = info["kv_cache_bytes_per_token_by_layer_type"]
        window_per_layer = info["kv_window_bytes_per_sequence"] / cfg.num_hidden_layers
        m, mh = cfg.compress_rate_csa, cfg.compress_rate_hca
        # a context whose CSA entries stay within the top-k: every entry and key is read
        S = min(cfg.index_topk * m - 2, 4000)
        nc, nh = (S + 1) // m, (S + 1) // mh
        got = c4.decode_kv_read_by_type(cfg, 2.0, S)
        assert got[SLIDING] == window_per_layer
        assert got[CSA] == pytest.approx(window_per_layer + per[CSA] * m * nc)
        assert got[HCA] == pytest.approx(window_per_layer + per[HCA] * mh * nh)
        # the op list reads exactly that, layer by layer (attention + indexer cache reads)
        ops = c4.decode_ops(cfg, "fp8", 2, S)
        for i in range(cfg.num_hidden_layers):
            r = sum(o.kv_bytes_read for o in ops if o.layer == i)
            assert r == pytest.approx(2 * got[cfg.layer_type(i)])
    # past the top-k a CSA layer reads K entries but every indexer key
    c = tiny
    S = 400
    got = c4.decode_kv_read_by_type(c, 2.0, S)
    assert got[CSA] == c.sliding_window * c.head_dim * 2 + (c.index_topk * c.head_dim + (S + 1) // 4 * c.index_head_dim) * 2


def test_kv_cache_bytes_matches_info(tiny):
    cfg = get_preset("deepseek-v4-pro")
    L = 1 << 20   # a multiple of both rates: the per-token figure times the context, plus the windows
    info = info_dict_v4(cfg)
    assert c4.kv_cache_bytes(cfg, 2.0, L) == pytest.approx(info["kv_cache_bytes_per_token"] * L
                                                          + info["kv_window_bytes_per_sequence"])


def test_prefill_counts_and_flash_only(tiny):
    c = tiny
    ops = c4.prefill_ops(c, Q, 2, 20)
    # queries 0..19: window keys sum min(6, p+1), HCA entries sum (p+1)//8
    W = c.sliding_window
    pairs = sum(min(W, p + 1) + (p + 1) // 8 for p in range(20))
    assert _op(ops, "attention", 2).flops == 2 * 2 * 2 * c.num_attention_heads * pairs * c.head_dim
    assert _op(ops, "lm_head", None).flops == 2 * 2 * c.hidden_size * c.vocab_size   # last token only
    with pytest.raises(ValueError, match="attn_impl"):
        c4.forward_ops(c, Q, costmodel.StepShape(1, 4, 0, attn_impl="masked"))


def test_estimate_v4_flash_and_pro():
    r = estimate("deepseek-v4-flash", "b200", "fp8", context=8192, batch=4)
    assert r["fits"] and r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    # memory-bound decode: the step cannot beat the bytes it moves at the catalog bandwidth
    assert r["decode_step_s"] >= r["decode_bytes_per_step"] / 8e12
    assert r["weights_bytes"] == c4.weight_bytes(get_preset("deepseek-v4-flash"))["total"]
    pro = estimate_v4(get_preset("deepseek-v4-pro"), "b200-node", "fp8", context=131072, batch=2)
    assert pro["fits"] and pro["decode_tokens_per_s"] > 0
    small = estimate("deepseek-v4-pro", "h20", "fp8")
    assert not small["fits"] and small["decode_tokens_per_s"] is None


def test_v4_bad_inputs():
    with pytest.raises(ValueError, match="quant bf16"):
        estimate("deepseek-v4-flash", "b200", "bf16")
    with pytest.raises(ValueError, match="offload"):
        estimate("deepseek-v4-flash", "b200", "fp8", offload="experts")


def test_cli_sim_local_v4_json():
    out = subprocess.run([sys.executable, "-m", "dsref.experiments.cli", "sim", "local", "--model",
                          "deepseek-v4-flash", "--device", "b200", "--context", "8192", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["quant"] == "fp8" and d["fits"] and d["decode_tokens_per_s"] > 0


def test_whatif_v4_decode_cells():
    from dsref.experiments import whatif_v4 as w
    r = w.decode_at("deepseek-v4-flash", "h800-node", 8192)
    assert 1 <= r["batch_per_device"] <= w.MAX_BATCH_PER_DEVICE
    assert r["chip_s_per_token"] == pytest.approx(r["step_s"] / r["batch_per_device"])
    assert r["step_s"] <= 1 / w.SLO_TOKENS_PER_S
    # V3 supports 160K tokens: no 1M cell; V4's cache per sequence is the config's, windows included
    assert w.decode_at("deepseek-v3", "h800-node", 1 << 20)["chip_s_per_token"] is None
    assert w.kv_per_sequence("deepseek-v4-pro", 1 << 20) == c4.kv_cache_bytes(get_preset("deepseek-v4-pro"), 2.0, 1 << 20)
