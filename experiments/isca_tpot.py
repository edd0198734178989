"""ISCA'25 theoretical EP-communication bound on TPOT (arXiv 2505.09343, sec. on the
theoretical limit of inference speed).

The paper's method: each device holds a micro-batch of 32 tokens; every token is
dispatched to its 8 routed experts + 1 shared expert (9 destinations) in FP8 and
combined back in BF16, over the device's scale-out link; two micro-batches overlap
compute with communication, so a layer costs two micro-batches' communication; 61
layers. We follow that method with every figure from the project:

  * hidden size, top-k, shared experts and layer count from the deepseek-v3 preset;
  * dispatch / combine bytes per element from sim.comm (FP8 1 B + one fp32 scale per
    128 elements = 1.03125 B -- the paper ignores the scales; BF16 2 B);
  * link bandwidth from the catalog: the h800-node preset's NIC bandwidth per GPU
    (8 x 400 Gb/s CX7 = 50 GB/s) and the gb200 device's NVLink (1800 GB/s
    bidirectional = 900 GB/s per direction). Theoretical bound: efficiency 1
    (the paper's bound assumes line rate; gpu.all_to_all = 0.8 would give the
    achievable figure, reported in the note).
"""

from __future__ import annotations

from dsref.experiments.registry import Record, record

TOKENS_PER_MICROBATCH = 32   # the paper's assumption
MICROBATCHES = 2             # dual micro-batch overlap


def layer_comm_s(cfg, bandwidth: float, tokens: int = TOKENS_PER_MICROBATCH, efficiency: float = 1.0) -> float:
    """Seconds of EP dispatch + combine for one micro-batch in one MoE layer."""
    from dsref.sim.comm import BF16_BYTES, DISPATCH_FP8_BYTES
    dests = cfg.num_experts_per_tok + cfg.n_shared_experts
    nbytes = tokens * dests * cfg.hidden_size * (DISPATCH_FP8_BYTES + BF16_BYTES)
    return nbytes / (bandwidth * efficiency)


def tpot_s(cfg, bandwidth: float, efficiency: float = 1.0) -> float:
    return MICROBATCHES * layer_comm_s(cfg, bandwidth, efficiency=efficiency) * cfg.num_hidden_layers


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    from dsref.hwmodels.catalog import load_device
    from dsref.hwmodels.systems import load_system
    from dsref.reference.presets import get_preset
    cfg = get_preset("deepseek-v3")
    h800 = load_system("h800-node")
    ib = h800.network_bandwidth_per_device
    gb200 = load_device("gb200")
    nvl = gb200.intra_node_bandwidth
    eff = gb200.efficiency("all_to_all")
    reading = ("paper's method: 32 tokens/device micro-batch, 9 destinations (8 routed + 1 shared), "
               "FP8 dispatch + BF16 combine, two micro-batches per layer, 61 layers, line rate")
    mech = ("hidden 7168 (the paper rounds to 7K = 7000: +2.4%) and FP8 scales (one fp32 per 128 elements, "
            "sim.comm: +1.0%)")
    out = [
        record(claims, "isca_tpot_ib_layer", layer_comm_s(cfg, ib) * 1e6, reading=reading,
               note=f"h800-node NIC {ib / 1e9:.0f} GB/s per GPU; {mech}"),
        record(claims, "isca_tpot_ib", tpot_s(cfg, ib) * 1e3, reading=reading,
               note=(f"2 x layer comm x {cfg.num_hidden_layers} layers; at gpu.all_to_all efficiency {eff}: "
                     f"{tpot_s(cfg, ib, eff) * 1e3:.1f} ms")),
        record(claims, "isca_tpot_gb200", tpot_s(cfg, nvl) * 1e3, reading=reading,
               note=(f"gb200 NVLink {nvl / 1e9:.0f} GB/s per direction (catalog); at efficiency {eff}: "
                     f"{tpot_s(cfg, nvl, eff) * 1e3:.2f} ms")),
    ]
    return out
