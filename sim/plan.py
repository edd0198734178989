"""Memory plan: what one device holds when a model runs over a device mesh on a system.

``plan(cfg, quant, system, mesh, ...)`` sizes, per device of the mesh (``reference.mesh``:
axes data, expert, tensor), three things and compares their sum with the device's memory:

weights
    Every row of the tensor table (``reference.params.tensors``; with the MTP module's rows when
    ``mtp=True``) at the stored bytes of the quantisation (``sim.quant.tensor_bytes``: elements x
    bits per element, scales included -- the same bytes every cost of the simulator uses). A row
    is split as its ``Tensor.spec`` says: bytes per device = bytes / prod(size of the axis of
    each split dimension that the axis divides). A dimension an axis does not divide stays
    replicated on that axis (``reference/mesh.py``), so every device of the mesh holds the same
    bytes: the plan's per-device figure is also the maximum over devices. The data axis never
    splits a weight.

KV cache
    ``ModelConfig.kv_cache_bytes_per_token(quant.kv_bytes)`` (the one source of the figure: MLA's
    latent + rotary key per layer, or GQA's keys and values), plus one layer's worth per MTP module
    when it is kept, times ceil(batch / batch_split) sequences x context tokens, where batch_split
    = data x expert (attention-DP + MoE-EP: each replica holds its own sequences' cache). MLA's
    latent is shared by every head, so the tensor axis does not split it; a GQA model's cache is
    split over tensor when tensor divides its KV heads (the k/v projections are column-split).

activations (one prefill chunk of T tokens on each batch replica)
    An upper bound, the sum of the largest live buffers of each phase (they are not all live at
    once, so the sum bounds the peak from above), with t the tensor axis where it divides the
    dimension, a the quantisation's activation bytes, and the assumptions named:

    * residual stream:  3 x T x D x 4 B   (the f32 residual, the normed input, the block output)
    * attention, prefill in the expanded MLA form (sim.deployment's serving prefill):
      q [T, H/t, N+P] + expanded keys [S, H/t, N+P] and values [S, H/t, A] of the whole context S,
      at a bytes; a fused attention kernel (FlashAttention-style) is assumed: no [T, S] scores.
      GQA: q [T, H/t, hd] (its cache is already counted).
    * MoE: dispatched rows [T x k, D] in and combined rows [T x k, D] out, plus the experts'
      gate/up output [T x k, 2 F/t], at a bytes: k rows per token received at balanced routing
      (EPLB's aim); a skewed batch sends more rows to the hottest device. Dense MLP: [T, 2 I/t].
    * logits:           T x V/t x 4 B   (f32 over the tensor-split vocabulary, every position)

Usable memory = device memory x ``memory_fraction``; the default 0.9 is vLLM's default
``gpu_memory_utilization`` (vllm/engine/arg_utils.py EngineArgs; https://docs.vllm.ai/en/latest/
models/engine_args.html): the rest is left to the runtime (CUDA context, NCCL/cuBLAS workspaces,
graphs), which this plan does not model. The default chunk, 8192 tokens, is SGLang's default
``chunked_prefill_size`` on H100/H200/A100/H20-class GPUs (sgl-project/sglang
python/sglang/srt/server_args.py).

``search_meshes`` enumerates every (data, expert, tensor) whose product is the device count and
whose expert axis divides the routed experts, and plans each. docs/memory-plan.md has examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsref.reference.config import ModelConfig
from dsref.reference.mesh import MeshShape, split_axes
from dsref.reference.params import GROUPS, Tensor, tensors
from dsref.sim.quant import Quant, tensor_bytes

#: vLLM's default gpu_memory_utilization (EngineArgs, vllm/engine/arg_utils.py; docs.vllm.ai engine args).
DEFAULT_MEMORY_FRACTION = 0.9
#: SGLang's default chunked_prefill_size for 35-160 GB GPUs (python/sglang/srt/server_args.py).
DEFAULT_CHUNK = 8192
F32_BYTES = 4
RESIDUAL_COPIES = 3  # the residual x, the normed block input, the block output before the add


class PlanError(ValueError):
    """A plan that cannot be made (wrong device count, expert axis, option value): one line naming the option."""


@dataclass(frozen=True)
class Hardware:
    """The devices a plan runs on: ``n_devices`` copies of ``device`` (a catalog Device)."""

    system: str
    device: object
    n_devices: int
    nodes: int
    devices_per_node: int

    @property
    def memory_bytes(self) -> float:
        return self.device.require("memory_bytes")


def resolve_hardware(system: str, nodes: int | None = None) -> Hardware:
    """A system preset (hwmodels/data/systems) as ``nodes`` nodes. A node preset is one node unless
    ``nodes`` scales it (2 x h800-node = 16 H800); a cluster preset has its num_nodes, or fewer."""
    from dsref.hwmodels.systems import Cluster, load_system
    if not str(system).strip():
        raise PlanError("--system: empty; give a system preset name (see `dsref hw list`)")
    if nodes is not None and nodes < 1:
        raise PlanError(f"--nodes: must be >= 1, got {nodes}")
    sys_ = load_system(system)
    node = sys_.node if isinstance(sys_, Cluster) else sys_
    have = sys_.num_nodes if isinstance(sys_, Cluster) else None
    if nodes is None:
        nodes = have or 1
    elif have is not None and nodes > have:
        raise PlanError(f"--nodes {nodes}: system {system} is a cluster of {have} nodes")
    return Hardware(sys_.name, node.device, nodes * node.devices_per_node, nodes, node.devices_per_node)


def check_mesh(cfg: ModelConfig, mesh: MeshShape, hw: Hardware, option: str = "--mesh") -> None:
    """The mesh must use every device of the system once, and split the routed experts whole."""
    if mesh.size != hw.n_devices:
        raise PlanError(f"{option} {mesh}: {mesh.size} devices, but {hw.system} x {hw.nodes} node(s) has "
                        f"{hw.n_devices}; the product data x expert x tensor must equal the device count")
    if cfg.is_moe and cfg.n_routed_experts % mesh.expert:
        raise PlanError(f"{option} {mesh}: expert={mesh.expert} does not divide the {cfg.n_routed_experts} "
                        f"routed experts of {cfg.name} (whole experts per device)")


def shard_divisor(t: Tensor, mesh: MeshShape) -> int:
    """How many pieces one device's share of ``t`` is: the product of the sizes of the axes that
    split its dimensions on this mesh (``reference.mesh.split_axes``, the rule the model is placed
    by: an axis that does not divide its dimension replicates)."""
    return math.prod(getattr(mesh, axis) for axis in split_axes(t, mesh) if axis is not None)


def _rows(cfg: ModelConfig, quant: Quant, mtp: bool) -> list[tuple[Tensor, float]]:
    return [(t, tensor_bytes(cfg, quant, t)) for t in tensors(cfg, mtp=mtp)]


def weight_bytes(cfg: ModelConfig, quant: Quant, mesh: MeshShape, mtp: bool = False,
                 rows: list | None = None) -> dict:
    """Weight bytes per device by tensor-table group (GROUPS), their total, the model's total and
    the sum over the mesh (>= the model: the replicated parts count once per device)."""
    rows = rows if rows is not None else _rows(cfg, quant, mtp)
    groups = dict.fromkeys(GROUPS, 0.0)
    model = 0.0
    for t, b in rows:
        groups[t.group] += b / shard_divisor(t, mesh)
        model += b
    per_device = sum(groups.values())
    return {"groups": groups, "per_device": per_device, "max_over_devices": per_device,
            "model": model, "sum_over_devices": per_device * mesh.size}


def kv_bytes_per_token(cfg: ModelConfig, quant: Quant, mesh: MeshShape, mtp: bool = False) -> float:
    """KV-cache bytes of one token on one device (all layers; MTP layers when kept)."""
    per_tok = cfg.kv_cache_bytes_per_token(quant.kv_bytes)
    if mtp:
        per_tok += per_tok / cfg.num_hidden_layers * cfg.num_nextn_predict_layers
    if cfg.arch == "dense" and cfg.num_key_value_heads % mesh.tensor == 0:
        per_tok /= mesh.tensor  # GQA keys/values split by head; MLA's latent is shared: replicated
    return per_tok


def _split(n: int, by: int) -> float:
    """n / by where ``by`` divides n, else n (the dimension stays replicated)."""
    return n / by if n % by == 0 else n


def activation_bytes(cfg: ModelConfig, quant: Quant, mesh: MeshShape, chunk: int, context: int) -> dict:
    """Upper bound of the activations of one prefill chunk on one device; the module doc has the formula."""
    T, D, a, t = chunk, cfg.hidden_size, quant.act_bytes, mesh.tensor
    S = max(context, chunk)
    heads = _split(cfg.num_attention_heads, t)
    out = {"residual": RESIDUAL_COPIES * T * D * F32_BYTES}
    if cfg.arch == "dense":
        out["attention"] = T * heads * cfg.dense_head_dim * a
    else:
        N, P, A = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        out["attention"] = (T * heads * (N + P) + S * heads * (N + P + A)) * a
    if cfg.is_moe:
        rows = T * cfg.num_experts_per_tok
        out["mlp"] = (2 * rows * D + rows * 2 * _split(cfg.moe_intermediate_size, t)) * a
        if cfg.num_moe_layers < cfg.num_hidden_layers:  # a dense layer may be wider than the experts
            out["mlp"] = max(out["mlp"], T * 2 * _split(cfg.intermediate_size, t) * a)
    else:
        out["mlp"] = T * 2 * _split(cfg.intermediate_size, t) * a
    out["logits"] = T * _split(cfg.vocab_size, t) * F32_BYTES
    out["total"] = sum(out.values())
    return out


@dataclass
class Plan:
    """One mesh's memory per device (bytes) and whether it fits."""

    model: str
    quant: str
    hw: Hardware
    mesh: MeshShape
    batch: int
    context: int
    chunk: int
    mtp: bool
    memory_fraction: float
    weights: dict
    kv_per_token: float
    kv: float
    activations: dict
    extras: dict = field(default_factory=dict)

    @property
    def usable(self) -> float:
        return self.hw.memory_bytes * self.memory_fraction

    @property
    def sequences_per_replica(self) -> int:
        return math.ceil(self.batch / self.mesh.batch_split)

    @property
    def total(self) -> float:
        return self.weights["per_device"] + self.kv + self.activations["total"]

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    @property
    def kv_tokens_per_replica(self) -> int:
        """KV tokens one batch replica can hold once weights and activations are placed (0 if none)."""
        free = self.usable - self.weights["per_device"] - self.activations["total"]
        return max(0, int(free // self.kv_per_token))

    @property
    def kv_tokens_total(self) -> int:
        """Batch x context tokens of KV the whole mesh can hold (each replica its own sequences)."""
        return self.kv_tokens_per_replica * self.mesh.batch_split

    def to_dict(self) -> dict:
        return {"model": self.model, "quant": self.quant, "system": self.hw.system, "nodes": self.hw.nodes,
                "device": self.hw.device.id, "devices": self.hw.n_devices, "mesh": self.mesh.sizes,
                "batch_split": self.mesh.batch_split, "batch": self.batch, "context": self.context,
                "chunk": self.chunk, "mtp": self.mtp, "device_memory_bytes": self.hw.memory_bytes,
                "memory_fraction": self.memory_fraction, "usable_bytes": self.usable,
                "weights_by_group_bytes": self.weights["groups"], "weights_bytes": self.weights["per_device"],
                "weights_max_over_devices_bytes": self.weights["max_over_devices"],
                "model_weight_bytes": self.weights["model"],
                "weights_sum_over_devices_bytes": self.weights["sum_over_devices"],
                "kv_bytes_per_token": self.kv_per_token, "sequences_per_replica": self.sequences_per_replica,
                "kv_cache_bytes": self.kv, "activation_bytes": self.activations,
                "total_bytes": self.total, "fits": self.fits, "headroom_bytes": self.usable - self.total,
                "kv_tokens_per_replica": self.kv_tokens_per_replica, "kv_tokens_total": self.kv_tokens_total}


def check_sizes(batch: int, context: int, chunk: int, memory_fraction: float) -> None:
    for opt, v in (("--batch", batch), ("--context", context), ("--chunk", chunk)):
        if not isinstance(v, int) or v < 1:
            raise PlanError(f"{opt}: must be an integer >= 1, got {v!r}")
    if not 0.0 < memory_fraction <= 1.0:
        raise PlanError(f"--memory-fraction: must be in (0, 1], got {memory_fraction!r}")


def plan(cfg: ModelConfig, quant: Quant, hw: Hardware, mesh: MeshShape, *, batch: int = 1, context: int = 4096,
         chunk: int = DEFAULT_CHUNK, mtp: bool = False, memory_fraction: float = DEFAULT_MEMORY_FRACTION,
         rows: list | None = None) -> Plan:
    """The memory plan of ``cfg`` under ``quant`` on ``hw`` split as ``mesh`` (see the module doc)."""
    check_sizes(batch, context, chunk, memory_fraction)
    if mtp and cfg.num_nextn_predict_layers < 1:
        raise PlanError(f"--mtp: model {cfg.name} has no MTP module (num_nextn_predict_layers = 0)")
    check_mesh(cfg, mesh, hw)
    w = weight_bytes(cfg, quant, mesh, mtp, rows)
    per_tok = kv_bytes_per_token(cfg, quant, mesh, mtp)
    kv = math.ceil(batch / mesh.batch_split) * context * per_tok
    act = activation_bytes(cfg, quant, mesh, chunk, context)
    return Plan(cfg.name, quant.name, hw, mesh, batch, context, chunk, mtp, memory_fraction, w, per_tok, kv, act)


def meshes(n: int, cfg: ModelConfig) -> list[MeshShape]:
    """Every (data, expert, tensor) with data x expert x tensor = n whose expert axis divides the
    routed experts (a dense model: any expert size, it only splits the batch)."""
    out = []
    for e in range(1, n + 1):
        if n % e or (cfg.is_moe and cfg.n_routed_experts % e):
            continue
        for t in range(1, n // e + 1):
            if (n // e) % t == 0:
                out.append(MeshShape(data=n // e // t, expert=e, tensor=t))
    return out


def search_meshes(cfg: ModelConfig, quant: Quant, hw: Hardware, **kw) -> list[Plan]:
    """Plans of every mesh of ``meshes``: those that fit first, most KV tokens over the mesh first,
    then the smaller tensor axis (fewer all-reduces per layer)."""
    rows = _rows(cfg, quant, kw.get("mtp", False))
    plans = [plan(cfg, quant, hw, m, rows=rows, **kw) for m in meshes(hw.n_devices, cfg)]
    return sorted(plans, key=lambda p: (not p.fits, -p.kv_tokens_total, p.mesh.tensor, p.mesh.expert))

