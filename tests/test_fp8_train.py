"""reference/fp8_train.py: DeepSeek-V3's FP8 training GEMMs (arXiv:2412.19437 sec. 3.3), simulated.

The quantisers against NumPy (hand-computed values, a float64 loop over tiles, the checkpoint's
block quantiser); fp8_linear and its custom gradient against a float64 NumPy implementation of
the recipe; the routed experts' hand-written backward under the recipe against autodiff of
fp8_linear; what must stay out of FP8 (router, attention, LM head); tiny-v3 end to end (slow).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsref.reference.checkpoint import dequantize_fp8_blockwise, quantize_fp8_blockwise
from dsref.reference.dispatch import expert_window_rows
from dsref.reference.fp8_train import Fp8Recipe, e4m3, fp8_linear, quant_blocks, quant_tiles, scale_of
from dsref.reference.model import attend_expanded, mla_absorbed, moe, routed_experts
from dsref.reference.presets import get_preset

HI = jax.lax.Precision.HIGHEST
R = Fp8Recipe()
# jit'd once per shape: op-by-op dispatch of the quantisers would compile every op separately
qtiles = jax.jit(quant_tiles, static_argnums=(1, 2, 3))
qblocks = jax.jit(quant_blocks, static_argnums=(1, 2))


# ------------------------------------------------------------------ NumPy float64 recipe
def np_e4m3(v):
    return np.clip(v, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def np_quant(x, tile_rows, tile_cols, pow2=False):
    """x [rows, cols] (float64 result) in tile_rows x tile_cols tiles from (0, 0), one loop per tile."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for r0 in range(0, x.shape[0], tile_rows):
        for c0 in range(0, x.shape[1], tile_cols):
            t = x[r0:r0 + tile_rows, c0:c0 + tile_cols]
            amax = np.abs(t).max()
            s = amax / 448 if amax > 0 else 1.0
            if pow2 and amax > 0:
                s = 2.0 ** np.ceil(np.log2(s))
            out[r0:r0 + tile_rows, c0:c0 + tile_cols] = np_e4m3(t / s) * s
    return out


def np_fp8_linear(x, w, dy, pow2=False):
    """float64: y = Q1x128(x) QB(W)^T, dx = Q1x128(dy) QB(W), dW = Q128x1(dy)^T Q128x1(x)."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    wq = np_quant(w, 128, 128, pow2)
    y = np.concatenate([np_quant(r[None], 1, 128, pow2) for r in x2]) @ wq.T
    dx = np.concatenate([np_quant(r[None], 1, 128, pow2) for r in dy2]) @ wq
    dw = np_quant(dy2, 128, 1, pow2).T @ np_quant(x2, 128, 1, pow2)
    return y.reshape(*x.shape[:-1], -1), dx.reshape(x.shape), dw


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ quantisers
def test_e4m3_rounds_to_nearest_even_like_ml_dtypes_and_saturates():
    grid = np.unique(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    grid = grid[np.isfinite(grid)]
    mid = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)  # exact ties: XLA must round them to even
    probe = np.concatenate([mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)),
                            np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 50])
    got = np.asarray(jax.jit(e4m3)(probe))
    np.testing.assert_array_equal(got, probe.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    # 1 + 2^-4 is the tie between 1 and 1.125: to even (1); 1.1875 (tie 1.125/1.25) -> 1.25
    np.testing.assert_array_equal(np.asarray(jax.jit(e4m3)(jnp.array([1.0625, 1.1875, 0.0]))), [1.0, 1.25, 0.0])
    # beyond 448 saturates (float8_e4m3fn has no inf: an unclamped cast gives NaN)
    big = jnp.array([449.0, 464.0, 500.0, 1e30, -1e6], jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(e4m3)(big)), [448, 448, 448, 448, -448])
    assert np.isnan(np.float32(500).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_quant_tiles_hand_computed_partial_tile_and_zero_tile():
    x = np.zeros((3, 160), np.float32)
    # row 0: tile 0 = [0, 128) with amax 3.5 -> scale 3.5/448 = 2^-7; tile 1 = [128, 160) (32
    # elements, a partial tile) with amax 0.875 -> scale 2^-9, whatever tile 0 holds
    x[0, :4] = [3.5, -0.5, 0.3, 1e-4]
    x[0, 128:131] = [0.875, 0.1, -0.01]
    x[1, 5] = 7.0  # row 1: tile 1 all zero (amax 0): zeros, no NaN
    x[2, 0] = 1e-44  # row 2: subnormal (XLA:CPU flushes it; elsewhere amax/448 underflows): 0, not NaN
    q = np.asarray(qtiles(x, -1, 128))
    # 0.5 / 2^-7 = 64 exactly; 0.3 * 128 = 38.4 -> 40 (step 4 in [32, 64)); 1e-4 * 128 = 0.0128,
    # below e4m3's smallest normal 2^-6: subnormal steps of 2^-9, 0.0128 / 2^-9 = 6.55 -> 7 * 2^-9
    np.testing.assert_array_equal(q[0, :4], np.float32([3.5, -0.5, 40 / 128, 7 * 2.0 ** -9 / 128]))
    # 0.1 * 512 = 51.2 -> 52 (step 4); -0.01 * 512 = -5.12 -> -5 (step 0.5 in [4, 8))
    np.testing.assert_array_equal(q[0, 128:131], np.float32([0.875, 52 / 512, -5 / 512]))
    assert np.all(q[0, 131:] == 0) and np.all(q[2] == 0) and np.isfinite(q).all()
    np.testing.assert_array_equal(q[1], x[1])  # 7.0 is its tile's amax: exact


def test_partial_tile_has_its_own_scale_not_a_shifted_block():
    """The partial-block pitfall: tiles start at 0; the last, partial tile [128, 160) must get its
    scale from its own 32 elements. An outlier at index 100 sits in tile 0, and also in the
    right-aligned block [32, 160) a shifted tiling would use: that scale would crush tile 1."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 160)) * 1e-2).astype(np.float32)
    x[:, 100] = 1e3
    q = np.asarray(qtiles(x, -1, 128))
    np.testing.assert_allclose(q, np_quant(x, 1, 128), rtol=1e-6, atol=0)
    shifted = np.concatenate([np_quant(x[:, :32], 1, 32), np_quant(x[:, 32:], 1, 128)], axis=1)
    assert rel(shifted[:, 128:], x[:, 128:]) > 0.1  # the wrong tiling really is wrong here
    assert np.all(np.abs(q[:, 128:] - x[:, 128:]) <= 2.0 ** -4 * np.abs(x[:, 128:]))  # e4m3's half-step


@pytest.mark.parametrize("shape,axis", [((150, 160), -1), ((150, 160), 0), ((7, 300), -1), ((300, 3), 0)])
def test_quant_tiles_matches_a_float64_loop_over_tiles(shape, axis):
    x = (np.random.default_rng(2).standard_normal(shape) * np.logspace(-3, 2, shape[1])).astype(np.float32)
    tiles = (1, 128) if axis == -1 else (128, 1)
    np.testing.assert_allclose(np.asarray(qtiles(x, axis, 128)), np_quant(x, *tiles), rtol=1e-6, atol=0)


def test_quant_blocks_equals_the_checkpoint_fp8_block_format():
    """(200, 300): partial blocks in both dimensions; also stacked [E, rows, cols] experts."""
    w = np.random.default_rng(3).standard_normal((3, 200, 300)).astype(np.float32)
    w[1, 128:, 256:] = 0.0  # an all-zero (partial) block
    want = dequantize_fp8_blockwise(*quantize_fp8_blockwise(w))
    got = np.asarray(qblocks(w, (128, 128)))
    np.testing.assert_allclose(got, want, rtol=2.0 ** -22, atol=0)  # XLA:CPU divides to 1 ulp: s, then q*s
    np.testing.assert_allclose(got[2], np_quant(w[2], 128, 128), rtol=1e-6, atol=0)
    assert np.all(got[1, 128:, 256:] == 0)


def test_pow2_scales():
    s = np.asarray(jax.jit(scale_of, static_argnums=1)(jnp.array([0.0, 448.0, 449.0, 1.0, 896.0, 3.5]), True))
    np.testing.assert_array_equal(s, [1.0, 1.0, 2.0, 2.0 ** -8, 2.0, 2.0 ** -7])
    x = np.random.default_rng(4).standard_normal((5, 200)).astype(np.float32)
    q = np.asarray(qtiles(x, -1, 128, True))
    np.testing.assert_array_equal(q, np_quant(x, 1, 128, pow2=True).astype(np.float32))  # no rounding in q * s
    assert not np.array_equal(q, np.asarray(qtiles(x, -1, 128)))


@pytest.mark.parametrize("bad", [dict(act_tile=0), dict(act_tile=128.0), dict(weight_block=[128, 128]),
                                 dict(weight_block=(128,)), dict(fmt="e5m2"), dict(pow2_scales=1)])
def test_recipe_refuses_bad_fields(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=f"Fp8Recipe.{field}"):
        Fp8Recipe(**bad)


def test_recipe_is_hashable_and_a_static_jit_argument():
    assert hash(Fp8Recipe()) == hash(Fp8Recipe()) and Fp8Recipe() == Fp8Recipe()
    assert Fp8Recipe(pow2_scales=True) != Fp8Recipe()
    f = jax.jit(fp8_linear, static_argnums=2)
    x, w = jnp.ones((2, 8)), jnp.ones((4, 8))
    np.testing.assert_array_equal(np.asarray(f(x, w, R)), np.full((2, 4), 8.0, np.float32))


# ------------------------------------------------------------------ the Linear
@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_linear_and_its_gradient_match_a_float64_numpy_recipe(pow2):
    """150 tokens (Wgrad: a full and a partial 128-token tile), in = 160, out = 200: partial
    tiles and blocks everywhere. Channels of very different sizes, so per-tile scales matter."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3, 50, 160)) * np.logspace(-2, 1, 160)).astype(np.float32)
    w = (rng.standard_normal((200, 160)) * 0.05).astype(np.float32)
    dy = (rng.standard_normal((3, 50, 200)) * np.logspace(1, -3, 200)).astype(np.float32)
    recipe = Fp8Recipe(pow2_scales=pow2)

    @jax.jit
    def run(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: fp8_linear(x, w, recipe), x, w)
        return (y, *vjp(dy))
    y, dx, dw = run(x, w, dy)
    y64, dx64, dw64 = np_fp8_linear(x, w, dy, pow2)
    for got, want in ((y, y64), (dx, dx64), (dw, dw64)):
        assert got.dtype == jnp.float32
        assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()  # f32 accumulation


def test_fp8_gradient_error_is_in_the_e4m3_band():
    """Relative to the exact float32 Linear the FP8 gradients are off by about e4m3's rounding
    (2^-4 relative half-step at most, ~1-3% in norm): not 0 (FP8 really happens), not more."""
    rng = np.random.default_rng(6)
    x, w = jnp.asarray(rng.standard_normal((64, 256)), jnp.float32), jnp.asarray(rng.standard_normal((192, 256)))
    dy = jnp.asarray(rng.standard_normal((64, 192)), jnp.float32)
    fs = (lambda x, w: fp8_linear(x, w, R), lambda x, w: jnp.einsum("mk,nk->mn", x, w, precision=HI),
          lambda x, w: fp8_linear(x, w, Fp8Recipe(wgrad_requant=True)))
    g8, g32, req = jax.jit(lambda x, w, dy: [jax.vjp(f, x, w)[1](dy) for f in fs])(x, w, dy)
    for a, b in zip(g8, g32):
        assert 2.0 ** -8 < rel(a, b) < 2.0 ** -4, rel(a, b)
    np.testing.assert_array_equal(np.asarray(req[0]), np.asarray(g8[0]))  # Dgrad: the same
    assert 0 < rel(req[1], g8[1]) < 2.0 ** -4  # Wgrad from the requantised FP8 copy: close, not equal


# ------------------------------------------------------------------ routed experts
def test_expert_rows_backward_applies_the_recipe_per_window():
    """routed_experts' hand-written backward (model._expert_rows_bwd) under the recipe equals
    autodiff through fp8_linear over the same GEMMs: per expert, per window of C rows. 24 tokens
    x 2 of 4 experts, 12 rows each, C = 8: every expert's second window ends with the next
    expert's first 4 rows. Those of experts 1 and 3 are 100x larger tokens: they must not enter
    the max-abs of experts 0 and 2's Wgrad token tiles."""
    E, M, D, F = 4, 24, 160, 136
    first = np.arange(M) >= 12
    ids = np.stack([np.where(first, 1, 0), np.where(first, 3, 2)], 1).astype(np.int32)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((M, D)).astype(np.float32) * np.where(first, 100.0, 1.0)[:, None].astype(np.float32)
    wts = rng.uniform(0.2, 1.0, (M, 2)).astype(np.float32)
    ws = [jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32) for s in ((E, F, D), (E, F, D), (E, D, F))]
    cot = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)

    def experts(x, wg, wu, wd, prec):
        w = {"experts.gate_proj.weight": wg, "experts.up_proj.weight": wu, "experts.down_proj.weight": wd}
        return routed_experts(w, x, jnp.asarray(ids), jnp.asarray(wts), E, prec)

    # the reference: each expert's (token, slot) rows in dispatch order, cut into windows of C,
    # each window one SwiGLU of fp8_linear (zero rows pad it to C: no tile's max-abs changes)
    order, C = np.argsort(ids.reshape(-1), stable=True), expert_window_rows(M * 2, E)
    assert C == 8
    wins = [(e, rows[c0:c0 + C]) for e in range(E) for rows in [order[ids.reshape(-1)[order] == e]]
            for c0 in range(0, len(rows), C)]
    assert len(wins) == 8 and any(len(r) < C for _, r in wins[:-1])
    flat = np.zeros((len(wins), C), np.int64)
    valid = np.zeros((len(wins), C), np.float32)
    for i, (_, r) in enumerate(wins):
        flat[i, :len(r)], valid[i, :len(r)] = r, 1.0
    tok, e_of = flat // 2, np.array([e for e, _ in wins])

    def swiglu8(xe, wg, wu, wd):
        return fp8_linear(jax.nn.silu(fp8_linear(xe, wg, R)) * fp8_linear(xe, wu, R), wd, R)

    def reference(x, wg, wu, wd):
        y = jax.vmap(swiglu8)(x[tok] * valid[..., None], wg[e_of], wu[e_of], wd[e_of])
        y = y * (wts.reshape(-1)[flat] * valid)[..., None]
        return jnp.zeros((M, D), jnp.float32).at[tok.reshape(-1)].add(y.reshape(-1, D))

    @jax.jit
    def run(*args):
        out = []
        for f in (lambda *a: experts(*a, R), reference, lambda *a: experts(*a, HI)):
            y, vjp = jax.vjp(f, *args)
            out.append((y, vjp(cot)))
        return out

    (y8, g8), (yr, gr), (_, g32) = run(jnp.asarray(x), *ws)
    assert rel(y8, yr) < 1e-6
    assert rel(g8[0], gr[0]) < 1e-5 and rel(g8[0], g32[0]) > 1e-3
    for a, b, c in zip(g8[1:], gr[1:], g32[1:]):  # each expert's weight gradient on its own
        for e in range(E):
            assert rel(a[e], b[e]) < 1e-5, (e, rel(a[e], b[e]))
            assert rel(a[e], c[e]) > 1e-3  # and the backward really was FP8


# ------------------------------------------------------------------ what stays out of FP8
def _moe_weights(cfg, rng):
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    Fs = F * cfg.n_shared_experts
    w = {"gate.weight": rng.standard_normal((E, D)) * 0.1, "gate.e_score_correction_bias": rng.standard_normal(E) * 0.1,
         "experts.gate_proj.weight": rng.standard_normal((E, F, D)) * 0.1,
         "experts.up_proj.weight": rng.standard_normal((E, F, D)) * 0.1,
         "experts.down_proj.weight": rng.standard_normal((E, D, F)) * 0.1,
         "shared_experts.gate_proj.weight": rng.standard_normal((Fs, D)) * 0.1,
         "shared_experts.up_proj.weight": rng.standard_normal((Fs, D)) * 0.1,
         "shared_experts.down_proj.weight": rng.standard_normal((D, Fs)) * 0.1}
    return {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}


def test_router_is_not_fp8_but_the_experts_are():
    """Same input to the MoE block with and without the recipe: the router's logits, choices and
    weights bit-identical (V3 sec. 3.3.1: MoE gating stays in higher precision), the output not."""
    cfg = get_preset("tiny-v3")
    rng = np.random.default_rng(8)
    w, x = _moe_weights(cfg, rng), jnp.asarray(rng.standard_normal((2, 12, cfg.hidden_size)), jnp.float32)

    @jax.jit
    def run(w, x):
        caps = [{}, {}]
        outs = [moe(w, cfg, x, p, c) for p, c in zip((HI, R), caps)]
        return outs, caps

    (y32, y8), (c32, c8) = run(w, x)
    for k in ("router_logits", "topk_ids", "topk_weights"):
        np.testing.assert_array_equal(np.asarray(c8[k]), np.asarray(c32[k]))
    assert 1e-3 < rel(y8, y32) < 0.1


def test_attention_operators_are_not_fp8():
    cfg = get_preset("tiny-v3")
    H, N, P, A, R_ = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                      cfg.kv_lora_rank)
    rng = np.random.default_rng(9)
    B, T = 2, 10

    def r(*s):
        return jnp.asarray(rng.standard_normal(s), jnp.float32)

    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
    q, k, v = r(B, T, H, N + P), r(B, T, H, N + P), r(B, T, H, A)
    w = {"kv_b_proj.weight": r(H * (N + A), R_)}
    lat = (r(B, T, H, N), r(B, T, H, P), r(B, T, R_), r(B, T, P))

    @jax.jit
    def run(q, k, v, w, lat):
        return [(attend_expanded(cfg, q, k, v, mask, p), mla_absorbed(w, cfg, *lat, mask, p)) for p in (R, HI)]

    (e8, a8), (e32, a32) = run(q, k, v, w, lat)
    np.testing.assert_array_equal(np.asarray(e8), np.asarray(e32))
    np.testing.assert_array_equal(np.asarray(a8), np.asarray(a32))


# ------------------------------------------------------------------ tiny-v3 end to end
@pytest.fixture(scope="module")
def tiny_v3_runs():
    """float32 and FP8: the next-token loss (naive MLA, as training runs it) and its gradient, the
    logits and final hidden state, and the MTP module's logits and hidden state (forward only: its
    layer is the same code as the main ones). Compiled at XLA:CPU's lowest backend optimisation:
    the compile is nearly all of this fixture's time; the ops and so the numbers are the same."""
    from flax import nnx

    from dsref.reference.model import DeepseekModel, forward, mtp_logits
    from dsref.reference.params import head_name
    cfg = get_preset("tiny-v3")
    model = DeepseekModel(cfg, rngs=nnx.Rngs(0), with_mtp=True)
    gd, st = nnx.split(model)
    tok = jnp.asarray(np.random.default_rng(10).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)

    def loss(s, prec):
        m = nnx.merge(gd, s)
        o = forward(m, tok, mla_form="naive", prec=prec)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(o.logits[:, :-1]), tok[:, 1:, None], -1).mean()
        return ce, (o, mtp_logits(m, tok[:, 1:], jax.lax.stop_gradient(o.hidden[:, :-1]), prec=prec))

    opts = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    out = {}
    for name, prec in (("f32", None), ("fp8", R)):
        f = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
        (v, aux), g = f.lower(st, prec).compile(compiler_options=opts)(st)
        out[name] = (float(v), np.concatenate([np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(g)]), *aux)
    return out, jnp.asarray(model.globals[head_name(cfg)])


@pytest.mark.slow
def test_tiny_v3_fp8_loss_and_gradient_track_float32(tiny_v3_runs):
    out, _ = tiny_v3_runs
    (v32, g32, o32, m32), (v8, g8, o8, m8) = out["f32"], out["fp8"]
    assert v8 != v32 and abs(v8 / v32 - 1) < 0.01
    assert np.isfinite(g8).all()
    cos = g8 @ g32 / np.linalg.norm(g8) / np.linalg.norm(g32)
    assert cos > 0.99, cos
    assert rel(g8, g32) > 1e-3  # FP8 reached the gradient
    # logits: each FP8 GEMM is ~4% off (two e4m3 operands, ~2.6% each); a few in a row, ~6%
    assert 1e-3 < rel(o8.logits, o32.logits) < 0.15
    assert 1e-3 < rel(m8.logits, m32.logits) < 0.15  # the MTP module under the recipe too


@pytest.mark.slow
def test_tiny_v3_lm_head_is_not_fp8(tiny_v3_runs):
    """The FP8 forward's logits (main and MTP) are their final hidden state times the head in
    float32, and not the FP8 GEMM of the same operands (off by about e4m3's rounding)."""
    out, head = tiny_v3_runs
    for o in out["fp8"][2:]:
        plain = jnp.einsum("btd,vd->btv", o.hidden, head, precision=HI)
        assert rel(o.logits, plain) < 1e-6
        assert rel(fp8_linear(o.hidden, head, R), plain) > 1e-3
