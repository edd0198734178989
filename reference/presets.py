"""Named model configurations, transcribed from the published config.json files.

Sources: the config.json of each Hugging Face repository
(deepseek-ai/DeepSeek-V3, deepseek-ai/DeepSeek-V2, deepseek-ai/DeepSeek-V2-Lite,
moonshotai/Moonlight-16B-A3B, moonshotai/Kimi-K2-Instruct, Qwen/Qwen2.5-*,
meta-llama/Llama-3.*, Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B, meta-llama/Llama-2-13b-hf).
Small presets ("tiny-*", "small-*") exist for tests and benchmarks; they exercise
the same code paths (groups, YaRN, dense-first-k, qk-norm + softmax top-k MoE).

Qwen3-MoE (docs/models.md): Qwen/Qwen3-30B-A3B config.json (transformers 4.51.0):
hidden 2048, 48 layers, 32 heads, 4 kv heads, head_dim 128, 128 experts, top-8,
moe_intermediate 768, norm_topk_prob true, decoder_sparse_step 1, mlp_only_layers [],
vocab 151936, rope_theta 1e6, rms_norm_eps 1e-6, max_position 40960, untied.
Qwen/Qwen3-235B-A22B: hidden 4096, 94 layers, 64 heads, 4 kv heads, head_dim 128,
128 experts, top-8, moe_intermediate 1536, intermediate 12288 (unused: no dense
layer), otherwise as 30B-A3B. Llama-2-13B (meta-llama/Llama-2-13b-hf config.json):
hidden 5120, 40 layers, 40 heads = 40 kv heads (MHA), intermediate 13824,
vocab 32000, rope_theta 1e4, rms_norm_eps 1e-5, max_position 4096, untied.

DeepSeek-V3.2 (docs/models.md): deepseek-ai/DeepSeek-V3.2 config.json (model_type deepseek_v32,
transformers_version 4.44.2), as dumped with the checkpoint's tensor list in a public model report
(index id 62736905881 of the code search; the dump gives 685,396,921,376 stored values over
92,425 tensors, which tests/test_dsa.py reproduces): DeepSeek-V3's fields unchanged (same YaRN,
same 61 layers, 1 MTP module) plus index_n_heads 64, index_head_dim 128, index_topk 2048.
DeepSeek-V3.2-Exp: deepseek-ai/DeepSeek-V3.2-Exp on GitHub, inference/config_671B_v3.2.json
(commit 3b99a53; read): the same architecture in the inference code's names (dim 7168, n_layers 61,
n_dense_layers 3, 128 heads, q_lora 1536, kv_lora 512, 64 rope dims, index_n_heads 64,
index_head_dim 128, index_topk 2048, YaRN defaults of its ModelArgs: factor 40 from 4096,
beta 32/1, mscale 1). Its Hugging Face config.json was not found in a stored copy; the fields
only that file carries (rms_norm_eps, max_position_embeddings, num_nextn_predict_layers,
mscale_all_dim) are taken equal to V3.2's (assumption, medium confidence: every field the two
sources both carry agrees, and both models load in transformers as the same DeepseekV32 class).

DeepSeek-V4 (reference/config_v4.py, docs/models.md "DeepSeek-V4"): ModelConfigV4 presets, kept
out of preset_names() (whose every entry is a ModelConfig; all_preset_names() lists both).
  * deepseek-v4-pro: deepseek-ai/DeepSeek-V4-Pro config.json as dumped with the checkpoint's tensor
    list in a public model report (code-search index id 62968290951: "DeepSeek-V4-Pro" config.json,
    64 safetensors files, 145,116 tensors, 861,608,274,846 stored values; tests/test_config_v4.py
    reproduces both counts from the tensor table). High confidence: every field below is in it.
  * deepseek-v4-flash: deepseek-ai/DeepSeek-V4-Flash config.json. The stored copies found are of the
    -0731 re-release (code-search index id 59258988294, "OFFICIAL_CONFIG", with DSpark fields) and a
    test that states the base release differs from it only by those fields and by 44 rather than 46
    compress_ratios (id 58039819897); a vLLM test's copy (id 66905242583) agrees field by field.
    Medium-high confidence; no tensor dump of Flash was found to check against.
  * tiny-v4: ours, adversarial (see the entry).
"""

from __future__ import annotations

from dsref.reference.config import ConfigError, ModelConfig, RopeScaling
from dsref.reference.config_v4 import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfigV4

_V3_YARN = RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                       beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
_V2_YARN = RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                       beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)


def _v3(**kw) -> ModelConfig:
    return ModelConfig(**kw)


def _v32(**kw) -> ModelConfig:
    """DeepSeek-V3.2(-Exp): DeepSeek-V3 plus the lightning indexer (64 heads of 128, top-2048)."""
    base = dict(index_n_heads=64, index_head_dim=128, index_topk=2048)
    base.update(kw)
    return _PRESETS["deepseek-v3"]().replace(**base)


def _v2(**kw) -> ModelConfig:
    base = dict(topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
                rope_scaling=_V2_YARN, rms_norm_eps=1e-6)
    base.update(kw)
    return ModelConfig(**base)


def _dense(**kw) -> ModelConfig:
    base = dict(arch="dense", n_routed_experts=0, n_shared_experts=0, q_lora_rank=None,
                rope_scaling=None, tie_word_embeddings=False, num_nextn_predict_layers=0)
    base.update(kw)
    base.setdefault("first_k_dense_replace", base["num_hidden_layers"])
    cfg = ModelConfig(**base)
    cfg.validate(f"preset {cfg.name}")
    return cfg


def _qwen(**kw):
    return _dense(attention_bias=True, rope_theta=1e6, vocab_size=152064, head_dim=128,
                  num_key_value_heads=8, rms_norm_eps=1e-6, max_position_embeddings=32768, **kw)


def _qwen3_moe(**kw):
    """Qwen3-MoE: GQA with per-head q/k RMSNorm, every layer a 128-expert top-8 MoE."""
    base = dict(qk_norm=True, attention_bias=False, rope_theta=1e6, vocab_size=151936, head_dim=128,
                num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=40960,
                n_routed_experts=128, num_experts_per_tok=8, norm_topk_prob=True, scoring_func="softmax",
                topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                decoder_sparse_step=1, mlp_only_layers=(), first_k_dense_replace=0)
    base.update(kw)
    return _dense(**base)


def _llama(**kw):
    base = dict(rope_theta=500000.0, vocab_size=128256, head_dim=128, num_key_value_heads=8,
                rms_norm_eps=1e-5, max_position_embeddings=131072)
    base.update(kw)
    return _dense(**base)


_PRESETS = {
    "deepseek-v3": lambda: _v3(
        name="deepseek-v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_theta=10000.0, rope_scaling=_V3_YARN,
        max_position_embeddings=163840, rms_norm_eps=1e-6, num_nextn_predict_layers=1),
    "deepseek-v2": lambda: _v2(
        name="deepseek-v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, first_k_dense_replace=1,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
        routed_scaling_factor=16.0, max_position_embeddings=163840),
    "deepseek-v2-lite": lambda: _v2(
        name="deepseek-v2-lite", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
        routed_scaling_factor=1.0, max_position_embeddings=163840),
    "moonlight-16b-a3b": lambda: _v3(
        name="moonlight-16b-a3b", vocab_size=163840, hidden_size=2048, intermediate_size=11264,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=2.446, rope_theta=50000.0, rope_scaling=None,
        max_position_embeddings=8192, rms_norm_eps=1e-5, num_nextn_predict_layers=0),
    "kimi-k2": lambda: _v3(
        name="kimi-k2", vocab_size=163840, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=1,
        num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384,
        n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
        routed_scaling_factor=2.827, rope_theta=50000.0,
        rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=4096, beta_fast=1.0,
                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=131072, rms_norm_eps=1e-6, num_nextn_predict_layers=0),
    "deepseek-v3.2": lambda: _v32(name="deepseek-v3.2"),
    "deepseek-v3.2-exp": lambda: _v32(name="deepseek-v3.2-exp"),
    # ---- dense GQA comparison models (simulator and published comparisons)
    "qwen2.5-14b": lambda: _qwen(name="qwen2.5-14b", hidden_size=5120, intermediate_size=13824,
                                 num_hidden_layers=48, num_attention_heads=40),
    "qwen2.5-72b": lambda: _qwen(name="qwen2.5-72b", hidden_size=8192, intermediate_size=29568,
                                 num_hidden_layers=80, num_attention_heads=64),
    "llama-3.2-3b": lambda: _llama(name="llama-3.2-3b", hidden_size=3072, intermediate_size=8192,
                                   num_hidden_layers=28, num_attention_heads=24,
                                   tie_word_embeddings=True),
    "llama-3.1-8b": lambda: _llama(name="llama-3.1-8b", hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32),
    "llama-3.1-70b": lambda: _llama(name="llama-3.1-70b", hidden_size=8192, intermediate_size=28672,
                                    num_hidden_layers=80, num_attention_heads=64),
    "llama-3.1-405b": lambda: _llama(name="llama-3.1-405b", hidden_size=16384,
                                     intermediate_size=53248, num_hidden_layers=126,
                                     num_attention_heads=128),
    "llama-2-13b": lambda: _llama(name="llama-2-13b", hidden_size=5120, intermediate_size=13824,
                                  num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                                  head_dim=None, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5,
                                  max_position_embeddings=4096),
    # ---- GQA + MoE (Qwen3-MoE): NumPy reference and simulator only
    "qwen3-30b-a3b": lambda: _qwen3_moe(name="qwen3-30b-a3b", hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48,
                                        num_attention_heads=32),
    "qwen3-235b-a22b": lambda: _qwen3_moe(name="qwen3-235b-a22b", hidden_size=4096,
                                          intermediate_size=12288, moe_intermediate_size=1536,
                                          num_hidden_layers=94, num_attention_heads=64),
    # ---- small presets for tests and benchmarks (same code paths as the real ones)
    # Qwen3-MoE in miniature: head_dim != hidden/heads, GQA 2:1, 16 experts top-4.
    "tiny-qwen3-moe": lambda: _qwen3_moe(
        name="tiny-qwen3-moe", vocab_size=256, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, n_routed_experts=16, num_experts_per_tok=4, rope_theta=10000.0,
        max_position_embeddings=128),
    "tiny-v3": lambda: _v3(
        name="tiny-v3", vocab_size=256, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, rope_scaling=RopeScaling(
            factor=4.0, original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0,
            mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=128, num_nextn_predict_layers=1),
    "tiny-v2": lambda: _v2(
        name="tiny-v2", vocab_size=256, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=3, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
        n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
        routed_scaling_factor=1.5, rope_scaling=RopeScaling(
            factor=4.0, original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0,
            mscale=0.707, mscale_all_dim=0.707), max_position_embeddings=128),
    "tiny-v2-lite": lambda: _v2(
        name="tiny-v2-lite", vocab_size=256, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1, topk_method="greedy",
        routed_scaling_factor=1.0, max_position_embeddings=128),
    # V3.2 in miniature, adversarial for the indexer: 2 indexer heads (relu zeroes both for many
    # (query, key) pairs, so exact score ties happen), index_topk 5 below the tests' sequence
    # lengths (the top-k really drops keys), index_head_dim 16 > qk_rope_head_dim 8 (rotated and
    # unrotated dims both present; a power of two, as DeepSeek's Hadamard rotation of q and k
    # needs), YaRN as in tiny-v3.
    "tiny-v32": lambda: _PRESETS["tiny-v3"]().replace(
        name="tiny-v32", index_n_heads=2, index_head_dim=16, index_topk=5),
    # ~10M parameters (+2M MTP), V3-shaped: the model `dsref train` trains on a laptop CPU in
    # minutes (docs/training.md); a byte-level BPE of 8,192 ids.
    "mini-v3": lambda: _v3(
        name="mini-v3", vocab_size=8192, hidden_size=256, intermediate_size=768,
        moe_intermediate_size=128, num_hidden_layers=4, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, rope_scaling=None, max_position_embeddings=1024,
        num_nextn_predict_layers=1),
    # ~0.5B parameters, ~0.1B activated: the CPU benchmark model.
    "small-v3": lambda: _v3(
        name="small-v3", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
        moe_intermediate_size=704, num_hidden_layers=8, first_k_dense_replace=1,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
        n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, rope_scaling=None, max_position_embeddings=4096,
        num_nextn_predict_layers=1),
}
_ALIASES = {"deepseek-r1": "deepseek-v3", "deepseek-v3-0324": "deepseek-v3",
            "deepseek-r1-distill-qwen-14b": "qwen2.5-14b", "kimi-k2-instruct": "kimi-k2",
            "moonlight": "moonlight-16b-a3b"}

_V4_YARN = RopeScaling(factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0,
                       mscale=1.0, mscale_all_dim=0.0, attention_factor=1.0)


def _v4(**kw) -> ModelConfigV4:
    """Fields both released V4 config.json files share: vocab 129280, head_dim 512 with 64 rotated
    dims, one K=V head, sliding window 128, CSA 4 / HCA 128, indexer 64 x 128, 3 hash layers, 1
    shared expert, top-6, sqrtsoftplus router (noaux_tc: biased selection), swiglu_limit 10, n_hc 4
    with 20 Sinkhorn iterations and eps 1e-6, rms_norm_eps 1e-6, rope_theta 1e4, compress_rope_theta
    1.6e5 with YaRN x16 from 65536 (beta 32/1), 1,048,576 positions, 1 MTP module (compress_ratios'
    entry after the main layers is 0: sliding)."""
    base = dict(vocab_size=129280, num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, sliding_window=128,
                compress_rate_csa=4, compress_rate_hca=128, index_n_heads=64, index_head_dim=128,
                n_shared_experts=1, num_experts_per_tok=6, scoring_func="sqrtsoftplus", norm_topk_prob=True,
                swiglu_limit=10.0, hidden_act="silu", hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
                rms_norm_eps=1e-6, rope_theta=10000.0, compress_rope_theta=160000.0, rope_scaling=_V4_YARN,
                max_position_embeddings=1048576, num_nextn_predict_layers=1, mtp_layer_types=(SLIDING,),
                tie_word_embeddings=False)
    base.update(kw)
    L = base["num_hidden_layers"]
    base.setdefault("mlp_layer_types", (HASH_MOE,) * 3 + (MOE,) * (L - 3))
    cfg = ModelConfigV4(**base)
    cfg.validate(f"preset {cfg.name}")
    return cfg


_PRESETS_V4 = {
    # compress_ratios [0, 0] + [4, 128] x 20 + [4] (+ 0 for MTP): 2 sliding, 21 CSA, 20 HCA
    "deepseek-v4-flash": lambda: _v4(
        name="deepseek-v4-flash", hidden_size=4096, num_hidden_layers=43, num_attention_heads=64,
        q_lora_rank=1024, o_groups=8, o_lora_rank=1024, moe_intermediate_size=2048, n_routed_experts=256,
        index_topk=512, routed_scaling_factor=1.5, layer_types=(SLIDING, SLIDING) + (CSA, HCA) * 20 + (CSA,)),
    # compress_ratios [128, 128] + [4, 128] x 29 + [4] (+ 0 for MTP): 31 HCA, 30 CSA, no sliding-only layer
    "deepseek-v4-pro": lambda: _v4(
        name="deepseek-v4-pro", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
        q_lora_rank=1536, o_groups=16, o_lora_rank=1024, moe_intermediate_size=3072, n_routed_experts=384,
        index_topk=1024, routed_scaling_factor=2.5, layer_types=(HCA, HCA) + (CSA, HCA) * 29 + (CSA,)),
    # V4 in miniature, adversarial for the next step's parity tests: every layer type, a hash layer
    # that is CSA (layer 1), the MTP block HCA (the releases' is sliding, so only this exercises
    # compression in MTP); HCA rate 8 and sliding window 6 (not a multiple of 4 or 8) so short
    # sequences cross window and compression boundaries; index_topk 3 below the compressed entries
    # of a 32-token test (the top-k really drops entries); hc_mult 3 and 7 Sinkhorn iterations (not
    # the released 4 and 20: catches hard-coded values); rms_norm_eps 1e-5 (catches eps that ignore
    # the config); qk_rope_head_dim 8 of head_dim 32 (partial RoPE) and index_head_dim 16 > 8;
    # o_lora_rank 12 < H*d/g = 64 (a real low rank); top-3 of 8 experts; swiglu_limit 0.5 so random
    # weights hit the clamp; compress_rope_theta 4e4 != rope_theta; YaRN x4 from 32 positions.
    "tiny-v4": lambda: _v4(
        name="tiny-v4", vocab_size=256, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
        head_dim=32, qk_rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=12, sliding_window=6,
        layer_types=(SLIDING, CSA, HCA, CSA, HCA, SLIDING), compress_rate_hca=8, mtp_layer_types=(HCA,),
        index_n_heads=2, index_head_dim=16, index_topk=3, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=3, mlp_layer_types=(HASH_MOE, HASH_MOE, MOE, MOE, MOE, MOE),
        routed_scaling_factor=1.7, swiglu_limit=0.5, hc_mult=3, hc_sinkhorn_iters=7, rms_norm_eps=1e-5,
        compress_rope_theta=40000.0,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0,
                                 mscale=1.0, mscale_all_dim=0.0, attention_factor=1.0),
        max_position_embeddings=128),
}


def preset_names() -> list[str]:
    """The ModelConfig (V3/V2-family and GQA) presets and aliases."""
    return sorted(_PRESETS) + sorted(_ALIASES)


def all_preset_names() -> list[str]:
    """Every preset, DeepSeek-V4 (ModelConfigV4) ones included."""
    return sorted(_PRESETS) + sorted(_PRESETS_V4) + sorted(_ALIASES)


def get_preset(name: str) -> ModelConfig | ModelConfigV4:
    key = _ALIASES.get(name.lower(), name.lower())
    if key in _PRESETS_V4:
        return _PRESETS_V4[key]()
    if key not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(all_preset_names())}")
    cfg = _PRESETS[key]()
    if name.lower() != key:
        cfg = cfg.replace(name=name.lower())
    cfg.validate(f"preset {name}")
    return cfg


def load_config(name_or_path: str) -> ModelConfig | ModelConfigV4:
    """A preset name, a config.json path, or a checkpoint directory. A DeepSeek-V4 config.json (any
    of its three spellings, reference/config_v4.py) gives a ModelConfigV4, everything else a
    ModelConfig exactly as before."""
    from pathlib import Path

    from dsref.reference.config_v4 import is_v4_json
    p = Path(name_or_path)
    if p.exists():
        if is_v4_json(p):
            return ModelConfigV4.from_json(p)
        return ModelConfig.from_json(p)
    return get_preset(name_or_path)
