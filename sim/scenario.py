"""Scenarios for the serving and training simulators: TOML files, defaults, validation.

A scenario is a TOML file (the package's ``scenarios/<name>.toml`` for the built-in
ones, read as package data through importlib.resources, or any path), read into
typed tables (``ServeScenario`` / ``TrainScenario`` and their ``Workload``,
``Length``, ``Instance`` tables below, whose defaults double as the documentation
of the fields); a file only states what differs. Unknown keys and impossible values raise :class:`ScenarioError` naming
the file (or scenario) and the field, e.g.
``deepseek-day6: field 'decode.ep': EP degree 100 does not divide the 288 expert slots``.

Hardware comes from ``hwmodels`` (``system`` = a node or cluster preset), the
model from ``reference.presets`` (``model`` = a preset name or config.json): this
module checks the structure; ``sim.deployment.resolve`` looks the model and the
hardware up once (when the scenario is loaded) and checks what needs them.
"""

from __future__ import annotations

import codecs
import copy
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any


def _builtin_dir():
    """The built-in scenarios: package data of dsref.sim (a directory, or inside a wheel/zip)."""
    return resources.files("dsref.sim") / "scenarios"


class ScenarioError(ValueError):
    """A scenario that cannot run; the message is "<file or scenario>: field '<name>': ..."."""


def _err(src: str, fld: str, msg: str) -> ScenarioError:
    return ScenarioError(f"{src}: field '{fld}': {msg}")


# ---------------------------------------------------------------- the fields
# Every field with its default; the classes double as the documentation of the TOML format
# (one table per nested class). A file only states what differs.
_META = ("source", "base_dir", "_deployment")  # where a scenario came from; not part of the TOML


class _Table:
    """A scenario table: typed fields; ``as_dict`` gives the TOML shape (nested dicts)."""

    def as_dict(self) -> dict:
        return {f.name: (v.as_dict() if isinstance(v, _Table) else v)
                for f in fields(self) if f.name not in _META for v in (getattr(self, f.name),)}


@dataclass(frozen=True)
class Length(_Table):
    """A token-length distribution (fixed | lognormal | exponential | uniform), clipped to [min, max]."""

    dist: str = "fixed"
    mean: float = 1000.0
    cv: float = 0.0            # coefficient of variation
    min: int = 1
    max: int = 1_000_000


@dataclass(frozen=True)
class Workload(_Table):
    arrival: str = "poisson"   # poisson | constant | trace
    rate_per_s: float = 1.0
    trace: str = ""            # JSONL: {"t": s, "prompt_tokens", "output_tokens", "cached_tokens"}
    prompt_tokens: Length = Length()
    output_tokens: Length = Length(mean=200.0)
    prefix_cache_hit_rate: float = 0.0  # token-level share of each prompt found in the prefix cache


@dataclass(frozen=True)
class Instance(_Table):
    """One serving role's instances (prefill, decode or aggregated)."""

    instances: int = 1             # identical copies of this instance
    nodes: int = 1                 # nodes per instance (devices = nodes * devices_per_node) ...
    devices: int = 0               # ... or an explicit device count (overrides nodes when > 0)
    attn_dp: int = 0               # DP-attention ranks (0 = devices / (tp * pp))
    tp: int = 1
    ep: int = 1                    # expert-parallel degree (1 = every device holds all experts)
    pp: int = 1
    redundant_experts: int = 0     # extra expert replicas (DeepSeek: 32); slots = routed + redundant
    node_limit: int = 0            # node-limited routing M (0 = unlimited)
    token_budget_per_device: int = 16384   # new tokens per step per device (prefill / mixed steps)
    max_batch_per_device: int = 256        # running sequences per device (decode)
    max_requests_per_step: int = 0         # prefill requests per step (0 = only the token budget limits)
    two_microbatch_overlap: bool = False   # split each step in two micro-batches: max(2*compute(half), comm)
    mtp_acceptance: float = 0.0            # MTP: 1 draft token accepted with this probability (0 = off)
    # MTP with d draft tokens per step: acceptance of draft i given drafts 1..i-1 were accepted
    # (e.g. [0.9, 0.75, 0.6]); overrides mtp_acceptance. Expected tokens per step 1 + a1 + a1 a2 + ...
    mtp_acceptance_per_depth: tuple = ()
    moe_tp: int = 0                        # tensor parallelism inside each expert (0 = auto: tp / ep when
                                           # ep divides tp, i.e. TP-sharded experts when EP is off)
    cuda_graph: str = "auto"               # kernels replayed from a captured graph: auto (decode and
                                           # aggregated steps yes, prefill no) | on | off
    routing_zipf: float = 0.0              # expert popularity skew: Zipf exponent of the assignment
                                           # shares (0 = uniform routing)
    activation_reserve_bytes: float = -1.0  # -1: largest prefill op's activations (sim.local.activation_bytes)


@dataclass(frozen=True)
class _ScenarioBase(_Table):
    """The fields every scenario has; the kinds below add theirs (and set kind's and system's defaults)."""

    name: str = ""
    description: str = ""
    kind: str = ""
    model: str = "deepseek-v3"
    quant: str = "fp8"
    seed: int = 0
    system: str = ""               # hwmodels node or cluster preset
    kv_dtype: str = ""             # KV-cache element type: "" (the quantisation's) | bf16 | fp16 | fp8 | fp32
    # where it came from (messages name the source; relative trace paths start at base_dir)
    source: str = "<scenario>"
    base_dir: Path = Path(".")
    _deployment: Any = field(default=None, init=False, repr=False, compare=False)  # sim.deployment.resolve

    def with_overrides(self, overrides: dict) -> "Scenario":
        """This scenario with ``overrides`` (nested dict, TOML shape) applied, validated and resolved anew."""
        return _overridden(self, overrides)


@dataclass(frozen=True)
class ServeScenario(_ScenarioBase):
    kind: str = "serve"
    system: str = "h800-node"
    duration_s: float = 60.0
    device_split: int = 1          # run each catalog device as N logical devices (Ascend 910C = 2 dies)
    scaleup_devices: int = 0       # devices sharing the scale-up fabric (0 = a node; NVL72 / CloudMatrix UB: more)
    mode: str = "disaggregated"    # disaggregated | aggregated
    ctx_quantum_tokens: int = 64   # decode step-time cache granularity of the mean context (0 = exact)
    kernel_floors: bool = True     # charge kernel launch floors, per-step host overhead and the kernel
                                   # tables' GEMM curves (hwmodels/kernels.toml); false = plain roofline
    sample_interval_s: float = 0.0  # queue-length sampling period (0 = duration / 200)
    workload: Workload = Workload()
    prefill: Instance = Instance()
    decode: Instance = Instance()
    aggregated: Instance = Instance()

    def trace_path(self) -> Path:
        p = Path(self.workload.trace)
        return p if p.is_absolute() else self.base_dir / p

    @property
    def roles(self) -> tuple[str, ...]:
        """The instance roles of this mode."""
        return ("prefill", "decode") if self.mode == "disaggregated" else ("aggregated",)

    def instance(self, role: str) -> Instance:
        return getattr(self, role)


@dataclass(frozen=True)
class TrainScenario(_ScenarioBase):
    kind: str = "train"
    system: str = "h800-cluster-2048"
    nodes: int = 0                 # 0 nodes and 0 devices = the whole system
    devices: int = 0
    schedule: str = "dualpipe"     # dualpipe | 1f1b
    pp: int = 16
    ep: int = 64
    tp: int = 1
    node_limit: int = 4
    seq_len: int = 4096
    global_batch: int = 15360
    micro_batch: int = 1
    recompute: str = "selective"   # none | selective (RMSNorm + MLA up-projections) | full
    ep_overlap: bool = True        # EP all-to-all hidden behind compute (DualPipe: only in F&B chunk pairs)
    dp_overlap: bool = True        # ZeRO-1 gradient reduce-scatter overlapped with the last backward chunk
    comm_reserved_cores: int = 0   # cores (GPU SMs) the EP communication kernels hold while they overlap compute
    mtp: bool = False              # train the model's MTP module(s) too (on the last pipeline stage)
    stage_split: str = "even"      # even (first stages take the remainder) | balanced (min-max stage compute)
    goodput: float = 1.0           # share of the reserved device time that is productive training
    token_budget: float = 14.8e12


Scenario = ServeScenario | TrainScenario
_KINDS = {"serve": ServeScenario, "train": TrainScenario}


def _defaults(cls) -> dict:
    """The TOML shape of a scenario class: {field: default} (nested tables as dicts)."""
    return cls().as_dict()


def _build(cls, d: dict, **meta):
    """A typed table from its merged dict (nested tables built from their defaults' classes)."""
    proto = cls()
    return cls(**{k: (_build(type(getattr(proto, k)), v) if isinstance(v, dict) else v) for k, v in d.items()},
               **meta)


_DISTS = ("fixed", "lognormal", "exponential", "uniform")


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def _merge(base: dict, over: dict, src: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        name = prefix + k
        if k not in base:
            raise _err(src, name, f"unknown key; allowed: {sorted(base)}")
        if isinstance(base[k], dict) and base[k]:
            if not isinstance(v, dict):
                raise _err(src, name, "must be a table")
            out[k] = _merge(base[k], v, src, name + ".")
        else:
            d = base[k]
            if isinstance(d, bool):
                if not isinstance(v, bool):
                    raise _err(src, name, f"must be true or false, got {v!r}")
            elif isinstance(d, (int, float)):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise _err(src, name, f"must be a finite number, got {v!r}")
                if isinstance(d, int) and not isinstance(d, bool) and float(v) != int(v):
                    raise _err(src, name, f"must be an integer, got {v!r}")
                v = type(d)(v)
            elif isinstance(d, str) and not isinstance(v, str):
                raise _err(src, name, f"must be a string, got {v!r}")
            elif isinstance(d, tuple):  # a list of numbers
                if not isinstance(v, (list, tuple)) or any(
                        isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in v):
                    raise _err(src, name, f"must be a list of finite numbers, got {v!r}")
                v = tuple(float(x) for x in v)
            out[k] = v
    return out


def load_raw(name_or_path: str) -> tuple[dict, str, Path | None]:
    """(parsed TOML, source name for messages, file or None for a built-in) of a built-in name or a path."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        res = _builtin_dir() / f"{name_or_path}.toml"
        if not res.is_file():
            raise ScenarioError(f"{name_or_path}: field 'scenario': unknown scenario; built-in: "
                                f"{', '.join(builtin_names())} (or give a .toml path)")
        src, text, p = name_or_path, res.read_text(), None
    else:
        if not str(name_or_path).strip():
            raise ScenarioError("<command line>: field 'scenario': empty; give a built-in name "
                                f"({', '.join(builtin_names())}) or a .toml path")
        if not p.exists():
            raise ScenarioError(f"{p}: field 'scenario': file not found")
        if not p.is_file():
            raise ScenarioError(f"{p}: field 'scenario': not a file (a directory?); give a .toml scenario file")
        src = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ScenarioError(f"{src}: field 'toml': not a TOML text file (not UTF-8)") from None
        except OSError as e:
            raise ScenarioError(f"{src}: field 'scenario': cannot read ({e.strerror or e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{src}: field 'toml': invalid TOML ({e})") from None
    return data, src, p


def load(name_or_path: str, overrides: dict | None = None) -> "Scenario":
    """Load, default and validate a scenario; ``overrides`` (nested dict) win over the file.
    A built-in scenario is named after its file; relative paths in it (a trace) are read from
    the current directory."""
    data, src, path = load_raw(name_or_path)
    return from_dict(data, src, path, overrides, default_name=src if path is None else "")


# What every scenario must state: what it simulates, which model, on what. The rest has defaults
# (the classes above), which are only meaningful once these three are chosen.
REQUIRED = ("kind", "model", "system")
MAX_SAMPLES = 1_000_000    # queue-length samples per run
# Longest run a scenario (or `sim serve --duration`) takes: one simulated day. The simulator's cost
# is per step and per request (deepseek-day6: ~1.6k requests and ~200 steps per simulated second,
# ~45 s of wall time per simulated hour), so a day is already ~20 minutes of wall time; steady
# state is reached in minutes of simulated time, and no published serving figure averages over
# more than a day (DeepSeek's Day-6 report: 24 h).
MAX_DURATION_S = 86_400.0


def from_dict(data: dict, src: str = "<scenario>", path: Path | None = None,
              overrides: dict | None = None, default_name: str = "") -> Scenario:
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise _err(src, missing[0], f"required; a scenario must state {', '.join(REQUIRED)} (missing: "
                   f"{', '.join(missing)}): kind = 'serve' or 'train', model = a preset name or config.json, "
                   "system = a node or cluster preset (see `dsref sim serve --list` for complete examples)")
    kind = data.get("kind", "serve")
    if kind not in _KINDS:
        raise _err(src, "kind", f"must be 'serve' or 'train', got {kind!r}")
    d = _merge(_defaults(_KINDS[kind]), data, src)
    if overrides:
        d = _merge(d, overrides, src)
    if not d["name"]:
        d["name"] = default_name or (path.stem if path is not None else "scenario")
    return _validated(_build(_KINDS[kind], d, source=src,
                             base_dir=path.parent if path is not None else Path.cwd()))


def _overridden(sc: Scenario, overrides: dict) -> Scenario:
    """The scenario with ``overrides`` (nested dict, TOML shape) applied, validated and resolved anew."""
    d = _merge(sc.as_dict(), overrides, sc.source)
    return _validated(_build(type(sc), d, source=sc.source, base_dir=sc.base_dir))


def _validated(sc: Scenario) -> Scenario:
    """The structure here, then what needs the model and the hardware (sim.deployment.resolve, whose
    Deployment is kept with the scenario: each scenario is resolved once)."""
    if sc.kind == "serve":
        _validate_serve(sc)
    from dsref.sim.deployment import resolve  # deployment builds on this module: imported at use
    resolve(sc)
    return sc


def _pos(sc: Scenario, fld: str, v, allow_zero=False):
    if v < 0 or (v == 0 and not allow_zero):
        raise _err(sc.source, fld, f"must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def _validate_serve(sc: ServeScenario) -> None:
    s = sc.source
    _pos(sc, "duration_s", sc.duration_s)
    if sc.duration_s > MAX_DURATION_S:
        raise _err(s, "duration_s", f"must be <= {MAX_DURATION_S:,.0f} s (one simulated day; the simulation's "
                   f"cost grows with every step and request), got {sc.duration_s:g}")
    _pos(sc, "seed", sc.seed, True)
    _pos(sc, "sample_interval_s", sc.sample_interval_s, True)
    if sc.sample_interval_s and sc.duration_s / sc.sample_interval_s > MAX_SAMPLES:
        raise _err(s, "sample_interval_s", f"{sc.sample_interval_s:g} s samples a {sc.duration_s:g} s run more than "
                   f"{MAX_SAMPLES:,} times (each sample is a simulator event); 0 = duration / 200")
    _pos(sc, "device_split", sc.device_split)
    _pos(sc, "ctx_quantum_tokens", sc.ctx_quantum_tokens, True)
    _pos(sc, "scaleup_devices", sc.scaleup_devices, True)
    if sc.mode not in ("disaggregated", "aggregated"):
        raise _err(s, "mode", f"must be 'disaggregated' or 'aggregated', got {sc.mode!r}")
    w = sc.workload
    if w.arrival not in ("poisson", "constant", "trace"):
        raise _err(s, "workload.arrival", f"must be poisson, constant or trace, got {w.arrival!r}")
    if w.arrival == "trace":
        if not w.trace:
            raise _err(s, "workload.trace", "arrival = 'trace' needs a JSONL trace file")
        tp = sc.trace_path()
        if not tp.exists():
            raise _err(s, "workload.trace", f"file not found: {tp}")
        if not tp.is_file():
            raise _err(s, "workload.trace", f"not a file (a directory?): {tp}")
        with tp.open("rb") as f:
            head = f.read(4096)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            raise _err(s, "workload.trace", f"not a JSONL text file (not UTF-8): {tp}") from None
    else:
        _pos(sc, "workload.rate_per_s", w.rate_per_s)
    if not 0.0 <= w.prefix_cache_hit_rate < 1.0:
        raise _err(s, "workload.prefix_cache_hit_rate", f"must be in [0, 1), got {w.prefix_cache_hit_rate}")
    for key in ("prompt_tokens", "output_tokens"):
        L = getattr(w, key)
        if L.dist not in _DISTS:
            raise _err(s, f"workload.{key}.dist", f"must be one of {_DISTS}, got {L.dist!r}")
        _pos(sc, f"workload.{key}.mean", L.mean)
        _pos(sc, f"workload.{key}.cv", L.cv, True)
        _pos(sc, f"workload.{key}.min", L.min)
        if L.max < L.min:
            raise _err(s, f"workload.{key}.max", f"must be >= min ({L.min}), got {L.max}")
