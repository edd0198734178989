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
