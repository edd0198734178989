"""Roofline step time: every op is bound by compute or by memory, plus communication.

    t_op   = max(flops / (peak[op.precision] * eff_compute), bytes / (mem_bw * eff_memory))
    t_comm = bytes / (link_bw * eff_link) + latency            (per collective call)
    t_step = sum t_op + sum t_comm + overhead                  (overlap=False)
           = max(sum t_op, sum t_comm) + overhead              (overlap=True)

Peaks, bandwidths and efficiencies come only from the hardware catalog
(hwmodels/catalog.py: ``Device.peak``, ``Device.efficiency``, the cited
hwmodels/data/efficiency.toml). Efficiency op types used per op kind:
gemm / moe_gemm / head / router / embed / norm / elementwise -> "gemm",
attention -> "attention", every byte -> "memory"; collectives: all_reduce ->
"all_reduce", all_to_all and point-to-point sends -> "all_to_all", host<->device
copies -> "pcie". Nothing here is tuned to reproduce a throughput claim.

Matrix-size dependence: on a device whose file has a ``[gemv_bandwidth_efficiency]``
curve (the host, from ``dsref hw probe``), a GEMM op that records ``gemm_matrix_bytes``
streams its bytes at memory_bandwidth x curve(matrix bytes) instead of x
efficiency.memory: a one-row product over a 0.5 MB matrix reached ~11 GB/s on a
2-vCPU EPYC VM where 4 MB and larger ones reached ~25 GB/s.

GEMM row dependence: on a device whose file has a ``[gemm_rows_efficiency]``
curve (``dsref hw probe`` measures one for the host), an op that carries
``gemm_rows`` (the M of each of its GEMM calls, sim/costmodel.py) runs at
peak x eff_gemm x curve(gemm_rows), and its FLOPs are multiplied by
``gemm_padding`` (rows computed / rows needed, e.g. routed-expert windows padded
to whole blocks). Devices without a curve ignore both fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsref.sim.comm import CommOp
from dsref.sim.costmodel import Op

_COMPUTE_EFF = {"attention": "attention"}
# When a device's data file marks a rate "unknown" (e.g. Ascend 910C fp32), the
# catalog refuses to guess. Vector ops (norms, softmax, router) then use the
# device's known 16-bit vector/cube rate: they are memory-bound at every batch we
# model, so the choice moves no step time; it is reported as a catalog gap.
UNKNOWN_RATE_FALLBACK = {"fp32": ("fp16", "bf16")}
_LINK_EFF = {"all_reduce": "all_reduce", "all_to_all": "all_to_all", "p2p": "all_to_all", "pcie": "pcie"}


@dataclass(frozen=True)
class OpTime:
    op: Op
    compute_s: float
    memory_s: float
    floor_s: float = 0.0  # the kernel's launch floor (hwmodels/kernels.py), 0 when not charged

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.floor_s) * self.op.count

    @property
    def bound(self) -> str:
        if self.floor_s > max(self.compute_s, self.memory_s):
            return "floor"
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class StepTime:
    """A step's time and where it went."""

    time_s: float
    compute_time_s: float
    comm_time_s: float
    overhead_s: float
    ops: list[OpTime] = field(repr=False)
    comm: list[tuple[CommOp, float]] = field(repr=False)

    def by_kind(self) -> dict[str, dict]:
        """Per op kind: time, FLOPs, bytes, arithmetic intensity, time share that is memory-bound."""
        out: dict[str, dict] = {}
        for t in self.ops:
            d = out.setdefault(t.op.kind, {"time_s": 0.0, "flops": 0.0, "bytes": 0.0, "memory_bound_time_s": 0.0,
                                           "ops": 0})
            d["time_s"] += t.time_s
            d["flops"] += t.op.flops * t.op.count
            d["bytes"] += t.op.bytes * t.op.count
            d["ops"] += t.op.count
            if t.bound == "memory":
                d["memory_bound_time_s"] += t.time_s
        for d in out.values():
            d["intensity_flop_per_byte"] = d["flops"] / d["bytes"] if d["bytes"] else None
            d["bound"] = "memory" if d["memory_bound_time_s"] >= d["time_s"] / 2 else "compute"
        return out

    def summary(self) -> dict:
        return {"time_s": self.time_s, "compute_time_s": self.compute_time_s, "comm_time_s": self.comm_time_s,
                "overhead_s": self.overhead_s, "by_kind": self.by_kind(),
                "comm": {c.name: t for c, t in self.comm}}


def compute_efficiency_type(kind: str) -> str:
    return _COMPUTE_EFF.get(kind, "gemm")


def peak_rate(device, precision: str) -> float:
    """Device.peak(precision), or the UNKNOWN_RATE_FALLBACK rate when the catalog marks it unknown."""
    from dsref.hwmodels.catalog import CatalogError
    try:
        return device.peak(precision)
    except CatalogError:
        for alt in UNKNOWN_RATE_FALLBACK.get(precision, ()):
            try:
                return device.peak(alt)
            except CatalogError:
                continue
        raise


def device_efficiencies(device) -> dict[str, float]:
    """Every efficiency factor of ``device`` (catalog lookups done once; each re-reads the TOML)."""
    from dsref.hwmodels.catalog import EFFICIENCY_OPS
    return {op: device.efficiency(op) for op in EFFICIENCY_OPS}


def op_time(op: Op, device, *, memory_bandwidth: float | None = None,
            effs: dict[str, float] | None = None, floor_s: float = 0.0) -> OpTime:
    """Roofline time of one op on ``device`` (a hwmodels Device).

    memory_bandwidth overrides where the op's bytes come from (e.g. weights left in
    host memory under partial offload); its efficiency is still the device's.
    effs: precomputed ``device_efficiencies(device)``.
    """
    effs = effs or device_efficiencies(device)
    eff_type = compute_efficiency_type(op.kind)
    peak = peak_rate(device, op.precision) * effs[eff_type]
    flops = op.flops
    curve = getattr(device, "gemm_rows_curve", None)
    if curve is not None and eff_type == "gemm" and op.gemm_rows is not None and flops:
        peak *= curve.at(op.gemm_rows)
        flops *= op.gemm_padding
    bw = (memory_bandwidth if memory_bandwidth is not None else device.require("memory_bandwidth"))
    gemv = getattr(device, "gemv_bandwidth_curve", None)
    if gemv is not None and op.gemm_matrix_bytes:
        bw *= gemv.at(op.gemm_matrix_bytes)  # measured streaming rate of a matrix this size
    else:
        bw *= effs["memory"]
    return OpTime(op, flops / peak if flops else 0.0, op.bytes / bw if op.bytes else 0.0, floor_s)


def link_bandwidth(device, link: str, node=None) -> float:
    """Unidirectional per-device bandwidth (B/s) of a link type from the catalog."""
    if link == "intra":
        bw = node.fabric_bandwidth if node is not None and node.fabric_bandwidth else device.intra_node_bandwidth
    elif link == "inter":
        bw = (node.network_bandwidth_per_device if node is not None and node.network_bandwidth_per_device
              else device.network_bandwidth)
    elif link == "pcie":
        bw = node.pcie_bandwidth if node is not None else None
    else:
        raise ValueError(f"unknown link {link!r}")
    if not bw:
        raise ValueError(f"device '{device.id}': no {link} bandwidth in the catalog")
    return bw


def comm_time(c: CommOp, device, *, node=None, latency_s: dict[str, float] | None = None) -> float:
    """Time of ``c.count`` calls of one collective: bytes / (bw * eff) + latency each.

    Latency per call: the larger of the device's kernel profile's collective latency for this
    link, collective and group size (hwmodels/kernels.py: NCCL/DeepEP/HCCL published small-message
    figures) and the system preset's network latency (``latency_s``, clusters)."""
    if c.bytes == 0:
        return 0.0
    eff = device.efficiency(_LINK_EFF[c.collective] if c.link != "pcie" else "pcie")
    lat = max((latency_s or {}).get(c.link, 0.0), _collective_alpha(device, c))
    return c.count * (c.bytes / (link_bandwidth(device, c.link, node) * eff) + lat)


def _collective_alpha(device, c: CommOp) -> float:
    """The kernel profile's per-call latency of this collective; 0 where the profile has no figure
    for the link (e.g. CPU profiles have no scale-up fabric) -- reported by `dsref hw kernels`."""
    from dsref.hwmodels.catalog import CatalogError
    from dsref.hwmodels.kernels import kernel_profile
    try:
        prof = kernel_profile(device)
        # a host <-> device copy is a point-to-point transfer over the PCIe link
        coll = "p2p" if c.collective == "pcie" else c.collective
        return prof.collective_latency_s(c.link, coll, max(int(c.participants), 2)) if prof else 0.0
    except CatalogError:
        return 0.0


def step_time(ops: list[Op], device, comm: list[CommOp] = (), *, node=None, overhead_s: float = 0.0,
              overlap: bool = False, latency_s: dict[str, float] | None = None,
              memory_bandwidth: float | None = None, kernel_floor_s: float = 0.0) -> StepTime:
    """Roofline time of a whole step on one device (ops already divided per device); every op
    (kernel) takes at least ``kernel_floor_s``."""
    effs = device_efficiencies(device)
    times = [op_time(op, device, memory_bandwidth=memory_bandwidth, effs=effs, floor_s=kernel_floor_s)
             for op in ops]
    tc = sum(t.time_s for t in times)
    ct = [(c, comm_time(c, device, node=node, latency_s=latency_s)) for c in comm]
    tm = sum(t for _, t in ct)
    total = (max(tc, tm) if overlap else tc + tm) + overhead_s
    return StepTime(total, tc, tm, overhead_s, times, ct)


def ridge_point(device, precision: str, kind: str = "gemm") -> float:
    """Arithmetic intensity (FLOP/B) where achievable compute meets achievable bandwidth."""
    return (peak_rate(device, precision) * device.efficiency(compute_efficiency_type(kind))
            / (device.require("memory_bandwidth") * device.efficiency("memory")))
