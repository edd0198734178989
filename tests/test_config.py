"""ModelConfig: config.json round trips, clear errors, presets and exact parameter counts."""
from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from dsref.reference.config import ConfigError, ModelConfig
from dsref.reference.model import DeepseekModel
from dsref.reference.presets import get_preset, preset_names

V3_JSON = {  # the published DeepSeek-V3 config.json, abridged to what the model reads + unused extras
    "architectures": ["DeepseekV3ForCausalLM"], "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "model_type": "deepseek_v3", "torch_dtype": "bfloat16", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                          "quant_method": "fp8", "weight_block_size": [128, 128]},
}


def write(tmp_path, d, name="config.json"):
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return p


def test_published_v3_config_equals_preset(tmp_path):
    cfg = ModelConfig.from_json(write(tmp_path, V3_JSON))
    assert cfg == get_preset("deepseek-v3")  # extras are kept but not compared
    assert cfg.extra["quantization_config"]["fmt"] == "e4m3" and cfg.extra["ep_size"] == 1


def test_round_trip_keeps_unused_fields(tmp_path):
    cfg = ModelConfig.from_json(write(tmp_path, V3_JSON))
    cfg.save(tmp_path / "out.json")
    back = ModelConfig.from_json(tmp_path / "out.json")
    assert back == cfg and back.extra["auto_map"] == V3_JSON["auto_map"]


def test_transformers5_rope_parameters(tmp_path):
    d = dict(V3_JSON)
    rs = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {**rs, "rope_type": "yarn", "rope_theta": 10000.0}
    assert ModelConfig.from_json(write(tmp_path, d)) == get_preset("deepseek-v3")


def test_v2_config_defaults_to_softmax(tmp_path):
    d = {k: v for k, v in V3_JSON.items() if k not in ("scoring_func", "topk_method")}
    d.update(model_type="deepseek_v2", n_group=8, topk_group=3, topk_method="group_limited_greedy")
    cfg = ModelConfig.from_json(write(tmp_path, d))
    assert cfg.scoring_func == "softmax" and cfg.topk_method == "group_limited_greedy"


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("kv_lora_rank"), "kv_lora_rank"),
    (lambda d: d.update(hidden_size="7168"), "hidden_size"),
    (lambda d: d.update(num_experts_per_tok=2.5), "num_experts_per_tok"),
    (lambda d: d.update(n_group=7), "n_group"),
    (lambda d: d.update(topk_group=9), "topk_group"),
    (lambda d: d.update(topk_method="noaux_tc", scoring_func="softmax"), "topk_method"),
    (lambda d: d.update(scoring_func="relu"), "scoring_func"),
    (lambda d: d.update(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (lambda d: d.update(first_k_dense_replace=99), "first_k_dense_replace"),
    (lambda d: d.update(norm_topk_prob="yes"), "norm_topk_prob"),
    (lambda d: d.update(rope_scaling={"type": "yarn"}), "rope_scaling.factor"),
    (lambda d: d.update(rope_scaling={"type": "dynamic", "factor": 2}), "rope_scaling.type"),
    (lambda d: d.update(rms_norm_eps=-1), "rms_norm_eps"),
    (lambda d: d.update(hidden_act="gelu"), "hidden_act"),
])
def test_bad_fields_are_named_with_the_file(tmp_path, mutate, field):
    d = json.loads(json.dumps(V3_JSON))
    mutate(d)
    p = write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(p)
    assert f"'{field}'" in str(e.value) and str(p) in str(e.value)


def test_malformed_json_and_missing_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(p)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("deepseek-v9")


# ---------------------------------------------------------------- parameter counts
PUBLISHED = {  # name: (total, activated, tolerance) from the model cards / papers
    "deepseek-v3": (671e9, 37e9, 0.02),
    "deepseek-v2": (236e9, 21e9, 0.02),
    "deepseek-v2-lite": (15.7e9, 2.4e9, 0.03),
    "kimi-k2": (1.04e12, 32e9, 0.02),
    "qwen2.5-72b": (72.7e9, None, 0.01),
    "llama-3.1-405b": (405e9, None, 0.01),
    "llama-3.1-8b": (8.03e9, None, 0.01),
    "llama-2-13b": (13.0e9, None, 0.005),  # Llama 2 paper (arXiv 2307.09288) Table 1: 13B
    "qwen3-30b-a3b": (30.5e9, None, 0.005),  # model card; activated: tests/test_qwen3_moe.py
    "qwen3-235b-a22b": (235e9, None, 0.005),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    total, active, tol = PUBLISHED[name]
    cfg = get_preset(name)
    pc = cfg.param_counts()
    assert pc["total_params"] == pytest.approx(total, rel=tol)
    if active is None and not cfg.is_moe:  # dense: everything but the input embedding table
        assert pc["activated_params"] == pc["total_params"] - cfg.vocab_size * cfg.hidden_size
    elif active is None:  # Qwen counts activated parameters differently: tests/test_qwen3_moe.py
        assert pc["activated_params"] < pc["total_params"] / 5
    else:
        assert pc["activated_params"] == pytest.approx(active, rel=0.025)


def test_v3_exact_counts_and_mtp():
    pc = get_preset("deepseek-v3").param_counts()
    assert pc["total_params"] == 671_026_419_200
    assert 36.5e9 < pc["activated_params"] < 37.5e9
    assert 11e9 < pc["mtp_params"] < 12e9
    assert pc["checkpoint_params"] == pytest.approx(685e9, rel=0.002)  # the published 685B with MTP
    assert get_preset("deepseek-r1").param_counts() == pc


def test_full_size_shapes_without_allocating():
    """jax.eval_shape of the 671B model: the shapes the code builds sum to the counted total."""
    cfg = get_preset("deepseek-v3")
    abstract = nnx.eval_shape(lambda: DeepseekModel(cfg, rngs=nnx.Rngs(0), with_mtp=True))
    sizes = {n: int(np.prod(p.shape)) for n, p in abstract.hf_items()}
    main = sum(v for n, v in sizes.items() if not n.startswith("model.layers.61."))
    assert main == cfg.param_counts()["total_params"]
    assert sum(sizes.values()) - main == cfg.param_counts()["mtp_params"]


def test_kv_cache_bytes():
    assert get_preset("deepseek-v3").kv_cache_bytes_per_token() == 70_272
    assert get_preset("qwen2.5-72b").kv_cache_bytes_per_token() == 327_680
    assert get_preset("llama-3.1-405b").kv_cache_bytes_per_token() == 516_096
    # GQA: layers x 2 (K and V) x kv heads x head_dim x 2 bytes
    assert get_preset("qwen3-30b-a3b").kv_cache_bytes_per_token() == 48 * 2 * 4 * 128 * 2 == 98_304
    assert get_preset("qwen3-235b-a22b").kv_cache_bytes_per_token() == 94 * 2 * 4 * 128 * 2
    assert get_preset("llama-2-13b").kv_cache_bytes_per_token() == 40 * 2 * 40 * 128 * 2 == 819_200


def test_every_preset_loads_and_round_trips(tmp_path):
    for name in preset_names():
        cfg = get_preset(name)
        cfg.save(tmp_path / "c.json")
        assert ModelConfig.from_json(tmp_path / "c.json") == cfg.replace(name=cfg.name), name


def test_info_cli_json(capsys):
    from dsref.experiments.cli import main
    assert main(["info", "deepseek-v3", "--json", "--no-check"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_params"] == 671_026_419_200 and d["kv_cache_bytes_per_token"] == 70_272
    assert d["num_layers"] == 61 and d["mtp_params"] > 0 and d["activated_params"] < 38e9
    assert main(["info", "qwen2.5-14b", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kv_cache_bytes_per_token"] == 196_608 and d["mtp_params"] == 0
    assert main(["info", "tiny-v3", "--json"]) == 0
    sc = json.loads(capsys.readouterr().out)["self_check"]
    assert sc["rel_err_absorbed_vs_float64"] < 1e-5
    assert main(["info", "no-such-model"]) == 2
