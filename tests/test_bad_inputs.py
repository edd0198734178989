"""Careless and hostile input to `dsref generate`, `dsref hw` and `dsref init-checkpoint`.

The project's standard: exit 2 and one line naming the option or file (``dsref: error:``, or
argparse's ``dsref generate: error: argument --top-p: ...`` after its usage lines), no
traceback, nothing written outside the output path. Every row runs in-process through
the CLI root's ``main`` (``dsref.experiments.cli``) in an empty working directory that must stay empty.
"""
from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st


def run(argv: list[str]) -> int:
    """The CLI root's main(argv); argparse's SystemExit becomes its code."""
    from dsref.experiments.cli import main
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return 0 if e.code is None else e.code


@contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under path -> (size, mtime_ns): to assert nothing changed."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """A tiny-v3 checkpoint made by `dsref init-checkpoint` (byte-level tokenizer, no MTP
    weights, max_position_embeddings 128, vocab 256) and some broken variants of it."""
    base = tmp_path_factory.mktemp("bad_inputs")
    ck = base / "ck"
    with _cwd(base):
        assert run(["init-checkpoint", "--preset", "tiny-v3", "--out", "ck", "--tokenizer", "--dtype",
                    "float32", "--seed", "3"]) == 0
    no_tok = base / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(ck / f, no_tok / f)
    bad_tok = base / "bad_tok"
    shutil.copytree(no_tok, bad_tok)
    (bad_tok / "tokenizer.json").write_text("{not json")
    pickled = base / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    binary = base / "binary.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    garbage = base / "garbage.toml"
    garbage.write_text("this is = = not toml\n")
    full = base / "full"  # a non-empty --out
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    a_file = base / "a_file"
    a_file.write_text("precious")
    return {"ck": ck, "no_tok": no_tok, "bad_tok": bad_tok, "pickled": pickled, "binary": binary,
            "garbage": garbage, "full": full, "a_file": a_file, "dir": base, "missing": base / "missing"}


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def check_refusal(code: int, capsys, fragments, cwd: Path) -> str:
    """Exit 2, one error line naming what was wrong, no traceback, nothing on stdout or in cwd."""
    cap = capsys.readouterr()
    assert code == 2, (code, cap.err)
    assert "Traceback" not in cap.err + cap.out
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert lines, "no error message"
    err = lines[-1]
    if err.startswith("dsref: error: "):
        assert len(lines) == 1, cap.err  # our own refusals: exactly one line
    else:  # argparse: usage lines, then `dsref SUB: error: argument --opt: ...`
        assert err.startswith("dsref") and ": error: " in err, cap.err
        assert all(ln.startswith(("usage:", " ")) for ln in lines[:-1]), cap.err
    for frag in fragments:
        assert frag in err, (frag, err)
    assert cap.out == "", "output printed before the refusal"
    assert list(cwd.iterdir()) == [], "something was written"
    return err


# ------------------------------------------------------------------ the table
G = ["generate", "--checkpoint", "{ck}"]
T = G + ["--tokens", "1,2,3"]
ROWS = [
    # --- generate: numbers (argparse, before anything is loaded)
    (T + ["--temperature", "nan"], ["--temperature"]),
    (T + ["--temperature", "inf"], ["--temperature"]),
    (T + ["--temperature", "1e999"], ["--temperature"]),
    (T + ["--temperature=-1"], ["--temperature"]),
    (T + ["--temperature", "hot"], ["--temperature"]),
    (T + ["--top-p", "0"], ["--top-p"]),
    (T + ["--top-p", "1.5"], ["--top-p"]),
    (T + ["--top-p", "nan"], ["--top-p"]),
    (T + ["--top-p=-0.5"], ["--top-p"]),
    (T + ["--top-k=-1"], ["--top-k"]),
    (T + ["--top-k", "2.5"], ["--top-k"]),
    (T + ["--top-k", "ten"], ["--top-k"]),
    (T + ["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (T + ["--max-new-tokens=-5"], ["--max-new-tokens"]),
    (T + ["--max-new-tokens", "1e3"], ["--max-new-tokens"]),
    (T + ["--max-new-tokens", ""], ["--max-new-tokens"]),
    (T + ["--seed=-1"], ["--seed"]),
    (T + ["--seed", "1.5"], ["--seed"]),
    (T + ["--seed", str(2**63)], ["--seed"]),
    (T + ["--stop", "abc"], ["--stop", "abc"]),
    (T + ["--stop", "1", "-2"], ["--stop"]),
    (T + ["--dtype", "float16"], ["--dtype"]),
    # --- generate: the prompt
    (G + ["--tokens", "1,,2"], ["--tokens", "1,,2"]),
    (G + ["--tokens=1,-2,3"], ["--tokens"]),
    (G + ["--tokens", "a,b"], ["--tokens"]),
    (G + ["--tokens="], ["--tokens"]),
    (G + ["--tokens", ","], ["--tokens"]),
    (G + ["--tokens", "1 2"], ["--tokens"]),
    (G + ["--tokens", "+1"], ["--tokens"]),
    (G + ["--tokens", "1,2,999"], ["--tokens", "999", "vocab_size is 256"]),
    (G, ["--prompt", "--tokens"]),
    (G + ["--tokens", "1", "--prompt", "x"], ["--prompt", "--tokens"]),
    (G + ["--prompt="], ["--prompt"]),
    (["generate", "--checkpoint", "{no_tok}", "--prompt", "def f"], ["no_tok", "tokenizer.json"]),
    (["generate", "--checkpoint", "{bad_tok}", "--prompt", "def f"], ["bad_tok", "tokenizer.json"]),
    # --- generate: limits of the checkpoint
    (T + ["--mtp"], ["MTP weights", "are missing", "/ck"]),
    (T + ["--mtp", "--temperature", "0.7"], ["--mtp", "--temperature"]),
    (T + ["--mtp", "--layers", "unrolled"], ["--mtp", "--layers unrolled"]),
    (T + ["--layers", "sideways"], ["--layers", "sideways"]),
    (T + ["--max-new-tokens", "126"], ["--max-new-tokens", "128", "at most 125 new tokens"]),
    (T + ["--max-new-tokens", "100000000"], ["--max-new-tokens", "100000000", "128"]),
    (T + ["--max-new-tokens", "100000000000"], ["--max-new-tokens", "100000000000", "128"]),
    # --- generate: the checkpoint path
    (["generate", "--checkpoint", "{missing}", "--tokens", "1"], ["missing"]),
    (["generate", "--checkpoint", "{a_file}", "--tokens", "1"], ["a_file"]),
    (["generate", "--checkpoint", "{pickled}", "--tokens", "1"], ["pytorch_model.bin", "never unpickle"]),
    (["generate", "--tokens", "1"], ["--checkpoint"]),
    # --- hw
    (["hw", "show", "nosuchdevice"], ["nosuchdevice", "h100", "known systems"]),
    (["hw", "show", "{missing}/x.toml"], ["x.toml", "not found"]),
    (["hw", "show", "{dir}/"], ["bad_inputs"]),
    (["hw", "show", "{binary}"], ["binary.toml"]),
    (["hw", "show", "{garbage}"], ["garbage.toml"]),
    (["hw", "nosuch"], ["invalid choice", "nosuch"]),
    (["hw", "probe", "--out", "{dir}"], ["--out", "is a directory"]),
    (["hw", "probe", "--out", "{a_file}/host.toml"], ["--out", "a_file"]),
    (["hw", "probe", "--out", ""], ["--out"]),
    # --- init-checkpoint
    (["init-checkpoint", "--preset", "nope", "--out", "x"], ["--preset", "nope"]),
    (["init-checkpoint", "--preset", "qwen2.5-72b", "--out", "x"], ["--preset", "qwen2.5-72b", "simulator"]),
    (["init-checkpoint", "--preset", "deepseek-v3", "--out", "x"], ["--preset", "deepseek-v3", "GiB"]),
    (["init-checkpoint", "--preset", "moonlight", "--mtp", "--out", "x"], ["--mtp", "moonlight"]),
    (["init-checkpoint", "--preset", "tiny-v3", "--out", "{full}"], ["--out", "full", "not empty"]),
    (["init-checkpoint", "--preset", "tiny-v3", "--out", "{a_file}"], ["--out", "a_file"]),
    (["init-checkpoint", "--preset", "tiny-v3", "--out", "{missing}/x"], ["--out", "missing"]),
    (["init-checkpoint", "--preset", "tiny-v3", "--out", ""], ["--out"]),
    (["init-checkpoint", "--preset", "tiny-v3"], ["--out"]),
    (["init-checkpoint", "--preset", "tiny-v3", "--out", "x", "--dtype", "int4"], ["--dtype"]),
    (["init-checkpoint", "--preset", "tiny-v3", "--out", "x", "--seed=-1"], ["--seed"]),
]


@pytest.mark.parametrize("argv,fragments", ROWS, ids=[" ".join(r[0][1 if r[0][0] == "generate" else 0:])[:60]
                                                       for r in ROWS])
def test_bad_input_is_refused(argv, fragments, files, empty_cwd, capsys):
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    before = tree(files["dir"])
    capsys.readouterr()
    check_refusal(run(argv), capsys, fragments, empty_cwd)
    assert tree(files["dir"]) == before  # the checkpoints, --out dirs and files are untouched


def test_generate_refuses_a_cache_larger_than_memory(files, empty_cwd, capsys, monkeypatch):
    from dsref.reference import generate_cli
    monkeypatch.setattr(generate_cli, "_available_memory", lambda jax: (1000, "test"))
    err = check_refusal(run(G[:2] + [str(files["ck"]), "--tokens", "1,2,3", "--max-new-tokens", "8"]), capsys,
                        ["--max-new-tokens", "GiB"], empty_cwd)
    assert "available" in err


def test_cache_size_is_what_generate_allocates():
    from flax import nnx

    from dsref.reference.decode import cache_bytes, init_cache, kv_cache_alloc_bytes, kv_cache_length
    from dsref.reference.model import DeepseekModel
    from dsref.reference.presets import get_preset
    cfg = get_preset("tiny-v3")
    model = DeepseekModel(cfg, rngs=nnx.Rngs(0))
    S = kv_cache_length(5, 20)
    assert S == 32 and kv_cache_length(5, 20, use_mtp=True) == 32 and kv_cache_length(5, 27, use_mtp=True) == 64
    for form in ("absorbed", "naive"):
        got = cache_bytes(init_cache(model, 2, S, form)) + 0
        assert kv_cache_alloc_bytes(cfg, 2, S, 4, form) == got
    mtp = cache_bytes(init_cache(model, 2, S)) + cache_bytes(init_cache(model, 2, S, layers=1))
    assert kv_cache_alloc_bytes(cfg, 2, S, 4, use_mtp=True) == mtp


def test_generate_api_rejects_bad_sampling():
    """decode.generate checks what the CLI checks, before compiling anything."""
    from flax import nnx

    from dsref.reference.decode import SEED_MAX, generate
    from dsref.reference.model import DeepseekModel
    from dsref.reference.presets import get_preset
    from dsref.reference import cli_common
    assert cli_common.seed(str(SEED_MAX)) == SEED_MAX  # the CLI accepts exactly the seeds generate() does
    model = DeepseekModel(get_preset("tiny-v3"), rngs=nnx.Rngs(0))
    bad = [dict(temperature=float("nan")), dict(temperature=-1.0), dict(temperature=float("inf")),
           dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")), dict(top_k=-1), dict(top_k=2.5),
           dict(seed=-1), dict(seed=2**63), dict(max_new_tokens=0), dict(max_new_tokens=2.0)]
    for kw in bad:
        n = kw.pop("max_new_tokens", 2)
        name = next(iter(kw), "max_new_tokens")
        with pytest.raises(ValueError, match=name):
            generate(model, [[1, 2]], n, **kw)


# ------------------------------------------------------------------ init-checkpoint
def test_init_checkpoint_then_generate(files, tmp_path, capsys, monkeypatch):
    ck = files["ck"]
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not [p for p in files["dir"].iterdir() if ".tmp-" in p.name]  # no temp dir left beside it
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert run(["generate", "--checkpoint", str(ck), "--prompt", "def f", "--max-new-tokens", "4"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("def f") and "Traceback" not in cap.err
    # an empty existing directory is fine, and filled
    (tmp_path / "empty").mkdir()
    assert run(["init-checkpoint", "--preset", "tiny-v2-lite", "--out", "empty", "--dtype", "fp8"]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_init_checkpoint_is_atomic(tmp_path, capsys, monkeypatch):
    """A failure halfway leaves neither --out nor the temporary directory behind."""
    from dsref.reference import checkpoint
    monkeypatch.chdir(tmp_path)

    def boom(model, cfg, out, **kw):
        (Path(out) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", boom)
    capsys.readouterr()
    check_refusal(run(["init-checkpoint", "--preset", "tiny-v3", "--out", "ck"]), capsys,
                  ["--out ck", "No space left"], tmp_path)

    def interrupted(model, cfg, out, **kw):
        (Path(out) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(["init-checkpoint", "--preset", "tiny-v3", "--out", "ck"])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ properties
def _examples(*values):
    def deco(f):
        for v in values:
            f = example(v)(f)
        return f
    return deco


_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_NUM_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-10**20, max_value=10**20).map(str),
    st.sampled_from(["", " ", "nan", "-nan", "inf", "-inf", "1e999", "0x10", "1_0", "½", "٣", "0.5\n", "--1"]),
    st.text(max_size=8),
)


def _property(option: str, value: str, files, capsys, extra=()):
    """Either it runs (exit 0) or it exits 2 with one line naming the option; never a traceback."""
    cwd = files["dir"] / "prop_cwd"
    cwd.mkdir(exist_ok=True)
    with _cwd(cwd):
        code = run(["generate", "--checkpoint", str(files["ck"]), "--tokens", "1,2,3", "--json",
                    f"{option}={value}", *extra])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    if code == 0:
        return True
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert code == 2 and lines and option in lines[-1], (value, cap.err)
    assert cap.out == "" and list(cwd.iterdir()) == []
    return False


@_SETTINGS
@given(value=_NUM_TEXT)
@_examples("0", "0.7", "1e-300", "1e300", "-0.0", "nan")
def test_property_temperature(files, capsys, value):
    ok = _property("--temperature", value, files, capsys, ["--max-new-tokens", "1"])
    try:
        v = float(value)
    except ValueError:
        return
    if ok:
        assert math.isfinite(v) and v >= 0


@_SETTINGS
@given(value=_NUM_TEXT)
@_examples("1", "0.5", "1e-300", "0", "1.0000001")
def test_property_top_p(files, capsys, value):
    ok = _property("--top-p", value, files, capsys, ["--max-new-tokens", "1", "--temperature", "1"])
    if ok:
        assert 0 < float(value) <= 1


@_SETTINGS
@given(value=st.one_of(st.integers(min_value=-10**6, max_value=10**12).map(str), _NUM_TEXT))
@_examples("0", "3", "255", "256", "100000000000", "-1")
def test_property_top_k(files, capsys, value):
    ok = _property("--top-k", value, files, capsys, ["--max-new-tokens", "1", "--temperature", "1"])
    if ok:
        assert int(value) >= 0


# 13..125 new tokens are valid too but need a larger (freshly compiled) cache bucket; left out
# to keep this cheap (3 prompt tokens + 12 + 1 fill the 16-slot bucket).
@_SETTINGS
@given(value=st.one_of(st.integers(max_value=12).map(str), st.integers(min_value=126).map(str), _NUM_TEXT)
       .filter(lambda s: not (s.strip().isdigit() and s.strip().isascii() and 12 < int(s) <= 125)))
@_examples("1", "12", "126", "0", str(10**11))
def test_property_max_new_tokens(files, capsys, value):
    ok = _property("--max-new-tokens", value, files, capsys)
    if ok:
        assert 1 <= int(value) <= 125
