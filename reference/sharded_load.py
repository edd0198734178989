"""Loading a checkpoint straight onto a device mesh: each process reads only its devices' shards.

``load_sharded(path, mesh)`` builds the model abstractly, then makes every weight with
``jax.make_array_from_callback``: JAX asks, per device this process owns, for one index
(a tuple of slices into the global array), and the callback reads exactly that slice from
the memory-mapped safetensors files -- for a stacked [L, ...] weight, layer by layer; for
routed experts, only the experts in the slice (each stored as its own tensor in DeepSeek's
files); for FP8, only the 128x128 blocks that cover the slice, dequantised, then cropped.
So a host of an expert-parallel run reads its own experts, not the 650 GB of all of them.
The checks are the loader's (reference/checkpoint.py): names, shapes, dtypes and FP8 scales
from the headers before anything is read, NaN/Inf per slice as it is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsref.reference.checkpoint import (_FP8, CheckpointError, _find_files, _Plan, _Reader,
                                        dequantize_fp8_blockwise, fp8_block, read_config)


def _bounds(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) per dimension of a device's index (slices, step 1)."""
    out = []
    for sl, n in zip(index, shape, strict=True):
        start, stop, step = sl.indices(n)
        if step != 1:  # pragma: no cover - JAX's shard indices are contiguous
            raise ValueError(f"shard index {index} is strided")
        out.append((start, stop))
    return out


def read_slice(plan: _Plan, hf: str, bounds: list[tuple[int, int]]) -> np.ndarray:
    """One checkpoint tensor's [start:stop, ...] region as float values (FP8: the covering
    blocks dequantised, then cropped); a memory-mapped view for unquantised tensors."""
    info = plan.r.infos[hf]
    a = plan.r.array(hf)
    if info.dtype != _FP8:
        out = a[tuple(slice(s, e) for s, e in bounds)]
    else:
        (r0, r1), (c0, c1) = bounds[-2:]
        br, bc = plan.block
        R, C = a.shape[-2:]
        rb0, cb0 = r0 // br * br, c0 // bc * bc
        rb1, cb1 = min(R, -(-r1 // br) * br), min(C, -(-c1 // bc) * bc)
        lead = tuple(slice(s, e) for s, e in bounds[:-2])
        region = a[(*lead, slice(rb0, rb1), slice(cb0, cb1))]
        scale = plan.r.array(hf + "_scale_inv")[(*lead, slice(rb0 // br, -(-rb1 // br)),
                                                 slice(cb0 // bc, -(-cb1 // bc)))]
        out = dequantize_fp8_blockwise(region, scale, plan.block)[..., r0 - rb0:r1 - rb0, c0 - cb0:c1 - cb0]
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        what = " after dequantization" if info.dtype == _FP8 else ""
        raise CheckpointError(f"{info.file}: tensor '{hf}' contains NaN or Inf{what}")
    return out


def read_entry(plan: _Plan, entry, bounds: list[tuple[int, int]]) -> np.ndarray:
    """A slice of one of our tensors (reference.params layout), from whichever checkpoint
    layout holds it: plain, one tensor per expert ("stack"), or a half of a fused gate_up."""
    if entry.how == "stack":  # experts [E, ...] stored one per tensor: read only ours
        (e0, e1), rest = bounds[0], bounds[1:]
        return np.stack([read_slice(plan, entry.srcs[e], rest) for e in range(e0, e1)])
    if entry.how in ("gate", "up"):  # fused [E, 2F, D]: gate rows first, then up
        half = plan.r.infos[entry.srcs[0]].shape[1] // 2
        off = 0 if entry.how == "gate" else half
        (f0, f1) = bounds[1]
        return read_slice(plan, entry.srcs[0], [bounds[0], (f0 + off, f1 + off), *bounds[2:]])
    return read_slice(plan, entry.srcs[0], bounds)


def load_sharded(path: str | Path, mesh, *, dtype=None, with_mtp: bool = False):
    """(ModelConfig, DeepseekModel) with every weight placed on ``mesh`` by its partition spec
    (reference/mesh.py), each process reading only the slices its devices hold."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsref.reference.mesh import placements
    from dsref.reference.model import DeepseekModel
    from dsref.reference.weights import BITS

    dtype = jnp.float32 if dtype is None else dtype
    path = Path(path)
    _find_files(path)  # refuse pickles before complaining about config.json
    cfg = read_config(path)
    plan = _Plan(_Reader(path), cfg, with_mtp, fp8_block(cfg, str(path / "config.json")), path / "config.json")
    entries = {e.name: e for group in plan.groups for e in group}
    model = nnx.eval_shape(lambda: DeepseekModel(cfg, dtype=dtype, with_mtp=with_mtp))
    for param, sharding, row, first in placements(model, mesh):
        shape, stored = tuple(param.shape), np.dtype(param.dtype)

        def convert(a, stored=stored):
            if stored == np.dtype(BITS):  # a bf16 stack on CPU is stored as its bits (reference/weights.py)
                return np.asarray(a).astype(jnp.bfloat16).view(np.uint16)
            return np.asarray(a, stored)

        def read(index, shape=shape, row=row, first=first, convert=convert, seen={}):  # noqa: B006 - per weight
            b = _bounds(index, shape)
            key = tuple(b)
            if key not in seen:  # devices holding the same slice (replicas) read it once
                if first is None:
                    seen[key] = convert(read_entry(plan, entries[row.name], b))
                else:
                    (l0, l1), rest = b[0], b[1:]
                    seen[key] = np.stack([convert(read_entry(plan, entries[f"model.layers.{first + j}.{row.rel}"],
                                                             rest)) for j in range(l0, l1)])
            return seen[key]

        param.set_value(jax.make_array_from_callback(shape, sharding, read))
    plan.r.release()
    return cfg, model
