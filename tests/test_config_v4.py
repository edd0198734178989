"""DeepSeek-V4: ModelConfigV4 in its three spellings, the tensor table against transformers and the
release, the presets against the published sizes, and `dsref info` on V4."""
from __future__ import annotations

import json

import pytest

from dsref.reference.config import ConfigError, ModelConfig
from dsref.reference.config_v4 import CSA, HCA, SLIDING, ModelConfigV4
from dsref.reference.params_v4 import (EMBED, INT64, ROUTED_EXPERT, param_counts, release_bytes,
                                       release_stored_values, tensors)
from dsref.reference.presets import all_preset_names, get_preset, load_config, preset_names

V4_PRESETS = ("deepseek-v4-flash", "deepseek-v4-pro", "tiny-v4")

# deepseek-ai/DeepSeek-V4-Pro config.json, transcribed from the public model report that dumps it
# with the checkpoint's tensor list (code-search index id 62968290951; reference/presets.py).
PRO_RELEASE = {
    "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 512,
    "hidden_act": "silu", "hidden_size": 7168, "index_head_dim": 128, "index_n_heads": 64, "index_topk": 1024,
    "initializer_range": 0.02, "max_position_embeddings": 1048576, "model_type": "deepseek_v4",
    "moe_intermediate_size": 3072, "n_routed_experts": 384, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 6, "num_hidden_layers": 61, "num_hash_layers": 3,
    "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 16, "o_lora_rank": 1024,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": [128, 128] + [4, 128] * 29 + [4, 0],
}
# deepseek-ai/DeepSeek-V4-Flash config.json: the -0731 copy (index id 59258988294) without its DSpark
# fields and with the base release's 44 compress_ratios (id 58039819897).
FLASH_RELEASE = {**PRO_RELEASE, "expert_dtype": "fp4", "hidden_size": 4096, "index_topk": 512,
                 "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_attention_heads": 64,
                 "num_hidden_layers": 43, "o_groups": 8, "q_lora_rank": 1024, "routed_scaling_factor": 1.5,
                 "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0]}


def _hf_model(cfg: ModelConfigV4):
    """transformers' DeepseekV4ForCausalLM of cfg on the meta device (shapes only, no memory)."""
    import torch
    import transformers
    hf_cfg = transformers.DeepseekV4Config(**cfg.to_hf_dict())
    with torch.device("meta"):
        return hf_cfg, transformers.DeepseekV4ForCausalLM(hf_cfg)


# ------------------------------------------------------------------ published sizes
def test_presets_match_published_sizes():
    """DeepSeek's model cards: V4-Flash 284B total / 13B activated, V4-Pro 1.6T / 49B. The cards round
    to the digits shown, so the tolerance is half a unit of the last digit: +-0.5B, +-0.05T. They
    count the main model (embedding and LM head in, MTP out: with its MTP module Flash is 290.9B,
    outside 284 +- 0.5) and, as for V3's 37B, activated = k of E routed experts + everything else
    except the input embedding table."""
    flash, pro = param_counts(get_preset("deepseek-v4-flash")), param_counts(get_preset("deepseek-v4-pro"))
    assert abs(flash["total_params"] - 284e9) <= 0.5e9
    assert abs(flash["activated_params"] - 13e9) <= 0.5e9
    assert abs(pro["total_params"] - 1.6e12) <= 0.05e12
    assert abs(pro["activated_params"] - 49e9) <= 0.5e9
    assert abs(flash["checkpoint_params"] - 284e9) > 0.5e9  # so the card's number excludes MTP
    # the exact counts (derived from the table; any change to it shows here)
    assert (flash["total_params"], flash["activated_params"], flash["mtp_params"]) == (
        284_332_240_471, 13_270_101_591, 6_610_048_891)
    assert (pro["total_params"], pro["activated_params"], pro["mtp_params"]) == (
        1_572_997_201_763, 48_852_402_019, 25_840_145_979)


def test_pro_release_layout_reproduces_the_checkpoint_dump():
    """The Pro checkpoint's safetensors list 145,116 tensors and 861,608,274,846 stored values (the
    dump cited in reference/presets.py): FP8 weights with one e8m0 scale per 128x128 block, FP4
    experts as int8 [out, in/2] with one scale per 32, bf16/fp32 rest, int64 tid2eid, MTP included.
    Reproducing both pins every shape of the table and the preset at once."""
    assert release_stored_values(get_preset("deepseek-v4-pro")) == (145_116, 861_608_274_846)
    # the dump's "tensor bytes" 805.32 GB (binary units, two decimals)
    assert round(release_bytes(get_preset("deepseek-v4-pro")) / 2**30, 2) == 805.32
    # Flash: no tensor dump; a third-party test quotes the model repo's safetensors total as 160 GB
    # (index id 58039819897, V4_BASE_PUBLISHED_BYTES = 160e9), a 2-digit figure: +-0.5 GB
    assert abs(release_bytes(get_preset("deepseek-v4-flash")) - 160e9) <= 0.5e9


# ------------------------------------------------------------------ the table vs transformers
@pytest.mark.parametrize("preset", ["tiny-v4", "deepseek-v4-pro"])
def test_table_equals_transformers_state_dict(preset):
    """Names, order and shapes of transformers' state_dict, at tiny width (tiny-v4 itself, and the
    Pro schedule of 61 layers shrunk to tiny dims: HCA first, no sliding layer)."""
    cfg = get_preset(preset)
    if preset != "tiny-v4":
        t = get_preset("tiny-v4")
        cfg = cfg.replace(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_attention_heads=t.num_attention_heads,
                          head_dim=t.head_dim, qk_rope_head_dim=t.qk_rope_head_dim, q_lora_rank=t.q_lora_rank,
                          o_groups=t.o_groups, o_lora_rank=t.o_lora_rank, index_n_heads=2, index_head_dim=16,
                          moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2,
                          rope_scaling=None, max_position_embeddings=64)
    _, model = _hf_model(cfg)
    sd = model.state_dict()
    assert [(t.name, t.shape) for t in tensors(cfg)] == [(k, tuple(v.shape)) for k, v in sd.items()]
    import torch
    assert all((t.stored == INT64) == (sd[t.name].dtype == torch.int64) for t in tensors(cfg))


def test_deepseek_names_map_through_transformers_conversion():
    """Replaying transformers' own loader renames (conversion_mapping.py "deepseek_v4") on the
    table's DeepSeek names gives the table's transformers names, experts included."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key
    cfg = get_preset("tiny-v4")
    _, model = _hf_model(cfg)
    sd = model.state_dict()
    conv = get_checkpoint_conversion_mapping("deepseek_v4")
    ren = [w for w in conv if not isinstance(w, WeightConverter)]
    cvt = [w for w in conv if isinstance(w, WeightConverter)]
    for t in tensors(cfg):
        for pattern in t.deepseek:
            got, _ = rename_source_key(pattern.format(e=5), ren, cvt, base_model_prefix="model", meta_state_dict=sd)
            assert got == t.name, (pattern, got, t.name)
    # the two the brief names: the final hyper-connection head and the compressor's KV norm
    by_name = {t.name: t for t in tensors(cfg)}
    assert by_name["model.hc_head.hc_fn"].deepseek == ("hc_head_fn",)
    assert by_name["model.layers.1.self_attn.compressor.kv_norm.weight"].deepseek == ("layers.1.attn.compressor.norm.weight",)
    assert by_name["model.layers.1.self_attn.kv_norm.weight"].deepseek == ("layers.1.attn.kv_norm.weight",)


def test_table_kinds_and_mtp():
    cfg = get_preset("tiny-v4")
    rows = tensors(cfg, mtp=True)
    mtp = [t for t in rows if t.mtp]
    assert {t.layer for t in mtp} == {cfg.num_hidden_layers}
    # tiny-v4's MTP block is HCA: a compressor, no indexer; never hash-routed
    names = {t.rel for t in mtp}
    assert "self_attn.compressor.kv_proj.weight" in names and not any("indexer" in n for n in names)
    assert "mlp.gate.e_score_correction_bias" in names and "mlp.gate.tid2eid" not in names
    assert {"e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight", "hc_head.hc_fn"} <= names
    assert not any(t.name == EMBED for t in mtp)  # MTP shares the embedding: no copy
    hash_rows = [t for t in rows if t.rel == "mlp.gate.tid2eid"]
    assert [t.layer for t in hash_rows] == [0, 1] and all(not t.is_weight for t in hash_rows)
    assert all(t.numel == cfg.n_routed_experts * 2 * 24 * 64 for t in rows if t.rel == "mlp.experts.gate_up_proj")
    assert {t.group for t in rows if t.rel.startswith("mlp.experts.")} == {ROUTED_EXPERT}


# ------------------------------------------------------------------ spellings
def _deepseek_inference_roundtrip(cfg):
    back = ModelConfigV4.from_hf_dict(cfg.to_deepseek_dict(), "ds.json")
    assert back.spelling == "deepseek-inference"
    return back


@pytest.mark.parametrize("name", V4_PRESETS)
def test_every_spelling_reads_to_the_same_config(name):
    import transformers
    cfg = get_preset(name)
    tf = ModelConfigV4.from_hf_dict(cfg.to_hf_dict(), "tf.json")
    assert tf == cfg and tf.spelling == "transformers"
    # what transformers itself writes after reading our dict (its to_dict adds its own fields)
    written = transformers.DeepseekV4Config(**cfg.to_hf_dict()).to_dict()
    assert ModelConfigV4.from_hf_dict(written, "tf2.json") == cfg
    # DeepSeek's inference spelling cannot carry max_position_embeddings (its max_seq_len is a
    # runtime cache size): the transformers default comes back
    assert _deepseek_inference_roundtrip(cfg) == cfg.replace(max_position_embeddings=1048576)


@pytest.mark.parametrize("name,release", [("deepseek-v4-pro", PRO_RELEASE), ("deepseek-v4-flash", FLASH_RELEASE)])
def test_released_config_json_is_the_preset(name, release, tmp_path):
    import transformers
    p = tmp_path / "config.json"
    p.write_text(json.dumps(release))
    cfg = load_config(str(p))
    assert isinstance(cfg, ModelConfigV4) and cfg.spelling == "deepseek-hf"
    assert cfg == get_preset(name)
    assert cfg.extra["quantization_config"]["scale_fmt"] == "ue8m0"  # unknown fields kept ...
    assert cfg.to_hf_dict()["quantization_config"] == release["quantization_config"]  # ... and written back
    # transformers reads the same release into the same schedule
    hf = transformers.DeepseekV4Config(**release)
    assert tuple(hf.layer_types) == cfg.layer_types and tuple(hf.mlp_layer_types) == cfg.mlp_layer_types
    assert hf.qk_rope_head_dim == cfg.qk_rope_head_dim


def test_mixed_spellings_must_agree(tmp_path):
    d = get_preset("tiny-v4").to_deepseek_dict()
    same = {**d, "hidden_size": d["dim"]}
    assert ModelConfigV4.from_hf_dict(same, "m.json").hidden_size == d["dim"]
    with pytest.raises(ConfigError, match=r"m\.json: field 'dim' = 64 contradicts field 'hidden_size' = 65"):
        ModelConfigV4.from_hf_dict({**d, "hidden_size": 65}, "m.json")
    tf = get_preset("tiny-v4").to_hf_dict()
    with pytest.raises(ConfigError, match="'compress_ratios'.*contradicts field 'layer_types'|"
                                          "'layer_types'.*contradicts"):
        ModelConfigV4.from_hf_dict({**tf, "compress_ratios": [0] * 7}, "m.json")


# ------------------------------------------------------------------ bad input
BAD = [
    ({"hc_mult": 0}, "'hc_mult' must be >= 1"),
    ({"dim": "big"}, "'dim' must be an integer"),
    ({"num_key_value_heads": 2}, "'num_key_value_heads' must be 1"),
    ({"score_func": "softmax"}, "'score_func' = 'softmax'"),
    ({"swiglu_limit": 0.0}, "'swiglu_limit' must be > 0"),
    ({"compress_ratios": [0, 4]}, "'compress_ratios' has 2 entries, fewer than the 6 layers"),
    ({"compress_ratios": [0, 4, 8, 4, 16, 0, 0]}, "'compress_ratios' = 16 contradicts field 'compress_ratios' = 8"),
    ({"o_groups": 3}, "'o_groups' = 3 must divide"),
    ({"rope_head_dim": 7}, "'rope_head_dim' = 7 must be even"),
    ({"n_activated_experts": 9}, "'n_activated_experts' = 9 must be in"),
    ({"index_head_dim": 4}, "'index_head_dim' = 4 must be even and >= qk_rope_head_dim"),
    ({"swiglu_limit": None}, "required field 'swiglu_limit' is missing"),
    ({"n_hash_layers": None}, "required field 'mlp_layer_types'"),
    ({"attention_bias": True}, "'attention_bias' must be false"),
]


@pytest.mark.parametrize("change,msg", BAD)
def test_bad_values_name_the_field_and_file(change, msg, tmp_path):
    d = get_preset("tiny-v4").to_deepseek_dict()
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    text = str(e.value)
    assert text.startswith(str(p) + ": ") and msg in text and "\n" not in text, text


def test_bad_values_in_transformers_spelling(tmp_path):
    tf = get_preset("tiny-v4").to_hf_dict()
    cases = [({"layer_types": ["sliding_attention"] * 5}, "'layer_types' has 5 entries, expected 6"),
             ({"mlp_layer_types": ["moe"] * 5 + ["dense"]}, "'mlp_layer_types' has ['dense']"),
             ({"compress_rates": {"csa": 4}}, "'compress_rates' must map"),
             ({"rope_parameters": {**tf["rope_parameters"], "compress": {**tf["rope_parameters"]["compress"],
                                                                         "attention_factor": 1.3}}},
              "'rope_parameters.compress.attention_factor' must be 1")]
    for change, msg in cases:
        p = tmp_path / "config.json"
        p.write_text(json.dumps({**tf, **change}))
        with pytest.raises(ConfigError) as e:
            load_config(str(p))
        assert str(e.value).startswith(str(p)) and msg in str(e.value) and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------------ presets, loading, CLI
def test_presets_listing_and_v3_loading_unchanged(tmp_path):
    assert not set(V4_PRESETS) & set(preset_names())  # every preset_names() entry stays a ModelConfig
    assert set(V4_PRESETS) <= set(all_preset_names())
    v3 = get_preset("tiny-v3")
    v3.save(tmp_path / "config.json")
    assert type(load_config(str(tmp_path))) is ModelConfig
    get_preset("tiny-v4").save(tmp_path / "config.json")
    assert load_config(str(tmp_path)) == get_preset("tiny-v4")  # a checkpoint directory works too


def test_kv_cache_per_layer_type():
    c = get_preset("deepseek-v4-flash")
    per = c.kv_bytes_per_token_by_type(2.0)
    # CSA: (512 + 128) bf16 values per 4 tokens; HCA: 512 per 128 tokens
    assert per == {SLIDING: 0.0, CSA: 320.0, HCA: 8.0}
    assert c.layer_counts() == {SLIDING: 2, CSA: 21, HCA: 20}
    assert c.kv_cache_bytes_per_token() == 21 * 320 + 20 * 8 == 6880
    assert c.index_cache_bytes_per_token() == 21 * 64
    assert c.kv_window_bytes() == 43 * 128 * 512 * 2


def test_info_cli_v4(capsys, tmp_path):
    from dsref.experiments.cli import main
    assert main(["info", "deepseek-v4-flash", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["arch"] == "deepseek_v4" and d["total_params"] == 284_332_240_471
    assert d["kv_cache_bytes_per_token_by_layer_type"] == {SLIDING: 0.0, CSA: 320.0, HCA: 8.0}
    assert d["num_layers_by_type"] == {SLIDING: 2, CSA: 21, HCA: 20} and d["config_spelling"] == "preset"
    assert "self_check" not in d
    p = tmp_path / "config.json"
    p.write_text(json.dumps(get_preset("tiny-v4").to_deepseek_dict()))
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "config spelling: deepseek-inference" in out and "CSA 1/4" in out and "HCA 1/8" in out


def test_other_commands_refuse_v4_in_one_line(capsys):
    """Commands that do not take a V4 model (plan, train, ...) refuse it
    cleanly (exit 2) instead of failing inside code written for ModelConfig."""
    from dsref.experiments.cli import main
    from dsref.reference.cli import load_model
    with pytest.raises(ConfigError, match=r"^--model deepseek-v4-pro: a DeepSeek-V4 model; this command does not take DeepSeek-V4 yet"):
        load_model("deepseek-v4-pro", "--model")
    assert load_model("deepseek-v4-pro", v4=True) == get_preset("deepseek-v4-pro")
    assert main(["plan", "--model", "tiny-v4", "--system", "h800-node"]) == 2
    err = capsys.readouterr().err
    assert "--model tiny-v4: a DeepSeek-V4 model" in err and err.count("\n") == 1
