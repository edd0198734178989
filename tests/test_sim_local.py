"""dsref.sim.local's llama.cpp mechanisms: graph-node overhead, the expanded DeepSeek KV cache of
early-2025 llama.cpp, CPU-only node presets, logits over PCIe, and the device calibration."""

from __future__ import annotations

import pytest

from dsref.hwmodels.catalog import load_device
from dsref.reference.presets import load_config
from dsref.sim import costmodel, llama_cpp
from dsref.sim.local import estimate, kv_bytes_per_token, resolve_target
from dsref.sim.quant import get_quant, model_weight_bytes

Q = "q4_k_m"


# llama.cpp logs ("llama_new_context_with_model: graph nodes  = N"), Jan-Mar 2025 builds:
#   Llama-3.2-3B 902 (Ollama log, 2024-09), Llama-3.1-8B 1030 (Arm learning-path Graviton3 log),
#   Llama-3.1-70B 2566 (RPC log), DeepSeek-R1-Distill-Qwen-14B 1686 (Metal log, Feb 2025),
#   DeepSeek-R1 5025 (mainline build 4905 in ikawrakow/ik_llama.cpp issue #285, Mar 2025).
@pytest.mark.parametrize("model,nodes", [("llama-3.2-3b", 902), ("llama-3.1-8b", 1030), ("llama-3.1-70b", 2566),
                                         ("qwen2.5-14b", 1686), ("deepseek-r1", 5025)])
def test_graph_nodes_match_llama_cpp_logs(model, nodes):
    assert llama_cpp.graph_nodes(load_config(model)) == nodes


def test_graphs_per_prompt_follow_n_ubatch():
    assert llama_cpp.graphs_per_step(1) == 1
    assert llama_cpp.graphs_per_step(llama_cpp.N_UBATCH) == 1
    assert llama_cpp.graphs_per_step(llama_cpp.N_UBATCH + 1) == 2


def test_expanded_cache_is_llama_cpp_log_size():
    cfg, quant = load_config("deepseek-r1"), get_quant(Q)
    # "KV self size = 9760.00 MiB, K (f16): 5856.00 MiB, V (f16): 3904.00 MiB" for 2048 cells (issue #285)
    assert kv_bytes_per_token(cfg, quant, "expanded_cache") * 2048 == pytest.approx(9760 * 2 ** 20)
    assert kv_bytes_per_token(cfg, quant, "absorbed") == pytest.approx((512 + 64) * 2 * 61)
    with pytest.raises(ValueError):
        kv_bytes_per_token(cfg, quant, "naive")


def test_expanded_cache_decode_reads_the_cache_and_expands_only_the_new_token():
    cfg, ctx = load_config("deepseek-r1"), 1024
    exp = costmodel.totals(costmodel.decode_ops(cfg, Q, 1, ctx, mla_form="expanded_cache"))
    lat = costmodel.totals(costmodel.decode_ops(cfg, Q, 1, ctx, mla_form="absorbed"))
    per_tok = kv_bytes_per_token(cfg, get_quant(Q), "expanded_cache")
    assert exp["kv_bytes"] == pytest.approx(per_tok * (ctx + 1) + per_tok, rel=1e-6)  # read S keys, write 1
    assert exp["weight_bytes"] == pytest.approx(lat["weight_bytes"])
    naive = costmodel.totals(costmodel.decode_ops(cfg, Q, 1, ctx, mla_form="naive"))
    assert exp["flops"] < lat["flops"] < naive["flops"]  # naive re-expands every cached key


def test_estimate_uses_one_kv_layout_for_memory_and_bytes():
    lat = estimate("deepseek-r1", "ampereone-server", Q, context=1024)
    exp = estimate("deepseek-r1", "ampereone-server", Q, context=1024, mla_form="expanded_cache")
    cfg = load_config("deepseek-r1")
    extra = (kv_bytes_per_token(cfg, get_quant(Q), "expanded_cache") - kv_bytes_per_token(cfg, get_quant(Q))) * 1024
    assert exp["kv_cache_bytes"] - lat["kv_cache_bytes"] == pytest.approx(extra)
    assert exp["decode_kv_bytes_per_step"] > 50 * lat["decode_kv_bytes_per_step"]
    assert exp["decode_tokens_per_s"] < lat["decode_tokens_per_s"]
    # a GQA model has one layout: the option is ignored
    assert estimate("qwen2.5-14b", "raspberry-pi-5", Q, mla_form="expanded_cache")["mla_form"] == "absorbed"


def test_cpu_only_node_is_its_cpu():
    tgt = resolve_target("ampereone-server")
    assert tgt.host is None and tgt.device.id == "ampereone-a192-32x"
    node = estimate("deepseek-r1", "ampereone-server", Q, context=1024)
    dev = estimate("deepseek-r1", "ampereone-a192-32x", Q, context=1024)
    assert node["memory_available_bytes"] == pytest.approx(512e9)  # counted once
    assert node["decode_tokens_per_s"] == pytest.approx(dev["decode_tokens_per_s"])
    assert node["decode_comm_s"] == 0.0  # no PCIe hop
    assert resolve_target("raspberry-pi-5").host is None


def test_overhead_only_for_llama_cpp_on_measured_targets():
    q = estimate("qwen2.5-14b", "raspberry-pi-5", Q, context=512)
    assert q["graph_nodes"] == 1686
    assert q["decode_overhead_s"] == pytest.approx(1686 * 5.22e-6)
    assert q["decode_step_s"] == pytest.approx(1 / q["decode_tokens_per_s"])
    b = estimate("llama-3.2-3b", "raspberry-pi-5", "bf16", context=512)  # 6.4 GB: fits
    assert b["decode_overhead_s"] == 0.0 and b["graph_nodes"] is None
    h = estimate("qwen2.5-14b", "h100", Q, context=512)
    assert h["decode_overhead_s"] == 0.0 and "not modelled" in h["overhead_source"]


def test_full_offload_sends_logits_not_the_hidden_state_back():
    r = estimate("qwen2.5-14b", "raspberry-pi-5-w7700", Q, context=64)
    assert r["gpu_layers"] == 48 and r["head_on_device"]
    cfg = load_config("qwen2.5-14b")
    node = resolve_target("raspberry-pi-5-w7700").node
    bytes_over_link = 4 * cfg.hidden_size + 4 * cfg.vocab_size  # one fp32 hidden state in, fp32 logits out
    dev = load_device("radeon-pro-w7700")
    eff = dev.efficiency("pcie")
    from dsref.hwmodels.kernels import kernel_profile
    alpha = kernel_profile(dev).collective_latency_s("pcie", "p2p", 2)  # per copy (sim/roofline.comm_time)
    assert r["decode_comm_s"] == pytest.approx(bytes_over_link / (node.pcie_bandwidth * eff) + 2 * alpha)


def test_tied_embedding_is_stored_as_the_output_layer():
    # Ollama's llama3.2:3b (Q4_K_M) is 2.02 GB: token_embd doubles as output and is Q6_K
    cfg = load_config("llama-3.2-3b")
    assert cfg.tie_word_embeddings
    assert model_weight_bytes(cfg, get_quant(Q))["total"] == pytest.approx(2.02e9, rel=0.01)
    assert model_weight_bytes(cfg, get_quant("bf16"))["total"] == pytest.approx(2 * cfg.param_counts()["total_params"],
                                                                              rel=1e-3)


def test_device_calibration_is_the_solution_of_its_measurements():
    """The stored memory efficiency and per-node overhead solve the two cited measurements; sim.local then
    reproduces them, and the held-out ones within 10%."""
    from dsref.experiments.edge_devices import CALIBRATION, calibrate, held_out_errors
    for target, cal in CALIBRATION.items():
        tgt = resolve_target(target)
        got = calibrate(target)
        assert tgt.device.efficiency("memory") == pytest.approx(got["memory_efficiency"], rel=0.01), target
        fig = llama_cpp.per_node_overhead(tgt.name, tgt.device.id)
        assert fig.value == pytest.approx(got["per_node_s"], rel=0.01), target
        for i, (model, pred, meas) in enumerate(held_out_errors(target)):
            assert pred == pytest.approx(meas, rel=0.01 if i < len(cal["fit"]) else 0.10), (target, model)
