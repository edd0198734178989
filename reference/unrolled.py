"""The layers unrolled, each weight a separate array: the faster decode step on XLA:CPU.

``forward`` (reference/model.py) runs each stack of same-kind layers as one ``lax.scan``
and slices a layer's (and a used expert's) matrices out of the stacked weights by index:
one compiled body whatever the depth. XLA:CPU gives a GEMM whole buffers only, so each
slice is first copied out (a copy fusion), and in a batch-1 decode step, which reads
every activated weight once, those copies cost: small-v3 decoded 1.2x (quiet) to 2x (loaded VM) slower that
way than from separate arrays (docs/performance.md).

This module is the other trade: the same stacked weights, cut into per-layer and
per-expert arrays that **alias** the stacks (zero-copy: ``jax.device_put`` of NumPy views
of the CPU buffers, no second copy of the model), and a forward pass that is unrolled
over layers and enters a ``lax.switch`` branch per used expert, which reads that expert's
arrays in place. Compile time grows with layers x experts (one branch per expert per
MoE layer), so it is for small models on CPU, where the decode rate matters more than
the compile: ``generate(..., layers="unrolled")``, ``dsref generate --layers unrolled``.
Same computation, same numbers as the scan (tested).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dsref.reference.params import EMBED, FINAL_NORM, head_name
from dsref.reference.weights import stored_to_compute

#: Most routed-expert branches (experts x MoE layers) the unrolled form accepts: each is
#: compiled separately (small-v3, 32 x 7 = 224 branches: ~30 s for prefill + decode on
#: the 2-vCPU VM; 4 layers x 256 experts took ~400 s).
MAX_EXPERT_BRANCHES = 512


def _alias(a, index):
    """a[index] as a separate jax.Array sharing a's memory where the backend allows it (CPU:
    a NumPy view of the buffer put back zero-copy); elsewhere a copy."""
    if jax.default_backend() == "cpu":
        return jax.device_put(np.asarray(a)[index])
    return a[index]


def split_weights(model) -> dict:
    """{"globals": {name: array}, "layers": [{rel name: array, or a tuple of E arrays for a
    routed expert}]}: every main layer's weights as separate arrays aliasing the stacks."""
    cfg = model.cfg
    branches = cfg.n_routed_experts * cfg.num_moe_layers
    if branches > MAX_EXPERT_BRANCHES:
        raise ValueError(f"{cfg.name}: {cfg.n_routed_experts} experts x {cfg.num_moe_layers} MoE layers = "
                         f"{branches} expert branches > {MAX_EXPERT_BRANCHES}: too slow to compile unrolled; "
                         "use the layer scan (layers='scan')")
    g = {n: model.globals.raw(n) for n in model.globals.names()}
    layers = []
    for st in model.stacks:
        for j in range(st.count):
            w = {}
            for n in st.names():
                a = st.stacked(n)
                if n in st.expert_names:
                    w[n] = tuple(_alias(a, (j, e)) for e in range(a.shape[1]))
                else:
                    w[n] = _alias(a, j)
            layers.append(w)
    return {"globals": g, "layers": layers}


class _Layer:
    """A per-layer dict in the interface ``decoder_layer`` reads (compute form on access)."""

    def __init__(self, w: dict):
        self.w = w

    def __getitem__(self, name):
        a = self.w[name]
        return _Experts(a) if isinstance(a, tuple) else stored_to_compute(a)

    def __contains__(self, name):
        return name in self.w

    def get(self, name, default=None):
        return self[name] if name in self else default


class _Experts(tuple):
    """The E routed-expert arrays of one matrix of one layer (read through lax.switch)."""

    @property
    def num_experts(self) -> int:
        return len(self)


def routed_experts_switch(wg, wu, wd, expert_rows):
    """run(e, ys, first, n): ``expert_rows(ys, first, n, g, u, d)`` for expert e, through a
    lax.switch on e whose branch passes that expert's own arrays (read in place)."""
    def branch(g, u, d, ys, first, n):
        return expert_rows(ys, first, n, *(stored_to_compute(m) for m in (g, u, d)))
    branches = [partial(branch, g, u, d) for g, u, d in zip(wg, wu, wd, strict=True)]

    def run(e, ys, first, n):
        return jax.lax.switch(e, branches, ys, first, n)
    return run


class Layout(NamedTuple):
    """What the unrolled forward needs of a model besides its weights (hashable: it is bound
    into the compiled steps): the config, the dtype and each stack's (first layer, count)."""

    cfg: object
    dtype: object
    runs: tuple

    @classmethod
    def of(cls, model) -> "Layout":
        return cls(model.cfg, model.dtype, tuple((st.first, st.count) for st in model.stacks))


def forward(layout: Layout, weights: dict, tokens, positions, cache, *, mla_form="absorbed", chunk_only=False,
            logits_at=None):
    """``reference.model.forward`` (cache given) with the layers unrolled over ``weights``
    (``split_weights``); the cache is the scan's stacked one, each layer writing its slice."""
    from dsref.reference.model import ForwardOutput, LayerCache, _mm, decoder_layer, linear, rms_norm

    cfg = layout.cfg
    prec = _mm(layout.dtype)
    g = weights["globals"]
    B = tokens.shape[0]
    h = g[EMBED][tokens].astype(layout.dtype)
    if len(cache) != len(layout.runs):
        raise ValueError(f"cache has {len(cache)} stacks for the model's {len(layout.runs)} (init_cache)")
    new_cache = []
    for s, (first, count) in enumerate(layout.runs):
        c = cache[s]
        for j in range(count):
            i = first + j
            with jax.named_scope(f"layer{i}"):
                h, lc = decoder_layer(_Layer(weights["layers"][i]), cfg, i, h, positions, LayerCache(c, j),
                                      mla_form=mla_form, prec=prec, chunk_only=chunk_only)
            c = lc.stack
        new_cache.append(c)
    hn = rms_norm(h, stored_to_compute(g[FINAL_NORM]), cfg.rms_norm_eps)
    head = stored_to_compute(g[head_name(cfg)])
    logits = linear(hn if logits_at is None else hn[jnp.arange(B), logits_at], head, prec).astype(jnp.float32)
    return ForwardOutput(logits, new_cache, hn)
