"""Opt-in: random DeepSeek-V4 configs against transformers' deepseek_v4 and our JAX model.

``DSREF_FUZZ_V4=N python -m pytest tests/test_fuzz_v4.py`` draws N configs (seed = the index):
1-3 layers of any attention type, hash or learned routing, 1/2/4 streams, 1-4 heads, partial
rotary 2..d, 1-4 output groups, windows 1-7, CSA rate 2/4, HCA rate 2/3/8, top-1..5 of the
entries, 1..E experts, both routers, YaRN on or off, Sinkhorn 1-24 iterations, clamp 0.3 or 10,
1-19 tokens. Each must match transformers (float32 logits <= 1e-5 relative, identical expert
sets, identical indexer selections outside exact ties) and the float32 JAX model (<= 1e-5).
Not run by default (each config builds a torch model and compiles a JAX one: ~5 s). Dims that
transformers' grouped matmul cannot take ("strides should be multiple of 16 bytes": odd expert
widths) are not drawn. Measured 2026-11-30: 37 configs, worst 1.1e-6 (transformers), 8.3e-7 (JAX).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

N = int(os.environ.get("DSREF_FUZZ_V4", "0"))
pytestmark = pytest.mark.skipif(N == 0, reason="set DSREF_FUZZ_V4=N to run N random V4 configs")


def _config(rng):
    from dsref.reference.config import RopeScaling
    from dsref.reference.config_v4 import CSA, HASH_MOE, HCA, MOE, SLIDING
    from dsref.reference.presets import get_preset
    L = int(rng.integers(1, 4))
    H, d = int(rng.choice([1, 2, 4])), int(rng.choice([8, 16]))
    r = int(rng.choice([2, 4, d]))
    E = int(rng.choice([4, 8]))
    yarn = RopeScaling(factor=4.0, original_max_position_embeddings=8, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                       mscale_all_dim=0.0, attention_factor=1.0)
    return get_preset("tiny-v4").replace(
        name="fuzz", num_hidden_layers=L, layer_types=tuple(str(t) for t in rng.choice([SLIDING, CSA, HCA], L)),
        mlp_layer_types=tuple(str(t) for t in rng.choice([HASH_MOE, MOE], L)), num_attention_heads=H, head_dim=d,
        qk_rope_head_dim=r, o_groups=int(rng.choice([g for g in (1, 2, 4) if (H * d) % g == 0])),
        o_lora_rank=4 * int(rng.integers(1, 3)), hidden_size=int(rng.choice([16, 32])),
        q_lora_rank=4 * int(rng.integers(1, 5)), sliding_window=int(rng.integers(1, 8)),
        compress_rate_csa=int(rng.choice([2, 4])), compress_rate_hca=int(rng.choice([2, 3, 8])),
        index_n_heads=int(rng.integers(1, 4)), index_head_dim=max(r, 8), index_topk=int(rng.integers(1, 6)),
        n_routed_experts=E, num_experts_per_tok=int(rng.integers(1, E + 1)),
        moe_intermediate_size=8 * int(rng.integers(1, 3)), scoring_func=str(rng.choice(["sqrtsoftplus", "sigmoid"])),
        hc_mult=int(rng.choice([1, 2, 4])), hc_sinkhorn_iters=int(rng.integers(1, 25)),
        hc_eps=float(rng.choice([1e-6, 0.01])), swiglu_limit=float(rng.choice([0.3, 10.0])),
        routed_scaling_factor=float(rng.uniform(0.5, 3)), rms_norm_eps=float(rng.choice([1e-6, 1e-3])),
        rope_scaling=yarn if rng.random() < 0.5 else None, num_nextn_predict_layers=0, mtp_layer_types=())


@pytest.mark.parametrize("seed", range(N))
def test_random_v4_config(seed):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import jax.numpy as jnp

    from dsref.reference import numpy_v4 as nv4
    from dsref.reference.config_v4 import CSA
    from dsref.reference.model_v4 import cast_weights, jit_forward_v4
    from tests.test_numpy_v4 import build_hf, hf_ids, run_hf, tiebreak_hooks
    rng = np.random.default_rng(seed)
    cfg = _config(rng)
    model = build_hf(cfg, seed)
    hooks = tiebreak_hooks(model)
    w = {k: v.detach().numpy().astype(np.float64) if v.dtype.is_floating_point else v.numpy()
         for k, v in model.state_dict().items()}
    T = int(rng.integers(1, 20))
    tokens = rng.integers(0, cfg.vocab_size, (2, T))
    theirs, hcap = run_hf(model, tokens)
    for h in hooks:
        h.remove()
    cap = {}
    ours = nv4.forward(tokens, w, cfg, capture=cap)
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() <= 1e-5, cfg
    for i in range(cfg.num_hidden_layers):
        got = np.sort(hcap[f"layers.{i}.gate"][2].reshape(2, T, -1), -1)
        assert (np.sort(cap[f"layers.{i}.topk_ids"], -1) == got).all(), (i, cfg)
        if cfg.layer_type(i) == CSA and not cap[f"layers.{i}.index_tie"].any():
            assert (cap[f"layers.{i}.index_ids"] == hf_ids(hcap[f"layers.{i}.index_ids"])).all(), (i, cfg)
    jl, _ = jit_forward_v4(cast_weights(w, cfg, jnp.float32), cfg, tokens, dtype=jnp.float32, capture=True)
    assert np.abs(np.asarray(jl) - ours).max() / np.abs(ours).max() <= 1e-5, cfg
