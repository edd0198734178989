"""Parity with Hugging Face transformers (the independent implementation).

Small random models in adversarial configurations (DeepSeek through the JAX model and the
float64 NumPy reference; Qwen3-MoE through the NumPy reference); float32 logits must agree to
max|ours - theirs| / max|theirs| <= 1e-5, and the selected experts must be the
same set on every token of every MoE layer.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from dsref.reference import numpy_ref  # noqa: E402
from dsref.reference.config import RopeScaling  # noqa: E402
from dsref.reference.model import DeepseekModel, forward, jit_forward  # noqa: E402
from dsref.reference.presets import get_preset  # noqa: E402
from tests.conftest import hf_state_to_ours, make_hf_model, randomize_hf  # noqa: E402

YARN = RopeScaling(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
                   mscale=1.0, mscale_all_dim=1.0)

# name -> (preset, overrides): each line targets a feature that engines get wrong.
CASES = {
    "v3-qlora-yarn-groups": ("tiny-v3", dict(rope_scaling=YARN)),
    "v3-no-qlora-no-yarn-dense0": ("tiny-v3", dict(q_lora_rank=None, rope_scaling=None, first_k_dense_replace=0)),
    "v3-ungrouped-unnormalised": ("tiny-v3", dict(n_group=1, topk_group=1, norm_topk_prob=False,
                                                  routed_scaling_factor=1.7)),
    "v3-yarn-mscale-differs": ("tiny-v3", dict(rope_scaling=RopeScaling(
        factor=8.0, original_max_position_embeddings=16, beta_fast=16.0, beta_slow=2.0, mscale=0.8,
        mscale_all_dim=1.2))),
    "v3-dense-first-2-groups-8": ("tiny-v3", dict(first_k_dense_replace=2, num_hidden_layers=4, n_group=8,
                                                 topk_group=3, num_experts_per_tok=3)),
    "v2-group-limited-softmax": ("tiny-v2", {}),
    "v2-lite-greedy-no-qlora": ("tiny-v2-lite", {}),
    # rms_norm_eps applies to the layer norms only: q_a/kv_a_layernorm keep the default 1e-6
    "v3-norm-eps-not-default": ("tiny-v3", dict(rms_norm_eps=0.1)),
    # config.json's rope_interleave false: MLA's rotary part in half-split pairs (i, i + P/2)
    "v3-rope-half-split-yarn": ("tiny-v3", dict(rope_interleave=False, rope_scaling=YARN)),
}


def _ours(cfg, sd):
    from flax import nnx
    return DeepseekModel(cfg, rngs=nnx.Rngs(0)).load_hf(sd)


def _logits_and_routing(hf_model, tokens, is_router):
    """Logits and, per MoE layer whose ``layer.mlp`` passes ``is_router``, the selected expert ids
    (forward hooks on the routers; their third output is the top-k index tensor)."""
    got, hooks = {}, []
    for i, layer in enumerate(hf_model.model.layers):
        if is_router(layer.mlp):
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda m, a, out, i=i: got.__setitem__(i, out[2].numpy())))
    with torch.no_grad():
        logits = hf_model(torch.as_tensor(tokens)).logits.float().numpy()
    for h in hooks:
        h.remove()
    return logits, got


def _deepseek_router(mlp) -> bool:
    gate = getattr(mlp, "gate", None)
    return gate is not None and (hasattr(gate, "e_score_correction_bias") or hasattr(gate, "topk_method"))


def _hf_routing(hf_model, tokens):
    """Logits and selected expert ids per MoE layer of a DeepSeek model."""
    return _logits_and_routing(hf_model, tokens, _deepseek_router)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_routing_match_transformers(case, seed):
    preset, over = CASES[case]
    cfg = get_preset(preset).replace(**over)
    hf = make_hf_model(cfg, seed)
    sd = hf_state_to_ours(hf.state_dict(), cfg)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 13))
    theirs, hf_ids = _hf_routing(hf, tokens)
    model = _ours(cfg, sd)
    for form in ("absorbed", "naive"):
        ours = np.asarray(jit_forward(model, tokens, form))
        rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
        assert rel <= 1e-5, f"{case} seed {seed} {form}: rel err {rel:.2e}"
    cap = {}
    forward(model, tokens, capture=cap)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert sorted(hf_ids) == moe_layers
    for i in moe_layers:
        ours_ids = np.sort(np.asarray(cap[f"layers.{i}.topk_ids"]).reshape(-1, cfg.num_experts_per_tok), -1)
        assert np.array_equal(ours_ids, np.sort(hf_ids[i], -1)), f"layer {i}: expert sets differ"
    # The float64 ground truth agrees with both.
    ref = numpy_ref.forward(tokens, {k: v.astype(np.float64) for k, v in sd.items()}, cfg)
    assert np.abs(ref - theirs).max() / np.abs(ref).max() <= 1e-5


def test_bias_changes_selection_but_not_weights():
    """The adversarial weights really exercise the bias: selection with and without it differ."""
    cfg = get_preset("tiny-v3")
    hf = make_hf_model(cfg, 0)
    sd = hf_state_to_ours(hf.state_dict(), cfg)
    x = np.random.default_rng(0).normal(size=(64, cfg.hidden_size))
    p = "model.layers.1.mlp."
    _, ids_b, _ = numpy_ref.gate(x, sd, cfg, p)
    nobias = dict(sd)
    nobias[p + "gate.e_score_correction_bias"] = np.zeros_like(sd[p + "gate.e_score_correction_bias"])
    _, ids_0, _ = numpy_ref.gate(x, nobias, cfg, p)
    assert (np.sort(ids_b, -1) != np.sort(ids_0, -1)).any(axis=-1).mean() > 0.2


# ------------------------------------------------------------------ Qwen3-MoE
# GQA + per-head q/k RMSNorm + softmax top-k MoE: the float64 NumPy reference only (the JAX
# model implements DeepSeek). Each case targets a gotcha: head_dim != hidden/heads, GQA 2:1,
# norm_topk_prob off, HF's (i + 1) % decoder_sparse_step placement with mlp_only_layers
# (dense layers of intermediate_size in between), top-1 with renormalisation (weight 1).
QWEN3_CASES = {
    "qwen3-moe-base": {},
    "qwen3-moe-unnormalised": dict(norm_topk_prob=False),
    "qwen3-moe-sparse-step-2-mlp-only-0": dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=(3,)),
    "qwen3-moe-top1-mha": dict(num_experts_per_tok=1, num_key_value_heads=4),
}


def make_hf_qwen3_moe(cfg, seed: int):
    """transformers' Qwen3MoeForCausalLM with cfg's shapes and adversarial random weights."""
    import transformers
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen3MoeConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    return randomize_hf(transformers.Qwen3MoeForCausalLM(hf_cfg).eval(), seed)


def hf_logits_and_qwen3_routing(hf_model, tokens):
    """Logits and, per MoE layer, the selected expert ids (hooks on Qwen3MoeTopKRouter)."""
    return _logits_and_routing(hf_model, tokens, lambda mlp: hasattr(mlp, "experts"))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(QWEN3_CASES))
def test_qwen3_moe_numpy_reference_matches_transformers(case, seed):
    cfg = get_preset("tiny-qwen3-moe").replace(**QWEN3_CASES[case])
    hf = make_hf_qwen3_moe(cfg, seed)
    sd = hf_state_to_ours(hf.state_dict(), cfg)
    # The tensor table (reference/params.py) is exactly what transformers builds.
    from dsref.reference.params import tensors
    assert {t.name: t.shape for t in tensors(cfg)} == {k: v.shape for k, v in sd.items()}
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 13))
    theirs, hf_ids = hf_logits_and_qwen3_routing(hf, tokens)
    cap = {}
    ours = numpy_ref.forward(tokens, {k: v.astype(np.float64) for k, v in sd.items()}, cfg, capture=cap)
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= 1e-5, f"{case} seed {seed}: rel err {rel:.2e}"
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert sorted(hf_ids) == moe_layers and moe_layers
    for i in moe_layers:
        ours_ids = np.sort(cap[f"layers.{i}.topk_ids"].reshape(-1, cfg.num_experts_per_tok), -1)
        assert np.array_equal(ours_ids, np.sort(hf_ids[i], -1)), f"layer {i}: expert sets differ"
