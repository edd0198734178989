"""reference/checkpoint_v4.py: DeepSeek-V4 checkpoints in both name sets, bf16 / FP8 / FP4 exactly.

The number formats are checked against hand-computed blocks (not against our own quantizer), the
release layout against params_v4.release_tensors, and the transformers-named and DeepSeek-named
bf16 outputs against transformers' own loader (from_pretrained, which renames DeepSeek's names
with its conversion_mapping "deepseek_v4"): the reloaded model's logits equal the saved model's.
"""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from dsref.reference import checkpoint_v4 as ck
from dsref.reference.checkpoint import CheckpointError
from dsref.reference.params_v4 import BF16, FP4, FP8, INT64, release_tensors, tensors
from dsref.reference.presets import get_preset

ST = {"float8_e4m3fn": "F8_E4M3", "float8_e8m0fnu": "F8_E8M0", "int8": "I8", "bfloat16": "BF16",
      "float32": "F32", "int64": "I64"}


def cfg32():
    """tiny-v4 with F = 32: FP4 needs every expert input dim divisible by 32 (tiny-v4's F is 24)."""
    return get_preset("tiny-v4").replace(moe_intermediate_size=32)


def random_weights(cfg, seed=0, mtp=True):
    """Every table tensor; magnitudes spread over e^-3..e^3 so blocks get different scales."""
    rng = np.random.default_rng(seed)
    w = {}
    for t in tensors(cfg, mtp=mtp):
        if t.stored == INT64:
            w[t.name] = np.stack([rng.permutation(cfg.n_routed_experts)[:cfg.num_experts_per_tok]
                                  for _ in range(t.shape[0])])
        else:
            w[t.name] = (rng.standard_normal(t.shape) * np.exp(rng.uniform(-3, 3, t.shape))).astype(np.float32)
    return w


def stored(d):
    """{name: array in its stored dtype} of a single-file checkpoint (through our header reader)."""
    f = ck._Files(d)
    return {n: np.array(f.array(n)) for n in f.infos}


def rewrite(d, tensors_):
    save_file(tensors_, str(d / "model.safetensors"), metadata={"format": "pt"})


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------ number formats
def test_fp4_bytes_hand_computed():
    # byte 0x2F: low nibble 0xF = -6 is element 0, high nibble 0x2 = +1 element 1; 0x71: 0.5 then 6;
    # 0x98: -0 then -0.5. Row 0 scale byte 130 = 2^3, row 1 byte 125 = 2^-2.
    packed = np.zeros((2, 16), np.uint8)
    packed[0, :3] = [0x2F, 0x71, 0x98]
    packed[1, 15] = 0x7B  # element 30 = code 0xB = -1.5, element 31 = code 0x7 = 6
    scale = np.array([[130], [125]], np.uint8).view(ml_dtypes.float8_e8m0fnu)
    got = ck.dequantize_fp4(packed.view(np.int8), scale)
    want = np.zeros((2, 32), np.float32)
    want[0, :6] = [-6 * 8, 1 * 8, 0.5 * 8, 6 * 8, -0.0, -0.5 * 8]
    want[1, 30:] = [-1.5 / 4, 6 / 4]
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.signbit(got[0, 4])  # code 8 is -0
    # and our quantizer gives back exactly these bytes and scales (each block's amax / 6 is a power of 2)
    q, s = ck.quantize_fp4(want)
    assert s.view(np.uint8).tolist() == [[130], [125]]
    assert q.view(np.uint8)[0, :3].tolist() == [0x2F, 0x71, 0x98] and q.view(np.uint8)[1, 15] == 0x7B


def test_ue8m0_bytes():
    b = np.array([0, 1, 126, 127, 128, 254, 255], np.uint8)
    got = ck.ue8m0_to_float(b.view(ml_dtypes.float8_e8m0fnu))
    assert got[:6].tolist() == [2.0 ** -127, 2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 127] and np.isnan(got[6])


def test_fp4_quantizer_rounds_and_scales():
    # amax 5 -> scale 1 (5/6 <= 1); amax 6.5 -> scale 2; ties go to even codes: 0.25 -> 0, 2.5 -> 2, 5 -> 4
    x = np.zeros((2, 32), np.float32)
    x[0, :4] = [0.25, 2.5, 5.0, -0.75]
    x[1, :3] = [6.5, 1.0, 2.5]
    q, s = ck.quantize_fp4(x)
    assert s.view(np.uint8).ravel().tolist() == [127, 128]
    assert ck.dequantize_fp4(q, s)[0, :4].tolist() == [0.0, 2.0, 4.0, -1.0]   # -0.75 ties to -1 (even code)
    assert ck.dequantize_fp4(q, s)[1, :3].tolist() == [6.0, 1.0, 2.0]         # /2: 3.25 -> 3, 0.5, 1.25 -> 1
    with pytest.raises(ValueError, match="multiple of 32"):
        ck.quantize_fp4(np.zeros((1, 24)))


def test_fp8_ue8m0_partial_last_block():
    # 130 x 200 with 128 x 128 blocks: a 2 x 2 grid whose last row / column blocks hold 2 rows / 72 cols
    w = np.zeros((130, 200), np.float32)
    w[129, 199] = 3.0       # only value of block (1, 1): scale 2^ceil(log2(3/448)) = 2^-7
    w[0, 0] = 448.0         # block (0, 0): scale exactly 1
    w[5, 130] = -449.0      # block (0, 1): 449/448 > 1 -> scale 2
    q, s = ck.quantize_fp8_ue8m0(w)
    assert s.shape == (2, 2) and s.view(np.uint8).tolist() == [[127, 128], [127, 120]]
    d = ck.dequantize_fp8(q, s)
    assert d[129, 199] == 3.0 and d[0, 0] == 448.0 and d[5, 130] == -448.0  # -224.5 -> -224 (e4m3) x 2
    # hand-made bytes: e4m3 0x38 = 1.0; in the partial block (1, 1) times 2^-7
    raw = np.zeros((130, 200), np.uint8)
    raw[129, 199] = 0x38
    sc = np.full((2, 2), 127, np.uint8)
    sc[1, 1] = 120
    got = ck.dequantize_fp8(raw.view(ml_dtypes.float8_e4m3fn), sc.view(ml_dtypes.float8_e8m0fnu))
    assert got[129, 199] == 2.0 ** -7 and np.count_nonzero(got) == 1
    with pytest.raises(ValueError, match="scale shape"):
        ck.dequantize_fp8(q, s[:1])


# ------------------------------------------------------------------ release round trip
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    cfg, w = cfg32(), random_weights(cfg32())
    root = tmp_path_factory.mktemp("v4")
    ck.save_checkpoint_v4(w, cfg, root / "ds", names="deepseek", dtype="release", max_shard_bytes=150_000)
    ck.save_checkpoint_v4(w, cfg, root / "hf", names="transformers", dtype="release")
    return cfg, w, root


def test_release_round_trip_is_quantize_dequantize(release):
    cfg, w, root = release
    got = ck.read_tensors_v4(root / "ds")
    assert got.names == "deepseek" and list(got) == [t.name for t in tensors(cfg, mtp=True)]
    for t in tensors(cfg, mtp=True):
        a = got[t.name]
        if t.stored == FP4:
            want = ck.dequantize_fp4(*ck.quantize_fp4(w[t.name]))
        elif t.stored == FP8:
            want = ck.dequantize_fp8(*ck.quantize_fp8_ue8m0(w[t.name]))
        elif t.stored == BF16:
            want = w[t.name].astype(ml_dtypes.bfloat16).astype(np.float32)
        else:
            want = w[t.name]
        assert a.dtype == want.dtype and np.array_equal(a, want), t.name
        assert got.formats[t.name] == {FP4: "fp4", FP8: "fp8", INT64: "int"}.get(t.stored, "float"), t.name
    # FP4 is lossy: the round trip must not be the identity (the test would pass on a no-op writer)
    gu = "model.layers.2.mlp.experts.gate_up_proj"
    assert not np.array_equal(got[gu], w[gu])


def test_release_layout_matches_the_table(release):
    cfg, _, root = release
    files = ck._Files(root / "ds")
    assert len({i.file for i in files.infos.values()}) > 1  # sharded, read through the index
    want = {n: (s, ST[d]) for n, s, d in release_tensors(cfg)}
    assert {n: (i.shape, i.dtype) for n, i in files.infos.items()} == want
    conf = json.loads((root / "ds" / "config.json").read_text())
    assert conf["quantization_config"] == ck.RELEASE_QUANT and conf["expert_dtype"] == "fp4"


def test_both_name_sets_read_the_same(release, tmp_path):
    cfg, w, root = release
    a, b = ck.read_tensors_v4(root / "ds"), ck.read_tensors_v4(root / "hf")
    assert (a.names, b.names) == ("deepseek", "transformers")
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in ck._Files(root / "hf").infos
    # float32 is lossless in both name sets; bf16 keeps the table's float32 rows float32
    for names in ck.NAME_SETS:
        ck.save_checkpoint_v4(w, cfg, tmp_path / names, names=names, dtype="float32")
        r = ck.read_tensors_v4(tmp_path / names)
        assert all(np.array_equal(r[k], w[k]) for k in w)
    ck.save_checkpoint_v4(w, cfg, tmp_path / "bf", names="deepseek", dtype="bf16")
    h = ck._Files(tmp_path / "bf").infos
    assert (h["layers.0.attn.attn_sink"].dtype, h["layers.0.ffn.experts.3.w2.weight"].dtype) == ("F32", "BF16")


def test_mtp_is_optional(release):
    cfg, _, root = release
    main = ck.read_tensors_v4(root / "ds", mtp=False)
    assert list(main) == [t.name for t in tensors(cfg)] and not any(k.startswith("mtp.") for k in main)


def test_fp8_experts_and_streaming(release, tmp_path):
    """Experts stored FP8 with 128x128 UE8M0 blocks (V4-Flash-Base's expert_dtype "fp8" layout) are read
    too; the stream knows the name set before reading and yields the table's order."""
    cfg, w, root = release
    d = tmp_path / "b"
    ck.save_checkpoint_v4(w, cfg, d, names="deepseek", dtype="release")
    t = stored(d)
    for e in range(cfg.n_routed_experts):
        n = f"layers.2.ffn.experts.{e}.w2.weight"
        q, s = ck.quantize_fp8_ue8m0(w["model.layers.2.mlp.experts.down_proj"][e])
        t[n], t[n.removesuffix(".weight") + ".scale"] = q, s
    rewrite(d, t)
    stream = ck.iter_tensors_v4(d)
    assert stream.names == "deepseek"
    got = {n: (a, f) for n, a, f in stream}
    dn = "model.layers.2.mlp.experts.down_proj"
    a, fmt = got[dn]
    assert fmt == "fp8" and np.array_equal(a, ck.dequantize_fp8(*ck.quantize_fp8_ue8m0(w[dn])))
    assert got["model.layers.3.mlp.experts.down_proj"][1] == "fp4"


# ------------------------------------------------------------------ refusals
def test_fp4_needs_32_divisible_inputs(tmp_path):
    cfg = get_preset("tiny-v4")  # F = 24: down_proj's input dim
    with pytest.raises(CheckpointError) as e:
        ck.save_checkpoint_v4(random_weights(cfg, mtp=False), cfg, tmp_path / "x", dtype="release")
    assert "experts.0.w2.weight" in one_line(e) and "moe_intermediate_size" in one_line(e)


def test_pickles_and_corrupt_headers_refused(release, tmp_path):
    cfg, w, root = release
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "p" / "config.json").write_text((root / "hf" / "config.json").read_text())
    with pytest.raises(CheckpointError) as e:
        ck.read_tensors_v4(tmp_path / "p")
    assert "pytorch_model.bin" in one_line(e) and "pickle" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        ck.read_tensors_v4(tmp_path / "p" / "pytorch_model.bin")
    assert "pickle" in one_line(e)
    d = tmp_path / "c"
    ck.save_checkpoint_v4(w, cfg, d, names="transformers", dtype="bf16")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[8:12] = b"#!{x"
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        ck.read_tensors_v4(d)
    assert "model.safetensors" in one_line(e) and "corrupt safetensors header" in one_line(e)


def test_missing_extra_wrong_shape_mixed_nonfinite_named(release, tmp_path):
    cfg, w, root = release
    d = tmp_path / "m"
    ck.save_checkpoint_v4(w, cfg, d, names="deepseek", dtype="release")
    base = stored(d)

    def fails(change, *needles):
        t = dict(base)
        change(t)
        rewrite(d, t)
        with pytest.raises(CheckpointError) as e:
            ck.read_tensors_v4(d)
        assert all(n in one_line(e) for n in needles), one_line(e)

    fails(lambda t: t.pop("layers.3.ffn.experts.5.w3.weight"), "'layers.3.ffn.experts.5.w3.weight'", "missing")
    fails(lambda t: t.pop("layers.1.attn.wq_a.scale"), "'layers.1.attn.wq_a.weight'", "scale")
    fails(lambda t: t.update({"layers.0.attn.kv_norm.weight": np.ones(31, np.float32)}),
          "'layers.0.attn.kv_norm.weight'", "[31]", "[32]")
    fails(lambda t: t.update({"layers.2.ffn.experts.0.w2.weight": t["layers.2.ffn.experts.0.w2.weight"][:, :8]}),
          "'layers.2.ffn.experts.0.w2.weight'", "[64, 16]")
    fails(lambda t: t.update({"layers.9.attn.wq_a.weight": np.ones(2, np.float32)}), "unexpected", "layers.9")
    fails(lambda t: t.update({"model.layers.0.self_attn.sinks": np.ones(4, np.float32)}), "mixes",
          "model.layers.0.self_attn.sinks")
    fails(lambda t: t.update({"layers.4.ffn.gate.bias": np.ones((8, 1), np.float32)}), "'layers.4.ffn.gate.bias'")
    bad = np.array(base["layers.0.attn.wkv.scale"]).view(np.uint8).copy()
    bad[0, 0] = 255  # UE8M0 NaN
    fails(lambda t: t.update({"layers.0.attn.wkv.scale": bad.view(ml_dtypes.float8_e8m0fnu)}),
          "'layers.0.attn.wkv.weight'", "non-finite")
    ids = base["layers.1.ffn.gate.tid2eid"].copy()
    ids[0, 0] = 8
    fails(lambda t: t.update({"layers.1.ffn.gate.tid2eid": ids}), "tid2eid", "[0, 8)")
    with pytest.raises(CheckpointError) as e:
        ck.save_checkpoint_v4({k: v for k, v in w.items() if k != "lm_head.weight"}, cfg, tmp_path / "n")
    assert "'lm_head.weight' missing" in one_line(e)


# ------------------------------------------------------------------ transformers loads what we write
def test_transformers_loads_our_bf16_output_with_equal_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.conftest import randomize_hf

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = get_preset("tiny-v4")
    hf_cfg = transformers.DeepseekV4Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    model = transformers.DeepseekV4ForCausalLM(hf_cfg).eval()
    randomize_hf(model, 0)
    kind = {t.name: t.stored for t in tensors(cfg)}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if n.endswith("tid2eid"):  # distinct experts per token (the default is all zeros)
                p.copy_(torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok]
                                     for _ in range(p.shape[0])]))
            elif kind.get(n) in (BF16, FP8, FP4):  # what a bf16 checkpoint stores exactly
                p.copy_(p.bfloat16().float())
    tok = torch.randint(0, cfg.vocab_size, (2, 19), generator=g)
    with torch.no_grad():
        want = model(tok).logits
    for names in ck.NAME_SETS:  # DeepSeek's names go through transformers' conversion_mapping
        ck.save_checkpoint_v4(model.state_dict(), cfg, tmp_path / names, names=names, dtype="bf16")
        m2, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
            tmp_path / names, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (names, info)
        with torch.no_grad():
            assert torch.equal(m2.eval()(tok).logits, want), names
    # and what transformers' own save_pretrained writes (its third naming) reads back as the state_dict
    model.save_pretrained(tmp_path / "saved")
    got = ck.read_tensors_v4(tmp_path / "saved")
    assert got.names == "transformers-saved" and list(got) == [t.name for t in tensors(cfg)]
    for n, p in model.state_dict().items():
        assert np.array_equal(got[n], p.numpy()), n


def test_transformers_dequantizes_our_release_output_identically(release):
    """transformers' own FP8/FP4 dequantizer (FineGrainedFP8Config(dequantize=True): `.scale` renamed to
    weight_scale_inv, `_unpack_fp4`, per-expert dequantize before stacking) on our DeepSeek-named
    release write gives every tensor bit-equal to our reader: an independent check of the nibble
    order, the scale grids and the expert combine."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, _, root = release
    qc = transformers.FineGrainedFP8Config(dequantize=True, weight_block_size=[128, 128], scale_fmt="ue8m0",
                                           expert_dtype="fp4")
    m, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
        root / "ds", dtype=torch.float32, quantization_config=qc, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    ours = ck.read_tensors_v4(root / "ds", mtp=False)
    theirs = m.state_dict()
    assert list(ours) == list(theirs)
    for n, a in ours.items():
        assert np.array_equal(theirs[n].numpy(), a), n
