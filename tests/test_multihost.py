"""Multi-process runs (reference/distributed.py): two local processes over the CPU backend form
one 8-device mesh and must give the single-device logits and greedy tokens.

The two-process test starts three children at once: the single-device reference and the two
workers (tests/multihost_worker.py, 4 CPU devices each, joined by jax.distributed over a free
localhost port, cross-process collectives through gloo). Layouts:

    expert=4,tensor=2   forward + generate; routed experts 0-7 on process 0, 8-15 on process 1, so the
                        MoE's all_to_all crosses the process boundary (tensor stays inside one)
    data=2,expert=4     forward only; the data axis crosses the boundary (expert stays inside)

Every child runs with XLA's CPU backend at optimisation level 0: compiling is most of the time
here and halves with it; the reference gets the same flags, and the comparison is against the
same model code, so what is tested (same numbers over two processes) is unchanged.

The option checks at the bottom run in this process without starting JAX's backend.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsref.reference import distributed as dist

WORKER = Path(__file__).with_name("multihost_worker.py")
GENERATE_MESH = "expert=4,tensor=2"
FORWARD_MESH = "data=2,expert=4"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
#: Seconds to wait for all three children (about 75 s on a loaded 2-core machine; the bound is
#: for a hang: a process that dies leaves the other blocked in a collective).
TIMEOUT_S = 300


def _gloo_available() -> str | None:
    """Why this JAX cannot run CPU collectives across processes, or None when it can."""
    try:
        from jax._src.lib import _jax  # the jaxlib extension; no public "has gloo?" query
    except ImportError as e:
        return f"jaxlib extension not importable: {e}"
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        return "this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
    except OSError as e:
        return f"cannot open a localhost socket for the coordinator: {e}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID,
                        dist.ENV_LOCAL_DEVICE_IDS, *dist.LAUNCHER_ENV.values())}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    return env


def _run_all(cmds: list[tuple[list[str], dict]], logdir: Path) -> list[str]:
    """Start every command, wait for all (TIMEOUT_S in total), kill the rest on any failure;
    returns each one's output. No child outlives this call."""
    procs, logs = [], []
    try:
        for i, (cmd, env) in enumerate(cmds):
            log = open(logdir / f"child-{i}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        pending = list(procs)
        while pending:
            for p in list(pending):
                if p.poll() is not None:
                    pending.remove(p)
                    if p.returncode != 0:
                        raise AssertionError(f"child {procs.index(p)} exited {p.returncode}")
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"children still running after {TIMEOUT_S}s")
            time.sleep(0.2)
    except AssertionError as e:
        text = "\n".join(f"--- child {i}: {' '.join(map(str, c[0][2:]))}\n{_read(f)[-3000:]}"
                         for i, (f, c) in enumerate(zip(logs, cmds)))
        raise AssertionError(f"{e}\n{text}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not reaped in 10 s
                pass
        outputs = [_read(f) for f in logs]
        for f in logs:
            f.close()
    return outputs


def _read(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.slow
def test_two_processes_match_one_device(tmp_path):
    reason = _gloo_available()
    if reason:
        pytest.skip(reason)
    port = _free_port()
    py = [sys.executable, str(WORKER)]
    layouts = ["--mesh", GENERATE_MESH, "--forward-mesh", FORWARD_MESH]
    cmds = [([*py, "--out", str(tmp_path / "ref")], _child_env(1))]
    for pid in (0, 1):
        cmds.append(([*py, "--out", str(tmp_path / "mh"), "--coordinator", f"127.0.0.1:{port}",
                      "--num-processes", "2", "--process-id", str(pid), *layouts], _child_env(4)))
    outputs = _run_all(cmds, tmp_path)
    print("\n".join(o.strip().splitlines()[-1] for o in outputs))  # each child's seconds per phase (-s)
    ref = np.load(tmp_path / "ref" / "result-0.npz")
    toks = ref["tokens_in"]
    for pid in (0, 1):
        got = np.load(tmp_path / "mh" / f"result-{pid}.npz")
        info = __import__("json").loads(str(got["summary"]))
        assert (info["process_index"], info["process_count"], info["local_devices"], info["global_devices"]) \
            == (pid, 2, 4, 8), outputs[1 + pid]
        for spec in (GENERATE_MESH, FORWARD_MESH):
            # The logits array spans both processes: gather() had to fetch the other half.
            assert bool(got[f"crosses/{spec}"]), spec
            assert _rel(got[f"logits/{spec}"], ref["logits/single"]) <= 1e-5, (pid, spec)
            np.testing.assert_array_equal(got[f"to_global/{spec}"], toks)
        assert list(got[f"expert_processes/{GENERATE_MESH}"]) == [0, 1]  # EP over the boundary
        np.testing.assert_array_equal(got[f"tokens/{GENERATE_MESH}"], ref["tokens/single"])


def test_to_global_and_gather_in_one_process():
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1), ("d",))
    g = dist.to_global(x, NamedSharding(mesh, PartitionSpec("d")))
    assert isinstance(g, jax.Array) and g.shape == x.shape
    np.testing.assert_array_equal(dist.gather(g), x)
    np.testing.assert_array_equal(dist.gather([1, 2]), [1, 2])  # host values pass through


def test_a_failing_child_stops_the_others(tmp_path):
    """One worker dying must not leave the other blocked in a collective: it is killed."""
    env = dict(os.environ)
    cmds = [([sys.executable, "-c", "import sys; sys.exit(3)"], env),
            ([sys.executable, "-c", "import time; time.sleep(120)"], env)]
    t = time.monotonic()
    with pytest.raises(AssertionError, match="child 0 exited 3"):
        _run_all(cmds, tmp_path)
    assert time.monotonic() - t < 30


# ------------------------------------------------------------------ options, no JAX backend
def test_resolve_single_process_when_nothing_given(monkeypatch):
    for var in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    assert dist.resolve() is None
    assert dist.resolve("h:1", 2, 1) == {"coordinator": "h:1", "num_processes": 2, "process_id": 1}


def test_resolve_flags_override_environment(monkeypatch):
    monkeypatch.setenv(dist.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(dist.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(dist.ENV_PROCESS_ID, "3")
    assert dist.resolve() == {"coordinator": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert dist.resolve(process_id=0)["process_id"] == 0
    monkeypatch.setenv(dist.ENV_PROCESS_ID, "4")
    with pytest.raises(dist.DistributedError, match=r"--process-id \(from \$DSREF_PROCESS_ID\): process id 4"):
        dist.resolve()


@pytest.mark.parametrize("kwargs, match", [
    ({"coordinator": "10.0.0.1", "num_processes": 2, "process_id": 0}, r"^--coordinator '10.0.0.1': expected HOST:PORT"),
    ({"coordinator": "h:0", "num_processes": 2, "process_id": 0}, r"^--coordinator 'h:0': port must be"),
    ({"coordinator": "h:65536", "num_processes": 2, "process_id": 0}, r"port must be an integer in 1..65535"),
    ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, r"^--num-processes: expected an integer >= 1"),
    ({"coordinator": "h:1", "num_processes": "two", "process_id": 0}, r"^--num-processes: expected an integer"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, r"^--process-id: process id 2 is not in \[0, 2\)"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": -1}, r"^--process-id: expected an integer >= 0"),
    ({"coordinator": "h:1"}, r"^--num-processes: needed for a multi-process run"),
    ({"num_processes": 2, "process_id": 1}, r"^--coordinator: needed"),
])
def test_resolve_rejects_bad_settings(monkeypatch, kwargs, match):
    for var in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID, *dist.LAUNCHER_ENV.values()):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(dist.DistributedError, match=match) as e:
        dist.resolve(**kwargs)
    assert "\n" not in str(e.value)


def test_launcher_fills_in_what_flags_leave_out(monkeypatch):
    for var in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID, *dist.LAUNCHER_ENV.values()):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(dist.DistributedError, match="^--coordinator: needed"):
        dist.resolve(auto=True)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert dist.detected_launcher() == "SLURM"
    assert dist.resolve(auto=True) == {"coordinator": None, "num_processes": None, "process_id": None}
    assert dist.resolve(coordinator="n1:5000") == {"coordinator": "n1:5000", "num_processes": None, "process_id": None}


def test_cli_options_parse_and_device_ids():
    p = argparse.ArgumentParser()
    dist.add_distributed_args(p)
    a = p.parse_args(["--coordinator", "[::1]:9000", "--num-processes", "2", "--process-id", "1",
                      "--local-device-ids", "0,1,2,3"])
    assert (a.coordinator, a.num_processes, a.process_id, a.distributed) == ("[::1]:9000", "2", "1", False)
    assert dist.parse_device_ids(a.local_device_ids) == [0, 1, 2, 3]
    with pytest.raises(dist.DistributedError, match="given twice"):
        dist.parse_device_ids("0,0")
    with pytest.raises(dist.DistributedError, match="^--local-device-ids: expected an integer >= 0"):
        dist.parse_device_ids("0,x")
