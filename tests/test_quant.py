"""Quantisations (sim/quant.py): per-tensor formats of the new ids, file sizes against
published files, and the KV-cache type option.

Published sizes (Hugging Face file listings show decimal GB to 3 significant digits):
  * mradermacher/Qwen2.5-14B-GGUF (static llama.cpp quants of Qwen/Qwen2.5-14B): Q2_K 5.77,
    Q3_K_S 6.66, Q3_K_M 7.34, Q4_K_S 8.57, Q4_K_M 8.99, Q6_K 12.1, Q8_0 15.7 GB;
    bartowski/Qwen2.5-14B-Instruct-GGUF Q5_K_M 10.5 GB; mradermacher/Qwen2.5-14B-Instruct-1M-i1-GGUF
    i1-IQ1_S 3.61 GB (the 1M model has Qwen2.5-14B's shapes: its i1-Q2_K is the same 5.77 GB).
  * unsloth/DeepSeek-R1-GGUF, sum of the split files: DeepSeek-R1-Q2_K 49.4+48.5+48.8+48.9+48.4
    = 244.0 GB; DeepSeek-R1-Q3_K_M 49.7+5x49.2+23.5 = 319.2 GB; DeepSeek-R1-Q4_K_M
    48.3+49.4+49.5+48.3+49.4+48.3+49.4+46.9+14.8 = 404.3 GB.
  * Ollama deepseek-r1:671b-q8_0 (ollama.com/library/deepseek-r1:671b-q8_0): 713 GB.
Tolerance: half a unit of the last published digit (summed over split files) plus 0.2 % for what
a GGUF holds besides weights (tokenizer vocabulary and merges, ~5-10 MB on a 5.8 GB file). A
wrong per-tensor rule for a large tensor class moves the total by more (e.g. Q2_K's Q3_K
ffn_down on DeepSeek-R1: ~9 %); the small ones are pinned by the per-tensor tests below.
"""

from __future__ import annotations

import pytest

from dsref.reference.params import EMBED, HEAD
from dsref.reference.presets import load_config
from dsref.sim.quant import (QUANTS, GgufModel, get_quant, ggml_bits, gguf_tensor_type,
                             model_weight_bytes, weight_role)

GB = 1e9


def _gguf(ftype, model, name, layer):
    cfg = load_config(model)
    shape = dict(_shapes(cfg, layer))[name]
    role = weight_role(cfg, name) if layer is None else name  # a tied embedding is stored as the output
    return gguf_tensor_type(ftype, role, shape, layer, GgufModel.of(cfg))


def _shapes(cfg, layer):
    from dsref.reference.params import global_shapes, layer_shapes
    return list(global_shapes(cfg).items()) + list(layer_shapes(cfg, layer if layer is not None else 0).items())


# ----------------------------------------------------------------- block formats
@pytest.mark.parametrize("fmt,bpw", [("iq1_s", 1.5625), ("iq2_xxs", 2.0625), ("q2_k", 2.625), ("q3_k", 3.4375),
                                     ("iq3_s", 3.4375), ("q4_0", 4.5), ("iq4_nl", 4.5), ("q4_k", 4.5),
                                     ("q5_1", 6.0), ("q6_k", 6.5625), ("q8_0", 8.5), ("mxfp4", 4.25)])
def test_ggml_block_sizes(fmt, bpw):
    # ggml-common.h: block_iq1_s 2+32+16 = 50 B / 256, block_q2_K 16+64+4 = 84 B / 256, ...
    assert ggml_bits(fmt) == bpw


# ----------------------------------------------------------------- llama.cpp mixes
@pytest.mark.parametrize("ftype,model,name,layer,want", [
    # Q2_K: attn_v Q4_K when n_head/n_head_kv >= 4 (Qwen2.5-14B: 40/8), else Q3_K (DeepSeek's
    # attn_kv_b: head_count_kv = n_head); ffn_down and attn_output Q3_K; everything else Q2_K
    ("q2_k", "qwen2.5-14b", "self_attn.v_proj.weight", 7, "q4_k"),
    ("q2_k", "qwen2.5-14b", "self_attn.k_proj.weight", 7, "q2_k"),
    ("q2_k", "qwen2.5-14b", "self_attn.q_proj.bias", 7, "f32"),
    ("q2_k", "deepseek-v3", "self_attn.kv_b_proj.weight", 7, "q3_k"),
    ("q2_k", "deepseek-v3", "self_attn.o_proj.weight", 7, "q3_k"),
    ("q2_k", "deepseek-v3", "self_attn.q_a_proj.weight", 7, "q2_k"),
    ("q2_k", "deepseek-v3", "mlp.experts.down_proj.weight", 7, "q3_k"),
    ("q2_k", "deepseek-v3", "mlp.shared_experts.down_proj.weight", 7, "q3_k"),
    ("q2_k", "deepseek-v3", "mlp.experts.gate_proj.weight", 7, "q2_k"),
    ("q2_k", "deepseek-v3", "mlp.gate.weight", 7, "f32"),  # ffn_gate_inp is never quantised
    ("q2_k", "deepseek-v3", HEAD, None, "q6_k"),
    ("q2_k", "deepseek-v3", EMBED, None, "q2_k"),
    # a 70B GQA model bumps Q3_K/Q4_K attn_v to Q5_K
    ("q2_k", "llama-3.1-70b", "self_attn.v_proj.weight", 40, "q5_k"),
    ("q4_k_m", "llama-3.1-70b", "self_attn.v_proj.weight", 11, "q5_k"),
    ("q4_k_m", "llama-3.1-70b", "self_attn.v_proj.weight", 12, "q6_k"),  # use_more_bits(12, 80)
    # Q3_K_S: Q3_K everywhere but the output
    ("q3_k_s", "llama-3.1-8b", "self_attn.v_proj.weight", 0, "q3_k"),
    ("q3_k_s", "llama-3.1-8b", "mlp.down_proj.weight", 0, "q3_k"),
    ("q3_k_s", "llama-3.1-8b", HEAD, None, "q6_k"),
    # Q3_K_M: attn_v Q5_K in the first two, ffn_down Q5_K in the first 1/16, attn_output Q4_K
    ("q3_k_m", "llama-3.1-8b", "self_attn.v_proj.weight", 1, "q5_k"),
    ("q3_k_m", "llama-3.1-8b", "self_attn.v_proj.weight", 2, "q4_k"),
    ("q3_k_m", "llama-3.1-8b", "mlp.down_proj.weight", 1, "q5_k"),
    ("q3_k_m", "llama-3.1-8b", "mlp.down_proj.weight", 2, "q4_k"),
    ("q3_k_m", "llama-3.1-8b", "self_attn.o_proj.weight", 20, "q4_k"),
    ("q3_k_m", "llama-3.1-8b", "mlp.up_proj.weight", 20, "q3_k"),
    # Q4_K_S: attn_v Q5_K in layers 0-3, ffn_down Q5_K in the first eighth
    ("q4_k_s", "qwen2.5-14b", "self_attn.v_proj.weight", 3, "q5_k"),
    ("q4_k_s", "qwen2.5-14b", "self_attn.v_proj.weight", 4, "q4_k"),
    ("q4_k_s", "qwen2.5-14b", "mlp.down_proj.weight", 5, "q5_k"),
    ("q4_k_s", "qwen2.5-14b", "mlp.down_proj.weight", 6, "q4_k"),
    # Q5_K_M: Q6_K attn_v / ffn_down in use_more_bits layers
    ("q5_k_m", "qwen2.5-14b", "mlp.down_proj.weight", 8, "q6_k"),
    ("q5_k_m", "qwen2.5-14b", "mlp.down_proj.weight", 9, "q5_k"),
    ("q6_k", "qwen2.5-14b", "mlp.down_proj.weight", 9, "q6_k"),
    # Q4_K_M on MLA: attn_kv_b is attn_v-like (category_is_attn_v)
    ("q4_k_m", "deepseek-v3", "self_attn.kv_b_proj.weight", 0, "q6_k"),
    ("q4_k_m", "deepseek-v3", "self_attn.kv_b_proj.weight", 8, "q4_k"),
    # Q8_0 everywhere, output included; the router stays F32
    ("q8_0", "deepseek-v3", HEAD, None, "q8_0"),
    ("q8_0", "deepseek-v3", "mlp.gate.weight", 9, "f32"),
    # IQ1_S: output Q5_K, token_embd Q2_K, attn_output IQ2_XXS, attn_v Q4_K (GQA >= 4 or >= 4 experts)
    ("iq1_s", "deepseek-v3", HEAD, None, "q5_k"),
    ("iq1_s", "deepseek-v3", EMBED, None, "q2_k"),
    ("iq1_s", "deepseek-v3", "self_attn.o_proj.weight", 30, "iq2_xxs"),
    ("iq1_s", "deepseek-v3", "self_attn.kv_b_proj.weight", 30, "q4_k"),
    ("iq1_s", "deepseek-v3", "self_attn.q_b_proj.weight", 30, "iq1_s"),
    ("iq1_s", "qwen2.5-14b", "self_attn.v_proj.weight", 30, "q4_k"),
    ("iq1_s", "llama-3.2-3b", EMBED, None, "q5_k"),  # tied: stored as the output
    # IQ1_S ffn_down: Q2_K for the first n_layer/8 ffn_down *tensors* in file order. DeepSeek-V3
    # (61 layers -> 7): dense 0-2, then layer 3 exps + shexp, layer 4 exps + shexp; layer 5 not
    ("iq1_s", "deepseek-v3", "mlp.down_proj.weight", 2, "q2_k"),
    ("iq1_s", "deepseek-v3", "mlp.shared_experts.down_proj.weight", 4, "q2_k"),
    ("iq1_s", "deepseek-v3", "mlp.experts.down_proj.weight", 5, "iq1_s"),
    ("iq1_s", "qwen2.5-14b", "mlp.down_proj.weight", 5, "q2_k"),
    ("iq1_s", "qwen2.5-14b", "mlp.down_proj.weight", 6, "iq1_s"),
    # rows that are no multiple of the block fall back (tensor_type_fallback)
    ("q4_k_m", "qwen2.5-72b", "mlp.down_proj.weight", 0, "q8_0"),    # 29568 cols: Q6_K -> Q8_0
    ("q4_k_m", "qwen2.5-72b", "mlp.down_proj.weight", 11, "q5_0"),   # Q4_K -> Q5_0
    ("q2_k", "deepseek-v2-lite", "mlp.experts.up_proj.weight", 5, "q2_k"),    # 2048 cols: fine
    ("q2_k", "deepseek-v2-lite", "mlp.experts.down_proj.weight", 5, "q4_0"),  # 1408 cols: Q3_K -> Q4_0
    ("iq1_s", "deepseek-v2-lite", "mlp.experts.down_proj.weight", 9, "iq4_nl"),
])
def test_llama_cpp_tensor_types(ftype, model, name, layer, want):
    assert _gguf(ftype, model, name, layer) == want


@pytest.mark.parametrize("model,quant,published_gb,half_unit_gb", [
    ("qwen2.5-14b", "q2_k", 5.77, 0.005),
    ("qwen2.5-14b", "q3_k_s", 6.66, 0.005),
    ("qwen2.5-14b", "q3_k_m", 7.34, 0.005),
    ("qwen2.5-14b", "q4_k_s", 8.57, 0.005),
    ("qwen2.5-14b", "q4_k_m", 8.99, 0.005),
    ("qwen2.5-14b", "q5_k_m", 10.5, 0.05),
    ("qwen2.5-14b", "q6_k", 12.1, 0.05),
    ("qwen2.5-14b", "q8_0", 15.7, 0.05),
    ("qwen2.5-14b", "iq1_s", 3.61, 0.005),
    ("deepseek-r1", "q2_k", 244.0, 5 * 0.05),
    ("deepseek-r1", "q3_k_m", 319.2, 7 * 0.05),
    ("deepseek-r1", "q4_k_m", 404.3, 9 * 0.05),
    ("deepseek-r1", "q8_0", 713, 0.5),
])
def test_gguf_file_sizes_match_published(model, quant, published_gb, half_unit_gb):
    got = model_weight_bytes(load_config(model), get_quant(quant))["total"] / GB
    assert got == pytest.approx(published_gb, abs=half_unit_gb + 0.002 * published_gb)


def test_gguf_needs_the_model_config():
    with pytest.raises(ValueError, match="cfg="):
        get_quant("q2_k").weight_bits("self_attn.v_proj.weight", (1024, 5120), 0, 48)


# ----------------------------------------------------------------- FP4
NV = 4 + 8 / 16  # E2M1 + one E4M3 scale per 16


@pytest.mark.parametrize("quant,name,shape,want", [
    # nvidia/DeepSeek-R1-FP4 (modelopt ptq.py: *head* and *attn* disabled): MLPs/experts NVFP4
    ("nvfp4", "mlp.experts.down_proj.weight", (256, 7168, 2048), NV + 64 / (7168 * 2048)),
    ("nvfp4", "mlp.shared_experts.up_proj.weight", (2048, 7168), NV + 64 / (2048 * 7168)),
    ("nvfp4", "mlp.down_proj.weight", (7168, 18432), NV + 64 / (7168 * 18432)),
    ("nvfp4", "self_attn.q_a_proj.weight", (1536, 7168), 16),
    ("nvfp4", "self_attn.kv_b_proj.weight", (32768, 512), 16),
    ("nvfp4", "self_attn.o_proj.weight", (7168, 16384), 16),
    ("nvfp4", "mlp.gate.weight", (256, 7168), 16),
    ("nvfp4", "mlp.gate.e_score_correction_bias", (256,), 32),
    ("nvfp4", HEAD, (129280, 7168), 16),
    ("nvfp4", EMBED, (129280, 7168), 16),
    # -v2 adds wo (o_proj)
    ("nvfp4_v2", "self_attn.o_proj.weight", (7168, 16384), NV + 64 / (7168 * 16384)),
    ("nvfp4_v2", "self_attn.kv_b_proj.weight", (32768, 512), 16),
    # amd/DeepSeek-R1-0528-MXFP4: E2M1 + E8M0 per 32; *self_attn*, *mlp.gate.*, lm_head excluded
    ("mxfp4", "mlp.experts.gate_proj.weight", (256, 2048, 7168), 4.25),
    ("mxfp4", "self_attn.q_b_proj.weight", (24576, 1536), 16),
    ("mxfp4", HEAD, (129280, 7168), 16),
])
def test_fp4_deepseek_mix(quant, name, shape, want):
    cfg = load_config("deepseek-v3")
    assert get_quant(quant).weight_bits(name, shape, 5, 61, cfg) == pytest.approx(want, rel=1e-12)


def test_fp4_dense_models_quantise_attention_too():
    cfg = load_config("llama-3.1-8b")
    assert get_quant("nvfp4").weight_bits("self_attn.v_proj.weight", (1024, 4096), 3, 32, cfg) == \
        pytest.approx(NV + 64 / (1024 * 4096))
    assert get_quant("mxfp4").weight_bits("self_attn.o_proj.weight", (4096, 4096), 3, 32, cfg) == 4.25
    assert get_quant("mxfp4").weight_bits(HEAD, (128256, 4096), None, 32, cfg) == 16
    with pytest.raises(ValueError, match="cfg="):
        get_quant("nvfp4").weight_bits("self_attn.o_proj.weight", (4096, 4096), 3, 32)


def test_nvfp4_deepseek_total_is_the_recipe_sum():
    # independent sum: MLP/expert parameters at 4.5 bits (+2 fp32 scalars per matrix), the rest bf16
    from dsref.reference.params import tensors
    cfg = load_config("deepseek-r1")
    fp4 = matrices = rest_bits = 0
    for t in tensors(cfg):
        if t.group in ("dense_mlp", "shared_expert", "routed_expert"):
            fp4 += t.numel
            matrices += t.shape[0] if len(t.shape) == 3 else 1
        else:
            rest_bits += t.numel * (32 if t.rel.endswith("e_score_correction_bias") else 16)
    want = (fp4 * NV + matrices * 64 + rest_bits) / 8
    assert model_weight_bytes(cfg, get_quant("nvfp4"))["total"] == pytest.approx(want, rel=1e-12)
    # same tensors in FP4, but MXFP4's E8M0 scale per 32 costs 0.25 bit less than NVFP4's E4M3 per 16
    assert model_weight_bytes(cfg, get_quant("mxfp4"))["total"] < model_weight_bytes(cfg, get_quant("nvfp4"))["total"]


def test_fp4_precision_and_bf16_projections():
    cfg = load_config("deepseek-v3")
    q = get_quant("nvfp4")
    assert q.gemm_precision == "fp4" and q.head_precision == "bf16" and q.attn_precision == "bf16"
    assert q.tensor_precision("self_attn.q_b_proj.weight", (24576, 1536), cfg) == "bf16"
    assert q.tensor_precision("mlp.experts.up_proj.weight", (256, 2048, 7168), cfg) == "fp4"
    assert q.tensor_precision(HEAD, (129280, 7168), cfg) == "bf16"
    assert get_quant("nvfp4_v2").tensor_precision("self_attn.o_proj.weight", (7168, 16384), cfg) == "fp4"
    assert get_quant("fp8").tensor_precision("self_attn.o_proj.weight", (7168, 16384), cfg) == "fp8"


# ----------------------------------------------------------------- KV cache type
@pytest.mark.parametrize("spec,kv,name,kv_bytes", [
    ("fp8", "fp8", "fp8+kv-fp8", 1.0),
    ("nvfp4", "fp8", "nvfp4+kv-fp8", 1.0),
    ("bf16", "fp32", "bf16+kv-fp32", 4.0),
    ("q4_k_m", "q8_0", "q4_k_m+kv-q8_0", 34 / 32),
    ("q8_0", "bf16", "q8_0+kv-bf16", 2.0),
])
def test_kv_dtype_keyword_and_string_form(spec, kv, name, kv_bytes):
    a = get_quant(spec, kv_dtype=kv)
    b = get_quant(name)
    assert a == b and a.name == name and a.kv_bytes == kv_bytes
    base = get_quant(spec)
    assert (a.gemm_precision, a.act_bytes, a.runtime, a.weight_format) == \
        (base.gemm_precision, base.act_bytes, base.runtime, base.name)
    cfg = load_config("qwen2.5-14b")
    assert model_weight_bytes(cfg, a)["total"] == model_weight_bytes(cfg, base)["total"]


def test_kv_dtype_default_and_case():
    assert get_quant("nvfp4", kv_dtype=None) is QUANTS["nvfp4"]
    assert get_quant("NVFP4+KV-FP8").name == "nvfp4+kv-fp8"
    assert get_quant("Q4-K-M").name == "q4_k_m"


def test_fp8_kv_cache_halves_the_deepseek_cache():
    from dsref.sim.local import kv_bytes_per_token
    cfg = load_config("deepseek-v3")
    assert kv_bytes_per_token(cfg, get_quant("nvfp4+kv-fp8")) == (512 + 64) * 61  # one byte per latent element
    assert kv_bytes_per_token(cfg, get_quant("nvfp4")) == 2 * (512 + 64) * 61


@pytest.mark.parametrize("call,match", [
    (lambda: get_quant("fp8", kv_dtype="int4"), r"kv_dtype 'int4' .*choices: bf16, fp16, fp8, fp32"),
    (lambda: get_quant("q4_k_m", kv_dtype="fp8"), r"kv_dtype 'fp8' .*llama.cpp.*choices: bf16, fp16, fp32, q8_0"),
    (lambda: get_quant("fp8+kv-int4"), r"kv_dtype 'int4'"),
    (lambda: get_quant("fp8+cache-fp8"), r"after '\+' must be kv-<dtype>"),
    (lambda: get_quant("fp8+kv-"), r"after '\+' must be kv-<dtype>"),
    (lambda: get_quant("fp8+kv-fp8", kv_dtype="bf16"), r"contradicts"),
    (lambda: get_quant("fp6"), r"unknown quantisation 'fp6'; known: .*nvfp4.*iq1_s"),
])
def test_bad_quant_specs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cli_local_accepts_new_ids(capsys):
    import json

    from dsref.experiments.cli import main
    main(["sim", "local", "--model", "deepseek-r1", "--device", "b200", "--quant", "nvfp4+kv-fp8", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["quant"] == "nvfp4+kv-fp8"
    assert d["weights_bytes"] == pytest.approx(model_weight_bytes(load_config("deepseek-r1"), get_quant("nvfp4"))["total"])
    assert main(["sim", "local", "--model", "qwen2.5-14b", "--device", "raspberry-pi-5", "--quant", "q2_k",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights_bits_per_weight"] == pytest.approx(3.12, abs=0.01)


def test_cli_help_lists_every_quantisation(capsys):
    from dsref.experiments.cli import main
    with pytest.raises(SystemExit):
        main(["sim", "local", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for q in QUANTS:
        assert f" {q}," in text or f" {q};" in text, q
