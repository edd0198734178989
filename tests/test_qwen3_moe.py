"""Qwen3-MoE (GQA + per-head q/k RMSNorm + softmax top-k MoE): config, published sizes,
the gotchas of its reference forward pass, and the simulator's handling of it.

Published figures (Hugging Face model cards, "Model Overview"):
  Qwen/Qwen3-30B-A3B: 30.5B parameters in total, 3.3B activated, 29.9B non-embedding.
  Qwen/Qwen3-235B-A22B: 235B in total, 22B activated, 234B non-embedding.
Qwen counts the input embedding among the activated parameters; this project's
``activated_params`` leaves it out (the convention that reproduces DeepSeek's 37B / 21B,
reference/params.py), so the tests add it back before comparing.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from dsref.reference import numpy_ref
from dsref.reference.config import ConfigError, ModelConfig
from dsref.reference.presets import get_preset
from dsref.sim import costmodel
from dsref.sim.llama_cpp import graph_nodes

# Qwen/Qwen3-30B-A3B config.json as published (transformers_version 4.51.0).
QWEN3_30B_JSON = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
    "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def _write(tmp_path, d):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    return p


# ---------------------------------------------------------------------- config
def test_published_config_equals_preset_and_round_trips(tmp_path):
    cfg = ModelConfig.from_json(_write(tmp_path, QWEN3_30B_JSON))
    assert cfg == get_preset("qwen3-30b-a3b")
    assert cfg.arch == "dense" and not cfg.is_mla and cfg.qk_norm and cfg.is_moe
    assert cfg.n_routed_experts == 128 and cfg.num_experts_per_tok == 8 and cfg.n_shared_experts == 0
    assert cfg.num_moe_layers == 48 and all(cfg.is_moe_layer(i) for i in range(48))
    assert cfg.dense_head_dim == 128 != cfg.hidden_size // cfg.num_attention_heads
    assert cfg.extra["router_aux_loss_coef"] == 0.001
    cfg.save(tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["model_type"] == "qwen3_moe" and out["num_experts"] == 128 and out["mlp_only_layers"] == []
    assert ModelConfig.from_json(tmp_path / "out.json") == cfg


def test_layer_placement_follows_transformers():
    # Qwen3MoeDecoderLayer: MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    cfg = get_preset("tiny-qwen3-moe").replace(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=(3,))
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert cfg.num_moe_layers == 2


def test_dense_qwen3_gets_qk_norm_and_no_experts(tmp_path):
    d = {k: v for k, v in QWEN3_30B_JSON.items() if k not in ("num_experts", "num_experts_per_tok",
                                                                  "moe_intermediate_size")}
    d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], intermediate_size=12288)
    cfg = ModelConfig.from_json(_write(tmp_path, d))
    assert cfg.qk_norm and not cfg.is_moe and cfg.num_moe_layers == 0
    assert not ModelConfig.from_json(_write(tmp_path, {**d, "model_type": "qwen2"})).qk_norm


def test_norm_topk_prob_defaults_to_transformers_false(tmp_path):
    d = {k: v for k, v in QWEN3_30B_JSON.items() if k != "norm_topk_prob"}
    assert ModelConfig.from_json(_write(tmp_path, d)).norm_topk_prob is False


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("num_experts"), "num_experts"),
    (lambda d: d.update(num_experts_per_tok=129), "num_experts_per_tok"),
    (lambda d: d.update(n_shared_experts=1), "n_shared_experts"),
    (lambda d: d.update(mlp_only_layers=[48]), "mlp_only_layers"),
    (lambda d: d.update(mlp_only_layers="0"), "mlp_only_layers"),
    (lambda d: d.update(decoder_sparse_step=0), "decoder_sparse_step"),
    (lambda d: d.update(qk_norm="yes"), "qk_norm"),
    (lambda d: d.update(head_dim=127), "head_dim"),
])
def test_bad_fields_are_named_with_the_file(tmp_path, mutate, field):
    d = json.loads(json.dumps(QWEN3_30B_JSON))
    mutate(d)
    p = _write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(p)
    assert f"'{field}'" in str(e.value) and str(p) in str(e.value)


def test_jax_model_refuses_with_a_clear_error():
    from flax import nnx

    from dsref.reference.model import DeepseekModel
    with pytest.raises(ValueError, match="implements DeepSeek"):
        DeepseekModel(get_preset("tiny-qwen3-moe"), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------- published sizes
@pytest.mark.parametrize("name,total,activated,non_embedding", [
    ("qwen3-30b-a3b", 30.5e9, 3.3e9, 29.9e9),
    ("qwen3-235b-a22b", 235e9, 22e9, 234e9),
])
def test_param_counts_match_model_cards(name, total, activated, non_embedding):
    cfg = get_preset(name)
    pc = cfg.param_counts()
    embed = cfg.vocab_size * cfg.hidden_size
    assert pc["total_params"] == pytest.approx(total, rel=0.005)
    assert pc["total_params"] - pc["embedding_params"] == pytest.approx(non_embedding, rel=0.005)
    assert pc["activated_params"] + embed == pytest.approx(activated, rel=0.02)
    # Closed form of this project's activated count: everything but 120 of 128 experts
    # per layer and the input embedding.
    D, F, L = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_hidden_layers
    idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * D * F * L
    assert pc["activated_params"] == pc["total_params"] - idle - embed


# ----------------------------------------------------------- reference gotchas
def _gqa_variant(mode):
    """numpy_ref.gqa with Qwen3's q/k norm done wrong: 'none' (left out), 'after_rope'
    (normalised after the rotation: the per-dimension weight no longer lines up) or
    'whole_vector' (RMS over all heads at once, H*head_dim, as OLMo2 does)."""
    def attn(x, w, cfg, positions, prefix):
        B, T, _ = x.shape
        H, K, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dense_head_dim
        q = numpy_ref.linear(x, w[prefix + "q_proj.weight"])
        k = numpy_ref.linear(x, w[prefix + "k_proj.weight"])
        v = numpy_ref.linear(x, w[prefix + "v_proj.weight"]).reshape(B, T, K, hd)
        qn, kn, eps = w[prefix + "q_norm.weight"], w[prefix + "k_norm.weight"], cfg.rms_norm_eps
        if mode == "whole_vector":
            q, k = numpy_ref.rms_norm(q, np.tile(qn, H), eps), numpy_ref.rms_norm(k, np.tile(kn, K), eps)
        q, k = q.reshape(B, T, H, hd), k.reshape(B, T, K, hd)
        cos, sin = numpy_ref.rope_cos_sin(cfg, positions)
        q, k = numpy_ref.apply_rope_half(q, cos, sin), numpy_ref.apply_rope_half(k, cos, sin)
        if mode == "after_rope":
            q, k = numpy_ref.rms_norm(q, qn, eps), numpy_ref.rms_norm(k, kn, eps)
        k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
        s = np.einsum("bthd,bshd->bhts", q, k) * cfg.softmax_scale
        s = np.where(np.triu(np.ones((T, T), bool), k=1), -np.inf, s)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return numpy_ref.linear(np.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * hd),
                                w[prefix + "o_proj.weight"])
    return attn


def _hf_case(cfg, seed=0):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.conftest import hf_state_to_ours
    from tests.test_parity_hf import hf_logits_and_qwen3_routing, make_hf_qwen3_moe
    hf = make_hf_qwen3_moe(cfg, seed)
    sd = {k: v.astype(np.float64) for k, v in hf_state_to_ours(hf.state_dict(), cfg).items()}
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 11))
    return hf, sd, tokens, hf_logits_and_qwen3_routing(hf, tokens)[0]


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_qk_norm_is_per_head_and_before_rope(monkeypatch):
    cfg = get_preset("tiny-qwen3-moe")
    _, sd, tokens, theirs = _hf_case(cfg)
    assert _rel(numpy_ref.forward(tokens, sd, cfg), theirs) <= 1e-5
    for mode in ("none", "after_rope", "whole_vector"):
        with monkeypatch.context() as m:
            m.setattr(numpy_ref, "gqa", _gqa_variant(mode))
            wrong = numpy_ref.forward(tokens, sd, cfg)
        assert _rel(wrong, theirs) > 1e-2, f"q/k norm '{mode}' is not caught"


def test_norm_topk_prob_changes_the_logits():
    import torch
    cfg = get_preset("tiny-qwen3-moe")
    hf, sd, tokens, on = _hf_case(cfg)
    for layer in hf.model.layers:
        layer.mlp.gate.norm_topk_prob = False
    with torch.no_grad():
        off = hf(torch.as_tensor(tokens)).logits.float().numpy()
    assert _rel(off, on) > 1e-2  # renormalising the top-k weights matters
    assert _rel(numpy_ref.forward(tokens, sd, cfg), on) <= 1e-5
    assert _rel(numpy_ref.forward(tokens, sd, cfg.replace(norm_topk_prob=False)), off) <= 1e-5


# -------------------------------------------------------------------- simulator
def test_decode_ops_of_qwen3_moe():
    cfg = get_preset("qwen3-30b-a3b")
    D, H, K, hd, L = 2048, 32, 4, 128, 48
    ops = costmodel.decode_ops(cfg, "bf16", 1, 4096)
    names = {op.name for op in ops}
    assert "qk_norm" in names and "routed_experts" in names
    assert not any(n.startswith("shared_experts") for n in names)
    qk = [op for op in ops if op.name == "qk_norm"]
    assert len(qk) == L and qk[0].flops == costmodel.RMSNORM_FLOPS_PER_ELEM * (H + K) * hd
    assert qk[0].weight_bytes == 2 * hd * 2  # q_norm + k_norm, bf16
    att = [op for op in ops if op.name == "attention"][0]
    assert att.kv_bytes_read == 4097 * 2 * K * hd * 2  # the GQA cache of one layer
    # One token touches its 8 experts: routed weight bytes = 8 x 3 x D x F x 2 per layer.
    moe = [op for op in ops if op.name == "routed_experts"]
    assert sum(op.weight_bytes for op in moe) == pytest.approx(L * 8 * 3 * D * 768 * 2, rel=1e-9)


@pytest.mark.parametrize("quant", ["bf16", "q4_k_m"])
def test_sim_local_runs(quant):
    from dsref.sim.local import estimate
    out = estimate("qwen3-30b-a3b", "h100", quant)
    assert out["fits"] and out["decode_tokens_per_s"] > 0 and out["prefill_tokens_per_s"] > 0
    assert out["kv_cache_bytes"] == pytest.approx(4096 * 98_304, rel=0.01)


def test_llama_cpp_graph_nodes():
    """build_qwen3moe = GQA without bias + q/k norm (4 nodes) + softmax MoE without the scale
    node; Llama-2 runs build_llama (sim/llama_cpp.py). Derived counts, not logged ones."""
    q = get_preset("qwen3-30b-a3b")
    assert graph_nodes(q) == 3030 and graph_nodes(get_preset("qwen3-235b-a22b")) == 5928
    assert graph_nodes(q) - graph_nodes(q.replace(qk_norm=False)) == 4 * q.num_hidden_layers
    assert graph_nodes(get_preset("llama-2-13b")) == 1286
    assert graph_nodes(get_preset("deepseek-r1")) == 5025  # the logged count still holds
