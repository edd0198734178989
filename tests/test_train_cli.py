"""`dsref train` (reference/train_cli.py, reference/train_run.py): a run killed with SIGKILL at
random moments (also in the middle of a checkpoint write) always leaves a loadable checkpoint and
resumes to exactly the losses of an uninterrupted run; what it writes loads in transformers
with the same logits; bad input is refused before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydoc_data.topics
import pytest

from dsref.reference.train_run import Batches, heldout_batches, read_corpus, read_state

ARGS = ["--preset", "tiny-v3", "--steps", "24", "--batch", "4", "--seq", "32", "--checkpoint-every", "1",
        "--seed", "3", "--lr", "3e-3", "--balance-alpha", "1e-3", "--no-progress", "--json"]


def _env(cache: Path) -> dict:
    return {**os.environ, "DSREF_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu"}


def _cmd(data: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "dsref.experiments.cli", "train", "--data", str(data), "--out", str(out),
            *ARGS, *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60 KB of CPython's pydoc topics: text that ships with Python."""
    d = tmp_path_factory.mktemp("corpus")
    topics = pydoc_data.topics.topics
    text = "\n".join(topics[k] for k in sorted(topics))[:60_000]
    (d / "topics.txt").write_text(text)
    return d / "topics.txt"


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    """One run start to finish: (its folder, its --json summary, the compile cache folder)."""
    d = tmp_path_factory.mktemp("run")
    cache = d / "cache"
    p = subprocess.run(_cmd(corpus, d / "a"), env=_env(cache), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return d / "a", json.loads(p.stdout), cache


def _staging(out: Path) -> list[str]:
    return [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.tmp-")]


def _kill_at(proc, out: Path, mode: str, rng) -> bool:
    """SIGKILL ``proc`` while it writes a checkpoint ("write": its staging folder beside ``out``
    exists) or at a random moment after a checkpoint exists ("random"); False if it finished first."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if mode == "write" and (out / "train_state.json").exists() and _staging(out):
            break  # a write after the first complete checkpoint: the kill must leave that one
        if mode == "random" and (out / "train_state.json").exists():
            time.sleep(rng.uniform(0.0, 0.4))
            break
        time.sleep(0.0005)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(corpus, uninterrupted, tmp_path):
    a, summary, cache = uninterrupted
    b = tmp_path / "b"
    rng = np.random.default_rng(0)
    kills, steps_seen = 0, []
    for mode in ("write", "random", "write", "random"):
        proc = subprocess.Popen(_cmd(corpus, b), env=_env(cache), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if not _kill_at(proc, b, mode, rng):
            break
        kills += 1
        # the last complete checkpoint is there and loads (weights, optimizer, state)
        state = read_state(b)
        assert state is not None and 1 <= state["step"] <= 24
        steps_seen.append(state["step"])
        from dsref.reference.checkpoint import load_checkpoint
        load_checkpoint(b, with_mtp=True)
    assert kills >= 2, "the run finished before it could be killed twice: the test did not test anything"
    assert steps_seen == sorted(steps_seen)
    p = subprocess.run(_cmd(corpus, b), env=_env(cache), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    assert res["resumed_from"] == steps_seen[-1] and res["steps"] == 24
    ha, hb = read_state(a)["history"], read_state(b)["history"]
    assert [h["loss"] for h in hb] == [h["loss"] for h in ha]  # bit for bit (JSON floats round-trip)
    assert [h["max_violation"] for h in hb] == [h["max_violation"] for h in ha]
    assert res["final_loss"] == summary["final_loss"] and res["eval_loss"] == summary["eval_loss"]
    assert not _staging(b)  # the killed writers' leftovers were cleaned up by the next write


@pytest.mark.slow
def test_the_trained_checkpoint_loads_in_transformers_with_equal_logits(uninterrupted):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from dsref.reference.checkpoint import load_checkpoint
    from dsref.reference.model import jit_forward
    a, summary, _ = uninterrupted
    assert summary["steps"] == 24 and summary["final_loss"] < read_state(a)["history"][0]["main"] - 0.5
    tokens = np.random.default_rng(0).integers(0, 256, (2, 24))
    _, ours = load_checkpoint(a)
    ours = np.asarray(jit_forward(ours, tokens))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(a, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.float().numpy()
    assert np.abs(theirs - ours).max() / np.abs(ours).max() <= 1e-5
    # the trained biases are in the checkpoint (they moved away from their zero init)
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias.detach().numpy()
    assert np.abs(bias).max() > 0


def test_batches_are_a_pure_function_of_seed_and_step():
    ids = np.arange(1001, dtype=np.int32)
    b = Batches(ids, batch=3, seq=10, seed=5)
    assert b.windows == 100
    again = Batches(ids, batch=3, seq=10, seed=5)
    np.testing.assert_array_equal(b(40), again(40))  # no state carried from earlier steps
    starts = np.concatenate([b(s)[:, 0] for s in range(34)])[:100]  # one epoch: every window once
    assert sorted(starts.tolist()) == list(range(0, 1000, 10))
    assert b.position(34) == {"epoch": 1, "window": 2}
    assert not np.array_equal(b(0), Batches(ids, 3, 10, seed=6)(0))
    w = b(7)
    np.testing.assert_array_equal(w[:, 1:] - w[:, :-1], 1)  # consecutive tokens, T+1 of them
    assert w.shape == (3, 11)
    h = heldout_batches(ids[:95], 4, 10, limit=8)
    assert len(h) == 2 and all(x.shape == (4, 11) for x in h)


def test_read_corpus_skips_binary_files_and_hidden_entries(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (tmp_path / ".hidden").write_text("no")
    c = read_corpus(tmp_path)
    assert [n for n, _ in c.docs] == ["a.txt", "sub/b.md"] and c.skipped == ("img.png",)
    with pytest.raises(ValueError, match="--data .*not UTF-8 text"):
        read_corpus(tmp_path / "img.png")
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="--data .*no text found"):
        read_corpus(tmp_path / "e")


@pytest.mark.parametrize("extra,match", [
    (["--data", "/nonexistent/x.txt"], "--data /nonexistent/x.txt: no such file"),
    (["--preset", "qwen2.5-14b"], "--preset qwen2.5-14b: a dense GQA model"),
    (["--preset", "tiny-v32"], "--preset tiny-v32: a V3.2 model .* not implemented"),
    (["--preset", "deepseek-v3"], "--preset deepseek-v3: .* parameters need about"),
    (["--seq", "4096"], "--seq 4096: the model's max_position_embeddings is 128"),
    (["--steps", "0"], "argument --steps"),
    (["--lr", "nan"], "argument --lr"),
    (["--warmup", "50", "--steps", "10"], "--warmup 50: more than --steps 10"),
    (["--tokenizer", "BADTOK"], "--tokenizer .*not a tokenizers tokenizer.json"),
    (["--no-mtp", "--mtp-weight", "0.3"], "--mtp-weight 0.3: --no-mtp"),
])
def test_bad_input_is_one_line_and_writes_nothing(corpus, tmp_path, extra, match):
    import re

    from dsref.experiments.cli import main
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    extra = [str(bad) if e == "BADTOK" else e for e in extra]
    args = ["train", "--preset", "tiny-v3", "--data", str(corpus), "--steps", "5", "--out", str(tmp_path / "o"),
            "--seq", "32", *extra]
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) if match.startswith("argument") \
            else contextlib.nullcontext():
        assert main(args) == 2
    assert re.search(match, err.getvalue()), err.getvalue()
    assert not (tmp_path / "o").exists()


def test_resuming_with_other_settings_or_into_a_foreign_folder_is_refused(corpus, uninterrupted, tmp_path):
    import shutil

    from dsref.experiments.cli import main
    a, _, _ = uninterrupted
    c = tmp_path / "c"
    shutil.copytree(a, c)
    before = {p.name: p.read_bytes() for p in c.iterdir()}
    base = ["train", "--data", str(corpus), "--out", str(c), *ARGS]
    for change, match in ((["--seed", "4"], "--seed: differs"), (["--lr", "1e-3"], "--lr: the checkpoint .* lr=0.003"),
                          (["--steps", "30"], "--steps: the checkpoint .* steps=24"),
                          (["--batch", "8"], "--batch: differs")):
        args = base + change
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(args) == 2
        assert len(err.getvalue().strip().splitlines()) == 1 and __import__("re").search(match, err.getvalue()), \
            err.getvalue()
    assert {p.name: p.read_bytes() for p in c.iterdir()} == before  # nothing touched
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a `dsref train` checkpoint"):
        read_state(tmp_path / "foreign")


@pytest.mark.expensive
def test_training_over_a_mesh_follows_one_device(corpus, tmp_path):
    """--mesh expert=2,tensor=2 on 4 simulated CPU devices (experts split whole, matmuls split
    Megatron-style, AdamW's moments placed like their weights): the same losses as one device,
    to float32 rounding (other summation orders), and a checkpoint that reloads on one device."""
    env = {**_env(tmp_path / "cache"), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    runs = {}
    for name, extra in (("one", []), ("mesh", ["--mesh", "expert=2,tensor=2"])):
        # no MTP module and nothing held out: two programs less to compile, the same MoE and MLA
        cmd = _cmd(corpus, tmp_path / name, *extra, "--no-mtp", "--holdout", "0", "--steps", "3")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = read_state(tmp_path / name)
    assert runs["mesh"]["mesh"] == {"data": 1, "expert": 2, "tensor": 2}
    one, mesh = ([h["loss"] for h in runs[k]["history"]] for k in ("one", "mesh"))
    np.testing.assert_allclose(mesh, one, rtol=2e-5)
    assert one[-1] != one[0]  # it trained
    from dsref.reference.checkpoint import load_checkpoint
    load_checkpoint(tmp_path / "mesh")
