"""Checkpoint reading/writing against transformers' own save_pretrained/from_pretrained.

Tolerances: float32 checkpoints, float32 compute: max|ours - theirs| / max|theirs|
<= 1e-5. A bf16 checkpoint loaded into float32 is compared with transformers
running float32 on the same bf16 weights (also 1e-5); against the original
float32 weights the bf16 rounding (2^-9 relative per weight) allows 3e-2.
"""
from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from dsref.reference import numpy_ref  # noqa: E402
from dsref.reference.checkpoint import (  # noqa: E402
    CheckpointError, _grid, dequantize_fp8_blockwise, describe_checkpoint, load_checkpoint,
    quantize_fp8_blockwise, read_tensors, save_checkpoint, tokenizer_path)
from dsref.reference.config import ConfigError  # noqa: E402
from dsref.reference.model import DeepseekModel, forward, jit_forward, mtp_logits  # noqa: E402
from dsref.reference.presets import get_preset  # noqa: E402

TOKENS = np.random.default_rng(7).integers(0, 256, (2, 11))
BLOCK = (16, 24)  # partial blocks on tiny-v3: kv_a_proj_with_mqa [40, 64] -> grid 3 x 3


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _hf_model(cfg, seed):
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    v2 = cfg.scoring_func == "softmax"
    C = transformers.DeepseekV2Config if v2 else transformers.DeepseekV3Config
    M = transformers.DeepseekV2ForCausalLM if v2 else transformers.DeepseekV3ForCausalLM
    hc = C(**cfg.to_hf_dict())
    hc._attn_implementation = "eager"
    m = M(hc).eval()
    with torch.no_grad():
        for n, p in list(m.named_parameters()) + list(m.named_buffers()):
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif n.endswith("e_score_correction_bias"):
                p.copy_(0.2 * torch.randn_like(p))  # non-zero: selection depends on it
            elif p.dtype.is_floating_point and "inv_freq" not in n:
                p.normal_(0.0, 0.1)
    return m


def _hf_logits(m, tokens=TOKENS):
    with torch.no_grad():
        return m(torch.as_tensor(tokens)).logits.float().numpy()


def _from_pretrained(d, cfg):
    M = transformers.DeepseekV2ForCausalLM if cfg.scoring_func == "softmax" else transformers.DeepseekV3ForCausalLM
    return M.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def hf_ckpts(tmp_path_factory):
    """transformers-written checkpoints: {case: (dir, cfg, reference logits)}."""
    out = {}
    for case, preset, kw in [("v3-f32", "tiny-v3", {}),
                             ("v2-f32-sharded", "tiny-v2", {"max_shard_size": "150KB"}),
                             ("v2lite-f32", "tiny-v2-lite", {})]:
        cfg = get_preset(preset)
        m = _hf_model(cfg, seed=len(out))
        d = tmp_path_factory.mktemp(case)
        m.save_pretrained(d, **kw)
        out[case] = (d, cfg, _hf_logits(m))
        if case == "v3-f32":  # same model, bf16 and sharded
            d16 = tmp_path_factory.mktemp("v3-bf16-sharded")
            m.to(torch.bfloat16).save_pretrained(d16, max_shard_size="150KB")
            out["v3-bf16-sharded"] = (d16, cfg, out[case][2])
    return out


@pytest.fixture(scope="session")
def v3(hf_ckpts):
    d, cfg, ref = hf_ckpts["v3-f32"]
    cfg2, model = load_checkpoint(d)
    return d, cfg2, model, ref


# ------------------------------------------------------------- transformers -> ours
def test_save_pretrained_layout_is_per_expert(hf_ckpts):
    info = describe_checkpoint(hf_ckpts["v3-f32"][0])
    assert info["expert_layout"] == "per_expert" and info["num_files"] == 1
    assert info["dtypes"] == {"F32": info["num_tensors"]} and not info["quantized"]
    sharded = describe_checkpoint(hf_ckpts["v3-bf16-sharded"][0])
    assert sharded["num_files"] > 1 and sharded["index"].endswith("model.safetensors.index.json")
    assert set(sharded["dtypes"]) <= {"BF16", "F32"}


@pytest.mark.parametrize("case", ["v3-f32", "v2-f32-sharded", "v2lite-f32"])
def test_transformers_checkpoint_logits_match(hf_ckpts, v3, case):
    d, cfg, ref = hf_ckpts[case]
    model = v3[2] if case == "v3-f32" else load_checkpoint(d)[1]
    assert _rel(jit_forward(model, TOKENS), ref) <= 1e-5


def test_bf16_sharded_checkpoint(hf_ckpts):
    d, cfg, ref32 = hf_ckpts["v3-bf16-sharded"]
    _, model = load_checkpoint(d)  # float32 model from bf16 weights
    same_weights = _hf_logits(_from_pretrained(d, cfg))
    ours = jit_forward(model, TOKENS)
    assert _rel(ours, same_weights) <= 1e-5
    assert _rel(ours, ref32) <= 3e-2
    import jax.numpy as jnp
    _, m16 = load_checkpoint(d, dtype=jnp.bfloat16)  # bf16 model: the stored bits, no re-rounding
    raw = _torch_raw(d)
    for name in ["model.layers.0.self_attn.q_b_proj.weight", "lm_head.weight"]:
        got = dict(m16.hf_items())[name].get_value()
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), raw[name])
    e = dict(m16.hf_items())["model.layers.1.mlp.experts.gate_proj.weight"].get_value()
    np.testing.assert_array_equal(np.asarray(e[3]), raw["model.layers.1.mlp.experts.3.gate_proj.weight"])


def test_read_tensors_stacks_experts(hf_ckpts, v3):
    from safetensors.numpy import load_file
    d, cfg, model, _ = v3
    got = dict(read_tensors(d, cfg))
    assert set(got) == {n for n, _ in model.hf_items()}
    raw = load_file(str(d / "model.safetensors"))
    stacked = got["model.layers.2.mlp.experts.up_proj.weight"]
    assert stacked.shape == (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size)
    for e in (0, 5, cfg.n_routed_experts - 1):
        np.testing.assert_array_equal(stacked[e], raw[f"model.layers.2.mlp.experts.{e}.up_proj.weight"])
    bias = got["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert np.abs(bias).min() > 0
    np.testing.assert_array_equal(model.layer(1).raw("mlp.gate.e_score_correction_bias"), bias)


def test_with_mtp_requires_mtp_tensors(hf_ckpts):
    d = hf_ckpts["v3-f32"][0]  # transformers does not store the MTP layer
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\..*missing") as e:
        load_checkpoint(d, with_mtp=True)
    assert "model.safetensors" in str(e.value)


# ------------------------------------------------------------- ours -> transformers
@pytest.mark.parametrize("layout,shard", [("per_expert", 120_000), ("fused", None)])
def test_writer_roundtrip_through_transformers(v3, tmp_path, layout, shard):
    d, cfg, model, _ = v3
    out = save_checkpoint(model, cfg, tmp_path / "w", dtype="float32", max_shard_bytes=shard,
                          expert_layout=layout)
    info = describe_checkpoint(out)
    assert info["expert_layout"] == layout and (info["num_files"] > 1) == (shard is not None)
    ours = np.asarray(jit_forward(model, TOKENS))
    assert _rel(_hf_logits(_from_pretrained(out, cfg)), ours) <= 1e-5
    _, back = load_checkpoint(out)
    np.testing.assert_array_equal(jit_forward(back, TOKENS), ours)


def test_writer_bf16_keeps_bias_float32(v3, tmp_path):
    d, cfg, model, _ = v3
    out = save_checkpoint(model, cfg, tmp_path / "b")
    got = dict(read_tensors(out))
    assert got["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    assert got["model.layers.1.self_attn.q_a_proj.weight"].dtype == ml_dtypes.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------- FP8
def _block_loop_dequant(q, s, block):
    """Direct NumPy dequantization, one block at a time (the definition)."""
    out = np.empty(q.shape, np.float32)
    br, bc = block
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = (slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc))
            out[blk] = q[blk].astype(np.float32) * s[i, j]
    return out


def test_fp8_quantizer_partial_blocks():
    w = np.random.default_rng(0).standard_normal((40, 70)).astype(np.float32) * 3
    w[16:32, 24:48] = 0.0  # an all-zero block: scale 1, no division by zero
    q, s = quantize_fp8_blockwise(w, BLOCK)
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.dtype == np.float32 and s.shape == (3, 3)
    assert s[1, 1] == 1.0 and np.all(np.isfinite(q.astype(np.float32)))
    np.testing.assert_array_equal(s[2, 2], np.abs(w[32:, 48:]).max() / np.float32(448))
    deq = dequantize_fp8_blockwise(q, s, BLOCK)
    np.testing.assert_array_equal(deq, _block_loop_dequant(q, s, BLOCK))
    # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormal spacing 2^-9 (times the block scale)
    s_full = np.repeat(np.repeat(s, BLOCK[0], 0), BLOCK[1], 1)[:40, :70]
    assert np.all(np.abs(deq - w) <= np.abs(w) / 16 + s_full * 2.0 ** -9)
    q3, s3 = quantize_fp8_blockwise(np.stack([w, 2 * w]), BLOCK)  # leading (expert) dims
    assert s3.shape == (2, 3, 3)
    np.testing.assert_array_equal(s3[0], s)
    np.testing.assert_array_equal(q3[0].astype(np.float32), q.astype(np.float32))
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_fp8_blockwise(q, s[:2], BLOCK)


@pytest.fixture(scope="session")
def fp8_ckpt(tmp_path_factory):
    """Our FP8 writer on a random tiny-v3 with its MTP layer, weight_block_size [16, 24]."""
    cfg = get_preset("tiny-v3")
    rng = np.random.default_rng(3)
    shapes = {n: p.shape for n, p in nnx.eval_shape(lambda: DeepseekModel(cfg, with_mtp=True)).hf_items()}
    model = {n: (1 + 0.2 * rng.standard_normal(s) if n.endswith("norm.weight") else 0.1 * rng.standard_normal(s))
             .astype(np.float32) for n, s in shapes.items()}
    d = save_checkpoint(model, cfg, tmp_path_factory.mktemp("fp8"), dtype="fp8", fp8_block_size=BLOCK,
                        max_shard_bytes=60_000)
    return d, cfg


def _torch_raw(d):
    """All tensors via safetensors' torch backend (an independent reader), as NumPy."""
    from safetensors import safe_open
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                if t.dtype == torch.float8_e4m3fn:
                    out[k] = t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
                elif t.dtype == torch.bfloat16:
                    out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                else:
                    out[k] = t.numpy()
    return out


def test_fp8_checkpoint_layout(fp8_ckpt):
    d, cfg = fp8_ckpt
    conf = json.loads((d / "config.json").read_text())
    assert conf["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [16, 24]}
    raw = _torch_raw(d)
    kv = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert raw[kv].dtype == ml_dtypes.float8_e4m3fn and raw[kv + "_scale_inv"].shape == (3, 3)
    assert raw["model.layers.1.mlp.experts.7.down_proj.weight_scale_inv"].shape == _grid((64, 32), BLOCK)
    assert raw["model.layers.3.eh_proj.weight"].dtype == ml_dtypes.float8_e4m3fn
    for keep in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.mlp.gate.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.3.embed_tokens.weight",
                 "model.layers.3.shared_head.head.weight", "model.layers.3.enorm.weight"]:
        assert raw[keep].dtype == ml_dtypes.bfloat16, keep
        assert keep + "_scale_inv" not in raw
    assert raw["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    info = describe_checkpoint(d)
    assert info["quantized"] and info["dtypes"]["F8_E4M3"] > 0 and info["num_files"] > 1


def test_fp8_dequant_bit_exact_and_model_matches_numpy(fp8_ckpt):
    d, cfg = fp8_ckpt
    raw = _torch_raw(d)
    got = dict(read_tensors(d, with_mtp=True))
    for name in ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.2.self_attn.q_b_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.3.eh_proj.weight"]:
        np.testing.assert_array_equal(got[name], _block_loop_dequant(raw[name], raw[name + "_scale_inv"], BLOCK))
    stacked = got["model.layers.2.mlp.experts.gate_proj.weight"]
    for e in range(cfg.n_routed_experts):
        n = f"model.layers.2.mlp.experts.{e}.gate_proj.weight"
        np.testing.assert_array_equal(stacked[e], _block_loop_dequant(raw[n], raw[n + "_scale_inv"], BLOCK))
    cfg2, model = load_checkpoint(d, with_mtp=True)
    w64 = {k: np.asarray(v, np.float64) for k, v in got.items()}
    ref, h_ref = numpy_ref.forward(TOKENS, w64, cfg2, return_hidden=True)
    fwd = nnx.jit(lambda m, t: forward(m, t))
    logits, _, h = fwd(model, TOKENS)
    assert _rel(logits, ref) <= 1e-5
    mtp_ref = numpy_ref.mtp_forward(TOKENS, h_ref, w64, cfg2)  # predicts t+2 at position t
    assert _rel(nnx.jit(mtp_logits)(model, TOKENS[:, 1:], h[:, :-1]).logits, mtp_ref) <= 1e-5
    _, no_mtp = load_checkpoint(d)  # MTP layer skipped
    assert len(no_mtp.mtp) == 0
    assert _rel(fwd(no_mtp, TOKENS).logits, np.asarray(logits)) <= 1e-6
    with pytest.raises(CheckpointError, match="dequant='refuse'"):
        load_checkpoint(d, dequant="refuse")


# ---------------------------------------------------------------- bad input
def _variant(src, dst, edit=None):
    """Copy a checkpoint directory, editing its tensors {name: array} (single file, numpy writer)."""
    from safetensors.numpy import save_file
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    t = {k: np.array(v) for k, v in _torch_raw(src).items()}
    if edit:
        edit(t)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _raises(path, *needles, err=CheckpointError, **kw):
    with pytest.raises(err) as e:
        load_checkpoint(path, **kw)
    msg = str(e.value)
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


def test_refuses_pickle(tmp_path, hf_ckpts):
    d = tmp_path / "pt"
    d.mkdir()
    shutil.copy(hf_ckpts["v3-f32"][0] / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _raises(d, d / "pytorch_model.bin", "never unpickle", "safetensors")
    _raises(d / "pytorch_model.bin", d / "pytorch_model.bin", "never unpickle")
    (tmp_path / "m.ckpt").write_bytes(b"x")
    _raises(tmp_path / "m.ckpt", "never unpickle")
    with pytest.raises(CheckpointError, match="never unpickle"):
        describe_checkpoint(d)


X = "model.layers.1.mlp.experts.5.up_proj.weight"
Q = "model.layers.0.self_attn.q_a_proj.weight"


@pytest.mark.parametrize("case,edit,needles", [
    ("missing", lambda t: t.pop(X), [X, "missing", "model.safetensors"]),
    ("extra", lambda t: t.__setitem__("model.layers.1.mlp.bogus.weight", np.zeros(3, np.float32)),
     ["model.layers.1.mlp.bogus.weight", "unexpected", "model.safetensors"]),
    ("extra-layer", lambda t: t.__setitem__("model.layers.9.input_layernorm.weight", np.ones(64, np.float32)),
     ["model.layers.9.input_layernorm.weight", "unexpected"]),
    ("shape", lambda t: t.__setitem__(Q, np.zeros((48, 63), np.float32)), [Q, "(48, 63)", "(48, 64)", "config.json"]),
    ("stack-shape", lambda t: t.__setitem__(X, np.zeros((33, 64), np.float32)), [X, "(33, 64)"]),
    ("int", lambda t: t.__setitem__(Q, np.zeros((48, 64), np.int32)), [Q, "I32", "floating-point"]),
    ("fp8-no-scale", lambda t: t.__setitem__(Q, np.zeros((48, 64), ml_dtypes.float8_e4m3fn)),
     [Q, "float8", "quantization_config"]),
    ("nan", lambda t: t[Q].__setitem__((3, 4), np.nan), [Q, "NaN or Inf"]),
    ("inf-bias", lambda t: t["model.layers.2.mlp.gate.e_score_correction_bias"].__setitem__(0, np.inf),
     ["model.layers.2.mlp.gate.e_score_correction_bias", "NaN or Inf"]),
])
def test_bad_tensors(hf_ckpts, tmp_path, case, edit, needles):
    d = _variant(hf_ckpts["v3-f32"][0], tmp_path / case, edit)
    msg = _raises(d, *needles)
    assert str(d) in msg


@pytest.mark.parametrize("case,edit,needles", [
    ("no-scale", lambda t: t.pop(Q + "_scale_inv"), [Q + "_scale_inv", "float8 without its scale"]),
    ("scale-shape", lambda t: t.__setitem__(Q + "_scale_inv", np.ones((3, 2), np.float32)),
     [Q + "_scale_inv", "(3, 2)", "(3, 3)"]),
    ("nan-scale", lambda t: t[Q + "_scale_inv"].__setitem__((0, 0), np.nan), [Q, "after dequantization"]),
    ("stray-scale", lambda t: t.__setitem__("model.norm.weight_scale_inv", np.ones((1, 1), np.float32)),
     ["model.norm.weight_scale_inv", "unexpected"]),
])
def test_bad_fp8(fp8_ckpt, tmp_path, case, edit, needles):
    d = _variant(fp8_ckpt[0], tmp_path / case, edit)
    assert str(d) in _raises(d, *needles, with_mtp=True)


def test_truncated_and_corrupt_files(hf_ckpts, tmp_path):
    src = hf_ckpts["v3-f32"][0]
    data = (src / "model.safetensors").read_bytes()
    for case, blob, needle in [("short-data", data[:-100], "truncated"), ("short-header", data[:50], "truncated"),
                               ("tiny", data[:5], "truncated"),
                               ("garbage-header", data[:8] + b"{not json" + data[17:], "corrupt")]:
        d = tmp_path / case
        d.mkdir()
        shutil.copy(src / "config.json", d / "config.json")
        (d / "model.safetensors").write_bytes(blob)
        msg = _raises(d, needle, d / "model.safetensors")
        if case == "short-data":  # names the tensor whose bytes are missing
            assert "tensor '" in msg


def test_index_pointing_to_missing_shard(hf_ckpts, tmp_path):
    d = tmp_path / "sh"
    shutil.copytree(hf_ckpts["v2-f32-sharded"][0], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (d / shard).unlink()
    name = next(k for k, v in index["weight_map"].items() if v == shard)
    _raises(d, "model.safetensors.index.json", shard, "missing shard", f"'{name}'")
    index["weight_map"][name] = "elsewhere.safetensors"  # listed shard lacks a tensor it is said to hold
    shutil.copy(hf_ckpts["v2-f32-sharded"][0] / shard, d / shard)
    (d / "elsewhere.safetensors").write_bytes((d / shard).read_bytes())
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(d, "elsewhere.safetensors", "not listed for this shard", "tensor '")


def test_bad_config(hf_ckpts, tmp_path):
    d = tmp_path / "cfg"
    shutil.copytree(hf_ckpts["v3-f32"][0], d)
    (d / "config.json").write_text("{bad json")
    _raises(d, d / "config.json", "not valid JSON", err=ConfigError)
    conf = json.loads((hf_ckpts["v3-f32"][0] / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "hidden_size": "64"}))
    _raises(d, d / "config.json", "hidden_size", err=ConfigError)
    (d / "config.json").write_text(json.dumps({**conf, "quantization_config": {"quant_method": "awq"}}))
    _raises(d, d / "config.json", "quantization_config.quant_method")
    (d / "config.json").write_text(json.dumps({**conf, "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128]}}))
    _raises(d, d / "config.json", "weight_block_size")
    (d / "config.json").write_text(json.dumps({**conf, "hidden_size": 32}))  # contradicts the tensors
    _raises(d, "model.embed_tokens.weight", "(256, 64)", "(256, 32)", d / "model.safetensors")


def test_writer_rejects_bad_tensors(v3, tmp_path):
    d, cfg, model, _ = v3
    sd = model.state_dict()
    sd.pop(Q)
    with pytest.raises(CheckpointError, match=Q):
        save_checkpoint(sd, cfg, tmp_path / "a")
    sd[Q] = np.zeros((48, 65), np.float32)
    with pytest.raises(CheckpointError, match=r"\(48, 65\)"):
        save_checkpoint(sd, cfg, tmp_path / "b")
    sd[Q] = np.zeros((48, 64), np.float32)
    sd["model.layers.0.bogus.weight"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError, match="bogus"):
        save_checkpoint(sd, cfg, tmp_path / "c")


def test_tokenizer_path_and_describe(hf_ckpts, tmp_path):
    d = tmp_path / "tok"
    shutil.copytree(hf_ckpts["v3-f32"][0], d)
    assert tokenizer_path(d) is None
    (d / "tokenizer.json").write_text("{}")
    assert tokenizer_path(d) == d / "tokenizer.json"
    info = describe_checkpoint(d)
    assert info["tokenizer"] == str(d / "tokenizer.json") and info["num_layers_stored"] == 3
    assert info["tensor_bytes"] == 4 * sum(np.prod(s) for s in _shapes_hf(hf_ckpts["v3-f32"][1]))


def _shapes_hf(cfg):
    from dsref.reference.params import global_shapes, layer_shapes
    out = list(global_shapes(cfg).values())
    for i in range(cfg.num_hidden_layers):
        out += list(layer_shapes(cfg, i).values())
    return out


def test_save_checkpoint_failure_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    """A write that fails halfway (disk full, interrupt) leaves the checkpoint already in the folder
    readable and unchanged, and no staging files behind."""
    import safetensors.numpy as stn
    cfg = get_preset("tiny-v3")
    model = DeepseekModel(cfg, rngs=nnx.Rngs(0))
    out = save_checkpoint(model, cfg, tmp_path / "w", dtype="float32", max_shard_bytes=20_000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = stn.save_file, []

    def flaky(data, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(data, path, metadata=metadata)
    monkeypatch.setattr(stn, "save_file", flaky)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(model, cfg, out, dtype="bfloat16", max_shard_bytes=20_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(stn, "save_file", real)
    save_checkpoint(model, cfg, out, dtype="bfloat16")  # a complete rewrite replaces every old shard
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
