"""DeepSeek-V4's multi-token-prediction module: numpy_v4.mtp (float64), model_v4.mtp_v4 (JAX), the
golden's ``mtp.0.logits`` and the checkpoint round trip of the module's weights.

The definition checked is DeepSeek's inference/model.py ``MTPBlock.forward`` (numpy_v4.mtp's
docstring): x_k = e_proj(enorm(Emb(t+1))) + h_proj(hnorm(h_{t,k})), one decoder block, the module's
own hc_head and norm, the shared head. One tiny config: two main layers (sliding, CSA) and an MTP
block whose attention is CSA (the hardest path: compressor, indexer with a real top-k choice) with
learned routing; weights adversarial (norm and hyper-connection vectors far from 1, biases that
reorder experts). One JAX compile of the MTP block, one of forward + block for the golden.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

import jax

from safetensors.numpy import load_file

from dsref.reference import model_v4 as mv4
from dsref.reference import numpy_v4 as nv4
from dsref.reference.checkpoint_v4 import read_tensors_v4, save_checkpoint_v4
from dsref.reference.config_v4 import CSA, HASH_MOE, MOE, SLIDING
from dsref.reference.oracle.compare import compare_dumps
from dsref.reference.oracle.golden import MTP_LOGITS, run_reference_v4
from dsref.reference.params_v4 import INT64, tensors
from dsref.reference.presets import get_preset

B, T = 2, 14  # 13 MTP rows: 3 complete CSA blocks of 4, index_topk 2 of them (a real choice); window 6
FAST = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def small_cfg(**kw):
    return get_preset("tiny-v4").replace(
        name="tiny-v4-mtp", num_hidden_layers=2, layer_types=(SLIDING, CSA), mlp_layer_types=(HASH_MOE, MOE),
        mtp_layer_types=(CSA,), num_nextn_predict_layers=1, index_topk=2, **kw)


def adversarial_weights(cfg, seed=0, mtp=True):
    """Every table tensor (MTP included): matrices ~ N(0, 1/fan_in); vectors ~ 1 + 0.3 N(0, 1); sinks
    and position biases ~ N(0, 1); tid2eid rows distinct random experts. float64."""
    rng = np.random.default_rng(seed)
    w = {}
    for t in tensors(cfg, mtp=mtp):
        if t.stored == INT64:
            w[t.name] = np.stack([rng.permutation(cfg.n_routed_experts)[:cfg.num_experts_per_tok]
                                  for _ in range(t.shape[0])])
        elif t.name.endswith("sinks") or "position_bias" in t.name:
            w[t.name] = rng.standard_normal(t.shape)
        elif len(t.shape) == 1:
            w[t.name] = 1 + 0.3 * rng.standard_normal(t.shape)
        else:
            w[t.name] = rng.standard_normal(t.shape) / np.sqrt(t.shape[-1])
    return w


@pytest.fixture(scope="module")
def case():
    cfg = small_cfg()
    w = adversarial_weights(cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T))
    cap = {}
    nv4.forward(tokens, w, cfg, capture=cap)
    streams = cap[f"layers.{cfg.num_hidden_layers - 1}.hidden"]
    return cfg, w, tokens, streams, nv4.mtp(tokens, streams, w, cfg)


def test_mtp_combine_by_hand():
    """x_k = e_proj(enorm(e)) + h_proj(hnorm(h_k)) on D = 2, n = 2, eps = 0, against literal numbers:
    e = [3, 4]: rms sqrt(12.5), enorm w [1, 2] -> [3, 8]/sqrt(12.5), e_proj [[1, 0], [1, 1]] -> [3, 11]/s;
    h_0 = [1, -1]: rms 1, hnorm w [2, 1] -> [2, -1], h_proj swaps -> [-1, 2];
    h_1 = [2, 0]: rms sqrt(2) -> [2 sqrt 2, 0] -> [0, 2 sqrt 2]."""
    w = {"m.enorm.weight": np.array([1.0, 2.0]), "m.hnorm.weight": np.array([2.0, 1.0]),
         "m.e_proj.weight": np.array([[1.0, 0.0], [1.0, 1.0]]), "m.h_proj.weight": np.array([[0.0, 1.0], [1.0, 0.0]])}
    emb = np.array([[[3.0, 4.0]]])                    # [B=1, T'=1, D=2]
    h = np.array([[[[1.0, -1.0], [2.0, 0.0]]]])       # [1, 1, n=2, 2]
    x = nv4.mtp_combine(emb, h, w, types.SimpleNamespace(rms_norm_eps=0.0), "m.")
    s, r2 = np.sqrt(12.5), np.sqrt(2.0)
    want = np.array([[3 / s - 1, 11 / s + 2], [3 / s, 11 / s + 2 * r2]])
    assert x.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(x[0, 0], want, rtol=1e-15)


def test_numpy_and_jax_agree(case):
    cfg, w, tokens, streams, ours = case
    assert ours.shape == (B, T - 1, cfg.vocab_size)
    jw = mv4.cast_weights(w, cfg, mtp=True)
    got = np.asarray(mv4.jit_mtp_v4(jw, cfg, tokens, streams.astype(np.float32), compiler_options=FAST))
    rel = np.abs(got - ours).max() / np.abs(ours).max()
    assert 0 < rel < 1e-5, rel  # float32 is not float64, and agrees to 1e-5 relative


def test_depends_on_next_token_not_the_one_after(case):
    """Row t reads Emb(token t+1) and the main model's streams at t: with the streams held fixed,
    changing token t+1 changes row t (and not rows before it); changing token t+2 leaves row t alone."""
    cfg, w, tokens, streams, ours = case
    t = 5
    for j, first_changed in ((t + 1, t), (t + 2, t + 1)):
        tk = tokens.copy()
        tk[:, j] = (tk[:, j] + 1) % cfg.vocab_size
        got = nv4.mtp(tk, streams, w, cfg)
        assert np.array_equal(got[:, :first_changed], ours[:, :first_changed])
        assert np.abs(got[:, first_changed] - ours[:, first_changed]).max() > 1e-3


def test_causal_in_the_main_streams(case):
    """Changing the main model's streams at position s changes row s, never rows before it; and through
    the whole model, changing token t+2 leaves row t alone (the main model is causal too)."""
    cfg, w, tokens, streams, ours = case
    s = 7
    st = streams.copy()
    st[:, s] += np.random.default_rng(2).standard_normal(st[:, s].shape)  # (a scaling would not do: hnorm)
    got = nv4.mtp(tokens, st, w, cfg)
    assert np.array_equal(got[:, :s], ours[:, :s]) and np.abs(got[:, s] - ours[:, s]).max() > 1e-3
    # the last stream (position T-1) is never read: nothing predicts token T+1
    st = streams.copy()
    st[:, -1] += 1.0
    assert np.array_equal(nv4.mtp(tokens, st, w, cfg), ours)
    tk = tokens.copy()
    tk[:, s + 2] = (tk[:, s + 2] + 1) % cfg.vocab_size
    cap = {}
    nv4.forward(tk, w, cfg, capture=cap)
    got = nv4.mtp(tk, cap[f"layers.{cfg.num_hidden_layers - 1}.hidden"], w, cfg)
    assert np.array_equal(got[:, :s + 1], ours[:, :s + 1]) and not np.array_equal(got[:, s + 1], ours[:, s + 1])


def test_bad_inputs_one_line(case):
    cfg, w, tokens, streams, _ = case
    with pytest.raises(ValueError, match=r"^h_streams: expected the main model's streams"):
        nv4.mtp(tokens, streams[:, :, 0], w, cfg)
    with pytest.raises(ValueError, match=r"^tokens: expected an integer array \[B, T\] with T >= 2"):
        nv4.mtp(tokens[:, :1], streams[:, :1], w, cfg)
    with pytest.raises(ValueError, match=r"^depth: 1 is not an MTP module"):
        nv4.mtp(tokens, streams, w, cfg, depth=1)
    w2 = dict(w)
    del w2["mtp.0.self_attn.sinks"]
    with pytest.raises(ValueError, match=r"^weights: MTP tensor mtp.0.self_attn.sinks missing"):
        nv4.mtp(tokens, streams, w2, cfg)


@pytest.mark.parametrize("names", ["deepseek", "transformers"])
def test_checkpoint_round_trip_with_mtp(tmp_path, names):
    """save_checkpoint_v4 writes the MTP module under DeepSeek's names (``mtp.0.e_proj.weight``,
    ``mtp.0.hc_head_fn``, ``mtp.0.attn.*``, per-expert ``ffn.experts.{e}.w1``) or ours for transformers'
    layout (``mtp.0.self_attn.*``, ``mtp.0.hc_head.hc_fn``, stacked experts); read_tensors_v4 gives the
    same arrays back; mtp=False skips the module."""
    cfg = small_cfg()
    w = {k: v if v.dtype.kind in "iu" else v.astype(np.float32) for k, v in adversarial_weights(cfg).items()}
    ck = save_checkpoint_v4(w, cfg, tmp_path / names, names=names, dtype="float32")
    stored = {k for f in ck.glob("*.safetensors") for k in load_file(f)}
    want = ({"mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.hc_head_fn",
             "mtp.0.hc_head_scale", "mtp.0.attn.wq_a.weight", "mtp.0.ffn.experts.7.w3.weight", "mtp.0.hc_attn_fn",
             "mtp.0.ffn.gate.bias", "mtp.0.attn.indexer.wq_b.weight"} if names == "deepseek" else
            {"mtp.0.e_proj.weight", "mtp.0.hnorm.weight", "mtp.0.hc_head.hc_fn", "mtp.0.self_attn.q_a_proj.weight",
             "mtp.0.mlp.experts.gate_up_proj", "mtp.0.attn_hc.fn", "mtp.0.mlp.gate.e_score_correction_bias",
             "mtp.0.self_attn.compressor.indexer.q_b_proj.weight"})
    assert want <= stored, sorted(want - stored)
    got = read_tensors_v4(ck, mtp=True)
    assert got.names == names and list(got) == [t.name for t in tensors(cfg, mtp=True)]
    for k, v in w.items():
        assert np.array_equal(got[k], v), k
    assert not any(k.startswith("mtp.") for k in read_tensors_v4(ck, mtp=False))


@pytest.fixture(scope="module")
def dumps(tmp_path_factory, case):
    cfg, w, tokens, streams, ours = case
    d = tmp_path_factory.mktemp("golden_mtp_v4")
    ck = save_checkpoint_v4({k: v if v.dtype.kind in "iu" else v.astype(np.float32) for k, v in w.items()}, cfg,
                            d / "ck", names="deepseek", dtype="float32")
    fast = {"jit_forward_v4": mv4.jit_forward_v4, "jit_mtp_v4": mv4.jit_mtp_v4}
    with pytest.MonkeyPatch.context() as mp:
        for name, f in fast.items():
            mp.setattr(mv4, name, lambda *a, f=f, **k: f(*a, compiler_options=FAST, **k))
        return {dt: run_reference_v4(ck, tokens, dt) for dt in ("float64", "float32")}


def test_golden_has_mtp_logits_and_compare_grades_them(case, dumps):
    cfg, w, tokens, streams, ours = case
    d64, d32 = dumps["float64"], dumps["float32"]
    assert d64[MTP_LOGITS].dtype == np.float64 and d32[MTP_LOGITS].dtype == np.float32
    assert d64[MTP_LOGITS].shape == d32[MTP_LOGITS].shape == (B, T - 1, cfg.vocab_size)
    # the checkpoint is float32: the float64 dump is numpy_v4.mtp on the float32-rounded weights
    np.testing.assert_allclose(d64[MTP_LOGITS], ours, rtol=0, atol=1e-5 * np.abs(ours).max())
    rep = compare_dumps(d64, d32, "float32")
    assert rep.ok and MTP_LOGITS in {r.name for r in rep.tensors}
    bad = dict(d32)
    bad[MTP_LOGITS] = bad[MTP_LOGITS] * np.float32(1.01)
    rep = compare_dumps(d64, bad, "float32")
    assert not rep.ok and [r.name for r in rep.tensors if not r.ok] == [MTP_LOGITS]
