"""Fault injection for the conformance kit's tests: the float64 NumPy reference with one mistake.

``BrokenReference(fault)`` is an engine (for ``conformance.grade_kit``) that runs
the float64 reference with one mistake from ``FAULTS`` injected; ``inject(fault)``
is the context manager that does it with ``unittest.mock.patch`` and restores
every original on exit. tests/test_oracle.py proves with them that each case of
the kit fails its mistake (``FAULT_CASE``) and no other. Test code only: nothing
in the package imports it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import ml_dtypes
import numpy as np

from dsref.reference.checkpoint import read_config, read_tensors
from dsref.reference.config import ModelConfig
from dsref.reference.oracle.conformance import CASES
from dsref.reference.oracle.golden import is_v4_checkpoint, numpy_outputs, run_reference_v4
from tests.broken_reference_v4 import FAULTS_V4, patch_v4

FAULTS = {
    "softmax_scale_latent": "absorbed MLA with the softmax scale from the latent width (kv_lora_rank + P)^-1/2",
    "rope_half": "RoPE rotates halves (x_i, x_i+P/2) instead of interleaved pairs",
    "yarn_no_blend": "YaRN frequencies not blended (plain RoPE frequencies)",
    "mscale_missing": "YaRN mscale(all_dim)^2 missing from the softmax scale",
    "mscale_rope_only": "YaRN mscale^2 applied to the rope part of the logits only",
    "yarn_cos_sin_factor_missing": "YaRN cos/sin factor mscale/mscale_all_dim not applied (DeepSeek's own code)",
    "group_score_max": "V3 group score taken as the group's max (V2) instead of the sum of its top-2",
    "group_mask_zero": "dropped expert groups masked with 0 instead of -inf",
    "weights_from_biased": "gate weights gathered from the biased scores (score + bias)",
    "weights_bias_cancel": "gate weights recovered as (score + bias) - bias in float32",
    "bias_bf16": "e_score_correction_bias rounded to bf16",
    "router_bf16": "router logits computed in bf16 (the product rounded to bf16)",
    "sigmoid_always_norm": "sigmoid router's top-k weights always renormalised (norm_topk_prob false ignored)",
    "softmax_after_topk": "softmax over the k selected logits (Mixtral) instead of over all experts",
    "norm_flag_ignored": "norm_topk_prob ignored by the softmax router: never renormalised (transformers' V2)",
    "no_routed_scaling": "routed_scaling_factor not applied",
    "one_shared_expert": "shared experts built one expert wide (n_shared_experts ignored): the weights do not fit",
    "dense_first_k_ignored": "first_k_dense_replace ignored: every layer treated as MoE",
    "q_lora_assumed": "q_lora assumed on: the engine builds q_a_proj/q_b_proj and cannot load q_proj",
    "norm_eps_hardcoded": "every RMSNorm eps hard-coded to 1e-6",
    "mla_norm_config_eps": "q_a_layernorm/kv_a_layernorm take the config's rms_norm_eps (instead of 1e-6)",
    "pad_ids_masked": "token ids 0/1 treated as padding: masked out as attention keys",
    "fp8_floor_grid": "FP8 scale grid floor-divided: the partial last block reuses the previous block's scale",
    "fp8_scale_transposed": "FP8 scale grid read transposed",
    "fp8_scale_pow2": "FP8 scales rounded to powers of two (UE8M0) without requantising the weights",
    "fp8_block_128_assumed": "FP8 block size hard-coded to 128x128 (config's weight_block_size ignored)",
    "mtp_concat_order": "MTP input concatenated [hnorm(h); enorm(emb)] (hidden first)",
    "mtp_prenorm_hidden": "MTP fed the main model's hidden state before its final norm",
    "index_rope_interleaved": "V3.2 indexer RoPE on interleaved pairs (DeepSeek's code before 2025-11-17)",
    "index_no_relu": "V3.2 indexer scores without the relu: sum_h w_h (q_h . k)",
    "index_heads_unweighted": "V3.2 indexer heads summed without their weights_proj weights",
    "index_not_causal": "V3.2 indexer top-k over every key, future ones included (MLA's own mask then drops them)",
    "index_dense_off_by_one": "V3.2 indexer keeps index_topk + 1 keys (an off-by-one in the top-k size)",
    "index_weights_bf16": "V3.2 indexer head weights (x W_w) computed in bf16",
    "index_chunk_mask_from_zero": "V3.2 chunked prefill: the indexer's causal mask built as if the chunk "
                                  "started at position 0",
    **FAULTS_V4,
}
# The case each fault must fail (cases that require it fail too, explained by it).
FAULT_CASE = {f: c.name for c in CASES for f in c.faults}
# Faults graded only with bf16 tolerances: under float32 ones the baseline already catches them
# (the report then blames the baseline, which tests/test_oracle.py checks too).
BF16_ONLY = {"router_bf16"}


_GATE_FAULTS = {"group_score_max", "group_mask_zero", "weights_from_biased", "weights_bias_cancel", "bias_bf16",
                "router_bf16", "sigmoid_always_norm", "softmax_after_topk", "norm_flag_ignored", "no_routed_scaling"}
_FP8_FAULTS = {"fp8_floor_grid", "fp8_scale_transposed", "fp8_scale_pow2", "fp8_block_128_assumed"}


def _bf16(a):
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _faulty_gate(x, w, cfg: ModelConfig, prefix: str, fault: str):
    """Copy of numpy_ref.gate with one routing mistake switched on."""
    E, k, G, kg = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    logits = x @ np.asarray(w[prefix + "gate.weight"], np.float64).T
    if fault == "router_bf16":
        logits = _bf16(logits)
    if cfg.scoring_func == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    choice = scores.copy()
    bias = None
    if cfg.topk_method == "noaux_tc":
        bias = np.asarray(w[prefix + "gate.e_score_correction_bias"], np.float64)
        if fault == "bias_bf16":
            bias = _bf16(bias)
        choice = choice + bias
    if cfg.topk_method != "greedy" and G > 1:
        grouped = choice.reshape(-1, G, E // G)
        if cfg.topk_method == "noaux_tc" and fault != "group_score_max":
            group_score = -np.sort(-grouped, axis=-1)[..., :2].sum(-1)
        else:
            group_score = grouped.max(-1)
        keep_groups = np.argsort(-group_score, axis=-1, kind="stable")[:, :kg]
        mask = np.ones_like(group_score, bool)
        np.put_along_axis(mask, keep_groups, False, axis=-1)
        fill = 0.0 if fault == "group_mask_zero" else -np.inf
        choice = np.where(np.repeat(mask, E // G, axis=-1), fill, choice)
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    if fault == "weights_from_biased":
        wts = np.take_along_axis(choice, ids, axis=-1)
    elif fault == "weights_bias_cancel" and bias is not None:
        f32 = np.float32
        biased = scores.astype(f32) + bias.astype(f32)  # the engine keeps score + bias in float32 ...
        wts = np.take_along_axis(biased - bias.astype(f32), ids, axis=-1).astype(np.float64)  # ... then subtracts
    elif fault == "softmax_after_topk" and cfg.scoring_func == "softmax":
        sel = np.take_along_axis(logits, ids, axis=-1)
        wts = np.exp(sel - sel.max(-1, keepdims=True))
        wts /= wts.sum(-1, keepdims=True)
    else:
        wts = np.take_along_axis(scores, ids, axis=-1)
    norm = cfg.norm_topk_prob
    if fault == "norm_flag_ignored" and cfg.scoring_func == "softmax":
        norm = False
    if fault == "sigmoid_always_norm" and cfg.scoring_func == "sigmoid":
        norm = True
    rsf = 1.0 if fault == "no_routed_scaling" else cfg.routed_scaling_factor
    if cfg.scoring_func == "sigmoid":
        if norm:
            wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
        wts = wts * rsf
    elif norm and k > 1:
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
    else:
        wts = wts * rsf
    return logits, ids, wts


def _faulty_dequant(fault: str):
    """Wrong FP8 dequantizations (the right one: W * scale_inv[ceil-divided block grid])."""
    def dequant(w_fp8, scale_inv, block=(128, 128)):
        w = np.asarray(w_fp8).astype(np.float32)
        s = np.asarray(scale_inv, np.float32)
        br, bc = (128, 128) if fault == "fp8_block_128_assumed" else block
        rows, cols = w.shape[-2:]
        ri, ci = np.arange(rows) // br, np.arange(cols) // bc
        if fault == "fp8_floor_grid":  # block index clipped to the floor-divided grid
            ri = np.minimum(ri, max(rows // br - 1, 0))
            ci = np.minimum(ci, max(cols // bc - 1, 0))
        if fault == "fp8_scale_transposed":
            s = np.swapaxes(s, -1, -2)
        if fault == "fp8_scale_pow2":
            s = np.exp2(np.round(np.log2(s))).astype(np.float32)
        if ri.max() >= s.shape[-2] or ci.max() >= s.shape[-1]:
            raise ValueError(f"scale grid {list(s.shape[-2:])} does not cover weight {[rows, cols]} "
                             f"in {br}x{bc} blocks")
        return w * s[..., ri[:, None], ci[None, :]]
    return dequant


def _masked_mla(pad_positions: dict):
    """numpy_ref.mla with keys at token ids 0/1 masked out (except each query's own position)."""
    from dsref.reference import numpy_ref
    from dsref.reference.config import MLA_NORM_EPS
    rms_norm, linear, orig_mla = numpy_ref.rms_norm, numpy_ref.linear, numpy_ref.mla

    def mla(x, w, cfg, positions, prefix, capture=None):
        pad = pad_positions["pad"]  # [B, T] True where the token is 0 or 1
        if not pad.any():  # nothing to mask: the reference's own MLA (V3.2's indexer included)
            return orig_mla(x, w, cfg, positions, prefix, capture)
        B, T, _ = x.shape
        H, N, P, A, R = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.v_head_dim, cfg.kv_lora_rank)
        g = lambda n: w[prefix + n]  # noqa: E731
        if cfg.q_lora_rank is None:
            q = linear(x, g("q_proj.weight"))
        else:
            q = linear(rms_norm(linear(x, g("q_a_proj.weight")), g("q_a_layernorm.weight"), MLA_NORM_EPS),
                       g("q_b_proj.weight"))
        q = q.reshape(B, T, H, N + P)
        kv = linear(x, g("kv_a_proj_with_mqa.weight"))
        c_kv = rms_norm(kv[..., :R], g("kv_a_layernorm.weight"), MLA_NORM_EPS)
        cos, sin = numpy_ref.rope_cos_sin(cfg, positions)
        q_pe = numpy_ref.apply_rope_interleaved(q[..., N:], cos, sin)
        k_pe = numpy_ref.apply_rope_interleaved(kv[..., R:], cos, sin)
        kvb = linear(c_kv, g("kv_b_proj.weight")).reshape(B, T, H, N + A)
        s = (np.einsum("bthn,bshn->bhts", q[..., :N], kvb[..., :N])
             + np.einsum("bthp,bsp->bhts", q_pe, k_pe)) * cfg.softmax_scale
        pad = pad[:, pad.shape[1] - T:]  # the MTP module's T-1 positions take tokens 1..T-1
        masked = np.triu(np.ones((T, T), bool), k=1)[None, None] | (pad[:, None, None, :] & ~np.eye(T, dtype=bool))
        s = np.where(masked, -np.inf, s)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return linear(np.einsum("bhts,bsha->btha", p, kvb[..., N:]).reshape(B, T, H * A), g("o_proj.weight"))
    return mla


def _index_fault(patch, fault: str, prefill_chunk: int | None) -> None:
    """The V3.2 indexer faults, as patches of reference/dsa.py's steps (numpy_ref.mla calls dsa.indexer)."""
    from dsref.reference import dsa
    if fault == "index_rope_interleaved":
        orig = dsa.indexer
        patch(dsa, "indexer", lambda x, w, cfg, positions, prefix, interleaved=False:
              orig(x, w, cfg, positions, prefix, True))
    elif fault == "index_no_relu":
        patch(dsa, "index_scores", lambda q, k, hw: np.einsum("bth,bthj,bsj->bts", hw, q, k))
    elif fault == "index_heads_unweighted":
        patch(dsa, "index_head_weights", lambda x, w, cfg, prefix: np.full(
            (*x.shape[:-1], cfg.index_n_heads), cfg.index_n_heads ** -0.5 * cfg.index_softmax_scale))
    elif fault == "index_not_causal":
        orig_vis = dsa.visible
        patch(dsa, "visible", lambda q_pos, k_pos, k_valid=None: np.ones_like(orig_vis(q_pos, k_pos, k_valid)))
    elif fault == "index_dense_off_by_one":
        orig_sel = dsa.select_topk
        patch(dsa, "select_topk", lambda scores, vis, topk: orig_sel(scores, vis, topk + 1))
    elif fault == "index_weights_bf16":
        from dsref.reference.numpy_ref import linear
        patch(dsa, "index_head_weights", lambda x, w, cfg, prefix: _bf16(
            linear(x, w[prefix + "indexer.weights_proj.weight"])) * (cfg.index_n_heads ** -0.5 * cfg.index_softmax_scale))
    elif fault == "index_chunk_mask_from_zero" and prefill_chunk:
        orig_vis, C = dsa.visible, prefill_chunk
        # a chunk's queries compared by their index within the chunk (q_pos - chunk start) with the
        # cache's absolute key slots: what a top-k mask that assumes position 0 does
        patch(dsa, "visible", lambda q_pos, k_pos, k_valid=None:
              orig_vis(np.asarray(q_pos) % C, k_pos, k_valid))


@contextlib.contextmanager
def inject(fault: str, tokens: np.ndarray | None = None, prefill_chunk: int | None = None):
    """Context manager: the NumPy reference (and checkpoint reading) with one mistake, restored on exit.
    prefill_chunk: the engine was asked to prefill in chunks of that many tokens (the float64 reference
    has no cache: a full forward, equal to a correct chunked prefill; only a chunking fault uses it)."""
    from dsref.reference import checkpoint as ckpt
    from dsref.reference import numpy_ref
    from dsref.reference.params import FINAL_NORM
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    orig_scale = ModelConfig.softmax_scale
    with contextlib.ExitStack() as st:
        patch = lambda obj, name, new: st.enter_context(mock.patch.object(obj, name, new))  # noqa: E731
        if fault == "softmax_scale_latent":
            patch(ModelConfig, "softmax_scale", property(
                lambda c: orig_scale.fget(c) * (c.qk_head_dim / (c.kv_lora_rank + c.qk_rope_head_dim)) ** 0.5))
        elif fault == "rope_half":
            patch(numpy_ref, "apply_rope_interleaved", numpy_ref.apply_rope_half)
        elif fault == "mscale_rope_only":
            # q_pe.k_pe gets mscale^2 (sqrt on each side), the nope part none: patch both pieces.
            unscaled = lambda c: c.qk_head_dim ** -0.5  # noqa: E731
            m_holder: dict[str, float] = {}
            orig_rope, orig_mla = numpy_ref.apply_rope_interleaved, numpy_ref.mla

            def mla(x, w, cfg, positions, prefix, capture=None):
                m_holder["m2"] = orig_scale.fget(cfg) / unscaled(cfg)
                return orig_mla(x, w, cfg, positions, prefix, capture)
            patch(numpy_ref, "mla", mla)
            patch(numpy_ref, "apply_rope_interleaved",
                  lambda x, cos, sin: orig_rope(x, cos, sin) * np.sqrt(m_holder.get("m2", 1.0)))
            patch(ModelConfig, "softmax_scale", property(unscaled))
        elif fault == "yarn_no_blend":
            orig_freq = numpy_ref.rope_frequencies

            def freqs(cfg):
                _, att = orig_freq(cfg)
                dim = cfg.qk_rope_head_dim
                return 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim), att
            patch(numpy_ref, "rope_frequencies", freqs)
        elif fault == "mscale_missing":
            patch(ModelConfig, "softmax_scale", property(lambda c: c.qk_head_dim ** -0.5))
        elif fault == "yarn_cos_sin_factor_missing":
            patch(numpy_ref, "rope_attention_factor", lambda cfg: 1.0)
        elif fault in _GATE_FAULTS:
            patch(numpy_ref, "gate", lambda x, w, cfg, prefix: _faulty_gate(x, w, cfg, prefix, fault))
        elif fault in _FP8_FAULTS:
            patch(ckpt, "dequantize_fp8_blockwise", _faulty_dequant(fault))
        elif fault == "dense_first_k_ignored":
            patch(ModelConfig, "is_moe_layer", lambda self, i: self.is_moe and i % self.moe_layer_freq == 0)
        elif fault == "q_lora_assumed":
            orig_mla = numpy_ref.mla

            def mla(x, w, cfg, positions, prefix, capture=None):
                if cfg.q_lora_rank is None:  # what an engine that builds q_a_proj unconditionally hits
                    raise KeyError(f"{prefix}q_a_proj.weight: missing from the checkpoint")
                return orig_mla(x, w, cfg, positions, prefix, capture)
            patch(numpy_ref, "mla", mla)
        elif fault == "norm_eps_hardcoded":
            orig_norm = numpy_ref.rms_norm
            patch(numpy_ref, "rms_norm", lambda x, w, eps: orig_norm(x, w, 1e-6))
        elif fault == "mla_norm_config_eps":
            orig_mla = numpy_ref.mla

            def mla(x, w, cfg, positions, prefix, capture=None):
                with mock.patch.object(numpy_ref, "MLA_NORM_EPS", cfg.rms_norm_eps):
                    return orig_mla(x, w, cfg, positions, prefix, capture)
            patch(numpy_ref, "mla", mla)
        elif fault == "pad_ids_masked":
            patch(numpy_ref, "mla", _masked_mla({"pad": np.isin(np.asarray(tokens), (0, 1))}))
        elif fault == "mtp_concat_order":
            orig_mtp = numpy_ref.mtp_forward

            def mtp(tokens_, h, w, cfg, depth=0):
                # [hn; en] W^T == [en; hn] W'^T with W's two column blocks swapped
                name = f"model.layers.{cfg.num_hidden_layers + depth}.eh_proj.weight"
                D = cfg.hidden_size
                w2 = dict(w)
                w2[name] = np.concatenate([w[name][:, D:], w[name][:, :D]], axis=1)
                return orig_mtp(tokens_, h, w2, cfg, depth)
            patch(numpy_ref, "mtp_forward", mtp)
        elif fault == "mtp_prenorm_hidden":
            orig_mtp = numpy_ref.mtp_forward

            def mtp(tokens_, h, w, cfg, depth=0):
                # RMSNorm is scale-invariant per token, so hnorm(h_prenorm) == hnorm(hn / final_norm.weight)
                return orig_mtp(tokens_, h / np.asarray(w[FINAL_NORM], np.float64), w, cfg, depth)
            patch(numpy_ref, "mtp_forward", mtp)
        elif fault.startswith("index_"):
            _index_fault(patch, fault, prefill_chunk)
        elif fault in FAULTS_V4:
            patch_v4(patch, fault, tokens)
        yield


class BrokenReference:
    """Engine: the float64 NumPy reference with one injected mistake (see FAULTS, inject)."""

    dtype = "float64"
    chunked_prefill = True  # takes prefill_chunk (see inject)

    def __init__(self, fault: str):
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        self.fault, self.name = fault, f"broken[{fault}]"

    def __call__(self, checkpoint: Path, tokens: np.ndarray, prefill_chunk: int | None = None) -> dict[str, np.ndarray]:
        with inject(self.fault, tokens, prefill_chunk):
            if is_v4_checkpoint(checkpoint):  # DeepSeek-V4: numpy_v4 on the dequantized weights
                return run_reference_v4(Path(checkpoint), tokens, "float64")
            cfg = read_config(checkpoint)
            mtp = cfg.num_nextn_predict_layers > 0
            w = {k: np.asarray(v, np.float64) for k, v in read_tensors(checkpoint, cfg, with_mtp=mtp)}
            if self.fault == "one_shared_expert" and cfg.n_shared_experts > 1:
                name = "model.layers.0.mlp.shared_experts.gate_proj.weight"
                raise RuntimeError(f"size mismatch for {name}: checkpoint {list(w[name].shape)}, model "
                                   f"[{cfg.moe_intermediate_size}, {cfg.hidden_size}]")
            return numpy_outputs(w, cfg, tokens)
