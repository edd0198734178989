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
from dsref.reference.oracle.golden import numpy_outputs

FAULTS = {
    "rope_half": "RoPE rotates halves (x_i, x_i+P/2) instead of interleaved pairs",
    "mscale_rope_only": "YaRN mscale^2 applied to the rope part of the logits only",
    "group_mask_zero": "dropped expert groups masked with 0 instead of -inf",
    "weights_from_biased": "gate weights gathered from the biased scores (score + bias)",
    "norm_flag_ignored": "norm_topk_prob ignored: V3 always normalises, V2 never (transformers' V2)",
    "no_routed_scaling": "routed_scaling_factor not applied",
    "fp8_floor_grid": "FP8 scale grid floor-divided: the partial last block reuses the previous block's scale",
    "bias_bf16": "e_score_correction_bias rounded to bf16",
    "dense_first_k_ignored": "first_k_dense_replace ignored: every layer treated as MoE",
    "q_lora_assumed": "q_lora assumed on: q = q_b(RMSNorm(q_a(x))) with q_a = identity, unit norm, q_b = q_proj",
    # two more mistakes, each caught by one case as well
    "yarn_no_blend": "YaRN frequencies not blended (plain RoPE frequencies, YaRN cos/sin factor kept)",
    "mscale_missing": "YaRN mscale(all_dim)^2 missing from the softmax scale",
}
# The case each fault must fail (and no other).
FAULT_CASE = {**{c.fault: c.name for c in CASES}, "yarn_no_blend": "rope-pair-layout",
              "mscale_missing": "yarn-mscale"}


def _faulty_gate(x, w, cfg: ModelConfig, prefix: str, fault: str):
    """Copy of numpy_ref.gate with one routing mistake switched on."""
    E, k, G, kg = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    logits = x @ np.asarray(w[prefix + "gate.weight"], np.float64).T
    if cfg.scoring_func == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits))
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
    choice = scores.copy()
    if cfg.topk_method == "noaux_tc":
        bias = np.asarray(w[prefix + "gate.e_score_correction_bias"], np.float64)
        if fault == "bias_bf16":
            bias = bias.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        choice = choice + bias
    if cfg.topk_method != "greedy" and G > 1:
        grouped = choice.reshape(-1, G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_score = -np.sort(-grouped, axis=-1)[..., :2].sum(-1)
        else:
            group_score = grouped.max(-1)
        keep_groups = np.argsort(-group_score, axis=-1, kind="stable")[:, :kg]
        mask = np.ones_like(group_score, bool)
        np.put_along_axis(mask, keep_groups, False, axis=-1)
        fill = 0.0 if fault == "group_mask_zero" else -np.inf
        choice = np.where(np.repeat(mask, E // G, axis=-1), fill, choice)
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    wts = np.take_along_axis(choice if fault == "weights_from_biased" else scores, ids, axis=-1)
    norm = cfg.norm_topk_prob
    if fault == "norm_flag_ignored":
        norm = cfg.scoring_func == "sigmoid"
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


def _floor_grid_dequant(w_fp8, scale_inv, block=(128, 128)):
    """Wrong FP8 dequantization: block index clipped to the floor-divided grid (partial block loses its scale)."""
    w = np.asarray(w_fp8).astype(np.float32)
    s = np.asarray(scale_inv, np.float32)
    br, bc = block
    rows, cols = w.shape[-2:]
    ri = np.minimum(np.arange(rows) // br, max(rows // br - 1, 0))
    ci = np.minimum(np.arange(cols) // bc, max(cols // bc - 1, 0))
    return w * s[..., ri[:, None], ci[None, :]]


@contextlib.contextmanager
def inject(fault: str):
    """Context manager: the NumPy reference (and checkpoint reading) with one mistake, restored on exit."""
    from dsref.reference import checkpoint as ckpt
    from dsref.reference import numpy_ref
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    with contextlib.ExitStack() as st:
        if fault == "rope_half":
            st.enter_context(mock.patch.object(numpy_ref, "apply_rope_interleaved", numpy_ref.apply_rope_half))
        elif fault == "mscale_rope_only":
            def unscaled(cfg):
                return cfg.qk_head_dim ** -0.5
            orig_rope = numpy_ref.apply_rope_interleaved
            orig_scale = ModelConfig.softmax_scale

            # q_pe.k_pe gets mscale^2 (sqrt on each side), the nope part none: patch both pieces.
            m_holder: dict[str, float] = {}

            def mla(x, w, cfg, positions, prefix, _orig=numpy_ref.mla):
                m_holder["m2"] = orig_scale.fget(cfg) / unscaled(cfg)
                return _orig(x, w, cfg, positions, prefix)

            def rope(x, cos, sin):
                return orig_rope(x, cos, sin) * np.sqrt(m_holder.get("m2", 1.0))
            st.enter_context(mock.patch.object(numpy_ref, "mla", mla))
            st.enter_context(mock.patch.object(numpy_ref, "apply_rope_interleaved", rope))
            st.enter_context(mock.patch.object(ModelConfig, "softmax_scale", property(unscaled)))
        elif fault == "yarn_no_blend":
            orig_freq = numpy_ref.rope_frequencies

            def freqs(cfg):
                inv, att = orig_freq(cfg)
                dim = cfg.qk_rope_head_dim
                return 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim), att
            st.enter_context(mock.patch.object(numpy_ref, "rope_frequencies", freqs))
        elif fault == "mscale_missing":
            st.enter_context(mock.patch.object(ModelConfig, "softmax_scale",
                                               property(lambda cfg: cfg.qk_head_dim ** -0.5)))
        elif fault in ("group_mask_zero", "weights_from_biased", "norm_flag_ignored", "no_routed_scaling",
                       "bias_bf16"):
            st.enter_context(mock.patch.object(
                numpy_ref, "gate", lambda x, w, cfg, prefix: _faulty_gate(x, w, cfg, prefix, fault)))
        elif fault == "fp8_floor_grid":
            st.enter_context(mock.patch.object(ckpt, "dequantize_fp8_blockwise", _floor_grid_dequant))
        elif fault == "dense_first_k_ignored":
            st.enter_context(mock.patch.object(
                ModelConfig, "is_moe_layer", lambda self, i: self.is_moe and i % self.moe_layer_freq == 0))
        elif fault == "q_lora_assumed":
            orig_mla = numpy_ref.mla

            def mla(x, w, cfg, positions, prefix):
                if cfg.q_lora_rank is not None:
                    return orig_mla(x, w, cfg, positions, prefix)
                D = cfg.hidden_size
                w2 = dict(w)
                w2[prefix + "q_a_proj.weight"] = np.eye(D)
                w2[prefix + "q_a_layernorm.weight"] = np.ones(D)
                w2[prefix + "q_b_proj.weight"] = w[prefix + "q_proj.weight"]
                return orig_mla(x, w2, cfg.replace(q_lora_rank=D), positions, prefix)
            st.enter_context(mock.patch.object(numpy_ref, "mla", mla))
        yield


class BrokenReference:
    """Engine: the float64 NumPy reference with one injected mistake (see FAULTS, inject)."""

    dtype = "float64"

    def __init__(self, fault: str):
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        self.fault, self.name = fault, f"broken[{fault}]"

    def __call__(self, checkpoint: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
        with inject(self.fault):
            cfg = read_config(checkpoint)
            w = {k: np.asarray(v, np.float64) for k, v in read_tensors(checkpoint, cfg)}
            return numpy_outputs(w, cfg, tokens)

