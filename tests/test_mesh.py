"""The model over a device mesh gives what one device gives (reference/mesh.py,
reference/expert_parallel.py, reference/sharded_load.py).

Every layout in ``mesh.LAYOUTS`` (the ones docs/scaling.md describes) runs on 8 simulated CPU
devices in a worker process (tests/mesh_worker.py: the device count is fixed when JAX starts),
on an FP8 checkpoint loaded shard by shard: the loaded weights, the logits and every layer's
captures (float32, relative <= 1e-5), the routing (exact) and greedy generation (with batch
padding, and MTP self-speculation once) are compared with one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsref.reference.expert_parallel import dispatch_slots
from dsref.reference.mesh import AXES, LAYOUTS, MeshError, MeshShape, dim_spec, padded_batch, parse_mesh
from dsref.reference.params import tensors
from dsref.reference.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


#: By default the layouts that combine axes (each axis appears, and each pair); the single-axis
#: ones run with `pytest -m expensive` (CI time: each layout compiles ~30 programs).
COMBINED = ["data x expert", "expert x tensor", "data x expert x tensor"]


def run_layouts(tmp_path, names: list[str]) -> dict:
    """Run the worker on these layouts, in two processes at once (compiling is single-threaded)."""
    halves = [names[0::2], names[1::2]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "mesh_worker.py"), str(tmp_path / f"{i}.json"),
                               *h], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, h in enumerate(halves)]
    results = {}
    try:
        for i, p in enumerate(procs):
            out, _ = p.communicate(timeout=1200)
            assert p.returncode == 0, out[-4000:]
            results.update(json.loads((tmp_path / f"{i}.json").read_text()))
    finally:
        for p in procs:
            p.kill()
    return results


def layout_problems(name: str, r: dict) -> list[str]:
    """What differs from one device on one layout (empty: nothing)."""
    bad = []
    if not r["load_equal"]:
        bad.append("weights read shard by shard differ from the whole-checkpoint load")
    if r["logits_rel"] > TOL:
        bad.append(f"logits relative error {r['logits_rel']:.2e}")
    bad += [f"{k} relative error {v:.2e}" for k, v in r["capture_rel"].items() if v > TOL]
    if not r["ids_equal"]:
        bad.append("routing (selected experts) differs")
    if not r["greedy_equal"]:
        bad.append("greedy tokens differ")
    if r["loss_rel"] > TOL or r["grads_rel"] > TOL:
        bad.append(f"training step: loss {r['loss_rel']:.2e}, gradients {r['grads_rel']:.2e}")
    if "expert" in r["mesh"]:  # expert parallel really is: experts split, tokens sent with all-to-all
        if "'expert'" not in r["experts_split"]:
            bad.append(f"routed experts not split over 'expert': {r['experts_split']}")
        if r["all_to_all"] < 2:
            bad.append("no all-to-all in the compiled forward")
    if r.get("mtp_equal") is False:
        bad.append("MTP self-speculative decoding gives other tokens")
    return [f"{name} ({r['mesh']}): {b}" for b in bad]


@pytest.mark.slow
def test_combined_layouts_match_one_device(tmp_path):
    """One test (the worker compiles ~30 programs per layout: run it once, also under xdist)."""
    results = run_layouts(tmp_path, COMBINED)
    assert set(results) == set(COMBINED)
    assert "mtp_equal" in results["data x expert"]
    problems = [p for name, r in results.items() for p in layout_problems(name, r)]
    assert not problems, "\n".join(problems)


@pytest.mark.expensive
def test_single_axis_layouts_match_one_device(tmp_path):
    single = [n for n in LAYOUTS if n not in COMBINED]
    assert len(single) == 3
    results = run_layouts(tmp_path, single)
    problems = [p for name, r in results.items() for p in layout_problems(name, r)]
    assert set(results) == set(single) and not problems, "\n".join(problems)


def test_docs_describe_every_tested_layout():
    text = (ROOT / "docs" / "scaling.md").read_text()
    for name, mesh in LAYOUTS.items():
        assert f"`{mesh}`" in text, f"docs/scaling.md does not describe the layout {name} ({mesh})"


# ----------------------------------------------------------------- in-process pieces
@pytest.mark.parametrize("text, want", [("data=2,expert=4", MeshShape(2, 4, 1)), ("tensor=8", MeshShape(1, 1, 8)),
                                        (" expert = 2 , data=1 ", MeshShape(1, 2, 1))])
def test_parse_mesh(text, want):
    assert parse_mesh(text) == want


@pytest.mark.parametrize("text, says", [("", "empty"), ("data", "AXIS=SIZE"), ("pipe=2", "unknown axis"),
                                        ("data=2,data=2", "twice"), ("data=0", "positive"), ("data=x", "positive"),
                                        ("data=1.5", "positive")])
def test_parse_mesh_refuses(text, says):
    with pytest.raises(MeshError, match=says):
        parse_mesh(text)


def _mesh(d, e, t):
    return jax.sharding.AbstractMesh((d, e, t), AXES)


def test_specs_follow_the_table_and_divisibility():
    cfg = get_preset("tiny-v3")  # 16 experts, 4 heads, vocab not a multiple of 3
    rows = {t.rel: t for t in tensors(cfg) if t.layer in (None, 2)}
    m = _mesh(1, 4, 2)
    assert tuple(dim_spec(rows["mlp.experts.gate_proj.weight"], m, lead=1)) == (None, "expert", "tensor", None)
    assert tuple(dim_spec(rows["mlp.experts.down_proj.weight"], m, lead=1)) == (None, "expert", None, "tensor")
    assert tuple(dim_spec(rows["self_attn.o_proj.weight"], m)) == (None, "tensor")
    assert tuple(dim_spec(rows["mlp.gate.weight"], m)) == (None, None)
    assert tuple(dim_spec(rows["model.embed_tokens.weight"], _mesh(1, 1, 3))) in ((None, None), ("tensor", None))
    if cfg.vocab_size % 3:
        assert tuple(dim_spec(rows["model.embed_tokens.weight"], _mesh(1, 1, 3))) == (None, None)
    with pytest.raises(MeshError, match="expert=3"):
        dim_spec(rows["mlp.experts.gate_proj.weight"], _mesh(1, 3, 1))


def test_padded_batch():
    assert padded_batch(3, _mesh(2, 4, 1)) == 8 and padded_batch(8, _mesh(2, 4, 1)) == 8
    assert padded_batch(1, _mesh(1, 1, 8)) == 1


def test_dispatch_slots_rank_each_assignment_within_its_device():
    dest = jnp.asarray([2, 0, 2, 1, 0, 2], jnp.int32)
    assert dispatch_slots(dest, 3).tolist() == [0, 0, 1, 0, 1, 2]


def test_padding_rows_are_skipped_and_give_zeros():
    """routed_experts(valid=...): the rows the expert-parallel buffers pad with cost nothing
    and come back zero; the real rows are as without padding."""
    from dsref.reference.model import routed_experts
    rng = np.random.default_rng(0)
    E, D, F, M = 4, 8, 6, 10
    w = {f"experts.{n}_proj.weight": jnp.asarray(rng.standard_normal(s), jnp.float32)
         for n, s in (("gate", (E, F, D)), ("up", (E, F, D)), ("down", (E, D, F)))}
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, E, (M, 1)), jnp.int32)
    ones = jnp.ones((M, 1), jnp.float32)
    valid = jnp.asarray(rng.random(M) < 0.6)
    full = routed_experts(w, x, ids, ones, E, None)
    part = routed_experts(w, x, ids, ones, E, None, valid=valid)
    np.testing.assert_array_equal(np.asarray(part)[~np.asarray(valid)], 0)
    np.testing.assert_allclose(np.asarray(part)[np.asarray(valid)], np.asarray(full)[np.asarray(valid)], rtol=1e-6)


# ----------------------------------------------------------------- the command line
def test_golden_and_generate_on_a_mesh_from_the_command_line(tmp_path):
    """`dsref golden --mesh` on 2 simulated devices writes the one-device dump (within float32
    rounding) and records the mesh; `dsref generate --mesh` gives the one-device tokens."""
    from dsref.experiments.cli import main
    from dsref.reference.oracle.compare import compare_files
    from dsref.reference.oracle.golden import read_metadata
    ck, toks = tmp_path / "ck", tmp_path / "t.npy"
    assert main(["init-checkpoint", "--preset", "tiny-v3", "--out", str(ck), "--dtype", "fp8"]) == 0
    np.save(toks, np.random.default_rng(0).integers(0, 200, (3, 6)))
    assert main(["golden", "--checkpoint", str(ck), "--tokens", str(toks), "--out", str(tmp_path / "one.st")]) == 0
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")])}
    cli = [sys.executable, "-m", "dsref.experiments.cli"]
    r = subprocess.run([*cli, "golden", "--checkpoint", str(ck), "--tokens", str(toks), "--out",
                        str(tmp_path / "two.st"), "--mesh", "expert=2"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_metadata(tmp_path / "two.st")["mesh"] == "data=1,expert=2,tensor=1"
    report = compare_files(tmp_path / "one.st", tmp_path / "two.st")
    assert report.ok, report
    gen = [*cli, "generate", "--checkpoint", str(ck), "--tokens", "5,6,7", "--max-new-tokens", "4", "--json"]
    one = subprocess.run(gen, env={**env, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=600)
    two = subprocess.run([*gen, "--mesh", "data=2"], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-1000:], two.stderr[-1000:])
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["tokens"] == b["tokens"] and b["mesh"] == "data=2" and b["devices"] == 2


@pytest.mark.parametrize("extra, says", [(["--mesh", "data=4"], "needs 4 devices"),
                                         (["--mesh", "data=1", "--dtype", "float64"], "--dtype float32"),
                                         (["--mesh", "data=1", "--stream"], "pick one"),
                                         (["--mesh", "data=-1"], "positive integer")])
def test_golden_mesh_bad_values(tmp_path, capsys, extra, says):
    from dsref.experiments.cli import main
    ck, toks = tmp_path / "ck", tmp_path / "t.npy"
    assert main(["init-checkpoint", "--preset", "tiny-v3", "--out", str(ck)]) == 0
    np.save(toks, np.zeros((1, 3), np.int64))
    capsys.readouterr()
    try:
        rc = main(["golden", "--checkpoint", str(ck), "--tokens", str(toks), "--out", str(tmp_path / "g.st"), *extra])
    except SystemExit as e:  # argparse rejects the value itself
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1], err
    assert not (tmp_path / "g.st").exists()
