"""Nothing lost when a write dies (issue 21): checkpoints and golden dumps are replaced atomically.

A child process writes a tiny-v3 checkpoint (or a dump) over a complete one and is SIGKILLed:
at seeded random moments, and at fixed points (after N shard files, after each of the renames
of the swap, during an fsync). After every kill the target loads as exactly the old or exactly
the new weights, never a half-written mix or an error, and the next write cleans up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsref.reference import atomic
from dsref.reference.checkpoint import CheckpointError, read_tensors, save_checkpoint
from dsref.reference.oracle.golden import read_dump, write_dump
from dsref.reference.params import EMBED, tensors
from dsref.reference.presets import get_preset

CFG = get_preset("tiny-v3")
SHARD = 200_000  # ~7 shards of tiny-v3 in float32: more moments to die between files


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: (0.02 * rng.standard_normal(t.shape)).astype(np.float32) for t in tensors(CFG)}


# The child: write seed S over OUT, and die (SIGKILL, no cleanup of any kind) where told.
#   how = "wait":   print "ready" once imports and tensors are done, then write (the parent kills it)
#   how = "files":  die right after the N-th safetensors file is complete
#   how = "rename": die right after the N-th os.rename (1: tmp->new, 2: OUT->old, 3: new->OUT)
#   how = "fsync":  die right after the N-th fsync
#   how = "none":   write and exit normally
CHILD = r"""
import os, signal, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_atomic_writes import weights, CFG, SHARD, dump_outputs
from dsref.reference import atomic
import safetensors.numpy as stn
kind, out, seed, how, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
calls = [0]
def after(real):
    def f(*a, **k):
        r = real(*a, **k)
        calls[0] += 1
        if calls[0] == n:
            die()
        return r
    return f
if how == "files":
    stn.save_file = after(stn.save_file)
elif how == "rename":
    os.rename = after(os.rename)
elif how == "fsync":
    atomic._fsync_path = after(atomic._fsync_path)
data = weights(seed) if kind == "ckpt" else dump_outputs(seed)
if how == "wait":
    print("ready", flush=True)
    sys.stdin.readline()
if kind == "ckpt":
    from dsref.reference.checkpoint import save_checkpoint
    save_checkpoint(data, CFG, out, dtype="float32", max_shard_bytes=SHARD)
else:
    from dsref.reference.oracle.golden import write_dump
    write_dump(data, out, {{"format": "dsref-dump-1", "seed": str(seed)}})
"""


def dump_outputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    return {"logits": rng.standard_normal((2, 64, 512)).astype(np.float32),
            "layers.0.hidden": rng.standard_normal((2, 64, 256)).astype(np.float32)}


def _child_args(kind, out, seed, how, n=0):
    code = CHILD.format(tests=str(Path(__file__).parent))
    return [sys.executable, "-c", code, kind, str(out), str(seed), how, str(n)]


def _run(kind, out, seed, how, n=0) -> int:
    p = subprocess.run(_child_args(kind, out, seed, how, n), capture_output=True, text=True, timeout=60)
    assert p.returncode in (0, -signal.SIGKILL), p.stderr[-2000:]
    return p.returncode


def _kill_after(kind, out, seed, delay: float) -> int:
    """Start the child, let it get ready (imports, tensors), then SIGKILL it ``delay`` s into its write."""
    p = subprocess.Popen(_child_args(kind, out, seed, "wait"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
    p.stdin.write("go\n")
    p.stdin.flush()
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    assert p.returncode in (0, -signal.SIGKILL), err[-2000:]  # killed, or done before the kill: not crashed
    return p.returncode


def _which_ckpt(out: Path, candidates: tuple[int, ...]) -> int:
    """The seed whose weights ``out`` holds: every tensor must match it exactly."""
    got = dict(read_tensors(out, CFG))
    for s in candidates:
        w = weights(s)
        if all(np.array_equal(got[k], w[k]) for k in w):
            return s
    raise AssertionError(f"{out} holds neither the old nor the new weights (seeds {candidates})")


def _which_dump(out: Path, candidates: tuple[int, ...]) -> int:
    got, meta = read_dump(out)
    for s in candidates:
        w = dump_outputs(s)
        if set(got) == set(w) and all(np.array_equal(got[k], w[k]) for k in w) and meta["seed"] == str(s):
            return s
    raise AssertionError(f"{out} holds neither the old nor the new dump (seeds {candidates})")


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("atomic") / "ck"
    save_checkpoint(weights(0), CFG, out, dtype="float32", max_shard_bytes=SHARD)
    return out


def test_checkpoint_survives_kills_at_fixed_points(ckpt):
    """Dies after each shard file, after each rename of the swap, during fsyncs: old or new, always."""
    cur, seed = 0, 1
    n_files = len(list(ckpt.glob("*.safetensors")))
    assert n_files > 3
    points = ([("files", k) for k in (1, n_files)] + [("rename", k) for k in (1, 2, 3)]
              + [("fsync", 3)])
    seen_missing = False
    for how, n in points:
        rc = _run("ckpt", ckpt, seed, how, n)
        assert rc == -signal.SIGKILL, (how, n)
        if how == "rename" and n == 2:  # killed between the two renames: the folder is missing
            assert not ckpt.exists() and any(".ck.new-" in s for s in _siblings(ckpt))
            seen_missing = True
        got = _which_ckpt(ckpt, (cur, seed))  # reading finishes an interrupted swap
        # the swap publishes the new checkpoint with its rename into place, never before
        assert got == (seed if how == "rename" and n >= 2 else cur), (how, n, got)
        cur, seed = got, seed + 1
    assert seen_missing
    assert _run("ckpt", ckpt, seed, "none") == 0  # a complete write cleans every leftover
    assert _which_ckpt(ckpt, (seed,)) == seed
    assert _siblings(ckpt) == []
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("model-")) == [
        "config.json", "model.safetensors.index.json"]


def test_checkpoint_survives_random_kills(ckpt):
    """SIGKILL at seeded random moments during the write (from the parent, as a crash would)."""
    t0 = time.monotonic()
    save_checkpoint(weights(100), CFG, ckpt, dtype="float32", max_shard_bytes=SHARD)
    write_s = time.monotonic() - t0  # kills land anywhere in the write (the child is ready by then)
    rng = np.random.default_rng(21)
    cur = 100
    for i in range(5):
        seed = 101 + i
        _kill_after("ckpt", ckpt, seed, float(rng.uniform(0.0, write_s)))
        cur = _which_ckpt(ckpt, (cur, seed))  # leftovers of this kill are cleaned by the next write
    _run("ckpt", ckpt, 200, "none")
    assert _which_ckpt(ckpt, (200,)) == 200 and _siblings(ckpt) == []


def test_first_write_killed_is_refused_clearly_then_cleaned(tmp_path):
    """No earlier checkpoint: a killed first write leaves nothing the loader takes for a checkpoint."""
    out = tmp_path / "first"
    assert _run("ckpt", out, 5, "files", 2) == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(CheckpointError, match=r"no such checkpoint directory; an interrupted write left only "
                                              r"an incomplete copy \(\.first\.tmp-\d+-[0-9a-f]+\)"):
        list(read_tensors(out, CFG))
    assert _run("ckpt", out, 6, "none") == 0
    assert _which_ckpt(out, (6,)) == 6 and _siblings(out) == []


def test_interrupted_swap_recovered_by_load_checkpoint(tmp_path):
    """Killed between its two renames: load_checkpoint itself finishes the swap and loads the new model."""
    from dsref.reference.checkpoint import load_checkpoint
    out = tmp_path / "ck"
    save_checkpoint(weights(0), CFG, out, dtype="float32")
    assert _run("ckpt", out, 1, "rename", 2) == -signal.SIGKILL
    assert not out.exists()
    _, model = load_checkpoint(out)
    emb = np.asarray(dict(model.hf_items())[EMBED].get_value())
    np.testing.assert_array_equal(emb, weights(1)[EMBED])
    assert _siblings(out) == []  # the old copy of that write is gone too


def test_missing_folder_messages(tmp_path):
    """What the loader says when it cannot decide for the user."""
    out = tmp_path / "ck"
    with pytest.raises(CheckpointError, match=r"ck: no such checkpoint directory$"):
        list(read_tensors(out, CFG))
    old = tmp_path / ".ck.old-999999999-ab"  # a previous copy and no new one: say how to use it
    save_checkpoint(weights(0), CFG, old, dtype="float32")
    with pytest.raises(CheckpointError, match=r"previous copy .*\.ck\.old-999999999-ab.*run: mv "):
        list(read_tensors(out, CFG))
    for tok in ("aa", "bb"):  # two complete new copies: ambiguous, never guessed
        save_checkpoint(weights(0), CFG, tmp_path / f".ck.new-999999999-{tok}", dtype="float32")
    with pytest.raises(CheckpointError, match=r"several complete copies .*rename the one to keep to ck"):
        list(read_tensors(out, CFG))


def test_python_exception_leaves_nothing_and_rewrite_keeps_other_files(tmp_path, monkeypatch):
    """An exception mid-write: old checkpoint intact, no temp folder beside it. A rewrite keeps
    files the writer does not produce (tokenizer.json) and drops stale shards."""
    import safetensors.numpy as stn
    out = tmp_path / "ck"
    save_checkpoint(weights(0), CFG, out, dtype="float32", max_shard_bytes=SHARD)
    (out / "tokenizer.json").write_text("{}")
    os.chmod(out, 0o750)
    real = stn.save_file

    def boom(data, path, metadata=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(stn, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(weights(1), CFG, out, dtype="float32")
    assert _siblings(out) == [] and _which_ckpt(out, (0,)) == 0
    monkeypatch.setattr(stn, "save_file", real)
    save_checkpoint(weights(1), CFG, out, dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == "{}" and (out.stat().st_mode & 0o777) == 0o750
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_bad_targets_named(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match=r"file: cannot write the checkpoint here: exists and is not a dir"):
        save_checkpoint(weights(0), CFG, f, dtype="float32")
    d = tmp_path / "here"
    d.mkdir()
    monkeypatch.chdir(d)  # the swap renames the folder away: refused rather than pulled from under the cwd
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint here: holds the current working directory"):
        save_checkpoint(weights(0), CFG, ".", dtype="float32")
    assert list(d.iterdir()) == []


def test_golden_dump_survives_kills(tmp_path):
    out = tmp_path / "golden.safetensors"
    write_dump(dump_outputs(0), out, {"format": "dsref-dump-1", "seed": "0"})
    cur = 0
    # killed after the dump file is complete but before its rename, and after the rename
    for seed, (how, n) in enumerate([("files", 1), ("fsync", 1), ("fsync", 2)], start=1):
        assert _run("dump", out, seed, how, n) == -signal.SIGKILL
        got = _which_dump(out, (cur, seed))
        assert got == (seed if (how, n) == ("fsync", 2) else cur), (how, n)
        cur = got
    rng = np.random.default_rng(7)
    for seed in range(10, 13):
        _kill_after("dump", out, seed, float(rng.uniform(0.0, 0.05)))
        cur = _which_dump(out, (cur, seed))
    assert _run("dump", out, 20, "none") == 0
    assert _which_dump(out, (20,)) == 20 and _siblings(out) == []


def test_atomic_file_helpers(tmp_path):
    p = tmp_path / "sub" / "r.json"
    with pytest.raises(FileNotFoundError):  # like open(path, "w"): the folder is the caller's
        atomic.atomic_write_text(p, "a")
    p.parent.mkdir()
    atomic.atomic_write_text(p, "a")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(p, "w") as f:
            f.write("half")
            raise RuntimeError
    assert p.read_text() == "a" and _siblings(p) == []
    atomic.atomic_write_bytes(p, b"b")
    assert p.read_bytes() == b"b"
    with pytest.raises(ValueError, match="mode must be a write mode"):
        with atomic.atomic_open(p, "a"):
            pass
    with atomic.atomic_path(tmp_path / "x.npy") as t:  # the suffix survives: np.save appends none
        np.save(t, np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(3))
