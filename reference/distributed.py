"""Multi-process (multi-host) runs: ``jax.distributed.initialize`` from flags, the environment
or the cluster launcher, and the helpers a multi-process mesh needs.

JAX is multi-controller: the same program runs once per host (one process per host, each
owning that host's accelerators); ``jax.devices()`` then lists every process's devices and a
mesh over all of them (reference/mesh.py ``make_mesh``) runs each jitted computation on all
hosts at once, the collectives (the MoE's all_to_all, tensor-parallel all-reduces) crossing
the network. Every process must build the same model, the same mesh and run the same
computations in the same order.

Where the three settings come from (first found wins, per setting):

    --coordinator HOST:PORT   env JAX_COORDINATOR_ADDRESS (JAX's own name: JAX reads it too)
    --num-processes N         env DSREF_NUM_PROCESSES (JAX has no variable for it)
    --process-id I            env DSREF_PROCESS_ID
    the launcher              SLURM, Open MPI, Cloud TPU VMs, GKE/Kubernetes: JAX detects all
                              three itself ("If you are using TPU, Slurm, or Open MPI, all
                              arguments are optional", jax.distributed.initialize docs,
                              https://docs.jax.dev/en/latest/_autosummary/jax.distributed.initialize.html)

Without any of them (and without ``--distributed``) the run is single-process and
``initialize`` does nothing: a SLURM allocation running one ordinary command must not turn
into a one-process "cluster" (JAX's SLURM detection would also restrict each GPU process to
the one GPU numbered SLURM_LOCALID).

Which devices a process owns: all of its host's by default; JAX_LOCAL_DEVICE_IDS=0,1,...
(JAX's own variable) or ``--local-device-ids`` restricts them. Under SLURM / Open MPI on GPUs
JAX's auto-detection gives each process ONE GPU (its local rank): with one process per host
pass ``--local-device-ids 0,1,2,3,4,5,6,7`` (docs/multi-host.md).

CPU: cross-process collectives go through gloo (``jax_cpu_collectives_implementation``,
whose default in jax 0.10.2 is already "gloo": jax/_src/config.py DEFAULT_CPU_COLLECTIVES_IMPL);
``initialize`` sets it when nothing else was chosen, so two processes on one machine
(tests/test_multihost.py) run the same programs as two GPU hosts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Environment variables read when the flag is absent. JAX's own name where it has one.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DSREF_NUM_PROCESSES"
ENV_PROCESS_ID = "DSREF_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
#: Launchers JAX detects by itself (checked by their environment variables only: no network).
LAUNCHER_ENV = {"SLURM": "SLURM_JOB_ID", "Open MPI": "OMPI_COMM_WORLD_SIZE",
                "Cloud TPU": "TPU_WORKER_HOSTNAMES", "Kubernetes": "KUBERNETES_SERVICE_HOST"}

#: The arguments of the one successful initialize call in this process (None before it).
_DONE: dict | None = None


class DistributedError(ValueError):
    """A multi-process setting that cannot be used: names the flag or variable."""


@dataclass(frozen=True)
class Summary:
    """Where this process stands: printed by the CLIs, written by the test's workers."""

    process_index: int
    process_count: int
    local_devices: int
    global_devices: int
    platform: str
    coordinator: str | None

    def __str__(self) -> str:
        where = f" (coordinator {self.coordinator})" if self.coordinator else ""
        return (f"process {self.process_index} of {self.process_count}{where}: {self.local_devices} local "
                f"of {self.global_devices} {self.platform} devices")


# ------------------------------------------------------------------ parsing
def parse_coordinator(text: str, option: str = "--coordinator") -> str:
    """``HOST:PORT`` (``[v6addr]:PORT`` too) with the port in 1..65535; returned stripped."""
    s = str(text).strip()
    host, colon, port = s.rpartition(":")
    if not colon or not host or host in ("[", "[]"):
        raise DistributedError(f"{option} {text!r}: expected HOST:PORT (e.g. 10.0.0.1:1234)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DistributedError(f"{option} {text!r}: port must be an integer in 1..65535, got {port!r}")
    return s


def _int(value, option: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise DistributedError(f"{option}: expected an integer >= {minimum}, got {value!r}")
    try:
        n = int(str(value).strip())
    except ValueError:
        raise DistributedError(f"{option}: expected an integer >= {minimum}, got {value!r}") from None
    if n < minimum:
        raise DistributedError(f"{option}: expected an integer >= {minimum}, got {value!r}")
    return n


def parse_device_ids(text, option: str = "--local-device-ids") -> list[int]:
    """``"0,1,2,3"`` (or a list) -> [0, 1, 2, 3]: distinct integers >= 0."""
    parts = text if isinstance(text, (list, tuple)) else str(text).split(",")
    ids = [_int(p, option, 0) for p in parts if str(p).strip()]
    if not ids:
        raise DistributedError(f"{option} {text!r}: expected device ids like 0,1,2,3")
    if len(set(ids)) != len(ids):
        raise DistributedError(f"{option} {text!r}: a device id is given twice")
    return ids


def detected_launcher() -> str | None:
    """The launcher JAX would detect, judged by its environment variable; None when none."""
    for name, var in LAUNCHER_ENV.items():
        if os.environ.get(var):
            return name
    return None


def resolve(coordinator=None, num_processes=None, process_id=None, *, auto: bool = False,
            option_names: dict | None = None) -> dict | None:
    """The settings ``initialize`` would pass to JAX, validated: a dict with coordinator,
    num_processes, process_id (None where the launcher fills it in), or None for a
    single-process run. Flags win over the environment; DistributedError names the flag."""
    names = {"coordinator": "--coordinator", "num_processes": "--num-processes",
             "process_id": "--process-id", **(option_names or {})}
    given = {}
    for key, value, env in (("coordinator", coordinator, ENV_COORDINATOR),
                            ("num_processes", num_processes, ENV_NUM_PROCESSES),
                            ("process_id", process_id, ENV_PROCESS_ID)):
        if value is not None:
            given[key] = (value, names[key])
        elif os.environ.get(env, "").strip():
            given[key] = (os.environ[env], f"{names[key]} (from ${env})")
    if not given and not auto:
        return None
    out = {"coordinator": None, "num_processes": None, "process_id": None}
    if "coordinator" in given:
        out["coordinator"] = parse_coordinator(*given["coordinator"])
    if "num_processes" in given:
        out["num_processes"] = _int(*given["num_processes"], 1)
    if "process_id" in given:
        out["process_id"] = _int(*given["process_id"], 0)
    n, i = out["num_processes"], out["process_id"]
    if n is not None and i is not None and i >= n:
        raise DistributedError(f"{given['process_id'][1]}: process id {i} is not in [0, {n}) "
                               f"({given['num_processes'][1]} {n})")
    missing = [names[k] for k, v in out.items() if v is None]
    if missing and detected_launcher() is None:
        # Nothing would fill them in: JAX would fail later with a less helpful message.
        raise DistributedError(f"{missing[0]}: needed for a multi-process run ({', '.join(missing)} "
                               f"missing); give --coordinator, --num-processes and --process-id together, "
                               f"or run under SLURM, Open MPI or a Cloud TPU VM, which JAX detects")
    return out


# ------------------------------------------------------------------ initialize
def initialize(coordinator=None, num_processes=None, process_id=None, *, local_device_ids=None,
               auto: bool = False, option_names: dict | None = None, timeout_s: int = 300) -> Summary:
    """Join the multi-process run described by the arguments / environment / launcher (see
    the module docstring) and return this process's Summary. Call it first, before anything
    touches JAX's devices. Single-process (nothing given, ``auto`` False): JAX is left as it
    is. Calling it again with the same settings returns the summary; other settings raise."""
    global _DONE
    import jax

    settings = resolve(coordinator, num_processes, process_id, auto=auto, option_names=option_names)
    if local_device_ids is not None:
        local_device_ids = parse_device_ids(local_device_ids, (option_names or {}).get(
            "local_device_ids", "--local-device-ids"))
    if settings is None:
        if local_device_ids is not None:
            raise DistributedError("--local-device-ids: only for a multi-process run (give --coordinator, "
                                   "--num-processes and --process-id, or --distributed under a launcher)")
        return summary()
    settings["local_device_ids"] = local_device_ids
    if _DONE is not None:
        if settings != _DONE:
            raise DistributedError(f"jax.distributed is already initialized in this process with {_DONE}; "
                                   f"cannot re-initialize with {settings}")
        return summary()
    if jax.distributed.is_initialized():  # someone else (a notebook, a caller) did it: use theirs
        _DONE = settings
        return summary()
    from jax._src import xla_bridge  # the public API has no "backend already started?" query
    if xla_bridge.backends_are_initialized():
        raise DistributedError("initialize: JAX's backend is already running (something called "
                               "jax.devices(), device_put or a computation first); call "
                               "dsref.reference.distributed.initialize before any JAX work")
    if jax.config.jax_cpu_collectives_implementation is None:
        # Without CPU collectives a cross-process psum/all_to_all on CPU fails at run time.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in settings.items() if v is not None}
    jax.distributed.initialize(**{("coordinator_address" if k == "coordinator" else k): v
                                  for k, v in kwargs.items()}, initialization_timeout=timeout_s)
    _DONE = settings
    return summary()


def summary() -> Summary:
    """This process's place in the run (starts JAX's backend if nothing has yet)."""
    import jax

    from jax._src import distributed as _dist  # the coordinator address JAX settled on
    return Summary(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                   jax.devices()[0].platform, getattr(_dist.global_state, "coordinator_address", None))


def shutdown() -> None:
    """Leave the run (all processes should; JAX also does it at exit)."""
    global _DONE
    import jax
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    _DONE = None


# ------------------------------------------------------------------ global arrays
def to_global(x, sharding):
    """``x`` (a host value every process holds identically) as a global jax.Array laid out by
    ``sharding``: each process builds only its own devices' shards from its copy (no
    cross-host transfer). ``jax.device_put(x, sharding)`` gives the same array in jax 0.10.2,
    but first checks that x is equal on every process by all-gathering all of it
    (multihost_utils.assert_equal, from jax/_src/dispatch.py): fine for a prompt, N copies of
    every weight over the network for a model. Nothing here checks that the copies agree."""
    import jax
    import numpy as np

    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def gather(x):
    """A (possibly sharded across processes) array as one numpy array on every process: the
    same as reference/mesh.py ``fetch`` (one implementation; this name for callers that think
    in processes). An array spanning processes is a collective fetch (process_allgather):
    every process must call it at the same point."""
    from dsref.reference.mesh import fetch
    return fetch(x)


# ------------------------------------------------------------------ CLI
def add_distributed_args(parser) -> None:
    """The multi-host options (all optional) in their own --help group; pass the parsed args to
    ``initialize_from_args``."""
    g = parser.add_argument_group(
        "multi-host (jax.distributed)",
        "Run one process per host; every process runs the same command. Under SLURM, Open MPI\n"
        "and on Cloud TPU VMs JAX detects the settings itself (give --distributed); flags\n"
        "override what it detects. See docs/multi-host.md.")  # line breaks: the CLIs print descriptions raw
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help=f"address of process 0 and a free port on it, the same on every process "
                        f"(env ${ENV_COORDINATOR})")
    g.add_argument("--num-processes", metavar="N",
                   help=f"number of processes in the run, >= 1 (env ${ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", metavar="I",
                   help=f"this process's index in [0, N), 0 on the coordinator's host (env ${ENV_PROCESS_ID})")
    g.add_argument("--local-device-ids", metavar="IDS",
                   help=f"this process's devices, e.g. 0,1,2,3,4,5,6,7 (env ${ENV_LOCAL_DEVICE_IDS}); "
                        "needed with one process per GPU host under SLURM/Open MPI, where JAX "
                        "otherwise gives each process one GPU")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run, taking what the flags do not give from the "
                        "launcher: SLURM, Open MPI and Cloud TPU VMs, which jax.distributed.initialize "
                        "detects itself (https://docs.jax.dev/en/latest/_autosummary/jax.distributed.initialize.html)")


def initialize_from_args(args) -> Summary:
    """``initialize`` with the options ``add_distributed_args`` added (for the commands). In a
    multi-process run the C-level stdout goes to stderr: gloo, JAX's CPU collectives, prints
    its connection log there ("[Gloo] Rank 0 is connected to ..."), which would corrupt
    ``--json``; Python's ``sys.stdout`` keeps the real stdout."""
    info = initialize(args.coordinator, args.num_processes, args.process_id,
                      local_device_ids=args.local_device_ids, auto=args.distributed)
    if info.process_count > 1 and info.platform == "cpu":
        _native_stdout_to_stderr()
    return info


def _native_stdout_to_stderr() -> None:
    import os
    import sys
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real, "w", buffering=1)
