"""The device mesh: named axes, parsed from ``--mesh data=2,expert=4``, and where each array lives.

Three axes, each optional (size 1 when not named):

    data    data parallel: the batch is split; every weight is replicated
    expert  expert parallel: routed experts split whole over it (reference/expert_parallel.py);
            attention and the dense layers treat it as more data parallelism (DeepSeek's
            serving layout: attention DP + MoE EP over the same devices)
    tensor  tensor parallel (Megatron): heads, FFN intermediate and vocabulary split

Which weight dimension splits over which axis is declared once, in the tensor table
(``reference.params.partition``); this module turns it into ``NamedSharding``s. A dimension
an axis does not divide stays replicated on that axis (correct, just less memory saved),
except the routed experts, whose count the expert axis must divide (whole experts per
device). The device order puts ``tensor`` innermost (its all-reduces are the most
frequent, so it should map onto the fastest links: NVLink inside a node), then
``expert``, then ``data``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Mesh axes, outermost first (the device order of ``make_mesh``).
AXES = ("data", "expert", "tensor")
#: The axes that split the batch (activations, KV cache): data, and expert (attention DP).
BATCH_AXES = ("data", "expert")

#: The parallel layouts the docs describe (docs/scaling.md), each tested on 8 simulated CPU
#: devices against one device (tests/test_mesh.py): name -> --mesh value.
LAYOUTS = {
    "data parallel": "data=8",
    "expert parallel (attention data parallel)": "expert=8",
    "tensor parallel": "tensor=8",
    "data x expert": "data=2,expert=4",
    "expert x tensor": "expert=4,tensor=2",
    "data x expert x tensor": "data=2,expert=2,tensor=2",
}


class MeshError(ValueError):
    """A --mesh value that cannot be used: names the option and what is wrong."""


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the named axes (1 for an axis not named)."""

    data: int = 1
    expert: int = 1
    tensor: int = 1

    @property
    def size(self) -> int:
        return self.data * self.expert * self.tensor

    @property
    def sizes(self) -> dict[str, int]:
        return {a: getattr(self, a) for a in AXES}

    @property
    def batch_split(self) -> int:
        """How many ways the batch is split (data x expert)."""
        return math.prod(getattr(self, a) for a in BATCH_AXES)

    def __str__(self) -> str:
        named = [f"{a}={n}" for a, n in self.sizes.items() if n > 1]
        return ",".join(named) or "data=1"


def parse_mesh(text: str, option: str = "--mesh") -> MeshShape:
    """``"data=2,expert=4"`` -> MeshShape(data=2, expert=4, tensor=1). Axis names from AXES,
    each at most once, sizes positive integers; MeshError (naming ``option``) otherwise."""
    if text is None or not str(text).strip():
        raise MeshError(f"{option}: empty; give AXIS=SIZE[,AXIS=SIZE...] with AXIS in {', '.join(AXES)} "
                        "(e.g. data=2,expert=4)")
    sizes: dict[str, int] = {}
    for part in str(text).split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq:
            raise MeshError(f"{option} {text!r}: {part.strip()!r} is not AXIS=SIZE (e.g. data=2,expert=4)")
        if name not in AXES:
            raise MeshError(f"{option} {text!r}: unknown axis {name!r}; axes are {', '.join(AXES)}")
        if name in sizes:
            raise MeshError(f"{option} {text!r}: axis {name!r} given twice")
        try:
            n = int(value.strip())
        except ValueError:
            raise MeshError(f"{option} {text!r}: size of {name!r} must be a positive integer, "
                            f"got {value.strip()!r}") from None
        if n < 1:
            raise MeshError(f"{option} {text!r}: size of {name!r} must be a positive integer, got {n}")
        sizes[name] = n
    return MeshShape(**sizes)


# ------------------------------------------------------------------ devices
def make_mesh(shape: MeshShape, devices=None, option: str = "--mesh"):
    """A ``jax.sharding.Mesh`` over the first ``shape.size`` devices (all of them in a
    multi-process run: every process must take part), axes AXES, GSPMD ("Auto") axes."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    devs = list(jax.devices() if devices is None else devices)
    if shape.size > len(devs):
        hint = (" (on CPU, start with XLA_FLAGS=--xla_force_host_platform_device_count=N to split the "
                "host into N devices)" if devs and devs[0].platform == "cpu" else "")
        raise MeshError(f"{option} {shape}: needs {shape.size} devices, JAX sees {len(devs)}{hint}")
    if jax.process_count() > 1 and shape.size != len(devs):
        raise MeshError(f"{option} {shape}: {shape.size} devices, but the {jax.process_count()} processes "
                        f"have {len(devs)}; a multi-process mesh uses every device")
    grid = np.asarray(devs[: shape.size], dtype=object).reshape(shape.data, shape.expert, shape.tensor)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_shape(mesh) -> MeshShape:
    """The MeshShape of a Mesh or AbstractMesh with the axes AXES."""
    return MeshShape(**{a: int(mesh.shape[a]) for a in AXES})


def active_mesh():
    """The mesh set by ``jax.set_mesh`` (as seen while tracing), when it has our axes and more
    than one device; else None. The model asks this instead of taking the mesh through every
    call: JAX's own scoped context, not a global of ours."""
    import jax
    m = jax.sharding.get_abstract_mesh()
    if m.empty or not set(AXES) <= set(m.axis_names) or m.size == 1:
        return None
    return m


def current_mesh():
    """The concrete mesh set by ``jax.set_mesh`` (outside tracing), or None."""
    import jax
    m = jax.sharding.get_mesh()
    return None if m is None or m.empty or not set(AXES) <= set(m.axis_names) else m


def batch_axes(mesh, batch: int):
    """The mesh axes a batch of ``batch`` sequences is split over: data and expert when their
    product divides it, else None (replicated: correct, every device computes every sequence)."""
    return BATCH_AXES if batch % mesh_shape(mesh).batch_split == 0 else None


def split_axes(row, shape: MeshShape) -> tuple[str | None, ...]:
    """Per dimension of a tensor-table row, the mesh axis it is actually split over on a mesh of
    this shape: its ``Tensor.spec`` where the axis has more than one device and divides the
    dimension, else None (replicated). The routed experts are the exception: the expert axis
    must divide their count (whole experts per device). The one rule for placing weights
    (``dim_spec``) and for sizing them (``sim.plan``)."""
    sizes = shape.sizes
    dims: list = []
    for ax, n in zip(row.spec, row.shape, strict=True):
        if ax == "expert" and n % sizes[ax]:
            raise MeshError(f"--mesh expert={sizes[ax]}: does not divide the {n} routed experts "
                            f"({row.name}); expert parallelism puts whole experts on each device")
        dims.append(ax if ax is not None and sizes[ax] > 1 and n % sizes[ax] == 0 else None)
    return tuple(dims)


def dim_spec(row, mesh, lead: int = 0):
    """PartitionSpec of a tensor-table row's array on ``mesh`` (``split_axes``), with ``lead``
    unsplit leading axes (a stack of layers: 1)."""
    from jax.sharding import PartitionSpec as P
    return P(*([None] * lead), *split_axes(row, mesh_shape(mesh)))


def placements(model, mesh):
    """(nnx.Param, NamedSharding, tensor-table row, first layer or None) for every weight of a
    DeepseekModel: globals as they are, each stack's tensors with their layer axis unsplit."""
    from jax.sharding import NamedSharding

    from dsref.reference.params import layer_tensors, tensors
    from dsref.reference.weights import attr

    cfg = model.cfg
    rows = {t.rel: t for t in tensors(cfg) if t.layer is None}
    for n in model.globals.names():
        yield model.globals.param(n), NamedSharding(mesh, dim_spec(rows[n], mesh)), rows[n], None
    for st in [*model.stacks, *model.mtp]:
        by_rel = {t.rel: t for t in layer_tensors(cfg, st.first)}
        for n in st.names():
            yield getattr(st, attr(n)), NamedSharding(mesh, dim_spec(by_rel[n], mesh, lead=1)), by_rel[n], st.first


def shard_model(model, mesh):
    """Place every weight of the model on the mesh by its spec (in place); returns the model."""
    import jax

    from dsref.reference.distributed import to_global
    # several processes: each builds its own shards (device_put would first gather every whole
    # weight to every process to check that they agree)
    put = to_global if jax.process_count() > 1 else jax.device_put
    for param, sharding, _, _ in placements(model, mesh):
        param.set_value(put(param.get_value(), sharding))
    return model


def place_batch(x, mesh, dim: int = 0):
    """x (an array) with dimension ``dim`` (the batch) split over the batch axes when they
    divide it; replicated otherwise. No mesh: x unchanged."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if mesh is None:
        return x
    spec = [None] * x.ndim
    spec[dim] = batch_axes(mesh, x.shape[dim])
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def padded_batch(batch: int, mesh) -> int:
    """The batch rounded up to a multiple of data x expert (padding rows are whole extra
    sequences, so the real rows' results do not change)."""
    n = mesh_shape(mesh).batch_split
    return -(-batch // n) * n


def fetch(x):
    """A (possibly sharded) array as one NumPy array on this host: in a multi-process run a
    process holds only its devices' shards, so the others' come over the network
    (``process_allgather``); every process gets the whole array."""
    import numpy as np
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
