"""Bad input to `dsref sim local|serve|train`, `dsref info`, `dsref golden` and `dsref compare`:
exit 2 and one line naming the option or file, no traceback, nothing written into the working
directory (the project standard; tests/test_bad_inputs.py covers generate and hw). Every case runs
in-process through the CLI root's main(argv).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsref.experiments.cli import main


def _tree(path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def _run(argv, capsys) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr, argparse error?) of `dsref argv`."""
    capsys.readouterr()
    try:
        rc, parse_error = main(argv), False
    except SystemExit as e:  # argparse
        rc, parse_error = e.code, True
    out, err = capsys.readouterr()
    return rc, out, err, parse_error


@pytest.fixture(scope="session")
def dumps(tmp_path_factory):
    """A one-case conformance kit's checkpoint, a float64 reference dump, and candidates that are all
    zeros, all NaN, and the reference with one Inf."""
    from dsref.reference.oracle import conformance, golden
    d = tmp_path_factory.mktemp("oracle")
    kit = conformance.write_kit(d / "kit", ["dense-first-k"])
    ck = kit / "dense-first-k" / "checkpoint"
    ref = golden.write_golden(ck, golden.load_tokens(kit / "dense-first-k" / "tokens.npy"), d / "ref.safetensors",
                              "float64")
    t, meta = golden.read_dump(ref)
    golden.write_dump({k: np.zeros_like(v) for k, v in t.items()}, d / "zero.safetensors", meta)
    golden.write_dump({k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in t.items()},
                      d / "nan.safetensors", meta)
    inf = dict(t)
    inf["layers.0.hidden"] = t["layers.0.hidden"].copy()
    inf["layers.0.hidden"].flat[3] = np.inf
    golden.write_dump(inf, d / "inf.safetensors", meta)
    return {"dir": d, "ck": str(ck), "ref": str(ref), **{k: str(d / f"{k}.safetensors") for k in ("zero", "nan", "inf")}}


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with careless inputs in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty.toml").write_text("")
    (tmp_path / "dev.toml").write_text('kind = "serve"\nmodel = "deepseek-v2-lite"\nsystem = "h800"\n')
    (tmp_path / "seed.toml").write_text('kind = "serve"\nmodel = "deepseek-v2-lite"\nsystem = "h800-node"\n'
                                        'mode = "aggregated"\nseed = -3\n')
    (tmp_path / "long.toml").write_text('kind = "serve"\nmodel = "deepseek-v2-lite"\nsystem = "h800-node"\n'
                                        'mode = "aggregated"\nduration_s = 1e9\n')
    (tmp_path / "tr.toml").write_text('kind = "train"\nmodel = "deepseek-v2-lite"\nsystem = "h800-cluster-2048"\n'
                                      "nodes = 1000\n")
    base = 'kind = "serve"\nmodel = "deepseek-v2-lite"\nsystem = "h800-node"\nmode = "aggregated"\n'
    (tmp_path / "samp.toml").write_text(base + "sample_interval_s = 1e-9\n")
    (tmp_path / "trdir.toml").write_text(base + '[workload]\narrival = "trace"\ntrace = "adir"\n')
    (tmp_path / "trbin.toml").write_text(base + '[workload]\narrival = "trace"\ntrace = "toks.npy"\n')
    (tmp_path / "toks.txt").write_text("1 2 3\n")
    np.save(tmp_path / "toks.npy", np.array([[1, 2, 3]], np.uint64))
    np.save(tmp_path / "u64.npy", np.array([[1, 2**63 + 5]], np.uint64))
    np.save(tmp_path / "f.npy", np.zeros((1, 3)))
    np.save(tmp_path / "neg.npy", np.array([[-1, 2]]))
    np.save(tmp_path / "oob.npy", np.array([[1, 100_000]]))
    np.save(tmp_path / "ok.npy", np.array([[1, 2]], np.int32))
    np.save(tmp_path / "long.npy", np.zeros((1, 65), np.int32))  # the kit checkpoint: 64 positions
    return tmp_path


LOCAL = ["sim", "local", "--model", "tiny-v3", "--device", "h800"]
SERVE = ["sim", "serve", "--scenario", "single-node-h800"]
TRAIN = ["sim", "train", "--scenario", "deepseek-v3-pretrain"]

# (argv, fragment of the message). {ck}, {ref} etc. are filled from the dumps fixture.
CASES = [
    # output paths that cannot be written: one line, before any work
    (["validate", "--out-dir", "toks.txt"], "--out-dir"),
    (["validate", "--out-dir", ""], "--out-dir"),
    (["conformance", "write", "toks.txt"], "toks.txt"),
    (SERVE + ["--rate", "1e300"], "--rate"),
    # sim local: every size option, both bounds, non-integers
    (LOCAL + ["--batch", "-3"], "--batch"),
    (LOCAL + ["--batch", "0"], "--batch"),
    (LOCAL + ["--batch", "abc"], "--batch"),
    (LOCAL + ["--batch", ""], "--batch"),
    (LOCAL + ["--batch", "65537"], "65,536"),
    (LOCAL + ["--context", "-1"], "--context"),
    (LOCAL + ["--context", "0"], "--context"),
    (LOCAL + ["--context", "99999999999999999999"], "--context"),
    (LOCAL + ["--prompt-tokens", "0"], "--prompt-tokens"),
    (LOCAL + ["--prompt-tokens", "1.5"], "--prompt-tokens"),
    (LOCAL + ["--batch", "65536", "--prompt-tokens", "2048"], "--batch x --prompt-tokens"),
    (["sim", "local", "--model", "toks.npy", "--device", "h800"], "--model toks.npy: a binary file"),
    (["sim", "local", "--model", "adir", "--device", "h800"], "--model adir: a directory without config.json"),
    (["sim", "local", "--model", "", "--device", "h800"], "--model: empty"),
    (["sim", "local", "--model", "nope", "--device", "h800"], "no such preset"),
    (["sim", "local", "--model", "tiny-v3", "--device", ""], "--device: empty"),
    (["sim", "local", "--model", "tiny-v3", "--device", "nope"], "--device nope"),
    (["sim", "local", "--model", "tiny-v3", "--device", "adir"], "--device adir"),
    (LOCAL + ["--quant", "nope"], "--quant nope"),
    # sim serve: numeric options, scenario files, output paths
    (SERVE + ["--duration", "inf"], "--duration"),
    (SERVE + ["--duration", "nan"], "--duration"),
    (SERVE + ["--duration", "1e12"], "86,400"),
    (SERVE + ["--duration", "0"], "--duration"),
    (SERVE + ["--duration", "-5"], "--duration"),
    (SERVE + ["--duration", ""], "--duration"),
    (SERVE + ["--seed", "-1"], "--seed"),
    (SERVE + ["--seed", "1.5"], "--seed"),
    (SERVE + ["--rate", "0"], "--rate"),
    (SERVE + ["--rate", "-1"], "--rate"),
    (SERVE + ["--rate", "nan"], "--rate"),
    (SERVE + ["--rate", "inf"], "--rate"),
    (SERVE + ["--scale", "0"], "--scale"),
    (SERVE + ["--scale", "5000"], "--scale"),
    (SERVE + ["--rate", "1e9", "--duration", "10"], "--rate x --duration"),
    (["sim", "serve", "--scenario", "empty.toml"], "empty.toml: field 'kind': required"),
    (["sim", "serve", "--scenario", "dev.toml"], "'h800' is a device, not a system"),
    (["sim", "serve", "--scenario", "seed.toml"], "seed.toml: field 'seed'"),
    (["sim", "serve", "--scenario", "long.toml"], "long.toml: field 'duration_s'"),
    (["sim", "serve", "--scenario", "adir"], "adir: field 'scenario': not a file"),
    (["sim", "serve", "--scenario", "toks.npy"], "toks.npy: field 'toml'"),
    (["sim", "serve", "--scenario", ""], "--scenario"),
    (["sim", "serve", "--scenario", "nosuch"], "nosuch: field 'scenario': unknown scenario"),
    (["sim", "serve", "--scenario", "samp.toml"], "samp.toml: field 'sample_interval_s'"),
    (["sim", "serve", "--scenario", "trdir.toml"], "trdir.toml: field 'workload.trace': not a file"),
    (["sim", "serve", "--scenario", "trbin.toml"], "trbin.toml: field 'workload.trace': not a JSONL text file"),
    (["sim", "serve", "--scenario", "deepseek-day6", "--sweep", "--duration", "20000"], "--sweep"),
    (SERVE + ["--trace", "adir"], "--trace adir: is a directory"),
    (SERVE + ["--plot", "nodir/x.png"], "--plot nodir/x.png"),
    (SERVE + ["--trace", ""], "--trace: empty"),
    (["sim", "serve", "--scenario", "deepseek-v3-pretrain"], "use `dsref sim train`"),
    # sim train
    (TRAIN + ["--nodes", "0"], "--nodes"),
    (TRAIN + ["--nodes", "-1"], "--nodes"),
    (TRAIN + ["--nodes", "1.5"], "--nodes"),
    (TRAIN + ["--nodes", ""], "--nodes"),
    (TRAIN + ["--nodes", "512"], "--nodes 512: system h800-cluster-2048 has 256 nodes"),
    (TRAIN + ["--trace", "adir"], "--trace adir"),
    (TRAIN + ["--plot", "nodir/x.png"], "--plot nodir/x.png"),
    (["sim", "train", "--scenario", "tr.toml"], "tr.toml: field 'nodes'"),
    (["sim", "train", "--scenario", "empty.toml"], "field 'kind': required"),
    # dsref info MODEL
    (["info", "toks.npy"], "MODEL toks.npy: a binary file"),
    (["info", "adir"], "MODEL adir: a directory without config.json"),
    (["info", ""], "MODEL: empty"),
    (["info", "no-such-model"], "checkpoint directory with config.json"),
    (["info", "toks.txt"], "MODEL toks.txt: not a model config.json"),
    # compare: tolerances and files
    (["compare", "{ref}", "{ref}", "--rtol", "-1"], "--rtol"),
    (["compare", "{ref}", "{ref}", "--rtol", "nan"], "--rtol"),
    (["compare", "{ref}", "{ref}", "--rtol", "inf"], "--rtol"),
    (["compare", "{ref}", "{ref}", "--atol", "-1"], "--atol"),
    (["compare", "{ref}", "{ref}", "--atol", "inf"], "--atol"),
    (["compare", "{ref}", "{ref}", "--tol", "cos=2"], "--tol 'cos=2'"),
    (["compare", "{ref}", "{ref}", "--tol", "routing=-0.1"], "--tol 'routing=-0.1'"),
    (["compare", "{ref}", "{ref}", "--tol", "rel=nan"], "--tol 'rel=nan'"),
    (["compare", "{ref}", "{ref}", "--tol", "foo=1"], "unknown tolerance 'foo'"),
    (["compare", "", "{ref}"], "REFERENCE: empty"),
    (["compare", "{ref}", "adir"], "adir: not a file"),
    (["compare", "{ref}", "toks.txt"], "toks.txt"),
    # golden --tokens / --out / --checkpoint
    (["golden", "--checkpoint", "{ck}", "--out", "o.safetensors", "--tokens", "toks.txt"],
     "--tokens toks.txt: not a .npy integer array"),
    (["golden", "--checkpoint", "{ck}", "--out", "o.safetensors", "--tokens", "u64.npy"], "dtype uint64"),
    (["golden", "--checkpoint", "{ck}", "--out", "o.safetensors", "--tokens", "f.npy"], "dtype float64"),
    (["golden", "--checkpoint", "{ck}", "--out", "o.safetensors", "--tokens", "neg.npy"], "neg.npy: token ids"),
    (["golden", "--checkpoint", "{ck}", "--out", "o.safetensors", "--tokens", "oob.npy"], "oob.npy: token ids"),
    (["golden", "--checkpoint", "{ck}", "--out", "o.safetensors", "--tokens", "adir"], "--tokens adir"),
    (["golden", "--checkpoint", "{ck}", "--out", "o.safetensors", "--tokens", "long.npy"],
     "--tokens long.npy: sequence length 65 exceeds the model's max_position_embeddings 64"),
    (["golden", "--checkpoint", "{ck}", "--out", "o.safetensors", "--tokens", ""], "--tokens: empty"),
    (["golden", "--checkpoint", "{ck}", "--out", "adir", "--tokens", "ok.npy"], "--out adir"),
    (["golden", "--checkpoint", "{ck}", "--out", "nodir/o.safetensors", "--tokens", "ok.npy"], "--out nodir"),
    (["golden", "--checkpoint", "toks.txt", "--out", "o.safetensors", "--tokens", "ok.npy"],
     "--checkpoint toks.txt"),
]


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(a)[:70] for a, _ in CASES])
def test_refused(argv, fragment, work, dumps, capsys):
    argv = [a.format(**dumps) for a in argv]
    before, before_dumps = _tree(work), _tree(dumps["dir"])
    rc, out, err, parse_error = _run(argv, capsys)
    assert rc == 2, (argv, out, err)
    assert "Traceback" not in err + out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if parse_error:  # argparse: usage, then one line naming the option
        assert lines and lines[-1].startswith("dsref") and "error: argument" in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("dsref: error: "), err
        assert out == ""
    assert fragment in lines[-1], (fragment, err)
    assert _tree(work) == before and _tree(dumps["dir"]) == before_dumps


# ------------------------------------------------------------------ results that are not refusals
def test_compare_zero_candidate_says_not_compared(dumps, capsys):
    rc, out, err, _ = _run(["compare", dumps["ref"], dumps["zero"]], capsys)
    assert rc == 1 and "Traceback" not in err
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith(("layers.", "logits"))}
    assert "not compared" in rows["logits"] and "  ok" not in rows["logits"]
    assert not any(r.rstrip().endswith(" ok") for n, r in rows.items() if "not compared" in r)
    assert "not compared" in out.splitlines()[-1]
    rc, out, _, _ = _run(["compare", dumps["ref"], dumps["zero"], "--json"], capsys)
    js = json.loads(out)
    t = {r["name"]: r for r in js["tensors"]}
    assert t["logits"]["compared"] is False and "ok" in t["logits"] and "why" in t["logits"]
    assert {"reference", "candidate", "ok", "first_failure", "first_failing_layer", "tensors"} <= set(js)


@pytest.mark.parametrize("which,what", [("nan", "NaN"), ("inf", "Inf")])
def test_compare_nonfinite_candidate_named(which, what, dumps, capsys):
    rc, out, err, _ = _run(["compare", dumps["ref"], dumps[which]], capsys)
    assert rc == 1 and "Traceback" not in err
    bad = [ln for ln in out.splitlines() if f" {what} " in ln]
    assert bad and all("FAIL" in ln and ln.startswith(("layers.", "logits")) for ln in bad)
    assert any(ln.startswith("layers.0.hidden") for ln in bad)
    rc, out, _, _ = _run(["compare", dumps["ref"], dumps[which], "--json"], capsys)
    js = json.loads(out)  # strict JSON: no NaN/Infinity tokens for the failed rows
    row = next(r for r in js["tensors"] if r["name"] == "layers.0.hidden")
    assert row["ok"] is False and row["nonfinite"][what] >= 1 and what in row["why"]


def test_compare_identical_passes_with_zero_tolerance(dumps, capsys):
    rc, out, _, _ = _run(["compare", dumps["ref"], dumps["ref"], "--rtol", "0", "--atol", "0"], capsys)
    assert rc == 0 and "PASS" in out and "not compared" not in out


def test_serve_short_run_warns(work, capsys):
    before = _tree(work)
    rc, out, err, _ = _run(SERVE + ["--duration", "5", "--json"], capsys)
    assert rc == 0 and "Traceback" not in err
    warn = [ln for ln in err.splitlines() if ln.startswith("dsref: warning:")]
    unfinished = [w for w in warn if "unfinished" in w]
    assert len(unfinished) == 1 and "--duration" in unfinished[0]
    assert all("not steady" in w for w in warn if w not in unfinished)  # the steady-state check may add one
    js = json.loads(out)
    assert js["warnings"] and "unfinished" in js["warnings"][0]
    assert _tree(work) == before


def test_steady_state_warning_threshold():
    from dsref.sim.serve_cli import UNFINISHED_WARN, steady_state_warnings
    r = {"requests_arrived": 1000, "rejected": 0, "requests_finished": 960, "duration_s": 600.0}
    assert steady_state_warnings(r) == []
    r["requests_finished"] = int(1000 * (1 - UNFINISHED_WARN)) - 100
    (w,) = steady_state_warnings(r)
    assert "20% of the 1,000 admitted requests" in w and "--duration" in w
    assert steady_state_warnings({**r, "requests_arrived": 0}) == []


def test_estimate_api_names_the_argument():
    from dsref.sim.local import MAX_BATCH, estimate
    from dsref.sim.cli import MAX_BATCH as CLI_MAX_BATCH
    assert MAX_BATCH == CLI_MAX_BATCH
    for kw, name in ((dict(batch=-3), "batch"), (dict(batch=0), "batch"), (dict(context=-1), "context"),
                     (dict(prompt_tokens=0), "prompt_tokens"), (dict(context=1.5), "context"),
                     (dict(batch=True), "batch"), (dict(batch=MAX_BATCH + 1), "batch")):
        with pytest.raises(ValueError, match=name):
            estimate("tiny-v3", "h800", **kw)


# ------------------------------------------------------------------ properties
PROP = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_junk = st.sampled_from(["", " ", "nan", "inf", "-inf", "1e3", "abc", "-0", "0x10", "1_0", "١٢"])


def _check_option(rc, err, option):
    assert "Traceback" not in err
    if rc == 2:
        assert option in err.strip().splitlines()[-1], err
    else:
        assert rc in (0, 1), err


@PROP
@given(option=st.sampled_from(["--batch", "--context", "--prompt-tokens"]),
       value=st.one_of(st.integers(-10**20, 64).map(str), st.integers(2**16 + 1, 10**22).map(str), _junk))
def test_local_sizes_property(option, value, capsys):
    rc, out, err, _ = _run(LOCAL + [option, value], capsys)
    _check_option(rc, err, option)


@PROP
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=8), _junk))
def test_serve_duration_property(value, capsys):
    """The validation layer (parsing only: a valid run would simulate): a value parses to a finite
    duration in (0, one day], or exits 2 naming --duration."""
    from dsref.experiments.cli import build_parser
    from dsref.sim.serve_cli import MAX_DURATION_S
    try:
        args = build_parser().parse_args(SERVE + ["--duration", value])
    except SystemExit as e:
        assert e.code == 2
        assert "--duration" in capsys.readouterr().err.strip().splitlines()[-1]
        return
    assert math.isfinite(args.duration) and 0 < args.duration <= MAX_DURATION_S


@PROP
@given(value=st.sampled_from(["0.5", "1", "2", "3"]))
def test_serve_tiny_runs_property(value, capsys):
    rc, out, err, _ = _run(SERVE + ["--duration", value, "--json", "--seed", value.split(".")[0]], capsys)
    assert rc == 0 and "Traceback" not in err and json.loads(out)["duration_s"] == float(value)


@PROP
@given(option=st.sampled_from(["--rtol", "--atol"]),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=6), _junk))
def test_compare_tolerance_property(option, value, dumps, capsys):
    rc, out, err, _ = _run(["compare", dumps["ref"], dumps["nan"], option, value], capsys)
    _check_option(rc, err, option)
    rc, out, err, _ = _run(["compare", dumps["ref"], dumps["ref"], option, value], capsys)
    _check_option(rc, err, option)
    if rc != 2:
        assert rc == 0  # identical dumps pass under any accepted tolerance


def test_command_line_bounds_equal_the_api_bounds():
    """sim/cli.py keeps its own MAX_BATCH so that building the parser imports no numpy; it must be
    sim.local's (the API refuses exactly what the command line refuses)."""
    from dsref.sim import cli, local
    assert cli.MAX_BATCH == local.MAX_BATCH
