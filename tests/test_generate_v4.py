"""`dsref generate` on DeepSeek-V4 checkpoints (reference/generate_v4.py) end to end, in process.

A 2-layer tiny-v4 (one CSA, one HCA layer, F = 32 so FP4 can store the experts) with random
weights, written once as float32 (lossless), as the release's FP8/FP4, and as float32 with a
byte-level tokenizer and an eos_token_id. Every run uses a 5-token prompt and 11 new tokens, so
the cache is 16 slots: the CLI, decode_v4.greedy_generate_v4 (same 16-slot cache, same compiler
options) and every checkpoint share one prefill and one decode compile (step compiles dominate:
~4 s each on a loaded 2-core XLA:CPU). Positions 3, 7, 11 complete CSA blocks, 7 an HCA block.
~15 s in all (load average 4.5 on 2 cores), 8 s of it the fixture's two step compiles.
"""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsref.experiments import cli
from dsref.reference import checkpoint_v4 as ck
from dsref.reference import decode_v4 as dv
from dsref.reference import generate_cli, generate_v4
from dsref.reference import model_v4 as mv4
from dsref.reference.config_v4 import CSA, HASH_MOE, HCA, MOE
from dsref.reference.generate_v4 import cache_bytes_per_token_v4
from dsref.reference.params_v4 import INT64, tensors
from dsref.reference.presets import get_preset

PROMPT = [5, 6, 7, 8, 9]
N = 11  # len(PROMPT) + N = 16: one cache bucket for the CLI and greedy_generate_v4
# XLA:CPU compiles ~3x faster at this level (reference/generate_v4.py COMPILER_OPTIONS); the CLI's
# steps get it through that module constant, so they share the compiles of greedy_generate_v4 here
FAST = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def main(argv) -> int:
    """The CLI root; argparse's SystemExit -> its code."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def small_cfg():
    return get_preset("tiny-v4").replace(num_hidden_layers=2, layer_types=(CSA, HCA), mlp_layer_types=(HASH_MOE, MOE),
                                         moe_intermediate_size=32)


def random_weights(cfg, seed=0):
    """Magnitudes that keep logits well apart (norms near 1, weights std 0.2)."""
    rng = np.random.default_rng(seed)
    w = {}
    for t in tensors(cfg):
        if t.stored == INT64:
            w[t.name] = np.stack([rng.permutation(cfg.n_routed_experts)[:cfg.num_experts_per_tok]
                                  for _ in range(t.shape[0])])
        elif t.name.endswith("norm.weight"):
            w[t.name] = (1 + 0.3 * rng.standard_normal(t.shape)).astype(np.float32)
        else:
            w[t.name] = (0.2 * rng.standard_normal(t.shape)).astype(np.float32)
    return w


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate_v4, "COMPILER_OPTIONS", FAST)
        yield make_checkpoints(tmp_path_factory.mktemp("v4gen"))


def make_checkpoints(root):
    from dsref.reference.init_checkpoint import train_tokenizer
    cfg = small_cfg()
    w = random_weights(cfg)
    ck.save_checkpoint_v4(w, cfg, root / "f32", dtype="float32")
    ck.save_checkpoint_v4(w, cfg, root / "release", dtype="release")
    jw = mv4.cast_weights(w, cfg, jnp.float32)
    greedy = dv.greedy_generate_v4(jw, cfg, np.array([PROMPT]), N, compiler_options=FAST)[0].tolist()
    # 256 ids, all bytes: no merges, so "hello" is 5 tokens (the same prefill shape)
    tok = train_tokenizer(cfg.vocab_size, texts=["hello world"])
    hello = tok.encode("hello").ids
    assert len(hello) == 5
    g_hello = dv.greedy_generate_v4(jw, cfg, np.array([hello]), N, compiler_options=FAST)[0].tolist()
    eos = g_hello[3]
    (root / "tok").mkdir()
    shutil.copy(root / "f32" / "model.safetensors", root / "tok")
    conf = json.loads((root / "f32" / "config.json").read_text())
    (root / "tok" / "config.json").write_text(json.dumps({**conf, "eos_token_id": eos}))
    tok.save(str(root / "tok" / "tokenizer.json"))
    return dict(cfg=cfg, root=root, jw=jw, greedy=greedy, tok=tok, hello=hello, g_hello=g_hello, eos=eos)


def run_json(capsys, *argv):
    assert main(["generate", "--max-new-tokens", str(N), "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_greedy_equals_greedy_generate_and_full_forward_argmax(v4, capsys):
    cfg, greedy = v4["cfg"], v4["greedy"]
    out = run_json(capsys, "--checkpoint", str(v4["root"] / "f32"), "--tokens", "5,6,7,8,9", "--temperature", "0")
    assert out["tokens"] == greedy
    assert len(set(greedy)) > 3  # not a degenerate constant output
    # by causality the full forward over prompt + generated picks each generated id at the position before it
    full, _ = mv4.jit_forward_v4(v4["jw"], cfg, np.array([PROMPT + greedy]), compiler_options=FAST)
    full = np.asarray(full)[0, len(PROMPT) - 1:-1]
    assert full.argmax(-1).tolist() == greedy
    top2 = np.sort(full, axis=-1)[:, -2:]
    assert ((top2[:, 1] - top2[:, 0]) / np.abs(full).max()).min() > 1e-4  # no near-tie decides a token
    assert out["prompt_tokens"] == 5 and out["decode_steps"] == N - 1 and out["steady_decode_tokens"] == N - 2
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert set(out["compile_steps_s"]) == {"prefill", "sample", "decode"}
    assert out["arch"] == "deepseek_v4" and out["mtp_acceptance_rate"] is None and out["devices"] == 1
    # float32 cache: CSA (d + J) * 4 / 4 + HCA d * 4 / 8 bytes per token, as the config counts them
    assert out["kv_cache_bytes_per_token"] == cfg.kv_cache_bytes_per_token(4) == (32 + 16) + 32 * 4 / 8
    assert out["kv_cache_bytes"] == dv.cache_bytes_v4(dv.init_cache_v4(cfg, 1, 16))
    assert "text" not in out  # no tokenizer.json


def test_cache_bytes_per_token_from_the_real_cache():
    for cfg in (get_preset("tiny-v4"), get_preset("deepseek-v4-flash")):
        for dt, size in ((jnp.bfloat16, 2), (jnp.float32, 4)):
            assert cache_bytes_per_token_v4(cfg, dt) == cfg.kv_cache_bytes_per_token(size), (cfg.name, size)


def test_sampling_is_seeded(v4, capsys):
    base = ["--checkpoint", str(v4["root"] / "f32"), "--tokens", "5,6,7,8,9", "--temperature", "3"]
    a = run_json(capsys, *base, "--seed", "7")["tokens"]
    assert run_json(capsys, *base, "--seed", "7")["tokens"] == a
    assert a != v4["greedy"]
    assert run_json(capsys, *base, "--seed", "8")["tokens"] != a
    # a nucleus that keeps only the most likely token is greedy at any temperature
    assert run_json(capsys, *base, "--seed", "7", "--top-p", "1e-9")["tokens"] == v4["greedy"]


def test_stop_and_eos(v4, capsys):
    greedy = v4["greedy"]
    k = 4
    out = run_json(capsys, "--checkpoint", str(v4["root"] / "f32"), "--tokens", "5,6,7,8,9", "--stop",
                   str(greedy[k]), "999")
    assert out["tokens"] == greedy[:greedy.index(greedy[k]) + 1]
    # with a tokenizer, the config's eos_token_id stops; the text streams after the prompt
    g, eos, tok = v4["g_hello"], v4["eos"], v4["tok"]
    want = g[:g.index(eos) + 1]
    assert main(["generate", "--checkpoint", str(v4["root"] / "tok"), "--prompt", "hello",
                 "--max-new-tokens", str(N)]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("hello") and tok.decode(want) in cap.out
    assert f"{len(want)} new tokens" in cap.err and "tok/s decode" in cap.err
    out = run_json(capsys, "--checkpoint", str(v4["root"] / "tok"), "--prompt", "hello")
    assert out["tokens"] == want and out["text"] == tok.decode(want)


def test_release_fp8_fp4_checkpoint(v4, capsys):
    cfg, d = v4["cfg"], v4["root"] / "release"
    read = ck.read_tensors_v4(d, cfg, mtp=False)
    assert {"fp8", "fp4"} <= set(read.formats.values())  # really stored quantized
    jw = mv4.cast_weights(read, cfg, jnp.float32)
    want = dv.greedy_generate_v4(jw, cfg, np.array([PROMPT]), N, compiler_options=FAST)[0].tolist()
    assert run_json(capsys, "--checkpoint", str(d), "--tokens", "5,6,7,8,9")["tokens"] == want


@pytest.mark.parametrize("opt", [["--mtp"], ["--mesh", "data=1"], ["--layers", "unrolled"], ["--distributed"],
                                 ["--coordinator", "localhost:1234"]])
def test_v3_only_options_refused(v4, capsys, opt):
    assert main(["generate", "--checkpoint", str(v4["root"] / "f32"), "--tokens", "1,2", *opt]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    err = cap.err.strip()
    flag = opt[0] if opt[0] != "--layers" else "--layers unrolled"
    assert "\n" not in err and err.startswith(f"dsref: error: {flag}: not supported for DeepSeek-V4"), err


def test_context_and_memory_refused_before_loading(v4, capsys, monkeypatch):
    d = str(v4["root"] / "f32")
    assert main(["generate", "--checkpoint", d, "--tokens", "5,6,7", "--max-new-tokens", "126"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "max_position_embeddings 128" in cap.err and "at most 125 new tokens fit" in cap.err
    monkeypatch.setattr(generate_cli, "_available_memory", lambda _jax: (1000, "test"))
    assert main(["generate", "--checkpoint", d, "--tokens", "5,6,7", "--max-new-tokens", "8"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "V4 caches for 3 + 8 tokens" in cap.err
    assert main(["generate", "--checkpoint", d, "--tokens", "5,256"]) == 2
    assert "vocab_size is 256" in capsys.readouterr().err
