"""DeepSeek's own (FP8 + Hadamard) form of the V3.2 lightning indexer, and its FP8 KV-cache
rounding, emulated in float64 NumPy: options next to the exact oracle of reference/dsa.py.

The project's oracle is the exact form (reference/dsa.py, as transformers computes it). DeepSeek's
inference code computes the same scores through an orthogonal rotation and FP8 e4m3, so an engine
that follows it selects a slightly different top-k; docs/dsa-precision.md measures how often.
Sources (github deepseek-ai/DeepSeek-V3.2-Exp, ``inference/``):

  * commit 3b99a53 (2025-10-02), the stored GitHub snapshot: ``kernel.py`` act_quant_kernel
    (lines 20-33 fast_log2_ceil / fast_round_scale, 66-79 the per-block amax, scale and clamp,
    109 ``round_scale=scale_fmt is not None``), fp8_index_kernel (lines 200-251: relu, times
    q_s per head, sum over heads, times k_s per key); ``model.py`` rotate_activation (424-428)
    and Indexer.forward (465-476); ``config_671B_v3.2.json``: ``"scale_fmt": "ue8m0"``.
  * the 2025-11-17 update of ``model.py`` (not in that snapshot; read from copies of the updated
    file in the code index): indexer RoPE not interleaved (reference/dsa.py has it),
    ``weights_proj`` kept in float32 and applied to ``x.float()``, and in MLA.forward, after
    kv_norm: "we use fp8 kv cache in actual deployment, so here we simulate the precision by
    casting kv to fp8 and then back to bf16": ``act_quant(kv, block_size, scale_fmt)`` with the
    module-wide ``block_size = 128``, dequantised as ``(kv_fp8 * kv_scale).to(bf16)``.

The official indexer, per query t and key s (I heads, J = index_head_dim = one 128-block):

  q', k'    = H q, H k             H: Walsh-Hadamard (Sylvester order) times J^-1/2, orthogonal
  q8, sq    = act_quant(q')        per (t, head): sq = amax/448 rounded UP to a power of two
  k8, sk    = act_quant(k')        per key s (the indexer key cache: FP8 + one float32 scale)
  w'[t, h]  = w[t, h] * sq[t, h]   w = (x W_w^T) I^-1/2 J^-1/2, float32 (dsa.index_head_weights)
  score[t,s]= sk[s] * sum_h relu(q8[t,h] . k8[s]) * w'[t, h]      float32 out (fp8_index)

Exactly computed (no rounding) this is dsa.index_scores: H is orthogonal (q'.k' = q.k) and the
scales are positive, so they pass through relu. ``quantize=False`` computes that, a test.

What is NOT emulated: the float32 accumulation order inside the kernels (tensor-core dot of 128
FP8 products, a sum over 64 heads: ~1e-7 relative, against FP8's 2^-4), and by default the bf16
roundings of q and k around the Hadamard (the official q, k are bf16; ``bf16=True`` adds them),
nor the float32 head weights (float64 here, as in dsa.py: a 1e-7 effect).
The element quotient x / scale is taken in float64 (the kernel: bf16 / float32 in float32); with
a power-of-two scale both are exact, so only scale_fmt=None could round differently, rarely.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from dsref.reference import dsa
from dsref.reference.config import ModelConfig
from dsref.reference.numpy_ref import rope_cos_sin

f64 = np.float64
E4M3 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
FP8_MAX = 448.0       # largest finite float8_e4m3fn (kernel.py fp8_max)
AMAX_FLOOR = 1e-4     # kernel.py line 70: amax = max(amax, 1e-4), so an all-zero block has a scale
BLOCK = 128           # model.py ``block_size``: act_quant's group along the last axis
SCALE_FMTS = (None, "ue8m0")


# ------------------------------------------------------------------ Hadamard (rotate_activation)
def hadamard(x):
    """y = H_n x / sqrt(n) on the last axis: H_n the Sylvester Hadamard matrix (H_2n = [[H, H],
    [H, -H]], scipy.linalg.hadamard's order), as fast_hadamard_transform(x, scale=n^-1/2) in
    model.py rotate_activation. Orthonormal and symmetric: hadamard(hadamard(x)) == x."""
    x = np.asarray(x, f64)
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: last axis length {n} is not a power of two")
    y = x.reshape(-1, n).copy()
    h = 1
    while h < n:  # butterflies: pair (j, j + h) within each block of 2h -> (a + b, a - b)
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = np.stack([a + b, a - b], axis=2)
        h *= 2
    return y.reshape(x.shape) * n ** -0.5


# ------------------------------------------------------------------ act_quant (kernel.py)
def _check_fmt(scale_fmt):
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt: {scale_fmt!r} is not one of {SCALE_FMTS} (config.json "
                         f"quantization_config.scale_fmt; V3.2 uses 'ue8m0')")


def block_scales(amax, scale_fmt="ue8m0"):
    """Per-block scale from the block's max |x|, in float32 as the kernel computes it:
    s = amax * (1/448) (kernel line 74); ue8m0 (any non-None scale_fmt, line 109): s rounded UP
    to a power of two, 2^ceil(log2 s) (fast_log2_ceil: exponent + 1 unless the mantissa is 0)."""
    _check_fmt(scale_fmt)
    a = np.maximum(np.asarray(amax, f64), AMAX_FLOOR).astype(np.float32)
    s = (a * np.float32(1.0 / FP8_MAX)).astype(np.float32)  # float32 product, as in the kernel
    if scale_fmt is None:
        return s.astype(f64)
    m, e = np.frexp(s.astype(f64))        # s = m 2^e, m in [0.5, 1)
    return np.ldexp(1.0, np.where(m == 0.5, e - 1, e)).astype(f64)  # exact powers of two


def act_quant_fp8(x, block: int = BLOCK, scale_fmt="ue8m0"):
    """(values, scales): x [..., N] in blocks of ``block`` along the last axis; per block
    s = block_scales(max |x|), values = e4m3(clamp(x / s, -448, 448)) (round to nearest even,
    ml_dtypes), returned as float64 [..., N] (exact e4m3 values); scales [..., N / block].
    x ~= values * s, blockwise."""
    x = np.asarray(x, f64)
    N = x.shape[-1]
    if block < 1 or N % block:
        raise ValueError(f"act_quant_fp8: last axis {N} is not a multiple of block {block}")
    xb = x.reshape(*x.shape[:-1], N // block, block)
    s = block_scales(np.abs(xb).max(-1), scale_fmt)
    y = np.clip(xb / s[..., None], -FP8_MAX, FP8_MAX).astype(E4M3).astype(f64)
    return y.reshape(x.shape), s


def dequant(values, scales, block: int):
    """values [..., N] * scales [..., N / block], blockwise (float64, exact)."""
    v = np.asarray(values, f64)
    return (v.reshape(*v.shape[:-1], -1, block) * np.asarray(scales, f64)[..., None]).reshape(v.shape)


def _block_for(n: int, block: int = BLOCK) -> int:
    """The official code asserts n % 128 == 0 (every V3.2 size is); a smaller test model (n < 128)
    gets one block over the whole vector, the same layout: one scale per vector."""
    return block if n >= block else n


def round_bf16(x):
    """Round to bfloat16 (nearest even) and back: what a bf16 tensor holds."""
    return np.asarray(x, f64).astype(BF16).astype(f64)


# ------------------------------------------------------------------ FP8 KV cache (MLA.forward)
def round_kv_fp8(kv, block: int | None = None, scale_fmt="ue8m0", bf16: bool = True):
    """The latent c_kv [..., R] (after kv_norm) as the updated MLA.forward stores it:
    act_quant in 1 x ``block`` blocks (block_size = 128: 4 scales per 512-wide V3.2 latent; R <
    128: one block), dequantised, then cast to bf16 (with ue8m0 scales that cast is exact).
    k_pe (the RoPE part) is not rounded: the code stores it unquantised in pe_cache."""
    kv = np.asarray(kv, f64)
    b = _block_for(kv.shape[-1]) if block is None else block
    v, s = act_quant_fp8(kv, b, scale_fmt)
    out = dequant(v, s, b)
    return round_bf16(out) if bf16 else out


# ------------------------------------------------------------------ fp8_index (kernel.py)
def index_scores_official(q, k, hw, quantize: bool = True, rotate: bool = True, scale_fmt="ue8m0",
                          bf16: bool = False, block: int | None = None):
    """Index scores [B, T, S] from q [B, T, I, J], k [B, S, J], hw [B, T, I] (dsa.index_head_weights:
    I^-1/2 J^-1/2 already folded in, as model.py folds them into ``weights``).

    quantize=False: the rotation alone, in float64 (equals dsa.index_scores to rounding).
    quantize=True: rotate (unless rotate=False, to show what it is for), act_quant q per
    (token, head) and k per key, then fp8_index's order: relu(q8 . k8) * (hw * sq) summed over
    heads, times sk; the kernel writes float32, so the result is rounded to float32.
    bf16=True: q and k are rounded to bf16 before and after the rotation (the official tensors
    are bf16: rotate_activation asserts it and returns bf16)."""
    q, k, hw = np.asarray(q, f64), np.asarray(k, f64), np.asarray(hw, f64)
    J = q.shape[-1]
    if k.shape[-1] != J:
        raise ValueError(f"index_scores_official: q head dim {J} != k head dim {k.shape[-1]}")
    if bf16:
        q, k = round_bf16(q), round_bf16(k)
    if rotate:
        q, k = hadamard(q), hadamard(k)
        if bf16:
            q, k = round_bf16(q), round_bf16(k)
    if not quantize:
        return dsa.index_scores(q, k, hw)
    b = _block_for(J) if block is None else block
    if J != b:
        raise ValueError(f"index_scores_official: fp8_index takes one scale per head vector; "
                         f"index_head_dim {J} != block {b}")
    q8, sq = act_quant_fp8(q, b, scale_fmt)      # sq [B, T, I, 1]
    k8, sk = act_quant_fp8(k, b, scale_fmt)      # sk [B, S, 1]
    weights = hw * sq[..., 0]                    # model.py: weights.unsqueeze(-1) * q_scale * ...
    # optimize=True: BLAS (the plain einsum loop is ~6x slower at V3.2's 64 x 128 x S)
    logits = np.maximum(np.einsum("bthj,bsj->bths", q8, k8, optimize=True), 0.0)  # relu first
    summed = np.einsum("bth,bths->bts", weights, logits, optimize=True)
    return (summed * sk[:, None, :, 0]).astype(np.float32).astype(f64)  # o: FP32


def indexer_official(x, w, cfg: ModelConfig, positions, prefix: str, interleaved: bool = False, *,
                     quantize: bool = True, rotate: bool = True, scale_fmt="ue8m0",
                     bf16: bool = False) -> dsa.Selection:
    """dsa.indexer with DeepSeek's FP8 + Hadamard scoring: same arguments, same Selection
    (ids, mask, tie, scores). Queries, keys, head weights, visibility and the top-k (lower
    position first among equal scores) are dsa.py's own functions; only the scoring differs.
    ``tie`` is computed on the float32 FP8 scores, where ties are more common than in float64."""
    cos, sin = rope_cos_sin(cfg, positions)
    q = dsa.index_queries(dsa.compressed_query(x, w, prefix), w, cfg, cos, sin, prefix, interleaved)
    k = dsa.index_keys(x, w, cfg, cos, sin, prefix, interleaved)
    hw = dsa.index_head_weights(x, w, cfg, prefix)
    scores = index_scores_official(q, k, hw, quantize, rotate, scale_fmt, bf16)
    return dsa.select_topk(scores, dsa.visible(positions, positions), cfg.index_topk)
