"""DeepSeek's FP8 + Hadamard indexer and FP8 KV rounding (reference/dsa_official.py) against the
exact oracle (reference/dsa.py) and hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from dsref.reference import dsa
from dsref.reference import dsa_official as off
from dsref.reference.params import tensors
from dsref.reference.presets import get_preset

CFG = get_preset("tiny-v32")
PRE = "model.layers.1.self_attn."


def _weights(seed: int, cfg=CFG):
    """Layer 1's attention weights (float64), as tests/test_dsa.py builds them."""
    rng = np.random.default_rng(seed)
    w = {}
    for t in tensors(cfg):
        if t.layer == 1 and t.rel.startswith("self_attn."):
            norm = t.rel.endswith("norm.weight")
            w[t.name] = 1 + 0.3 * rng.normal(size=t.shape) if norm else 0.3 * rng.normal(size=t.shape)
    return w


def _inputs(seed: int, B=2, T=13, cfg=CFG):
    rng = np.random.default_rng(100 + seed)
    return rng.normal(size=(B, T, cfg.hidden_size)), np.broadcast_to(np.arange(T), (B, T))


# ------------------------------------------------------------------ Hadamard
def test_hadamard_is_the_sylvester_matrix_and_orthonormal():
    h2 = np.array([[1, 1], [1, -1]])
    h8 = np.kron(np.kron(h2, h2), h2)  # Sylvester: H_2n = [[H, H], [H, -H]], entries +-1
    got = off.hadamard(np.eye(8))
    assert np.array_equal(np.sign(got), h8) and np.allclose(got, h8 / np.sqrt(8), rtol=1e-15, atol=0)
    x = np.random.default_rng(0).normal(size=(3, 5, 128))
    y = off.hadamard(x)
    assert np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    assert np.allclose(off.hadamard(y), x, atol=1e-13)  # symmetric and orthogonal: its own inverse
    with pytest.raises(ValueError, match="power of two"):
        off.hadamard(np.ones(12))


# ------------------------------------------------------------------ act_quant
def test_act_quant_on_a_hand_computed_block():
    x = np.array([3.0, -1.0, 0.3, 0.0])
    # ue8m0: 3/448 = 0.0067 -> 2^-7 = 0.0078125; x / s = 384, -128, 38.4 -> e4m3 40 (ulp 4), 0
    v, s = off.act_quant_fp8(x, 4, "ue8m0")
    assert s.tolist() == [2.0 ** -7] and v.tolist() == [384.0, -128.0, 40.0, 0.0]
    # no rounding of the scale: s = float32(3 * float32(1/448)), the max maps onto 448 (clamped)
    v, s = off.act_quant_fp8(x, 4, None)
    assert s[0] == np.float32(np.float32(3.0) * np.float32(1 / 448)) and v[0] == 448.0
    assert v[1] == -144.0  # -1/s = -149.33 -> nearest e4m3 (step 16 in [128, 256): 144 or 160)
    # two blocks, each with its own scale; an all-zero block takes the 1e-4 floor, rounded up
    v, s = off.act_quant_fp8(np.array([448.0, 1.0, 0.0, 0.0]), 2, "ue8m0")
    assert s.tolist() == [1.0, 2.0 ** -22] and v.tolist() == [448.0, 1.0, 0.0, 0.0]
    assert off.block_scales(449.0).item() == 2.0  # just over 448 -> the next power of two
    with pytest.raises(ValueError, match="scale_fmt"):
        off.act_quant_fp8(x, 4, "e8m0")
    with pytest.raises(ValueError, match="multiple of block"):
        off.act_quant_fp8(x, 3)


def test_e4m3_rounds_to_nearest_even():
    # amax 256: 256/448 rounds up to the scale 2^0, so the values are rounded as given; 1.0625 and
    # 1.1875 lie halfway between e4m3 neighbours (step 1/8): ties go to the even mantissa
    v, s = off.act_quant_fp8(np.array([256.0, 1.0625, 1.1875, 1.0]), 4, "ue8m0")
    assert s.tolist() == [1.0] and v.tolist() == [256.0, 1.0, 1.25, 1.0]


# ------------------------------------------------------------------ KV rounding
@pytest.mark.parametrize("fmt", ["ue8m0", None])
def test_round_kv_fp8_error_bound_per_block(fmt):
    """e4m3 keeps 3 mantissa bits: |err| <= 2^-4 |x| for normal values, <= 2^-10 s below 2^-6 s
    (subnormal step 2^-9 s); bf16 output adds <= 2^-8 |x| unless the scale is a power of two."""
    rng = np.random.default_rng(1)
    kv = rng.normal(size=(4, 512)) * np.exp(rng.normal(size=(4, 512)) * 2)
    r = off.round_kv_fp8(kv, scale_fmt=fmt)
    _, s = off.act_quant_fp8(kv, 128, fmt)
    s = np.repeat(s, 128, axis=-1)
    bound = np.maximum(2.0 ** -4 * np.abs(kv), 2.0 ** -10 * s) + (0 if fmt else 2.0 ** -8 * np.abs(kv))
    err = np.abs(r - kv)
    assert (err <= bound * (1 + 1e-12)).all()
    assert (err / bound).max() > 0.5 and err.max() > 0  # the bound is nearly reached: not vacuous
    assert np.array_equal(r, off.round_kv_fp8(r, scale_fmt=fmt)) or fmt is None  # idempotent (ue8m0)
    assert off.round_kv_fp8(np.ones((2, 32))).shape == (2, 32)  # a tiny latent: one block


# ------------------------------------------------------------------ indexer
@pytest.mark.parametrize("seed", [0, 1])
def test_unquantized_official_form_is_the_exact_indexer(seed):
    w, (x, pos) = _weights(seed), _inputs(seed)
    ref = dsa.indexer(x, w, CFG, pos, PRE)
    got = off.indexer_official(x, w, CFG, pos, PRE, quantize=False)
    vis = dsa.visible(pos, pos)
    assert np.allclose(got.scores, ref.scores, rtol=1e-12, atol=1e-12 * np.abs(ref.scores).max())
    assert np.array_equal(got.tie, ref.tie)
    clear = dsa.boundary_gap(ref, vis, CFG.index_topk) > 1e-9
    assert all(np.array_equal(got.ids[i], ref.ids[i]) for i in zip(*np.nonzero(clear)))


def _elem_bound(x, fmt="ue8m0"):
    """Per-element |e4m3(x / s) s - x| bound: 2^-4 |x| (3 mantissa bits), 2^-10 s (subnormals)."""
    _, s = off.act_quant_fp8(x, x.shape[-1], fmt)
    return np.maximum(2.0 ** -4 * np.abs(x), 2.0 ** -10 * s)


def test_quantized_official_form_within_the_fp8_bound_and_same_selection_when_well_separated():
    """|score_fp8 - score| <= sum_h |w_h| sum_i (|q_i| ek_i + eq_i |k_i| + eq_i ek_i) over the
    rotated q, k (relu is 1-Lipschitz), plus the float32 output rounding."""
    w, (x, pos) = _weights(0), _inputs(0)
    ref = dsa.indexer(x, w, CFG, pos, PRE)
    got = off.indexer_official(x, w, CFG, pos, PRE)
    from dsref.reference.numpy_ref import rope_cos_sin
    cos, sin = rope_cos_sin(CFG, pos)
    q = off.hadamard(dsa.index_queries(dsa.compressed_query(x, w, PRE), w, CFG, cos, sin, PRE))
    k = off.hadamard(dsa.index_keys(x, w, CFG, cos, sin, PRE))
    hw = dsa.index_head_weights(x, w, CFG, PRE)
    eq, ek = _elem_bound(q), _elem_bound(k)
    per_head = (np.einsum("bthj,bsj->bths", np.abs(q), ek) + np.einsum("bthj,bsj->bths", eq, np.abs(k))
                + np.einsum("bthj,bsj->bths", eq, ek))
    bound = np.einsum("bth,bths->bts", np.abs(hw), per_head) * (1 + 1e-9) + 2.0 ** -24 * np.abs(ref.scores)
    err = np.abs(got.scores - ref.scores)
    assert (err <= bound).all() and (err / bound).max() > 0.05, (err / bound).max()
    assert np.array_equal(got.scores, got.scores.astype(np.float32))  # the kernel writes float32
    vis = dsa.visible(pos, pos)
    gap = dsa.boundary_gap(ref, vis, CFG.index_topk)
    rel = (bound / np.abs(np.where(vis, ref.scores, 0)).max(-1, keepdims=True)).max(-1)
    clear = gap > 2 * rel  # no key can cross the k-th boundary within the bound
    assert clear.sum() >= 4, clear.sum()
    assert all(np.array_equal(got.ids[i], ref.ids[i]) for i in zip(*np.nonzero(clear)))


def test_score_level_agreement_and_what_the_rotation_is_for():
    """V3.2's dims (64 heads of 128). Errors relative to the spread of a row's scores over its keys
    (what decides the top-k). An outlier channel shared by q and k (100x) makes one product term
    dominate each dot product, and FP8's 2^-4 error of that one term dominates the score error;
    the Hadamard spreads it over 128 terms whose errors average out. An outlier in k alone is the
    opposite case: unrotated, e4m3 (a float) keeps the other channels at full relative precision,
    rotated they are mixed with the outlier and lose it (docs/dsa-precision.md measures both)."""
    rng = np.random.default_rng(2)
    I, J, S, T = 64, 128, 256, 2
    q, k = rng.normal(size=(1, T, I, J)), rng.normal(size=(1, S, J))
    hw = rng.normal(size=(1, T, I)) * (I * J) ** -0.5

    def err(q, k, **kw):
        exact = dsa.index_scores(q, k, hw)
        return (np.abs(off.index_scores_official(q, k, hw, **kw) - exact) / exact.std(-1, keepdims=True)).mean()
    assert err(q, k, quantize=False) < 1e-13
    assert err(q, k) < 0.1
    k2 = k.copy()
    k2[..., 5] = 100 * (1 + 0.05 * rng.normal(size=S))
    q2 = q.copy()
    q2[..., 5] *= 100
    assert err(q2, k2) < err(q2, k2, rotate=False) / 3   # shared outlier: the rotation helps
    assert err(q, k2) > err(q, k2, rotate=False)         # k-only outlier: it hurts


def test_bad_head_dim_is_named():
    q, k, hw = np.ones((1, 1, 2, 12)), np.ones((1, 3, 12)), np.ones((1, 1, 2))
    with pytest.raises(ValueError, match="power of two"):
        off.index_scores_official(q, k, hw)
    with pytest.raises(ValueError, match="head dim"):
        off.index_scores_official(q, np.ones((1, 3, 8)), hw)


def test_the_studys_row_metrics_on_a_hand_made_swap():
    """experiments/dsa_topk_agreement.compare_rows: exact [6..1], the other form swaps ranks 2 and 3
    (scores 4 and 3) across the k = 3 boundary: |A xor B| = 2, boundary 3.5, rank distance 0.5."""
    from dsref.experiments.dsa_topk_agreement import compare_rows
    exact = np.array([[[6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]]])
    other = np.array([[[6.0, 5, 3, 4, 2, 1], [6.0, 5, 4, 3.5, 2, 1]]])
    r = compare_rows(exact, other, 3)
    assert r["differ"].tolist() == [True, False] and np.allclose(r["symdiff"], [2 / 3, 0])
    assert np.allclose(r["gap"], [0.5 / 6, 0]) and np.allclose(r["depth"], [0.5 / 3, 0])


def test_e4m3_rounding_matches_torchs_float8_cast():
    """ml_dtypes' float8_e4m3fn rounding is torch's ``.to(torch.float8_e4m3fn)`` (what the official
    ``act_quant`` output dtype holds), over the whole range: subnormals, ties, up to 448."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-448, 448, 20000), rng.normal(size=20000) * 2.0 ** -7,
                        np.arange(-448, 448.5, 0.5), np.arange(0, 2.0 ** -5, 2.0 ** -12)])
    got = x.astype(off.E4M3).astype(np.float64)
    want = torch.from_numpy(x).to(torch.float32).to(torch.float8_e4m3fn).to(torch.float64).numpy()
    assert np.array_equal(got, want)
