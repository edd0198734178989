"""The conformance kit's cases: one baseline, and factors that each change one thing from it.

The **baseline** exercises every feature of a DeepSeek-V3 MoE layer at its simplest:
MLA with the q low-rank path, rotary dim P=2 (interleaved and rotate-half pairs
coincide with one pair), no YaRN, a sigmoid router with zero correction bias, one
expert group, one shared expert, ``norm_topk_prob`` true, ``routed_scaling_factor``
1, every RMSNorm eps 1e-6, float32 weights, token ids >= 2, one MoE layer.

Every other case is the baseline with **one factor** changed (``Case.factor``), and
names the cases it builds on (``requires``, the baseline implied). A failing case is
attributed to its factor only when everything it requires passed; otherwise the
report names the earlier failure that explains it (``conformance.attribute``).

Each case lists the mistakes (``faults``) that must fail it: tests/broken_reference.py
injects each into the float64 reference and tests/test_oracle.py proves that it fails
exactly that case (cases requiring it fail too, explained by it), under float32 *and*
bf16 tolerances, so every effect is sized above the tolerance it is graded with.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from dsref.reference.config import ModelConfig, RopeScaling
from dsref.reference.config_v4 import CSA, HASH_MOE, HCA, SLIDING, MOE, ModelConfigV4
from dsref.reference.oracle.kit_cases_v4 import BASE_V4, V4_BASELINE, case_weights_v4
from dsref.reference.params import tensors

BASELINE = "baseline"
SPECIAL_IDS = (0, 1)  # DeepSeek's <｜begin▁of▁sentence｜> / <｜end▁of▁sentence｜>: plain ids to an engine

_BASE = dict(name="kit", vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=2, num_key_value_heads=2,
             q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=2, v_head_dim=8,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
             topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.0,
             rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64, num_nextn_predict_layers=0,
             rms_norm_eps=1e-6)

# YaRN with no temperature in any convention: mscale == mscale_all_dim makes the cos/sin factor
# mscale(f, m)/mscale(f, m_all) exactly 1 (transformers, vLLM; DeepSeek's code has none), and
# a tiny mscale_all_dim makes the softmax factor mscale(f, m_all)^2 = (0.1 m_all ln f + 1)^2 ~ 1.
_NO_TEMP = 1e-6
_YARN = dict(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0)
_YARN_BASE = dict(qk_rope_head_dim=8, rope_theta=100.0, max_position_embeddings=64)
_YARN_TOKENS = (2, 48)  # positions 16..47 lie past original_max_position_embeddings


# V3.2 sparse attention: P = 8 (so half-split and interleaved RoPE differ), top-8 of up to 24 keys.
_SPARSE = dict(qk_rope_head_dim=8, rope_theta=100.0, index_n_heads=4, index_head_dim=16, index_topk=8)


def _yarn(mscale: float, mscale_all_dim: float) -> dict:
    return {**_YARN_BASE, "rope_scaling": RopeScaling(**_YARN, mscale=mscale, mscale_all_dim=mscale_all_dim)}


@dataclass(frozen=True)
class Case:
    name: str
    letter: str
    factor: str       # the one thing that differs from the baseline (a short phrase)
    targets: str      # what an engine must do to pass, and how the case makes a mistake visible
    overrides: dict
    faults: tuple[str, ...]  # mistakes that must fail it (tests/broken_reference.py)
    seed: int
    requires: tuple[str, ...] = ()  # cases whose factors this one builds on (baseline implied)
    tokens: tuple[int, int] = (2, 12)
    token_ids: str = "plain"  # plain: ids in [2, V) | special: half of them 0 or 1
    bias: str = "zero"  # zero | exact_pos | exact_neg | bf16_tie | huge
    router: str = "random"  # random (std gate_std) | tiny (bias decides) | offset (bf16 logits tie)
    gate_std: float = 0.3
    fp8_block: tuple[int, int] | None = None
    dump_tensors: tuple[str, ...] = ()  # tensors only this factor adds to the dump (absent -> UNSUPPORTED)
    index_weights: str = "random"  # random | cancelling (V3.2 head weights: large opposite pairs)
    prefill_chunk: int | None = None  # the engine prefills in chunks of this many tokens (None: at once)
    family: str = "v3"  # v3: a ModelConfig from _BASE | v4: a ModelConfigV4 from kit_cases_v4.BASE_V4
    v4_storage: str = "float32"  # V4 checkpoint: float32 | release (FP8 + FP4 experts, UE8M0 scales)
    comb_scale: float = 1.0  # V4: the hyper-connections' comb logits scaled up (kit_cases_v4.case_weights_v4)

    def config(self):
        if self.family == "v4":
            return ModelConfigV4(**{**BASE_V4, "name": f"kit-{self.name}", **self.overrides})
        return ModelConfig(**{**_BASE, "name": f"kit-{self.name}", **self.overrides})

    @property
    def root(self) -> str:
        """The baseline this case builds on: V3's for the V3 family, V4's for V4's."""
        return V4_BASELINE if self.family == "v4" else BASELINE

    @property
    def all_requires(self) -> tuple[str, ...]:
        return self.requires if self.name == self.root else (self.root, *self.requires)


CASES: tuple[Case, ...] = (
    Case(BASELINE, "a", "every feature at its simplest",
         "MLA (q low-rank path, P=2), sigmoid router (zero bias, one group, top-2 normalised, scale 1), one shared "
         "expert, eps 1e-6, float32 weights. A failure here explains every later failure",
         {}, ("softmax_scale_latent",), 1),
    Case("rope-pair-layout", "b", "rotary dim P=8 (4 frequency pairs)",
         "RoPE rotates interleaved pairs (x0,x1),(x2,x3).. (DeepSeek), not rotate-half pairs (x_i, x_i+P/2)",
         dict(qk_rope_head_dim=8, rope_theta=100.0), ("rope_half",), 2),
    Case("yarn-frequencies", "c", "YaRN frequency blend (factor 4, original 16), no temperature",
         "YaRN keeps fast dims, divides slow dims by the factor, ramps between; 48 positions, 32 of them past "
         "original_max_position_embeddings where the blend shows. mscale = mscale_all_dim ~ 0: no temperature",
         _yarn(_NO_TEMP, _NO_TEMP), ("yarn_no_blend",), 3, requires=("rope-pair-layout",), tokens=_YARN_TOKENS),
    Case("yarn-softmax-temperature", "d", "YaRN mscale = mscale_all_dim = 1 (the released V3 values)",
         "mscale(f, mscale_all_dim)^2 = 1.297 multiplies the whole softmax scale (nope and rope parts), the "
         "cos/sin factor is 1", _yarn(1.0, 1.0), ("mscale_missing", "mscale_rope_only"), 4,
         requires=("yarn-frequencies",), tokens=_YARN_TOKENS),
    Case("yarn-cos-sin-factor", "e", "YaRN mscale 1 != mscale_all_dim ~ 0",
         "cos and sin are multiplied by mscale(f, mscale)/mscale(f, mscale_all_dim) = 1.139 (transformers' "
         "attention_factor; DeepSeek's own code has no such factor, since its configs keep the two equal)",
         _yarn(1.0, _NO_TEMP), ("yarn_cos_sin_factor_missing",), 5, requires=("yarn-frequencies",),
         tokens=_YARN_TOKENS),
    Case("group-limited-routing", "f", "4 expert groups, keep 2 (noaux_tc)",
         "a group scores the sum of its top-2 biased scores (V3), not its max (V2); experts outside the kept "
         "groups are never chosen", dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=2),
         ("group_score_max",), 6, tokens=(2, 24)),
    Case("bias-selects-only", "g", "non-zero correction biases (0..7/8, bf16-exact)",
         "the bias only selects experts: the gate weights are the unbiased sigmoid scores",
         dict(num_experts_per_tok=3), ("weights_from_biased",), 8, bias="exact_pos"),
    Case("bias-cancellation", "h", "correction biases near 2^20",
         "weights taken from the scores directly, not recovered as (score + bias) - bias, which loses the "
         "score to float32 rounding (ulp(2^20) = 0.125)", dict(num_experts_per_tok=3), ("weights_bias_cancel",), 9,
         requires=("bias-selects-only",), bias="huge"),
    Case("bias-float32", "i", "biases 0.5 + distinct deltas < 1e-3, router scores all ~0.5",
         "the correction bias kept in float32: its deltas all round to 0.5 in bf16 (ties pick the wrong "
         "experts); router weights ~1e-6 so the bias alone decides, whatever the router's precision",
         dict(num_experts_per_tok=2), ("bias_bf16",), 10, requires=("bias-selects-only",), bias="bf16_tie",
         router="tiny"),
    Case("group-mask-neg-bias", "j", "negative correction biases with groups",
         "dropped groups are masked with -inf, not 0: every biased score here is < 0, so a 0 would win",
         dict(n_group=4, topk_group=2, num_experts_per_tok=1), ("group_mask_zero",), 7,
         requires=("group-limited-routing", "bias-selects-only"), bias="exact_neg"),
    Case("router-float32", "k", "router logits with a large common part and small per-expert differences",
         "router logits computed in float32 (x W_g): with a common offset ~3 and per-expert differences ~1e-2, "
         "a bf16 result (spacing 2^-6 at 3) mis-orders the experts; float32 inputs in bf16 are fine",
         {}, ("router_bf16",), 11, router="offset"),
    Case("sigmoid-no-norm", "l", "norm_topk_prob false with the sigmoid router",
         "top-k sigmoid weights NOT renormalised when norm_topk_prob is false (engines that always normalise "
         "V3-style routers fail)", dict(norm_topk_prob=False, num_experts_per_tok=3), ("sigmoid_always_norm",), 12),
    Case("softmax-router", "m", "V2 router: softmax over all experts, greedy top-k, no renormalisation",
         "softmax over all E logits, then top-k (not softmax over the k selected logits, Mixtral-style)",
         dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, num_experts_per_tok=3),
         ("softmax_after_topk",), 13),
    Case("softmax-topk-norm", "n", "V2 softmax router with norm_topk_prob true",
         "norm_topk_prob honoured for the softmax router: the top-k weights renormalised to sum 1",
         dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=True, num_experts_per_tok=3),
         ("norm_flag_ignored",), 14, requires=("softmax-router",)),
    Case("routed-scaling", "o", "routed_scaling_factor 2.5",
         "the routed experts' weights multiplied by routed_scaling_factor", dict(routed_scaling_factor=2.5),
         ("no_routed_scaling",), 15),
    Case("shared-experts-2", "p", "n_shared_experts 2",
         "the shared expert MLP is n_shared_experts x moe_intermediate_size wide (32 here), not one expert",
         dict(n_shared_experts=2), ("one_shared_expert",), 16),
    Case("dense-first-k", "q", "first_k_dense_replace 1 (2 layers)",
         "layer 0 is a dense MLP (intermediate_size), layer 1 MoE", dict(num_hidden_layers=2, first_k_dense_replace=1),
         ("dense_first_k_ignored",), 17),
    Case("no-q-lora", "r", "q_lora_rank null (V2-Lite style)",
         "q = x W_q: no low-rank path, no q norm", dict(q_lora_rank=None), ("q_lora_assumed",), 18),
    Case("rms-norm-eps", "s", "rms_norm_eps 0.25",
         "the decoder norms use the config's eps; the MLA norms (q_a_layernorm, kv_a_layernorm) keep 1e-6 "
         "whatever the config says (DeepSeek's and transformers' code)", dict(rms_norm_eps=0.25),
         ("norm_eps_hardcoded", "mla_norm_config_eps"), 19),
    Case("token-ids-0-1", "t", "token ids 0 and 1 in the input",
         "ids 0 (BOS) and 1 (EOS) are plain tokens: nothing masks, drops or replaces them",
         {}, ("pad_ids_masked",), 20, token_ids="special"),
    Case("fp8-v3-blocks", "u", "FP8 e4m3 weights, 128x128 blocks at V3's shapes",
         "block-wise dequantization W = W_fp8 * scale_inv[block] with the real V3 attention shapes (hidden 7168, "
         "kv_a_proj 576x7168: a 5x56 scale grid whose last block row is partial); float scales, not powers of two",
         dict(hidden_size=7168, kv_lora_rank=512, qk_rope_head_dim=64),
         ("fp8_floor_grid", "fp8_scale_transposed", "fp8_scale_pow2"), 21, requires=("rope-pair-layout",),
         fp8_block=(128, 128)),
    Case("fp8-nonsquare-blocks", "v", "FP8 with 20x12 blocks (from quantization_config)",
         "weight_block_size read from the config: 20x12 divides no dimension here (partial last block row and "
         "column everywhere)", {}, ("fp8_block_128_assumed",), 22, requires=("fp8-v3-blocks",), fp8_block=(20, 12)),
    Case("mtp", "w", "one multi-token-prediction module (num_nextn_predict_layers 1)",
         "mtp.0.logits [B, T-1, V]: eh_proj([enorm(emb(t+1)); hnorm(h_t)]) -> decoder layer -> shared_head norm "
         "-> head, where h_t is the main model's final hidden state after its norm; embedding first",
         dict(num_nextn_predict_layers=1), ("mtp_concat_order", "mtp_prenorm_hidden"), 23,
         dump_tensors=("mtp.0.logits",)),
    Case("sparse-attention", "x", "V3.2 lightning indexer: 4 index heads of 16 dims, top-8 of up to 24 keys",
         "MLA attends only to the indexer's top-8 keys: score = sum_h w_h relu(q_h . k) with per-head weights "
         "(weights_proj, x I^-1/2 J^-1/2), keys LayerNorm(x W_k) with weight and bias, half-split (not "
         "interleaved) RoPE on the indexer's first P dims while MLA keeps interleaved pairs, a causal mask. "
         "Rows 0-7 see at most 8 keys (dense attention, exactly); row 8 is the first to drop one",
         _SPARSE, ("index_rope_interleaved", "index_no_relu", "index_heads_unweighted", "index_not_causal",
                   "index_dense_off_by_one"), 24, requires=("rope-pair-layout",), tokens=(2, 24)),
    Case("index-weights-float32", "y", "indexer head weights as large opposite pairs",
         "the per-head weights (x W_w) kept in float32: heads 0/1 and 2/3 share their queries and get "
         "weights ~ +3 and ~ -3 whose sums ~1e-2 decide the ranking; rounded to bf16 (spacing 2^-6 at 3) "
         "those sums scramble the top-8", _SPARSE, ("index_weights_bf16",), 25, requires=("sparse-attention",),
         tokens=(2, 24), index_weights="cancelling"),
    Case("sparse-attention-chunked", "z", "prefill in chunks of 8 tokens (positions 8 and 16 start chunks)",
         "the engine prefills 8 tokens at a time into its caches; each chunk's indexer selects among every "
         "cached key by absolute position (a top-k mask built as if the chunk started at position 0 sees only "
         "the first keys). An engine that cannot be told to prefill in chunks is UNSUPPORTED here",
         _SPARSE, ("index_chunk_mask_from_zero",), 26, requires=("sparse-attention",), tokens=(2, 24),
         prefill_chunk=8),
    # ---------------------------------------------------------------- DeepSeek-V4 (kit_cases_v4)
    Case(V4_BASELINE, "A", "DeepSeek-V4: one sliding-window layer, every V4 feature at its simplest",
         "shared K=V head with RoPE on the last 8 of 16 dims, window 4 (the query's own token included) over 12 "
         "tokens, a learned sink logit per head, 2 output groups, 2 hyper-connection streams (Sinkhorn 20 "
         "iterations, comb read transposed), sqrtsoftplus router choosing 2 of 8 (zero bias), weights "
         "renormalised x 1.5, one shared expert. A failure here explains every later V4 failure",
         {}, ("v4_no_sinks", "v4_window_off_by_one", "v4_comb_not_transposed", "v4_router_sigmoid"), 31,
         family="v4"),
    Case("v4-hca", "B", "a heavily compressed attention layer (rate 4) over 16 tokens",
         "every 4 tokens pool into one entry (gated softmax over the block), RoPE'd at the block's FIRST token "
         "and readable from its LAST token on (query t reads entries w < (t+1)//4): the compressor boundaries",
         dict(layer_types=(HCA,)), ("v4_entry_visible_late", "v4_entry_visible_early", "v4_entry_rope_at_block_end"),
         32, tokens=(2, 16), family="v4"),
    Case("v4-csa", "C", "a compressed sparse attention layer (rate 4, overlapping), indexer top-2",
         "CSA entries pool 8 slots (the previous block's first-half series, then the block's own second half); "
         "the lightning indexer scores sum_h w_h relu(q_h . K_w) over the entries complete at the query and "
         "keeps the top 2 (a causal mask: never an entry of a later block)",
         dict(layer_types=(CSA,)), ("v4_index_not_causal", "v4_csa_overlap_swapped", "v4_index_no_relu"), 33,
         requires=("v4-hca",), tokens=(2, 24), family="v4"),
    Case("v4-hash-routing", "D", "a hash-routed MoE layer (tid2eid)",
         "the experts of token x are tid2eid[x] (its token id, not its position, not a top-k of the scores); "
         "their weights are the router's sqrtsoftplus scores of those experts, renormalised",
         dict(mlp_layer_types=(HASH_MOE,)), ("v4_hash_by_topk", "v4_hash_by_position"), 35, family="v4"),
    Case("v4-yarn-compressed", "E", "YaRN (factor 4, original 8) with a sliding and a compressed layer",
         "YaRN blends the frequencies of the compressed layers (and their compressors) only, with NO amplitude "
         "factor on cos/sin (V4 fixes attention_factor to 1; YaRN's default would be 0.1 ln 4 + 1 = 1.139); the "
         "sliding layer keeps plain RoPE. Layer 0 routes by hash: a near-tie routing flip there (allowed in bf16) "
         "would change a compressed entry every later query reads",
         dict(num_hidden_layers=2, layer_types=(SLIDING, HCA), mlp_layer_types=(HASH_MOE, MOE), max_position_embeddings=32,
              rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=8, beta_fast=32.0, beta_slow=1.0,
                                       mscale=1.0, mscale_all_dim=0.0, attention_factor=1.0)),
         ("v4_yarn_amplitude", "v4_yarn_on_sliding"), 34, requires=("v4-hca", "v4-hash-routing"), tokens=(2, 24), family="v4"),
    Case("v4-sinkhorn", "F", "hc_sinkhorn_iters 1 and hc_eps 0.05, two layers, sharp comb logits",
         "the hyper-connections' Sinkhorn-Knopp runs the config's iteration count and eps (eps also added to the "
         "pre weights and inside each normalisation), not the released 20 and 1e-6. Layer 0 copies one embedding "
         "into every stream, where comb's column sums (always normalised last) are all that matter; layer 1's "
         "streams differ, and comb logits scaled x8 keep one iteration far from twenty",
         dict(hc_sinkhorn_iters=1, hc_eps=0.05, num_hidden_layers=2, layer_types=(SLIDING, SLIDING),
              mlp_layer_types=(MOE, MOE)), ("v4_sinkhorn_iters_fixed", "v4_hc_eps_fixed"), 36, family="v4",
         comb_scale=8.0),
    Case("v4-swiglu-clamp", "G", "swiglu_limit 1 (values this size reach it)",
         "clipped SwiGLU: silu(min(gate, L)) * clip(up, -L, L) in the routed AND the shared experts (DeepSeek's "
         "current code and transformers 5.24; the gate is clamped from above only)",
         dict(swiglu_limit=1.0), ("v4_swiglu_no_clamp", "v4_swiglu_gate_both_sides", "v4_shared_expert_unclamped"),
         37, family="v4"),
    Case("v4-release-weights", "H", "the release's storage: FP8 e4m3 (128x128) and FP4 e2m1 experts (1x32), UE8M0",
         "UE8M0 scales are 2^(byte - 127); FP4 packs two e2m1 values per byte, the LOW nibble first; every "
         "matrix here is one partial FP8 block", {}, ("v4_ue8m0_bias_128", "v4_fp4_nibbles_swapped"), 38,
         family="v4", v4_storage="release"),
)
CASE_BY_NAME = {c.name: c for c in CASES}


def closure(names: list[str]) -> list[Case]:
    """The named cases plus everything they require, in kit order."""
    need, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo.extend(CASE_BY_NAME[n].all_requires)
    return [c for c in CASES if c.name in need]


def case_tokens(case: Case, cfg: ModelConfig) -> np.ndarray:
    rng = np.random.default_rng(case.seed)
    tok = rng.integers(2, cfg.vocab_size, case.tokens)
    if case.token_ids == "special":
        # half of the positions (the first included) get 0 or 1
        spots = rng.random(case.tokens) < 0.5
        spots[:, 0] = True
        tok = np.where(spots, rng.integers(0, 2, case.tokens), tok)
    return tok.astype(np.int32)


def case_weights(case: Case, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Deterministic adversarial weights: random matrices, norms around 1, case-specific router and bias
    (V4 cases: kit_cases_v4.case_weights_v4)."""
    if case.family == "v4":
        return case_weights_v4(case.seed, cfg, case.comb_scale)
    rng = np.random.default_rng(1000 + case.seed)
    w = {}
    for t in tensors(cfg, mtp=True):
        n, s = t.name, t.shape
        if n.endswith("norm.weight"):
            a = 1.0 + 0.2 * rng.standard_normal(s)
        elif n.endswith("e_score_correction_bias"):
            a = _bias(case.bias, s[0], rng)
        elif n.endswith("mlp.gate.weight"):
            a = _router(case, s, rng)
        elif n.endswith("embed_tokens.weight"):
            a = rng.standard_normal(s)
        elif n.endswith("indexer.weights_proj.weight") and case.index_weights == "cancelling":
            a = _cancelling_head_weights(s, rng)
        else:
            a = 0.15 * rng.standard_normal(s) * min(1.0, (32 / s[-1]) ** 0.5)  # keep x W ~ O(1) at any width
        w[n] = np.asarray(a, np.float32)
    if case.index_weights == "cancelling":
        _pair_queries(w, cfg)
    return w


def _cancelling_head_weights(shape, rng) -> np.ndarray:
    """weights_proj [I, D] as opposite pairs: rows 2h and 2h+1 are +c + delta_h and -c, c = 0.75 on the
    first half of the dims (x.c ~ +-3, the same for both), delta_h small multiples of 2^-12 on the
    second half (x.delta ~ 1e-2). Every entry is bf16-exact; only a float32 product keeps each pair's
    sum x.delta_h (see _pair_queries: a pair shares its queries, so only the sum matters)."""
    I, D = shape
    h = D // 2
    a = np.zeros(shape)
    a[0::2, :h], a[1::2, :h] = 0.75, -0.75
    a[0::2, h:] = rng.integers(-24, 25, (I // 2, D - h)) * 2.0 ** -12
    return a


def _pair_queries(w: dict, cfg: ModelConfig) -> None:
    """Index heads 2h+1 get head 2h's rows of wq_b: each pair scores keys alike (cancelling weights)."""
    J = cfg.index_head_dim
    for name in [n for n in w if n.endswith("indexer.wq_b.weight")]:
        q = w[name].reshape(cfg.index_n_heads, J, -1).copy()
        q[1::2] = q[0::2]
        w[name] = q.reshape(w[name].shape)


def _bias(kind: str, E: int, rng) -> np.ndarray:
    j = rng.permutation(np.arange(E) % 8)
    if kind == "exact_pos":  # multiples of 1/8 in [0, 0.875]: bf16-exact, biased scores > 0
        return j / 8.0
    if kind == "exact_neg":  # multiples of -1/4 in [-2.75, -1]: every biased score < 0
        return -1.0 - j / 4.0
    if kind == "huge":  # 2^20 + multiples of 2^13: bf16-exact, distinct, selection by bias alone
        return 2.0 ** 20 + j * 2.0 ** 13
    if kind == "bf16_tie":  # 0.5 + distinct deltas < 1e-3: all round to 0.5 in bf16
        vals = (np.arange(E) - (E - 1) / 2) * 2.2e-4  # ascending
        d = np.empty(E)
        d[:2] = vals[:2][rng.permutation(2)]  # experts 0 and 1 (what bf16 ties pick) get the lowest
        d[2:] = vals[2:][rng.permutation(E - 2)]
        out = 0.5 + d
        assert (out.astype(ml_dtypes.bfloat16).astype(np.float64) == 0.5).all() and len(set(out.tolist())) == E
        return out
    return np.zeros(E)


def _router(case: Case, shape, rng) -> np.ndarray:
    E, D = shape
    if case.router == "tiny":  # scores 0.5 +- ~1e-6: far below the bias deltas
        return 1e-7 * rng.standard_normal(shape)
    if case.router == "offset":
        # First half of the dims: one common row 0.75 (x.c ~ +-3, the same for every expert); second half:
        # small per-expert multiples of 2^-12 (x.delta ~ 1e-2). Every entry is bf16-exact, so bf16 *weights*
        # change nothing; a bf16 *result* (spacing 2^-6 near 3) scrambles the per-expert order.
        h = D // 2
        a = np.empty(shape)
        a[:, :h] = 0.75
        a[:, h:] = rng.integers(-24, 25, (E, D - h)) * 2.0 ** -12
        return a
    return case.gate_std * min(1.0, (32 / D) ** 0.5) * rng.standard_normal(shape)  # logits O(1) at any width
