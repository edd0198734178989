"""Where the JAX model's weights live: layers of one kind stacked [L, ...], read in place.

The tensor table (``reference.params``) declares every weight once, per layer. The model
holds them grouped: the globals (embedding, final norm, head) as they are, and each run
of consecutive decoder layers of the same kind (the dense layers, the MoE layers, the
MTP modules) as one ``LayerStack`` whose every tensor is stacked on a leading layer
axis [L, ...] -- routed experts [L, E, ...]. The forward pass then runs a stack with
one ``jax.lax.scan`` (MaxText's approach): the compiled program holds one copy of each
layer kind, so compile time does not grow with depth (V3's 58 MoE layers compile as
one) nor with the number of experts (a used expert is sliced out by index, there is
no branch per expert).

Reading layer l (and expert e) is a dynamic slice of the stacked array. XLA:CPU hands a
dot only whole buffers, so the slice becomes one copy fusion of that layer's matrix
feeding the GEMM; the copy lands in cache and the bytes read from memory are those of
the slice only. Two XLA:CPU specifics are handled here, once:

* bfloat16 on CPU: XLA:CPU has no fast bf16 GEMM (a bf16 x bf16 -> f32 GEMV ran at
  ~0.4 GB/s on the project's EPYC VM), and it does not slice bf16 arrays natively: a
  dynamic slice of a bf16 stack got its whole operand converted to float32 and that
  conversion hoisted out of the layer loop (1 s per call on an 8-layer test), and a
  bitcast of the stack to uint16 inside the program is a copy of the whole stack per
  call. So on CPU a bf16 stack is *stored* as its uint16 bits (``BITS``), sliced as
  integers and widened to float32 in the same copy fusion (bf16 -> f32 is exact: the
  bits shifted left by 16); the GEMM runs in float32 on exact bf16 values, which is
  what a bf16 GEMM with float32 accumulation computes. The views below (``raw``,
  ``LayerSlice``) show the bf16 values; only ``stacked`` returns the bits.
* other backends (GPU, TPU) slice and multiply bf16 natively.

The checkpoint view (``hf_items``) is per layer and per Hugging Face name: a
``LayerSlice`` reads and writes layer j of a stacked tensor, so checkpoint IO, the
golden dumps and the tests address weights exactly as before.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsref.reference.params import ROUTED_EXPERT, Tensor

F32 = jnp.float32


def attr(hf_name: str) -> str:
    return hf_name.replace(".", "__")


def init_value(name: str, shape, dtype, key, std: float):
    """One weight's initial value: ones for norms, zeros for biases, else N(0, std^2)."""
    if name.endswith("norm.weight"):
        return jnp.ones(shape, dtype)
    if name.endswith("e_score_correction_bias") or name.endswith(".bias"):
        return jnp.zeros(shape, F32 if "e_score" in name else dtype)
    # numpy's generator, seeded from the explicit JAX key: jax.random would compile one
    # kernel per distinct shape (seconds for a small model), numpy draws at memory speed.
    if isinstance(key, jax.core.Tracer):  # abstract init (nnx.eval_shape): shapes only
        return (jax.random.normal(key, shape, F32) * std).astype(dtype)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
    return jnp.asarray((rng.standard_normal(shape, np.float32) * std)).astype(dtype)


def param_dtype(name: str, dtype):
    # The balancing bias is added to sigmoid scores in [0, 1]: keep it in float32.
    return F32 if name.endswith("e_score_correction_bias") else dtype


#: Storage dtype of a bf16 stack on CPU: its bits (see the module docstring). No weight
#: or cache is ever an unsigned 16-bit integer, so this dtype means "bf16 bits".
BITS = jnp.uint16


def _cpu_bf16(a) -> bool:
    return a.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"


def storage_dtype(dtype):
    """The dtype a stack of ``dtype`` is stored in (BITS for bf16 on CPU)."""
    cpu_bf16 = jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"
    return jnp.dtype(BITS) if cpu_bf16 else jnp.dtype(dtype)


def to_storage(a):
    """A bf16 array as stored in a stack on CPU (its bits); anything else unchanged."""
    return jax.lax.bitcast_convert_type(a, BITS) if _cpu_bf16(a) else a


def from_storage(a):
    """The values of a stored stack (bf16 for bits)."""
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == BITS else a


def widen_bf16_bits(bits):
    """float32 values of bfloat16 numbers given as their uint16 bits (exact)."""
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, F32)


def compute_form(a):
    """A weight as the GEMMs take it: bf16 on CPU widened to float32 (see the module
    docstring); anything else unchanged."""
    return widen_bf16_bits(jax.lax.bitcast_convert_type(a, jnp.uint16)) if _cpu_bf16(a) else a


def take(stack, *index):
    """stack[index...] (leading axes, traced or static indices) of a stored stack, in compute
    form, read by one dynamic slice (bf16 bits are sliced as integers, then widened)."""
    starts = [jnp.asarray(i, jnp.int32) for i in index] + [jnp.int32(0)] * (stack.ndim - len(index))
    out = jax.lax.dynamic_slice(stack, starts, (1,) * len(index) + stack.shape[len(index):])
    return stored_to_compute(out.reshape(stack.shape[len(index):]))


def stored_to_compute(a):
    """A stored array (bf16 bits on CPU, else the model's dtype) in compute form."""
    return widen_bf16_bits(a) if a.dtype == BITS else compute_form(a)


class Weights(nnx.Module):
    """Named weights held as they are (the globals); ``w[name]`` reads one in compute form."""

    def __init__(self, rows: list[Tensor], dtype, keys, std: float = 0.02):
        for t, key in zip(rows, keys, strict=True):
            setattr(self, attr(t.rel), nnx.Param(init_value(t.rel, t.shape, param_dtype(t.rel, dtype), key, std)))

    def __getitem__(self, name: str):
        return compute_form(getattr(self, attr(name))[...])

    def __contains__(self, name: str) -> bool:
        return hasattr(self, attr(name))

    def get(self, name, default=None):
        return self[name] if name in self else default

    def names(self) -> list[str]:
        return [k.replace("__", ".") for k, v in vars(self).items() if isinstance(v, nnx.Param)]

    def raw(self, name: str):
        """The stored array (storage dtype)."""
        return getattr(self, attr(name))[...]

    def param(self, name: str):
        return getattr(self, attr(name))


class LayerStack(nnx.Module):
    """Decoder layers first..first+count-1, all of one kind: every tensor stacked [count, ...].

    rows: the tensor-table rows of each layer (same ``rel`` names and shapes in every
    layer); keys: one PRNG key per row per layer, in table order, so a model's random
    init is the same value for value as one layer at a time.
    """

    def __init__(self, first: int, rows: list[list[Tensor]], dtype, keys, std: float = 0.02):
        self.first, self.count = first, len(rows)
        kinds = {tuple((t.rel, t.shape) for t in r) for r in rows}
        if len(kinds) != 1:
            raise ValueError(f"layers {first}..{first + len(rows) - 1} are not all of one kind")
        self.expert_names = tuple(t.rel for t in rows[0] if t.group == ROUTED_EXPERT)
        for j, t in enumerate(rows[0]):
            dt = param_dtype(t.rel, dtype)
            per_layer = [init_value(t.rel, t.shape, dt, keys[i][j], std) for i in range(self.count)]
            setattr(self, attr(t.rel), nnx.Param(to_storage(jnp.stack(per_layer))))

    @property
    def layers(self) -> range:
        return range(self.first, self.first + self.count)

    def names(self) -> list[str]:
        return [k.replace("__", ".") for k, v in vars(self).items() if isinstance(v, nnx.Param)]

    def stacked(self, name: str):
        """The stored [count, ...] array of one tensor (bf16 on CPU: its uint16 bits)."""
        return getattr(self, attr(name))[...]

    def at(self, j) -> "LayerAt":
        """Layer ``first + j`` (j may be traced, e.g. the scan index)."""
        return LayerAt({n: self.stacked(n) for n in self.names()}, j, self.expert_names)

    def slices(self):
        """(rel name, j, LayerSlice) for every tensor of every layer, layer by layer in
        tensor-table order: the checkpoint view. The slices of one tensor share one fill
        record (see LayerSlice.set_value)."""
        fills = {n: {"owned": False} for n in self.names()}
        for j in range(self.count):
            for n in self.names():
                yield n, j, LayerSlice(getattr(self, attr(n)), j, fills[n])


class LayerAt:
    """One layer of a stack, addressed like a per-layer weight dict: ``w[name]`` is layer j's
    tensor in compute form, except the routed experts, which stay an ``ExpertsAt`` so that
    only the experts a token uses are sliced out."""

    def __init__(self, arrays: dict, j, expert_names=()):
        self.arrays, self.j, self.expert_names = arrays, j, tuple(expert_names)

    def __getitem__(self, name: str):
        a = self.arrays[name]
        if name in self.expert_names:
            return ExpertsAt(a, self.j)
        return take(a, self.j)

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def get(self, name, default=None):
        return self[name] if name in self else default

    def raw(self, name: str):
        """Layer j's tensor in the model's dtype (not widened)."""
        return from_storage(self.arrays[name][self.j])


class ExpertsAt:
    """The routed experts [E, ...] of layer j of a stack [L, E, ...]: ``expert(e)`` slices one."""

    def __init__(self, stack, j):
        self.stack, self.j = stack, j

    @property
    def num_experts(self) -> int:
        return self.stack.shape[1]

    def expert(self, e):
        return take(self.stack, self.j, e)


def expert_matrix(w, e):
    """Expert e's matrix from an ExpertsAt or a plain stacked [E, ...] array."""
    return w.expert(e) if isinstance(w, ExpertsAt) else compute_form(jax.lax.dynamic_index_in_dim(w, e, 0, False))


@partial(jax.jit, donate_argnums=0)
def _put_owned(stack, j, value):
    return jax.lax.dynamic_update_index_in_dim(stack, value, j, 0)


@jax.jit
def _put(stack, j, value):
    return jax.lax.dynamic_update_index_in_dim(stack, value, j, 0)


@partial(jax.jit, donate_argnums=0)
def _put_owned_row(stack, j, e, value):
    return jax.lax.dynamic_update_slice(stack, value[None, None], (j, e) + (0,) * (stack.ndim - 2))


def _on_device(value, dtype):
    """A host value as the stack stores it (bf16 as its bits, made on the host)."""
    if dtype == BITS:
        value = np.asarray(value).astype(jnp.bfloat16).view(np.uint16)
    return jnp.asarray(value, dtype)


class LayerSlice:
    """Layer j of a stacked nnx.Param, with the interface of a per-layer Param: shape,
    dtype, get_value / set_value and ``[...]`` read and write layer j only.

    Writing into an abstract stack (a model made under ``nnx.eval_shape``, as the
    checkpoint loader does) allocates it once and then updates it in place (a donated
    update), so loading holds the model plus one tensor, not a second copy of a stack."""

    def __init__(self, param, j: int, fill: dict):
        self.param, self.j, self.fill = param, j, fill

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape[1:])

    @property
    def dtype(self):
        return jnp.dtype(jnp.bfloat16) if self.param.dtype == BITS else self.param.dtype

    def get_value(self):
        return from_storage(self.param.get_value()[self.j])

    def set_value(self, value):
        if tuple(value.shape) != self.shape:
            raise ValueError(f"layer slice: shape {tuple(value.shape)} != expected {self.shape}")
        stack = self.param.get_value()
        if isinstance(stack, jax.ShapeDtypeStruct):
            stack = jnp.zeros(stack.shape, stack.dtype)
            self.fill["owned"] = True
        if self.fill["owned"] and len(self.shape) >= 3:
            # routed experts [E, ...]: one expert at a time, so loading holds one expert's
            # converted copy, not a whole layer's (small-v3 float32: peak RSS growth 1.41-1.47x
            # the weights with whole layers, 1.31-1.33x this way; docs/performance.md)
            for e in range(self.shape[0]):
                stack = _put_owned_row(stack, self.j, e, _on_device(value[e], stack.dtype))
            self.param.set_value(stack)
            return
        put = _put_owned if self.fill["owned"] else _put
        self.param.set_value(put(stack, self.j, _on_device(value, stack.dtype)))

    def __getitem__(self, idx):
        return self.get_value()[idx]

    def __setitem__(self, idx, value):
        if idx is not Ellipsis:
            raise TypeError("a layer slice is assigned whole (w[...] = array)")
        self.set_value(value)
