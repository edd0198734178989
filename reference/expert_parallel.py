"""Expert parallelism: each device holds E/n whole routed experts; tokens travel to them and back.

Under a mesh (reference/mesh.py) the routed experts run inside one ``jax.shard_map``, per
device (the local view):

    x      [b, T, D]   this device's sequences (the batch split over data x expert: DeepSeek's
                       attention data parallel; replicated when the split does not divide it)
    ids    [b, T, k]   their experts (the router ran outside, on the same split)
    W      [E/n, F/t, D]  this device's experts, their intermediate dim split over tensor

    dispatch  each (token, expert) assignment goes to the device owning the expert:
              device  = id // (E/n),  local expert = id % (E/n)
              send[device, slot] = x[token]     (slot: its rank among the assignments
                                                 this device sends to that device)
              one all_to_all over ``expert`` exchanges the buffers
    compute   the received rows through their local experts (reference.model.routed_experts:
              work proportional to the rows, padding rows skipped), partial over F/t,
              summed over ``tensor`` (psum)
    combine   a second all_to_all brings each row back to its sender, which adds
              w[token, k] * row into token's output

Exact: nothing is dropped and there is no capacity factor. Each per-device buffer holds the
worst case, slots = (tokens here) x min(k, E/n) -- a token's k experts are distinct, so at
most min(k, E/n) of them live on one device -- which keeps shapes static. The price is
buffer memory n x slots x D per device (decode: small; a long prefill on many devices:
large); ``jax.lax.ragged_all_to_all`` would send only the filled rows, and is the step to
take when memory, not exactness, is the concern.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsref.reference.mesh import BATCH_AXES, batch_axes, mesh_shape

F32 = jnp.float32
EXPERT_WEIGHTS = ("experts.gate_proj.weight", "experts.up_proj.weight", "experts.down_proj.weight")


def _expert_specs(arrays, stacked: bool, tensor: int):
    """in_specs of (gate, up, down): E over 'expert'; F over 'tensor' when it divides F."""
    lead = (None,) if stacked else ()
    F = arrays[0].shape[-2]
    t = "tensor" if tensor > 1 and F % tensor == 0 else None
    return (P(*lead, "expert", t, None), P(*lead, "expert", t, None), P(*lead, "expert", None, t)), t


def dispatch_slots(dest, n_dev: int):
    """Slot of each assignment within its destination's buffer: its rank among the assignments
    (in order) going to the same device. dest [A] -> slot [A]."""
    A = dest.shape[0]
    order = jnp.argsort(dest, stable=True)
    counts = jnp.bincount(dest, length=n_dev)
    start = jnp.cumsum(counts) - counts
    return jnp.zeros(A, jnp.int32).at[order].set((jnp.arange(A) - start[dest[order]]).astype(jnp.int32))


def routed_experts_sharded(w, x, ids, wts, num_experts: int, prec, local_experts):
    """sum_k wts * Expert_ids(x) with the experts split over the active mesh's ``expert`` axis.

    w: the layer's weights (names 'experts.{gate,up,down}_proj.weight': an ``ExpertsAt`` of a
    layer stack, or stacked [E, ...] arrays); x [B, T, D]; ids, wts [B, T, k];
    local_experts: ``reference.model.routed_experts`` (run on each device's rows).
    Returns [B, T, D] in x's dtype."""
    from dsref.reference.weights import ExpertsAt

    mesh = jax.sharding.get_abstract_mesh()
    shape = mesh_shape(mesh)
    n = shape.expert
    if num_experts % n:
        raise ValueError(f"expert={n} does not divide the {num_experts} routed experts")
    mats = [w[name] for name in EXPERT_WEIGHTS]
    if any(isinstance(m, tuple) for m in mats):
        raise ValueError("layers='unrolled' runs on one device; use the layer scan on a mesh")
    stacked = isinstance(mats[0], ExpertsAt)
    arrays = [m.stack for m in mats] if stacked else mats
    j = mats[0].j if stacked else jnp.int32(0)
    w_specs, t_axis = _expert_specs(arrays, stacked, shape.tensor)
    bax = batch_axes(mesh, x.shape[0])
    tok_spec = P(bax, None, None)
    E_local, k = num_experts // n, ids.shape[-1]

    def body(x, ids, wts, j, gate, up, down):
        b, T, D = x.shape
        M = b * T
        xf, e = x.reshape(M, D), ids.reshape(M * k)
        dest, loc = e // E_local, e % E_local
        cap = M * min(k, E_local)  # worst case per destination: exact, nothing dropped
        slot = dispatch_slots(dest, n)
        tok = jnp.arange(M * k) // k
        send = jnp.zeros((n, cap, D), x.dtype).at[dest, slot].set(xf[tok]).reshape(n * cap, D)
        send_e = jnp.full((n, cap), -1, jnp.int32).at[dest, slot].set(loc.astype(jnp.int32)).reshape(n * cap)
        if n > 1:
            send = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)
            send_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True)
        valid = send_e >= 0
        local = {name: (ExpertsAt(a, j) if stacked else a) for name, a in zip(EXPERT_WEIGHTS, (gate, up, down))}
        rows = local_experts(local, send, jnp.maximum(send_e, 0)[:, None], jnp.ones((n * cap, 1), F32),
                             E_local, prec, valid=valid)
        if t_axis is not None:  # each device has F/t of every expert's intermediate: sum the parts
            rows = jax.lax.psum(rows.astype(F32), "tensor").astype(x.dtype)
        if n > 1:
            rows = jax.lax.all_to_all(rows, "expert", 0, 0, tiled=True)
        back = rows.reshape(n, cap, D)[dest, slot].astype(F32) * wts.reshape(M * k, 1).astype(F32)
        return jnp.zeros((M, D), F32).at[tok].add(back).astype(x.dtype).reshape(b, T, D)

    run = jax.shard_map(body, in_specs=(tok_spec, tok_spec, tok_spec, P(), *w_specs), out_specs=tok_spec,
                        check_vma=False)
    return run(x, ids, wts, j, *arrays)


__all__ = ["BATCH_AXES", "dispatch_slots", "routed_experts_sharded"]
