"""The analytic forward FLOPs of sim/costmodel.py against XLA's count of the compiled JAX reference.

``jax.jit(f).lower(...).compile().cost_analysis()['flops']`` (HloCostAnalysis):
2*m*n*k per dot, one FLOP per element per arithmetic op, transcendentals apart.

What XLA reports for the MoE block (found here, see test_xla_counts_moe_loop_body_once):
reference/model.py runs the routed experts in a ``fori_loop`` whose trip count
(the number of expert blocks in use) is only known at run time. HloCostAnalysis
counts a while-loop body ONCE, not times the trip count: the XLA figure contains
one block of C rows (C = reference.model.block_size(M*k, E)) through one SwiGLU
expert per MoE layer, instead of the M*k rows that really run. So the comparison
is like with like: analytic total - routed expert FLOPs (M*k rows) + one loop
body (C rows), per MoE layer. Everything else (MLA in both forms, dense MLPs,
shared experts, router, LM head, norms, softmax, rope) is compared as is.

Numbers (prefill B=2, T=16, absorbed MLA): custom-moderate XLA 96,227,992 vs analytic
with the body once 96,011,776 (-0.2%); the real analytic count is 144,929,280. tiny-v3:
8,083,304 vs 7,979,776 (-1.3%). With every layer dense (no loop) the custom model gives
131,132,768 vs 131,117,568 (-0.01%). All cases, both MLA forms, prefill and decode: within 2%.

The layer scan (one ``lax.scan`` per stack of same-kind layers) is a while loop too, so
its body would be counted once per stack: the FLOPs are taken with the scan unrolled
(``forward(..., unroll_layers=True)``, the same computation).

The reference computes attention over every key slot and masks afterwards, so
the analytic model runs with attn_impl='masked': prefill without a cache attends
T keys per query, decode with a cache of S slots attends S keys per query.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dsref.reference.config import ModelConfig
from dsref.reference.model import DeepseekModel, LatentCache, block_size, forward, layer_runs
from dsref.reference.presets import get_preset
from dsref.sim.costmodel import StepShape, forward_ops, routed_expert_flops, totals

TOL = 0.05
# The cost analysis is taken on the optimised HLO; the LLVM backend's optimisation level
# does not change it (checked: identical FLOPs) and lowering it halves the compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
B, T = 2, 16          # prefill shape
CACHE_SLOTS, POS = 40, 20  # decode: cache of 40 slots, new token at position 20

CUSTOM = ModelConfig(
    name="custom-moderate", vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=96,
    kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=32,
    n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, rope_scaling=None,
    max_position_embeddings=256, num_nextn_predict_layers=0)

CONFIGS = {"tiny-v3": lambda: get_preset("tiny-v3"), "tiny-v2-lite": lambda: get_preset("tiny-v2-lite"),
           "custom-moderate": lambda: CUSTOM}


@functools.lru_cache(maxsize=None)
def xla_flops(cfg: ModelConfig, batch: int, tokens: int, form: str, cache_slots: int | None = None) -> float:
    gd, st = nnx.split(DeepseekModel(cfg, rngs=nnx.Rngs(0)))
    tok = jnp.zeros((batch, tokens), jnp.int32)
    if cache_slots is None:
        fn = jax.jit(lambda s, t: forward(nnx.merge(gd, s), t, mla_form=form, unroll_layers=True))
        compiled = fn.lower(st, tok).compile(FAST_COMPILE)
    else:
        cache = [LatentCache.zeros(cfg, batch, cache_slots, jnp.float32, layers=len(r)) for r in layer_runs(cfg)]
        pos = jnp.full((batch, tokens), POS, jnp.int32)
        fn = jax.jit(lambda s, t, p, c: forward(nnx.merge(gd, s), t, p, c, mla_form=form, unroll_layers=True))
        compiled = fn.lower(st, tok, pos, cache).compile(FAST_COMPILE)
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"])


def analytic_like_xla(cfg: ModelConfig, sh: StepShape) -> tuple[float, float]:
    """(analytic FLOPs with the MoE loop body counted once as XLA does, real analytic FLOPs)."""
    real = totals(forward_ops(cfg, "fp32", sh))["flops"]
    rows = sh.m * cfg.num_experts_per_tok
    c = block_size(rows, cfg.n_routed_experts)
    moe_layers = cfg.num_moe_layers
    like = real - moe_layers * routed_expert_flops(cfg, rows) + moe_layers * routed_expert_flops(cfg, c)
    return like, real


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_prefill_flops_match_xla(name, form):
    cfg = CONFIGS[name]()
    sh = StepShape(B, T, 0, attn_impl="masked", logits="all", mla_form=form)
    like, real = analytic_like_xla(cfg, sh)
    x = xla_flops(cfg, B, T, form)
    print(f"{name} prefill {form}: XLA {x:,.0f}  analytic(loop body once) {like:,.0f} ({like / x - 1:+.2%})  "
          f"analytic(real) {real:,.0f}")
    assert abs(like / x - 1) < TOL


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_decode_flops_match_xla(name, form):
    cfg = CONFIGS[name]()
    sh = StepShape(B, 1, POS, key_slots=CACHE_SLOTS, attn_impl="masked", logits="all", mla_form=form)
    like, real = analytic_like_xla(cfg, sh)
    x = xla_flops(cfg, B, 1, form, cache_slots=CACHE_SLOTS)
    print(f"{name} decode {form}: XLA {x:,.0f}  analytic(loop body once) {like:,.0f} ({like / x - 1:+.2%})  "
          f"analytic(real) {real:,.0f}")
    assert abs(like / x - 1) < TOL


def test_dense_only_config_matches_xla_exactly_enough():
    """No while-loop at all (every layer dense): the plain analytic count is compared."""
    cfg = CUSTOM.replace(first_k_dense_replace=CUSTOM.num_hidden_layers)
    real = totals(forward_ops(cfg, "fp32", StepShape(B, T, 0, attn_impl="masked", mla_form="absorbed")))["flops"]
    x = xla_flops(cfg, B, T, "absorbed")
    print(f"dense-only custom: XLA {x:,.0f} analytic {real:,.0f} ({real / x - 1:+.2%})")
    assert abs(real / x - 1) < 0.02


def test_xla_counts_moe_loop_body_once():
    """The finding the MoE comparison rests on: XLA's figure does not scale with the trip count."""
    cfg = CUSTOM
    sh = StepShape(B, T, 0, attn_impl="masked", mla_form="absorbed")
    like, real = analytic_like_xla(cfg, sh)
    x = xla_flops(cfg, B, T, "absorbed")
    rows = B * T * cfg.num_experts_per_tok
    missing = cfg.num_moe_layers * (routed_expert_flops(cfg, rows) - routed_expert_flops(
        cfg, block_size(rows, cfg.n_routed_experts)))
    assert real - x == pytest.approx(missing, rel=0.1)
    assert abs(like / x - 1) < TOL
