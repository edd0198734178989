"""Communication volumes of a parallel layout (sim.parallel.Parallelism): bytes sent per device per step.

Formulas
  * Ring all-reduce of X bytes over n devices: each device sends 2(n-1)/n * X
    (reduce-scatter + all-gather, Patarasuk & Yuan 2009; the nccl-tests "bus
    bandwidth" convention). Reduce-scatter or all-gather alone: (n-1)/n * X.
  * TP (Megatron-LM, Shoeybi et al. 2019): two all-reduces of the layer output
    [tokens, D] per layer in the forward pass (after attention, after the MLP).
  * EP dispatch/combine (DeepSeek-V3 tech report sec. 3.2, DeepEP): each token is
    sent to the devices holding its k experts. Node-limited routing sends a token
    to at most M nodes; over the scale-out network it travels once per remote node
    (then fans out over NVLink inside the node), so the inter-node dispatch bytes
    per token are min(k, M, nodes) * (nodes-1)/nodes * D * dispatch_bytes.
    Dispatch is FP8 (1 B + 128-element fp32 scales), combine BF16 (2 B).
    The inter-node and intra-node legs of one dispatch (or combine) run at the same
    time on different links (tech report sec. 3.2.2: "IB and NVLink communications
    are fully overlapped"; DeepEP's normal kernels forward RDMA -> NVLink in a
    pipeline): ops sharing a ``group`` cost the slowest of them (``grouped_time``).
  * PP: one activation tensor [tokens, D] per stage boundary per micro-batch.
  * DP with ZeRO-1 (Rajbhandari et al. 2020): reduce-scatter of the gradients and
    all-gather of the updated parameters, each (n-1)/n of the bytes.
  * Prefill-to-decode disaggregation: the prompt's KV cache, kv bytes/token x tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsref.reference.config import ModelConfig
from dsref.sim.parallel import Parallelism

FP8_BYTES = 1.0
BF16_BYTES = 2.0
FP32_BYTES = 4.0
FP8_SCALE_GROUP = 128  # DeepSeek-V3: one fp32 scale per 1x128 activation tile (tech report sec. 3.3)
DISPATCH_FP8_BYTES = FP8_BYTES + FP32_BYTES / FP8_SCALE_GROUP


@dataclass(frozen=True)
class CommOp:
    """Bytes one device sends for one collective, ``count`` times per step.

    link: 'intra' (NVLink/HCCS/...) or 'inter' (scale-out NIC) or 'pcie';
    collective: 'all_reduce' | 'all_to_all' | 'p2p' (selects the efficiency entry).
    """

    name: str
    bytes: float
    link: str
    collective: str
    count: int = 1
    participants: int = 1
    group: str = ""  # ops with the same non-empty group run concurrently on different links


def grouped_time(ops, time_of) -> float:
    """Total seconds of ``ops``: ungrouped ops add up; within a group the slowest op counts."""
    total, groups = 0.0, {}
    for c in ops:
        t = time_of(c)
        if c.group:
            groups[c.group] = max(groups.get(c.group, 0.0), t)
        else:
            total += t
    return total + sum(groups.values())


def ring_allreduce_bytes(nbytes: float, n: int) -> float:
    """Bytes each device sends in a ring all-reduce: 2(n-1)/n * nbytes."""
    return 0.0 if n <= 1 else 2.0 * (n - 1) / n * nbytes


def ring_gather_bytes(nbytes: float, n: int) -> float:
    """Reduce-scatter or all-gather alone: (n-1)/n * nbytes."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes


def tp_comm(cfg: ModelConfig, tokens: int, par: Parallelism, act_bytes: float) -> list[CommOp]:
    """Forward-pass TP all-reduces: 2 per layer of [tokens, D]."""
    tp = par.tp
    if tp <= 1:
        return []
    x = tokens * cfg.hidden_size * act_bytes
    link = "intra" if tp <= par.devices_per_node else "inter"
    return [CommOp("tp_allreduce", ring_allreduce_bytes(x, tp), link, "all_reduce",
                   count=2 * cfg.num_hidden_layers, participants=tp)]


def ep_dispatch_per_token(cfg: ModelConfig, par: Parallelism) -> dict[str, float]:
    """Bytes one token sends per MoE layer for dispatch (FP8) and combine (BF16), split intra/inter node."""
    k, D, ep, dpn = cfg.num_experts_per_tok, cfg.hidden_size, par.ep, par.devices_per_node
    if ep <= 1:
        return {"dispatch_intra": 0.0, "dispatch_inter": 0.0, "combine_intra": 0.0, "combine_inter": 0.0}
    nodes = max(1, ep // dpn)
    local = min(dpn, ep)
    if nodes > 1:
        m = k if par.node_limit is None else min(k, par.node_limit)
        inter_copies = min(m, nodes) * (nodes - 1) / nodes
    else:
        inter_copies = 0.0
    intra_copies = k * (local - 1) / local  # expert copies that take one hop inside a node
    out = {}
    for kind, b in (("dispatch", DISPATCH_FP8_BYTES), ("combine", BF16_BYTES)):
        out[f"{kind}_intra"] = intra_copies * D * b
        out[f"{kind}_inter"] = inter_copies * D * b
    return out


def ep_comm(cfg: ModelConfig, tokens_per_device: int, par: Parallelism) -> list[CommOp]:
    """All-to-all dispatch + combine for every MoE layer (forward)."""
    if par.ep <= 1 or not cfg.is_moe:
        return []
    per = ep_dispatch_per_token(cfg, par)
    n = cfg.num_moe_layers
    ops = []
    for key, v in per.items():
        if v:
            link = key.split("_")[1]
            ops.append(CommOp(f"ep_{key}", v * tokens_per_device, link, "all_to_all", count=n,
                              participants=par.ep, group=f"ep_{key.split('_')[0]}"))
    return ops


def pp_comm(cfg: ModelConfig, tokens_per_microbatch: int, microbatches: int, pp: int, act_bytes: float) -> list[CommOp]:
    """Stage-boundary activations sent by one stage per step (forward)."""
    if pp <= 1:
        return []
    return [CommOp("pp_activations", tokens_per_microbatch * cfg.hidden_size * act_bytes, "inter", "p2p",
                   count=microbatches, participants=2)]


def dp_zero1_comm(param_count_per_device: float, dp: int, grad_bytes: float = BF16_BYTES,
                  param_bytes: float = BF16_BYTES) -> list[CommOp]:
    """ZeRO-1: gradient reduce-scatter + parameter all-gather, once per step."""
    if dp <= 1:
        return []
    return [CommOp("dp_grad_reduce_scatter", ring_gather_bytes(param_count_per_device * grad_bytes, dp),
                   "inter", "all_reduce", participants=dp),
            CommOp("dp_param_all_gather", ring_gather_bytes(param_count_per_device * param_bytes, dp),
                   "inter", "all_reduce", participants=dp)]


def kv_transfer_bytes(cfg: ModelConfig, prompt_tokens: int, kv_bytes: float = BF16_BYTES,
                      absorbed: bool = True) -> float:
    """Prefill-to-decode transfer of one prompt's KV cache (all layers)."""
    return cfg.kv_cache_bytes_per_token(kv_bytes, absorbed=absorbed) * prompt_tokens

