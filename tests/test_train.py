"""Training the JAX reference (reference/train.py): the objective's gradient, the balancing bias,
determinism, and a short run on real text that learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pydoc_data.topics
import pytest
from flax import nnx

from dsref.reference.model import DeepseekModel, forward, route
from dsref.reference.presets import get_preset
from dsref.reference.train import (BIAS, TrainConfig, Trainer, balance_loss, loss_fn, max_violation,
                                   update_biases, windows)

BIAS_ATTR = BIAS


def corpus(vocab: int) -> np.ndarray:
    """CPython's pydoc topics (shipped with Python) as bytes, ids mod the vocabulary."""
    data = np.frombuffer(open(pydoc_data.topics.__file__, "rb").read(), np.uint8).astype(np.int64)
    return data % vocab


def unigram_entropy(ids: np.ndarray) -> float:
    p = np.bincount(ids) / ids.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def tiny():
    return get_preset("tiny-v3")


@pytest.mark.slow
def test_a_short_run_learns_below_the_unigram_entropy_and_is_deterministic(tiny):
    """60 steps of tiny-v3 (with its MTP module) on pydoc text: the main loss falls below the
    corpus's unigram entropy (a model that learned nothing about context cannot); a second run
    with the same seed gives bit-identical losses."""
    ids = corpus(tiny.vocab_size)
    tc = TrainConfig(steps=60, lr=3e-3, warmup=5, balance_alpha=1e-4)

    def run():
        tr = Trainer(DeepseekModel(tiny, rngs=nnx.Rngs(0), with_mtp=True), tc)
        rng = np.random.default_rng(0)
        return [tr.step(windows(ids, 8, 64, rng)) for _ in range(tc.steps)]

    a = run()
    losses = [float(m.main) for m in a]
    assert losses[0] > unigram_entropy(ids)  # random init: worse than counting bytes
    assert np.mean(losses[-5:]) < unigram_entropy(ids) - 0.1, losses
    assert float(a[-1].mtp) < float(a[0].mtp) - 1.0  # the MTP module learns too
    assert all(np.isfinite(float(m.loss)) for m in a)
    b = run()
    assert [float(m.loss) for m in b] == [float(m.loss) for m in a]


def test_gradient_matches_finite_differences(tiny):
    """Directional derivatives of the whole objective (cross-entropy + MTP + balance loss) along
    random directions, against central differences in float32 (the model computes in float32:
    its router and accumulations are float32 by design). Top-k routing makes the loss piecewise
    smooth: a step that flips one token's expert selection jumps (seen: 14.3 against 1.41 at
    one step size, 1.40 at the steps either side), so the check takes the median of the
    estimates at five step sizes; a flip spoils at most one or two of them."""
    model = DeepseekModel(tiny, rngs=nnx.Rngs(1), with_mtp=True, std=0.3)
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(windows(corpus(tiny.vocab_size), 2, 12, np.random.default_rng(1)))
    tc = TrainConfig(balance_alpha=0.1)

    def f(p):
        return loss_fn(p, graphdef, tokens, tc)[0]

    g = jax.jit(jax.grad(f))(params)
    f = jax.jit(f)
    rng = np.random.default_rng(2)
    def unit(tree):
        n = float(jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(tree))))
        return jax.tree.map(lambda a: a / n, tree)

    g_dir = unit(g)
    for _ in range(3):
        # unit directions, half along the gradient (a derivative well above float32's noise),
        # half random; the balancing bias only selects (no gradient by design): not a direction
        r = unit(jax.tree_util.tree_map_with_path(
            lambda p, a: jnp.zeros_like(a) if "e_score_correction_bias" in str(p)
            else jnp.asarray(rng.standard_normal(a.shape), a.dtype), params))
        v = jax.tree.map(lambda a, b: a + b, g_dir, r)
        fds = [(float(f(jax.tree.map(lambda a, d: a + eps * d, params, v)))
                - float(f(jax.tree.map(lambda a, d: a - eps * d, params, v)))) / (2 * eps)
               for eps in (1e-2, 3e-3, 1e-3, 5e-4, 3e-4)]
        an = float(sum(jnp.vdot(a, d) for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(v), strict=True)))
        assert abs(np.median(fds) - an) <= 2e-2 * max(abs(an), 1e-2), (fds, an)


def test_unselected_experts_get_no_gradient(tiny):
    model = DeepseekModel(tiny, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray([[5, 6, 7]], jnp.int32)  # 2 positions x top-4 of 16: most experts unused
    g = jax.grad(lambda p: loss_fn(p, graphdef, tokens, TrainConfig(mtp_weight=0.0))[0])(params)
    cap = {}
    forward(model, tokens[:, :-1], capture=cap)
    for i in (1, 2):
        used = set(np.asarray(cap[f"layers.{i}.topk_ids"]).ravel().tolist())
        ge = np.asarray(g["stacks"][1]["mlp__experts__gate_proj__weight"][...][i - 1])
        nonzero = {e for e in range(tiny.n_routed_experts) if np.abs(ge[e]).max() > 0}
        assert nonzero == used


def test_bias_update_moves_load_toward_balance():
    """Route a fixed batch whose router favours a few experts; apply the bias rule repeatedly (no
    gradient): MaxVio falls. With the sign flipped it rises: the test can fail."""
    cfg = get_preset("tiny-v3")
    rng = np.random.default_rng(0)
    E, D = cfg.n_routed_experts, cfg.hidden_size
    w_gate = rng.standard_normal((E, D)).astype(np.float32)
    w_gate[:3] += 2.0 * rng.standard_normal(D).astype(np.float32)  # experts 0-2 attract most tokens
    x = jnp.asarray(rng.standard_normal((256, D)), jnp.float32)

    def maxvio_after(gamma, steps=60):
        params = {"stacks": {0: {"mlp__gate__e_score_correction_bias": jnp.zeros((1, E), jnp.float32)}}}
        for _ in range(steps):
            b = params["stacks"][0]["mlp__gate__e_score_correction_bias"][0]
            _, ids, _ = route({"gate.weight": jnp.asarray(w_gate), "gate.e_score_correction_bias": b}, cfg, x)
            loads = jax.nn.one_hot(ids, E).sum((0, 1))[None]
            params = update_biases(params, loads, gamma, ((0, 0),))
        return float(max_violation(loads)[0])

    start = maxvio_after(0.0, steps=1)
    assert maxvio_after(0.01) < 0.5 * start
    assert maxvio_after(-0.01) > start


def test_balance_loss_is_one_when_uniform_and_larger_when_skewed():
    """L_bal = sum_i f_i P_i: 1 for uniform affinities with every expert chosen equally often (V3
    eq. 17-20 normalisation), more when the chosen experts also have the larger affinities (closed form)."""
    E, k, T = 8, 2, 16
    uniform_ids = jnp.asarray(np.arange(T * k).reshape(1, T, k) % E)
    assert float(balance_loss(jnp.zeros((1, T, E)), uniform_ids, E, "sigmoid")) == pytest.approx(1.0)
    logits = jnp.zeros((1, T, E)).at[..., :2].set(4.0)
    skew_ids = jnp.broadcast_to(jnp.asarray([0, 1]), (1, T, k))
    s4 = 1 / (1 + np.exp(-4.0))  # every token picks experts 0 and 1: f = E/k each, P = s4 / (2 s4 + 6/2)
    assert float(balance_loss(logits, skew_ids, E, "sigmoid")) == pytest.approx(2 * (E / k) * s4 / (2 * s4 + 3),
                                                                                rel=1e-6)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=-1.0), dict(b2=1.0), dict(warmup=1.5),
                                 dict(bias_gamma=float("nan"))])
def test_train_config_refuses_bad_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_trainer_refuses_bf16_weights(tiny):
    with pytest.raises(ValueError, match="float32"):
        Trainer(DeepseekModel(tiny, dtype=jnp.bfloat16), TrainConfig())


def test_windows_refuses_a_corpus_too_short():
    with pytest.raises(ValueError, match="corpus"):
        windows(np.arange(5), 2, 8, np.random.default_rng(0))



def test_the_mtp_modules_bias_moves_with_its_own_loads(tiny):
    """The MTP module routes through its own MoE layer: its loads are a row of StepMetrics.loads
    (after the main model's) and its bias moves by gamma * sign(mean - load) like theirs; without
    the MTP loss the module is not run: no row, so its bias is never moved."""
    from dsref.reference.train import layer_rows, moe_layers
    tokens = windows(corpus(tiny.vocab_size), 4, 16, np.random.default_rng(0))
    tr = Trainer(DeepseekModel(tiny, rngs=nnx.Rngs(0), with_mtp=True), TrainConfig(mtp_weight=0.3))
    assert tr.layers == tuple(moe_layers(tr.model(), tr.tc)) == (1, 2, 3)
    m = tr.step(tokens)
    bias = np.asarray(tr.params["mtp"][0][BIAS_ATTR][...][0])
    loads = np.asarray(m.loads[-1])
    np.testing.assert_allclose(bias, 0.001 * np.sign(loads.mean() - loads), atol=1e-9)
    assert np.abs(bias).max() > 0
    off = TrainConfig(mtp_weight=0.0)
    model = tr.model()
    assert moe_layers(model, off) == [1, 2] and all(g == "stacks" for g, _, _ in layer_rows(model, off))
    graphdef, params = nnx.split(model)
    shape = jax.eval_shape(lambda p: loss_fn(p, graphdef, jnp.asarray(tokens), off), params)  # traced, not compiled
    assert shape[1][1].shape == (2, tiny.n_routed_experts)


@pytest.fixture(scope="module")
def precisions(tiny):
    """Loss and gradient of one batch under float32, bfloat16 and bfloat16 + FP8 (same weights)."""
    tokens = jnp.asarray(windows(corpus(tiny.vocab_size), 4, 16, np.random.default_rng(0)))
    graphdef, params = nnx.split(DeepseekModel(tiny, rngs=nnx.Rngs(0), with_mtp=True))
    out = {}
    for name, tc in (("float32", TrainConfig()), ("bfloat16", TrainConfig(compute="bfloat16")),
                     ("fp8", TrainConfig(compute="bfloat16", fp8=True))):
        (loss, _), g = jax.jit(jax.value_and_grad(lambda p, tc=tc: loss_fn(p, graphdef, tokens, tc), has_aux=True))(params)
        out[name] = float(loss), g
    return params, out


def _flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


def test_bfloat16_compute_keeps_float32_master_weights(precisions):
    """compute="bfloat16": the loss differs from float32 by bf16 rounding (not 0: the option does
    something; not more than a few percent); the forward sees bf16 values in float32 arrays; the
    gradient is float32, and AdamW's update on the float32 master copy keeps steps smaller than a
    bf16 step of the weight (which a bf16 weight would round away)."""
    from dsref.reference.train import compute_params, optimizer
    params, out = precisions
    (f32, _), (b16, g) = out["float32"], out["bfloat16"]
    assert 1e-6 < abs(b16 - f32) / f32 < 2e-2, (f32, b16)
    rounded = jax.tree.leaves(compute_params(params, TrainConfig(compute="bfloat16")))
    assert all(a.dtype == jnp.float32 and np.array_equal(a, np.asarray(a.astype(jnp.bfloat16), np.float32))
               for a in rounded)  # float32 arrays holding bf16 values
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    tc = TrainConfig(compute="bfloat16", lr=1e-5, warmup=0)
    tx = optimizer(tc, params)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(g, params)  # one program, not op by op
    w = np.asarray(params["stacks"][0]["self_attn__o_proj__weight"][...])
    u = np.asarray(updates["stacks"][0]["self_attn__o_proj__weight"][...])
    new = w + u  # float32 master weights
    moved = new != w
    assert moved.any() and (np.abs(u[moved]) < np.abs(w[moved]) * 2.0 ** -8).any()
    assert (np.asarray(new.astype(jnp.bfloat16), np.float32) == np.asarray(w.astype(jnp.bfloat16), np.float32)).any()


def test_fp8_option_runs_the_recipe_in_the_training_step(precisions):
    """TrainConfig(fp8=True): the loss moves off the bf16 one by FP8 rounding (the recipe is
    applied: not 0) but stays within a few percent; the gradient is finite and keeps its direction."""
    _, out = precisions
    (l0, g0), (l1, g1) = out["bfloat16"], out["fp8"]
    g0, g1 = _flat(g0), _flat(g1)
    assert 1e-6 < abs(l1 - l0) / l0 < 3e-2, (l0, l1)
    assert np.isfinite(g1).all() and g1 @ g0 / np.linalg.norm(g0) / np.linalg.norm(g1) > 0.98
    with pytest.raises(ValueError, match="fp8 must be True or False"):
        TrainConfig(fp8=1)
