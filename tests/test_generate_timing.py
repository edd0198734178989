"""`dsref generate` reports compilation apart from prefill and steady-state decode, and keeps
compiled programs in a persistent cache (DSREF_CACHE_DIR; off with DSREF_NO_COMPILE_CACHE=1 or
--no-compile-cache; an unusable directory only warns).

Every test points DSREF_CACHE_DIR (and HOME, XDG_CACHE_HOME) into tmp_path: nothing is written
to the real home. Runs that must start from a fresh JAX (an empty in-memory jit cache, so that
something is compiled and cached) are subprocesses.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from flax import nnx

from dsref.experiments import cli
from dsref.reference import cli_common, generate_cli
from dsref.reference.checkpoint import save_checkpoint
from dsref.reference.model import DeepseekModel
from dsref.reference.presets import get_preset

ARGS = ["--tokens", "1,2,3", "--max-new-tokens", "6", "--stop"]  # no stop token: 6 new tokens, 5 decode steps


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A DeepSeek-V3-structured checkpoint small enough to compile in seconds (4 experts)."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = get_preset("tiny-v3").replace(num_hidden_layers=2, n_routed_experts=4, n_group=2, topk_group=1,
                                        num_experts_per_tok=2)
    save_checkpoint(DeepseekModel(cfg, rngs=nnx.Rngs(0)), cfg, d, dtype="float32")
    return d


def _env(tmp_path, **extra) -> dict:
    env = dict(os.environ, HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu")
    for k in (cli_common.CACHE_DIR_ENV, cli_common.NO_COMPILE_CACHE_ENV):
        env.pop(k, None)
    env.update(extra)
    return env


def _run(ckpt, env, *more) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, "-m", "dsref.experiments.cli", "generate", "--checkpoint", str(ckpt), *ARGS,
                        "--json", *more], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p.stderr


def _files(d) -> list:
    return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs] if os.path.exists(d) else []


def test_json_timings_and_cache_written(ckpt, tmp_path):
    cache = tmp_path / "cache"
    out, err = _run(ckpt, _env(tmp_path, DSREF_CACHE_DIR=str(cache)))
    assert err == ""
    assert len(out["tokens"]) == 6 and out["decode_steps"] == 5
    # compilation: measured per step, before the clock starts
    assert set(out["compile_steps_s"]) == {"prefill", "sample", "decode"}
    assert out["compile_s"] > 0 and all(v > 0 for v in out["compile_steps_s"].values())
    assert math.isclose(out["compile_s"], sum(out["compile_steps_s"].values()))
    assert out["load_s"] > 0
    # prefill and decode rates follow from the times they report
    assert out["prefill_s"] > 0 and math.isclose(out["prefill_tokens_per_s"], 3 / out["prefill_s"])
    assert out["steady_decode_tokens"] == 4  # steps 2..5 (the prefill gives token 1, step 1 token 2)
    assert out["decode_tokens_per_s"] > 0
    assert math.isclose(out["decode_tokens_per_s"], out["steady_decode_tokens"] / out["steady_decode_s"])
    assert math.isclose(out["decode_s"], out["first_decode_step_s"] + out["steady_decode_s"], rel_tol=1e-9)
    # a step of a 4-expert toy model is milliseconds; a compile is not (nothing compiled during decode)
    assert out["steady_decode_s"] / out["steady_decode_tokens"] < out["compile_s"]
    # the cache: files under DSREF_CACHE_DIR, nothing under HOME or XDG_CACHE_HOME
    assert out["compile_cache_dir"] == str(cache)
    assert _files(cache)
    assert not _files(tmp_path / "home") and not _files(tmp_path / "xdg")


def test_env_opt_out_writes_nothing(ckpt, tmp_path):
    cache = tmp_path / "cache"
    out, err = _run(ckpt, _env(tmp_path, DSREF_CACHE_DIR=str(cache), DSREF_NO_COMPILE_CACHE="1"))
    assert out["compile_cache_dir"] is None and out["compile_s"] > 0 and len(out["tokens"]) == 6
    assert "warning" not in err
    assert not _files(cache) and not _files(tmp_path / "home") and not _files(tmp_path / "xdg")


def test_flag_opt_out_reaches_the_cache_setup(ckpt, monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, disable=False):
            seen.append(disable)

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(generate_cli, "compile_cache", Recorder)
    monkeypatch.setattr(generate_cli, "_generate", lambda args, cache_dir: 0)
    assert cli.main(["generate", "--checkpoint", str(ckpt), *ARGS, "--no-compile-cache"]) == 0
    assert cli.main(["generate", "--checkpoint", str(ckpt), *ARGS]) == 0
    assert seen == [True, False]


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(cli_common.CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cli_common.compile_cache_dir() == str(tmp_path / "h" / ".cache" / "dsref" / "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cli_common.compile_cache_dir() == str(tmp_path / "x" / "dsref" / "jax")
    monkeypatch.setenv(cli_common.CACHE_DIR_ENV, str(tmp_path / "d"))
    assert cli_common.compile_cache_dir() == str(tmp_path / "d")
    for v, off in (("1", True), ("yes", True), ("0", False), ("", False), ("false", False)):
        monkeypatch.setenv(cli_common.NO_COMPILE_CACHE_ENV, v)
        assert cli_common.compile_cache_disabled() is off


def test_cache_setting_is_scoped_to_the_command(tmp_path, monkeypatch):
    import jax
    monkeypatch.delenv(cli_common.NO_COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv(cli_common.CACHE_DIR_ENV, str(tmp_path / "c"))
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    with cli_common.compile_cache() as d:
        assert d == str(tmp_path / "c") and os.path.isdir(d)
        assert jax.config.jax_compilation_cache_dir == d
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before
    with cli_common.compile_cache(disable=True) as d:
        assert d is None and jax.config.jax_compilation_cache_dir == before[0]


def test_uncreatable_cache_dir_only_warns(ckpt, tmp_path, monkeypatch, capsys):
    import jax
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.delenv(cli_common.NO_COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv(cli_common.CACHE_DIR_ENV, str(blocker / "cache"))
    before = jax.config.jax_compilation_cache_dir
    assert cli.main(["generate", "--checkpoint", str(ckpt), *ARGS, "--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["compile_cache_dir"] is None and len(out["tokens"]) == 6
    assert cap.err.count("warning") == 1 and str(blocker / "cache") in cap.err and "continuing without it" in cap.err
    with cli_common.compile_cache() as d:  # warned once per directory and process
        assert d is None
    assert capsys.readouterr().err == ""
    assert jax.config.jax_compilation_cache_dir == before and blocker.read_text() == "not a directory"
