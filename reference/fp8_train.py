"""DeepSeek-V3's FP8 training GEMMs, simulated: fine-grained E4M3 operands, float32 accumulation.

DeepSeek-V3 technical report (arXiv:2412.19437), sec. 3.3:
  3.3.1  "all three GEMMs associated with the Linear operator, namely Fprop (forward pass),
         Dgrad (activation backward pass), and Wgrad (weight backward pass), are executed in
         FP8"; kept in their original precision (BF16/FP32): "the embedding module, the output
         head, MoE gating modules, normalization operators, and attention operators".
  3.3.2  Fine-grained quantization: "for activations, we group and scale elements on a 1x128
         tile basis (i.e., per token per 128 channels); and (2) for weights ... on a 128x128
         block basis"; E4M3 "on all tensors" (no E5M2 for gradients); scales computed online
         from the current tensor's max-abs ("for each 1x128 activation tile or 128x128 weight
         block"), no delayed/history scaling; the per-group scales lie along the inner
         (contraction) dimension K and partial sums are promoted to FP32 every N_C = 128.
  App. B.2  the tile-wise grouping "requires different groupings for activation quantization,
         i.e., 1x128 in forward pass and 128x1 for backward pass. A similar process is also
         required for the activation gradient" (quantising the activation gradient per 128x128
         block instead made a 16B MoE diverge).

Hence, for y = x W^T (x [M, K] tokens x in-channels, W [N, K] in checkpoint layout):
  Fprop  y  = Q_{1x128}(x)    Q_{128x128}(W)^T      contraction K: x per token per 128 of K
  Dgrad  dx = Q_{1x128}(dy)   Q_{128x128}(W)        contraction N: dy per token per 128 of N
  Wgrad  dW = Q_{128x1}(dy)^T Q_{128x1}(x)          contraction M: 128 tokens per channel
The square weight blocks quantise W and W^T alike, so Dgrad uses the very FP8 weight of Fprop.

Q per tile/block: s = amax|tile| / 448 (V3: a plain FP32 scale; ``pow2_scales`` rounds s up to
a power of two, the UE8M0 scales of later DeepGEMM kernels and of V3's own cached
attention-output activations, sec. 3.3.3), q = e4m3(x / s), x ~ q * s. e4m3 rounds to nearest
even and saturates at +-448 (float8_e4m3fn has no infinity: an unclipped overflow would be
NaN; the real cast kernels clamp first, and with s = amax/448 only a rounding hair can overflow).
An all-zero tile gets s = 1 (its values are 0 whatever s is; so does a tile whose amax/448
underflows float32). A tile covers only the elements
that exist: a dimension that is not a multiple of 128 ends in a partial tile whose scale comes
from its own elements (zero padding leaves the amax unchanged); tiles start at index 0.

Simulation, not emulation: the dequantised operands (q * s, float32) are multiplied in float32
(Precision.HIGHEST, so no TF32 on GPUs). The products of two e4m3 values are exact in float32;
q * s rounds once (2^-24 relative, none with pow2 scales), far below e4m3's 2^-4. The Tensor
Cores' ~14-bit accumulation inside each 128-chunk (sec. 3.3.2) is not modelled: V3 promotes to
FP32 every 128 elements to make it negligible, which is the exact-f32 model here.

In the model (reference/model.py, ``prec=Fp8Recipe()``): q_a/q_b (or q), kv_a, kv_b (naive MLA),
o_proj, the dense and shared-expert MLPs, the MTP's eh_proj and the routed experts are FP8;
the embedding, norms, router, attention scores/softmax/values and the LM head are not. The
routed experts' backward runs per window of C <= 128 rows of one expert, so their Wgrad token
tiles are those windows (exactly 128 rows when C = 128; finer, so slightly more accurate, than a
grouped GEMM's 128-row tiles when C < 128). Not modelled: E5M6 and power-of-two scales for the
attention-output activations, FP8 caching of the SwiGLU inputs, FP8 dispatch (sec. 3.3.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

F32 = jnp.float32
E4M3_MAX = 448.0  # largest finite float8_e4m3fn (reference/checkpoint.py uses the same)
HIGHEST = jax.lax.Precision.HIGHEST


@dataclass(frozen=True)
class Fp8Recipe:
    """The FP8 GEMM recipe (frozen and hashable: a static argument of jit and custom_vjp).

    fmt           "e4m3" on every tensor (V3 sec. 3.3.2 "Mantissa over Exponents")
    act_tile      T: activations and output gradients in 1xT tiles along a GEMM's contraction
                  (1xT per token for Fprop/Dgrad, Tx1 per channel along tokens for Wgrad)
    weight_block  (rows, cols) blocks of W [out, in]
    pow2_scales   scales rounded up to powers of two (UE8M0); V3's Linear GEMMs: False
    wgrad_requant Wgrad's x is the Fprop copy Q_{1xT}(x) requantised to Tx1 tiles (an FP8
                  activation cache converted, sec. 3.3.3) instead of x quantised afresh
    """

    fmt: str = "e4m3"
    act_tile: int = 128
    weight_block: tuple[int, int] = (128, 128)
    pow2_scales: bool = False
    wgrad_requant: bool = False

    def __post_init__(self):
        if self.fmt != "e4m3":
            raise ValueError(f"Fp8Recipe.fmt: only 'e4m3' (V3 uses E4M3 on all tensors), got {self.fmt!r}")
        if not _pos_int(self.act_tile):
            raise ValueError(f"Fp8Recipe.act_tile must be a positive integer, got {self.act_tile!r}")
        b = self.weight_block
        if not (isinstance(b, tuple) and len(b) == 2 and all(_pos_int(v) for v in b)):
            raise ValueError(f"Fp8Recipe.weight_block must be a tuple of two positive integers, got {b!r}")
        for name in ("pow2_scales", "wgrad_requant"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Fp8Recipe.{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def fmax(self) -> float:
        return E4M3_MAX


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# ------------------------------------------------------------------ quantisers
def e4m3(v):
    """v (float32) rounded to the nearest float8_e4m3fn value (ties to even), saturated at +-448;
    returned as float32. XLA's f32 -> f8e4m3fn convert rounds like ml_dtypes (checked in the tests)."""
    return jnp.clip(v, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn).astype(F32)


def scale_of(amax, pow2: bool = False):
    """The dequantisation scale of a tile with max-abs ``amax``: amax/448; pow2: the smallest power
    of two >= amax/448 (so nothing saturates). 1 where amax/448 is 0 (an all-zero tile, or one so
    small that amax/448 underflows float32: its values round to 0, as they would in e4m3 anyway)."""
    s = amax / F32(E4M3_MAX)
    ok = s > 0
    if pow2:
        m, e = jnp.frexp(s)  # s = m 2^e, m in [0.5, 1): s is a power of two iff m == 0.5
        s = jnp.ldexp(jnp.ones_like(s), jnp.where(m == 0.5, e - 1, e))
    return jnp.where(ok, s, F32(1.0))


def _quant_grouped(xg, axes, pow2):
    """xg with each tile spanning ``axes``: e4m3(x / s) * s, s from that tile's max-abs."""
    s = scale_of(jnp.max(jnp.abs(xg), axis=axes, keepdims=True), pow2)
    return e4m3(xg / s) * s


def quant_tiles(x, axis: int = -1, tile: int = 128, pow2: bool = False):
    """x quantised-dequantised (float32, x's shape) in tiles of ``tile`` consecutive elements
    along ``axis``, one scale each (all other axes: tile size 1). Tiles start at index 0; the
    last one is partial when the axis is not a multiple of ``tile`` (zero-padded: amax unchanged)."""
    x = jnp.moveaxis(jnp.asarray(x).astype(F32), axis, -1)
    n = x.shape[-1]
    nt = -(-n // tile)
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nt * tile - n)])
    q = _quant_grouped(xp.reshape(*x.shape[:-1], nt, tile), -1, pow2)
    return jnp.moveaxis(q.reshape(xp.shape)[..., :n], -1, axis)


def quant_blocks(w, block: tuple[int, int] = (128, 128), pow2: bool = False):
    """w [..., rows, cols] quantised-dequantised (float32) in (br, bc) blocks of the last two axes,
    one scale each, blocks from (0, 0), partial at the ends (as reference/checkpoint.py's
    ``quantize_fp8_blockwise``, whose dequantised values these equal)."""
    w = jnp.asarray(w).astype(F32)
    (br, bc), (r, c) = block, w.shape[-2:]
    nr, nc = -(-r // br), -(-c // bc)
    wp = jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, nr * br - r), (0, nc * bc - c)])
    q = _quant_grouped(wp.reshape(*w.shape[:-2], nr, br, nc, bc), (-3, -1), pow2)
    return q.reshape(wp.shape)[..., :r, :c]


# ---------------------------------------------------------------- the three GEMMs
def fprop(x, w, recipe: Fp8Recipe):
    """y [..., N] = Q_{1xT}(x) Q_B(W)^T, float32; x [..., K], W [N, K] (sec. 3.3.2, Fig. 7a)."""
    xq = quant_tiles(x, -1, recipe.act_tile, recipe.pow2_scales)
    wq = quant_blocks(w, recipe.weight_block, recipe.pow2_scales)
    return jnp.einsum("...k,nk->...n", xq, wq, precision=HIGHEST)


def dgrad(dy, w, recipe: Fp8Recipe):
    """dx [..., K] = Q_{1xT}(dy) Q_B(W), float32; dy [..., N] tiled per token along N (App. B.2)."""
    dq = quant_tiles(dy, -1, recipe.act_tile, recipe.pow2_scales)
    wq = quant_blocks(w, recipe.weight_block, recipe.pow2_scales)
    return jnp.einsum("...n,nk->...k", dq, wq, precision=HIGHEST)


def wgrad(dy, x, recipe: Fp8Recipe):
    """dW [N, K] = Q_{Tx1}(dy)^T Q_{Tx1}(x), float32; dy [M, N], x [M, K]: the contraction is
    over the M tokens, so both are tiled T tokens x 1 channel (App. B.2: "128x1 for backward").
    The caller flattens the tokens and zeroes rows that are not part of the GEMM (they would
    enter the max-abs of their tile)."""
    t, p2 = recipe.act_tile, recipe.pow2_scales
    if recipe.wgrad_requant:  # the FP8 copy Fprop used (1xT), converted to Tx1 tiles
        x = quant_tiles(x, -1, t, p2)
    return jnp.einsum("mn,mk->nk", quant_tiles(dy, 0, t, p2), quant_tiles(x, 0, t, p2), precision=HIGHEST)


# ------------------------------------------------------------------- the Linear
def fp8_linear(x, w, recipe: Fp8Recipe):
    """x @ W^T (W [out, in], checkpoint layout) with V3's FP8 GEMMs in the forward and backward
    pass: Fprop forward; the custom gradient is dx = Dgrad(dy, W), dW = Wgrad(dy, x) (tokens =
    every leading axis of x, flattened). Result in x's dtype; gradients in x's and W's dtypes."""
    return _fp8_linear(recipe, x, w)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_linear(recipe, x, w):
    return fprop(x, w, recipe).astype(x.dtype)


def _fp8_linear_fwd(recipe, x, w):
    return _fp8_linear(recipe, x, w), (x, w)


def _fp8_linear_bwd(recipe, res, dy):
    x, w = res
    dy = dy.astype(F32)
    dx = dgrad(dy, w, recipe)
    dw = wgrad(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), recipe)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)
