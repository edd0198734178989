"""Scenarios for the serving and training simulators: TOML files, defaults, validation.

A scenario is a TOML file (the package's ``scenarios/<name>.toml`` for the built-in
ones, read as package data through importlib.resources, or any path). Every input
has a default (``SERVE_DEFAULTS`` / ``TRAIN_DEFAULTS`` below, which double as the
documentation of the fields); a file only states what differs. Unknown keys and impossible values raise :class:`ScenarioError` naming
the file (or scenario) and the field, e.g.
``deepseek-day6: field 'decode.ep': EP degree 100 does not divide the 288 expert slots``.

Hardware comes from ``hwmodels`` (``system`` = a node or cluster preset), the
model from ``reference.presets`` (``model`` = a preset name or config.json): this
module checks the structure; ``sim.deployment.resolve`` looks the model and the
hardware up once (when the scenario is loaded) and checks what needs them.
"""

from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import dataclass, field, replace
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


# ---------------------------------------------------------------- defaults
_LENGTH = {"dist": "fixed", "mean": 1000.0, "cv": 0.0, "min": 1, "max": 1_000_000}
_INSTANCE = {
    "instances": 1,            # identical copies of this instance
    "nodes": 1,                # nodes per instance (devices = nodes * devices_per_node) ...
    "devices": 0,              # ... or an explicit device count (overrides nodes when > 0)
    "attn_dp": 0,              # DP-attention ranks (0 = devices / (tp * pp))
    "tp": 1,
    "ep": 1,                   # expert-parallel degree (1 = every device holds all experts)
    "pp": 1,
    "redundant_experts": 0,    # extra expert replicas (DeepSeek: 32); slots = routed + redundant
    "node_limit": 0,           # node-limited routing M (0 = unlimited)
    "token_budget_per_device": 16384,  # new tokens per step per device (prefill / mixed steps)
    "max_batch_per_device": 256,       # running sequences per device (decode)
    "max_requests_per_step": 0,        # prefill requests per step (0 = only the token budget limits)
    "two_microbatch_overlap": False,   # split each step in two micro-batches: max(2*compute(half), comm)
    "mtp_acceptance": 0.0,             # MTP: 1 draft token accepted with this probability (0 = off)
    "activation_reserve_bytes": -1.0,  # -1: largest prefill op's activations (sim.local.activation_bytes)
}
SERVE_DEFAULTS: dict[str, Any] = {
    "name": "", "description": "", "kind": "serve",
    "model": "deepseek-v3", "quant": "fp8", "seed": 0, "duration_s": 60.0,
    "system": "h800-node",      # hwmodels node or cluster preset
    "device_split": 1,          # run each catalog device as N logical devices (Ascend 910C = 2 dies)
    "scaleup_devices": 0,       # devices sharing the scale-up fabric (0 = a node; NVL72 / CloudMatrix UB: more)
    "mode": "disaggregated",    # disaggregated | aggregated
    "ctx_quantum_tokens": 64,   # decode step-time cache granularity of the mean context (0 = exact)
    "sample_interval_s": 0.0,   # queue-length sampling period (0 = duration / 200)
    "workload": {
        "arrival": "poisson",   # poisson | constant | trace
        "rate_per_s": 1.0,
        "trace": "",            # JSONL: {"t": s, "prompt_tokens", "output_tokens", "cached_tokens"}
        "prompt_tokens": dict(_LENGTH),
        "output_tokens": dict(_LENGTH, mean=200.0),
        "prefix_cache_hit_rate": 0.0,  # token-level share of each prompt found in the prefix cache
    },
    "prefill": dict(_INSTANCE),
    "decode": dict(_INSTANCE),
    "aggregated": dict(_INSTANCE),
}
TRAIN_DEFAULTS: dict[str, Any] = {
    "name": "", "description": "", "kind": "train",
    "model": "deepseek-v3", "quant": "fp8", "seed": 0,
    "system": "h800-cluster-2048", "nodes": 0, "devices": 0,   # 0 nodes/devices = the whole system
    "schedule": "dualpipe",     # dualpipe | 1f1b
    "pp": 16, "ep": 64, "tp": 1, "node_limit": 4,
    "seq_len": 4096, "global_batch": 15360, "micro_batch": 1,
    "recompute": "selective",   # none | selective (RMSNorm + MLA up-projections) | full
    "ep_overlap": True,         # EP all-to-all hidden behind compute (DualPipe: only in F&B chunk pairs)
    "dp_overlap": True,         # ZeRO-1 gradient reduce-scatter overlapped with the last backward chunk
    "comm_reserved_cores": 0,   # cores (GPU SMs) the EP communication kernels hold while they overlap compute
    "mtp": False,               # train the model's MTP module(s) too (on the last pipeline stage)
    "stage_split": "even",      # even (first stages take the remainder) | balanced (min-max stage compute)
    "goodput": 1.0,             # share of the reserved device time that is productive training
    "token_budget": 14.8e12,
}

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
        if not p.exists():
            raise ScenarioError(f"{p}: field 'scenario': file not found")
        src, text = str(p), p.read_text()
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


def from_dict(data: dict, src: str = "<scenario>", path: Path | None = None,
              overrides: dict | None = None, default_name: str = "") -> "Scenario":
    kind = data.get("kind", "serve")
    if kind not in ("serve", "train"):
        raise _err(src, "kind", f"must be 'serve' or 'train', got {kind!r}")
    base = SERVE_DEFAULTS if kind == "serve" else TRAIN_DEFAULTS
    d = _merge(base, data, src)
    if overrides:
        d = _merge(d, overrides, src)
    if not d["name"]:
        d["name"] = default_name or (path.stem if path is not None else "scenario")
    sc = Scenario(kind, d, src, path.parent if path is not None else Path.cwd())
    sc.validate()
    return sc


@dataclass(frozen=True)
class Scenario:
    """A validated scenario: ``data`` holds every field (defaults filled in). Validation ends
    with ``sim.deployment.resolve``, whose Deployment is kept here (each scenario is resolved once)."""

    kind: str
    data: dict
    source: str
    base_dir: Path
    _deployment: Any = field(default=None, init=False, repr=False, compare=False)

    def __getitem__(self, k):
        return self.data[k]

    def with_overrides(self, overrides: dict) -> "Scenario":
        d = _merge(self.data, overrides, self.source)
        sc = replace(self, data=d)
        sc.validate()
        return sc

    # ----------------------------------------------------------- validation
    def validate(self) -> None:
        """The structure here, then what needs the model and the hardware (sim.deployment.resolve)."""
        if self.kind == "serve":
            self._validate_serve()
        from dsref.sim.deployment import resolve  # deployment builds on this module: imported at use
        resolve(self)

    def _pos(self, fld: str, v, allow_zero=False):
        if v < 0 or (v == 0 and not allow_zero):
            raise _err(self.source, fld, f"must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

    def _validate_serve(self) -> None:
        d, s = self.data, self.source
        self._pos("duration_s", d["duration_s"])
        self._pos("device_split", d["device_split"])
        self._pos("ctx_quantum_tokens", d["ctx_quantum_tokens"], True)
        self._pos("scaleup_devices", d["scaleup_devices"], True)
        if d["mode"] not in ("disaggregated", "aggregated"):
            raise _err(s, "mode", f"must be 'disaggregated' or 'aggregated', got {d['mode']!r}")
        w = d["workload"]
        if w["arrival"] not in ("poisson", "constant", "trace"):
            raise _err(s, "workload.arrival", f"must be poisson, constant or trace, got {w['arrival']!r}")
        if w["arrival"] == "trace":
            if not w["trace"]:
                raise _err(s, "workload.trace", "arrival = 'trace' needs a JSONL trace file")
            if not self.trace_path().exists():
                raise _err(s, "workload.trace", f"file not found: {self.trace_path()}")
        else:
            self._pos("workload.rate_per_s", w["rate_per_s"])
        if not 0.0 <= w["prefix_cache_hit_rate"] < 1.0:
            raise _err(s, "workload.prefix_cache_hit_rate", f"must be in [0, 1), got {w['prefix_cache_hit_rate']}")
        for key in ("prompt_tokens", "output_tokens"):
            L = w[key]
            if L["dist"] not in _DISTS:
                raise _err(s, f"workload.{key}.dist", f"must be one of {_DISTS}, got {L['dist']!r}")
            self._pos(f"workload.{key}.mean", L["mean"])
            self._pos(f"workload.{key}.cv", L["cv"], True)
            self._pos(f"workload.{key}.min", L["min"])
            if L["max"] < L["min"]:
                raise _err(s, f"workload.{key}.max", f"must be >= min ({L['min']}), got {L['max']}")

    def trace_path(self) -> Path:
        p = Path(self.data["workload"]["trace"])
        return p if p.is_absolute() else self.base_dir / p
