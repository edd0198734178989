"""`dsref golden` / `dsref compare` on a DeepSeek-V4 checkpoint (oracle/golden.py's V4 branch).

One tiny V4 checkpoint (a CSA, an HCA and a sliding layer; a hash-routed and two learned-routed
MoE layers), written with save_checkpoint_v4 and read back through read_tensors_v4, dumped by the
float64 NumPy reference and the float32 JAX model through the command line; the float32 dump
must pass `dsref compare` against the float64 one, a perturbed one must fail naming its layer, and
bad inputs exit 2 with one line naming the file. Three layers keep the JAX compile short.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dsref.experiments.cli import main
from dsref.reference import numpy_v4
from dsref.reference.checkpoint_v4 import read_tensors_v4, save_checkpoint_v4
from dsref.reference.config_v4 import CSA, HASH_MOE, HCA, MOE, SLIDING
from dsref.reference.oracle.golden import V4_HIDDEN_LAYOUT, read_dump, write_dump
from dsref.reference.params_v4 import INT64, tensors
from dsref.reference.presets import get_preset

# The float32 golden's XLA:CPU compile is most of this file's time: 11 s at the default optimisation
# level, 3 s at level 0 (measured on this config; the same program, last-bit differences only:
# model_v4.jit_forward_v4's docstring). The dump's contents are what is tested, not XLA's passes.
FAST_XLA = {"xla_backend_optimization_level": 0}
B, T = 2, 20  # CSA rate 4: 5 compressed entries, index_topk 3 of them (a real choice); window 6 < T


def small_cfg():
    return get_preset("tiny-v4").replace(
        name="tiny-v4-golden", num_hidden_layers=3, layer_types=(CSA, HCA, SLIDING),
        mlp_layer_types=(HASH_MOE, MOE, MOE))


def adversarial_weights(cfg, seed=0):
    """Every table tensor: matrices ~ N(0, 1/fan_in); vectors (norms, hyper-connection scales and
    biases, router correction bias) ~ 1 + 0.3 N(0, 1), so the bias reorders experts; sinks and
    compressor position biases ~ N(0, 1); tid2eid rows random distinct experts (its default, zeros,
    would put every token on expert 0)."""
    rng = np.random.default_rng(seed)
    w = {}
    for t in tensors(cfg, mtp=False):
        if t.stored == INT64:
            w[t.name] = np.stack([rng.permutation(cfg.n_routed_experts)[:cfg.num_experts_per_tok]
                                  for _ in range(t.shape[0])])
        elif t.name.endswith("sinks") or "position_bias" in t.name:
            w[t.name] = rng.standard_normal(t.shape).astype(np.float32)
        elif len(t.shape) == 1:
            w[t.name] = (1 + 0.3 * rng.standard_normal(t.shape)).astype(np.float32)
        else:
            w[t.name] = (rng.standard_normal(t.shape) / np.sqrt(t.shape[-1])).astype(np.float32)
    return w


def one_line_err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden_v4")
    cfg = small_cfg()
    ck = save_checkpoint_v4(adversarial_weights(cfg), cfg, d / "ck", names="transformers", dtype="float32")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    np.save(d / "tokens.npy", tokens)
    from dsref.reference import model_v4
    fast = functools.partial(model_v4.jit_forward_v4, compiler_options=FAST_XLA)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_v4, "jit_forward_v4", fast)
        for dt in ("float64", "float32"):
            rc = main(["golden", "--checkpoint", str(ck), "--tokens", str(d / "tokens.npy"),
                       "--out", str(d / f"{dt}.safetensors"), "--dtype", dt])
            assert rc == 0
    return cfg, ck, tokens, d


def test_v4_dump_layout(dumps):
    cfg, ck, tokens, d = dumps
    t, meta = read_dump(d / "float64.safetensors")
    n, D = cfg.hc_mult, cfg.hidden_size
    assert meta["hidden_layout"] == V4_HIDDEN_LAYOUT and meta["model"] == "tiny-v4-golden"
    assert t["logits"].shape == (B, T, cfg.vocab_size) and t["logits"].dtype == np.float64
    assert "mtp.0.logits" not in t and not any(k.endswith("mlp_out") for k in t)
    for i in range(cfg.num_hidden_layers):
        assert t[f"layers.{i}.hidden"].shape == (B, T, n * D)
        assert t[f"layers.{i}.attn_out"].shape == (B, T, D)
        ids = t[f"layers.{i}.topk_ids"]
        assert ids.shape == (B, T, cfg.num_experts_per_tok) and (np.diff(ids, axis=-1) > 0).all()
        assert (f"layers.{i}.index_ids" in t) == (cfg.layer_type(i) == CSA)
    assert t["layers.0.index_ids"].shape == (B, T, cfg.index_topk)
    # the hash layer's experts are tid2eid[token]; the learned layers' are the router's, not constant
    tid = read_tensors_v4(ck)["model.layers.0.mlp.gate.tid2eid"]
    assert (t["layers.0.topk_ids"] == np.sort(tid[tokens], -1)).all()
    for i in (1, 2):
        assert len({tuple(r) for r in t[f"layers.{i}.topk_ids"].reshape(-1, 3)}) > 3
    # hidden is the [B, T, n, D] streams numpy_v4 carries, flattened stream-major
    w = {k: v if v.dtype.kind in "iu" else v.astype(np.float64) for k, v in read_tensors_v4(ck).items()}
    cap = {}
    numpy_v4.forward(tokens, w, cfg, capture=cap)
    assert np.array_equal(t["layers.1.hidden"].reshape(B, T, n, D), cap["layers.1.hidden"])


def test_float32_passes_against_float64(dumps, capsys):
    _, _, _, d = dumps
    rc = main(["compare", str(d / "float64.safetensors"), str(d / "float32.safetensors")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS" in out
    a, _ = read_dump(d / "float64.safetensors")
    b, _ = read_dump(d / "float32.safetensors")
    rel = np.abs(a["logits"] - b["logits"]).max() / np.abs(a["logits"]).max()
    assert 0 < rel < 1e-5  # measured 1.0e-6 on the 6-layer tiny-v4 (float32 is not float64)


def test_perturbed_attn_out_fails_naming_its_layer(dumps, capsys):
    _, _, _, d = dumps
    t, meta = read_dump(d / "float32.safetensors")
    t["layers.1.attn_out"] = t["layers.1.attn_out"] * np.float32(1.01)
    write_dump(t, d / "bad.safetensors", meta)
    rc = main(["compare", str(d / "float64.safetensors"), str(d / "bad.safetensors")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL: first leaves tolerance at layer 1 (layers.1.attn_out)" in out, out


def test_tokens_out_of_vocab_exit_2(dumps, capsys):
    cfg, ck, tokens, d = dumps
    bad = d / "bad_tokens.npy"
    np.save(bad, np.where(tokens == tokens[0, 0], cfg.vocab_size, tokens))
    rc = main(["golden", "--checkpoint", str(ck), "--tokens", str(bad), "--out", str(d / "x.safetensors")])
    assert rc == 2
    err = one_line_err(capsys)
    assert str(bad) in err and f"[0, {cfg.vocab_size})" in err


def test_missing_tensor_exit_2(dumps, capsys, tmp_path):
    cfg, ck, tokens, d = dumps
    broken = tmp_path / "ck"
    broken.mkdir()
    (broken / "config.json").write_text((ck / "config.json").read_text())
    t = load_file(str(ck / "model.safetensors"))
    name = "model.layers.1.self_attn.sinks"
    del t[name]
    save_file(t, str(broken / "model.safetensors"), metadata={"format": "pt"})
    rc = main(["golden", "--checkpoint", str(broken), "--tokens", str(d / "tokens.npy"),
               "--out", str(tmp_path / "x.safetensors"), "--dtype", "float64"])
    assert rc == 2
    err = one_line_err(capsys)
    assert str(broken) in err and name in err and "missing" in err


def test_v4_refuses_float32_stream(dumps, capsys):
    """--stream on V4 runs the float64 reference only (tests/test_stream_golden_v4.py); float32 is refused."""
    _, ck, _, d = dumps
    rc = main(["golden", "--checkpoint", str(ck), "--tokens", str(d / "tokens.npy"),
               "--out", str(d / "y.safetensors"), "--stream", "--dtype", "float32"])
    assert rc == 2
    err = one_line_err(capsys)
    assert "--stream" in err and "float64" in err
