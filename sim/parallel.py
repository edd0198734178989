"""The parallel layout of one serving instance or one training replica, and where weights sit.

One type, ``Parallelism``, for the step cost (sim.stepcost), the communication volumes
(sim.comm), the serving and training simulators and sim.local's tensor-parallel node.

  * devices = dp x tp x pp. dp: data-parallel ranks -- in serving the DP-attention
    ranks (each runs attention and the dense part for its own sequences), in
    training the replicas of the non-expert weights (ZeRO-1 shards their optimizer state).
  * tp: tensor parallelism of the non-expert weights and activations (Megatron-LM).
  * ep: expert parallelism: the expert slots (routed experts + redundant replicas,
    DeepSeek's EPLB) are split over ep devices; in training EP spans DP ranks, so each
    expert's weights are replicated over dp / ep ranks (``expert_dp``).
  * moe_tp: tensor parallelism *inside* each routed expert (vLLM/SGLang's default when EP is off:
    every device of a TP group holds 1/moe_tp of every expert and runs all the group's tokens
    through its slices). Expert weights are split over ep x moe_tp devices.
  * pp: pipeline stages (contiguous layer ranges).
  * devices_per_node: devices sharing the fast scale-up fabric (NVLink node, or an NVL72 /
    CloudMatrix Unified Bus domain); collectives within it use the intra-node link.
  * node_limit: DeepSeek's node-limited routing M (a token's experts span at most M nodes).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsref.reference.config import ModelConfig
from dsref.reference.params import EMBED, GLOBAL, ROUTED_EXPERT, tensors
from dsref.sim.quant import Quant, tensor_bytes


@dataclass(frozen=True)
class Parallelism:
    """Degrees of parallelism of one instance (serving) or one replica set (training); see the module doc."""

    devices: int = 1
    dp: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    expert_slots: int = 0        # routed experts + redundant replicas (0: the model's routed experts)
    devices_per_node: int = 8
    node_limit: int | None = None
    moe_tp: int = 1

    def slots(self, cfg: ModelConfig) -> int:
        """Expert slots over the EP group (each holds one expert replica)."""
        return self.expert_slots or cfg.n_routed_experts

    @property
    def expert_dp(self) -> int:
        """Data-parallel replicas of each expert's weights (training: EP spans the DP ranks)."""
        return max(1, self.dp // self.ep)

    def weight_bytes_per_device(self, cfg: ModelConfig, quant: Quant) -> dict[str, float]:
        """Stored weight bytes on one device (the tensor table under ``quant``): routed experts
        split over EP (with redundant replicas) and moe_tp, everything else (attention, dense MLP, shared
        experts, norms, router, embedding, head) replicated over DP ranks and divided by TP;
        layers divided by PP (the mean stage)."""
        expert = other = glob = 0.0
        for t in tensors(cfg):
            b = tensor_bytes(cfg, quant, t)
            if t.group == ROUTED_EXPERT:
                expert += b
            elif t.group == GLOBAL:
                glob += b
            else:
                other += b
        E = cfg.n_routed_experts
        expert_dev = expert / max(E, 1) * self.slots(cfg) / max(self.ep, 1) / max(self.moe_tp, 1) if E else 0.0
        other_dev = other / self.tp
        per_dev = (expert_dev + other_dev) / self.pp + glob / self.tp
        return {"experts": expert_dev / self.pp, "non_expert": other_dev / self.pp, "globals": glob / self.tp,
                "total": per_dev}


def stage_params(cfg: ModelConfig, lo: int, hi: int, first: bool, last: bool, mtp: bool = False) -> tuple[float, float]:
    """(non-expert, routed-expert) parameters of a pipeline stage: the tensor table's rows of layers
    [lo, hi), the embedding on the first stage, the final norm and LM head on the last; mtp: the
    last stage also holds the MTP module(s) (decoder layer + eh_proj and norms; head and
    embedding shared with the main model)."""
    dense = expert = 0.0
    for t in tensors(cfg, mtp=mtp):
        if t.layer is None:
            held = first if t.name == EMBED else last  # the final norm and head sit with the last layer
        elif t.mtp:
            held = last
        else:
            held = lo <= t.layer < hi
        if not held:
            continue
        if t.group == ROUTED_EXPERT:
            expert += t.numel
        else:
            dense += t.numel
    return dense, expert
