"""llama.cpp's per-token fixed cost: graph nodes x a measured per-node overhead.

llama.cpp (and Ollama, which runs its graphs) evaluates one ggml graph per decode step.
The CPU backend of early 2025 runs the nodes one after another and puts a barrier across
all threads after *every* node, views and reshapes included (ggml-cpu.c
``ggml_graph_compute_thread``); the Vulkan backend records one dispatch per compute node
on the host and submits them over the PCIe link. Either way a step pays, besides
streaming weights and KV cache, a cost per graph node that does not shrink with the
model's bytes. sim.local adds ``graph_nodes(cfg) x per_node_s`` to every llama.cpp step.

``graph_nodes`` counts the nodes of llama.cpp's graph builders as of Jan-Mar 2025
(``build_llama``, ``build_qwen2``, ``build_deepseek2``; flash attention off, the Ollama
default then), the figure llama.cpp prints as "graph nodes". It reproduces the logged
counts: Llama-3.2-3B 902, Llama-3.1-8B 1030, Llama-3.1-70B 2566, Qwen2.5-14B /
R1-Distill-Qwen-14B 1686, DeepSeek-R1 5025 (logs quoted in tests/test_sim_local.py).

Derived the same way, not checked against a logged count (none found):
  * Llama-2 runs ``build_llama`` (MHA is GQA with K = H; the graph is the same), so
    Llama-2-13B = 40 x 32 + 6 = 1286.
  * ``build_qwen3moe`` (added April 2025, ggml-org/llama.cpp PR #12828; src/models/qwen3moe.cpp
    today) is build_qwen2 without biases plus ``build_norm`` (rms_norm + mul) on the
    reshaped Q and K before their ropes, and ``build_moe_ffn`` with softmax gating,
    norm_w = true, scale_w = false (no ggml_scale node; build_deepseek2 passes true), no
    selection bias and no shared expert (src/llama-graph.cpp build_moe_ffn). Per layer
    28 attention + 35 FFN nodes: Qwen3-30B-A3B 48 x 63 + 6 = 3030, Qwen3-235B-A22B 5928.
    Later llama.cpp versions also reshape V explicitly (+1 node per layer); the count
    follows the era of the logged counts above.

The per-node cost is a property of the device (thread count, host CPU, backend) and lives
with its source in hwmodels/data/llama_cpp_overhead.toml; a target without an entry gets
no overhead (reported as such).
"""

from __future__ import annotations

from functools import lru_cache

from dsref.hwmodels.catalog import DATA_DIR
from dsref.reference.config import ModelConfig

OVERHEAD_FILE = DATA_DIR / "llama_cpp_overhead.toml"  # package data of dsref.hwmodels

# llama.cpp's default physical batch (common.h n_ubatch = 512): a prompt is evaluated as
# ceil(tokens / 512) graphs.
N_UBATCH = 512

# --- nodes of one decoder layer, counted op by op (views/reshapes/permutes are nodes) ---
# Shared by every architecture:
NORM_NODES = 2            # rms_norm, mul by the weight
KV_STORE_NODES = 5        # K: cache view + cpy; V: transpose + cache view + cpy
ATTN_CORE_NODES = 8       # permute q, view k, kq mul_mat, soft_max_ext, view v, kqv mul_mat, permute, cont
RESIDUAL_NODES = 1        # add
SWIGLU_NODES = 5          # up, gate, silu, mul, down
# GQA (build_llama / build_qwen2):
GQA_QKV_NODES = 3         # q, k, v mul_mat
GQA_BIAS_NODES = 3        # qwen2: + q, k, v bias adds
GQA_ROPE_NODES = 4        # reshape + rope, for q and k
QK_NORM_NODES = 4         # qwen3 / qwen3moe: rms_norm + mul, for q and k (before the rope)
# MLA (build_deepseek2, expanded K/V cache):
MLA_Q_LORA_NODES = 4      # wq_a, rms_norm, mul, wq_b (a single wq mul_mat without q_lora)
MLA_KV_NODES = 20         # q views 2, wkv_a 1, views 2, cont 1, kv norm 2, wkv_b 1, k/v views 2, cont v 1,
                          # view v 1, cont+rope q_pe 2, cont+rope k_pe 2, concat q 1, repeat+concat k 2
# MoE FFN (llm_build_moe_ffn):
MOE_ROUTER_NODES = 8      # gate mul_mat, sigmoid|softmax, argsort + view (top-k), reshape + get_rows,
                          # reshape of the input, multiply by the weights
MOE_SCALE_NODES = 1       # + ggml_scale by the routed scaling factor (scale_w: build_deepseek2 only)
MOE_BIAS_NODES = 1        # + add of the selection bias (noaux_tc)
MOE_NORM_NODES = 4        # reshape, sum_rows, div, reshape (norm_topk_prob)
SHARED_EXPERT_ADD_NODES = 1  # moe_out + shared-expert output
# Outside the layers: token get_rows, last layer's out-id get_rows x2, final norm 2, output mul_mat.
GLOBAL_NODES = 6


def _attention_nodes(cfg: ModelConfig) -> int:
    common = NORM_NODES + KV_STORE_NODES + ATTN_CORE_NODES + 1 + RESIDUAL_NODES  # + wo
    if cfg.arch == "dense":
        return (common + GQA_QKV_NODES + GQA_ROPE_NODES + (GQA_BIAS_NODES if cfg.attention_bias else 0)
                + (QK_NORM_NODES if cfg.qk_norm else 0))
    q = MLA_Q_LORA_NODES if cfg.q_lora_rank else 1
    return common + q + MLA_KV_NODES


def _ffn_nodes(cfg: ModelConfig, i: int) -> int:
    nodes = NORM_NODES + RESIDUAL_NODES
    if not cfg.is_moe_layer(i):
        return nodes + SWIGLU_NODES
    k = cfg.num_experts_per_tok
    nodes += MOE_ROUTER_NODES + SWIGLU_NODES + (2 * k - 1)  # k views + (k-1) adds sum the experts
    nodes += MOE_SCALE_NODES if cfg.is_mla else 0  # qwen3moe: scale_w = false
    nodes += MOE_BIAS_NODES if cfg.topk_method == "noaux_tc" else 0
    nodes += MOE_NORM_NODES if cfg.norm_topk_prob else 0
    if cfg.n_shared_experts:
        nodes += SWIGLU_NODES + SHARED_EXPERT_ADD_NODES
    return nodes


def graph_nodes(cfg: ModelConfig) -> int:
    """Nodes of llama.cpp's decode graph for ``cfg`` (the 'graph nodes' it logs), Jan-Mar 2025."""
    return GLOBAL_NODES + sum(_attention_nodes(cfg) + _ffn_nodes(cfg, i) for i in range(cfg.num_hidden_layers))


def graphs_per_step(tokens: int) -> int:
    """Graphs llama.cpp evaluates for ``tokens`` new tokens of one sequence (n_ubatch chunks)."""
    return max(1, -(-tokens // N_UBATCH))


@lru_cache(maxsize=None)
def _overheads(path: str, _mtime: int) -> dict:
    from dsref.hwmodels.catalog import parse_figure, read_toml
    out = {}
    for key, raw in read_toml(path).items():
        out[key] = parse_figure(raw, path, key, ("s",))
    return out


def per_node_overhead(target_name: str, device_id: str):
    """The measured per-node Figure (value in s) for a sim.local target, else None.

    Looked up by the target's name (a node preset: a GPU's cost depends on its host), then by
    its device id (a CPU device, or a CPU-only node of it).
    """
    table = _overheads(str(OVERHEAD_FILE), OVERHEAD_FILE.stat().st_mtime_ns)
    return table.get(target_name) or table.get(device_id)
