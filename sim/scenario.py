"""Scenarios for the serving and training simulators: TOML files, defaults, validation.

A scenario is a TOML file (the package's ``scenarios/<name>.toml`` for the built-in
ones, read as package data through importlib.resources, or any path). Every input has a default (``SERVE_DEFAULTS`` / ``TRAIN_DEFAULTS``
below, which double as the documentation of the fields); a file only states what
differs. Unknown keys and impossible values raise :class:`ScenarioError` naming
the file (or scenario) and the field, e.g.
``deepseek-day6: field 'decode.ep': EP degree 100 does not divide the 288 expert slots``.

Hardware comes from ``hwmodels`` (``system`` = a node or cluster preset), the
model from ``reference.presets`` (``model`` = a preset name or config.json).
"""

from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import dataclass, replace
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
    """A validated scenario: ``data`` holds every field (defaults filled in)."""

    kind: str
    data: dict
    source: str
    base_dir: Path

    def __getitem__(self, k):
        return self.data[k]

    def with_overrides(self, overrides: dict) -> "Scenario":
        d = _merge(self.data, overrides, self.source)
        sc = replace(self, data=d)
        sc.validate()
        return sc

    # ----------------------------------------------------------- resolution
    def model(self):
        from dsref.reference.config import ConfigError
        from dsref.reference.presets import load_config
        try:
            return load_config(self.data["model"])
        except (ConfigError, ValueError, KeyError) as e:
            raise _err(self.source, "model", f"unknown model {self.data['model']!r} ({e})") from None

    def quant(self):
        from dsref.sim.quant import get_quant
        try:
            return get_quant(self.data["quant"])
        except ValueError as e:
            raise _err(self.source, "quant", str(e)) from None

    def system(self):
        """(node, cluster or None, device) with device_split applied."""
        from dsref.hwmodels.catalog import CatalogError
        from dsref.hwmodels.systems import Cluster, load_system
        try:
            s = load_system(self.data["system"])
        except (CatalogError, FileNotFoundError, OSError, ValueError) as e:
            raise _err(self.source, "system", f"unknown device or system {self.data['system']!r} ({e})") from None
        node, cluster = (s.node, s) if isinstance(s, Cluster) else (s, None)
        split = self.data.get("device_split", 1)
        dev = node.device if split == 1 else split_device(node.device, split)
        return node, cluster, dev

    def latency_s(self) -> dict:
        """Per-call network latency from the cluster preset (max_latency, else hop_latency), else none."""
        _, cluster, _ = self.system()
        if cluster is None:
            return {}
        lat = cluster.max_latency_s or cluster.hop_latency_s
        return {"inter": lat} if lat else {}

    # ----------------------------------------------------------- validation
    def validate(self) -> None:
        (self._validate_serve if self.kind == "serve" else self._validate_train)()

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
        roles = ("prefill", "decode") if d["mode"] == "disaggregated" else ("aggregated",)
        cfg = self.model()
        self.quant()
        node, _, dev = self.system()
        for role in roles:
            self._validate_instance(role, cfg, node, dev)

    def instance_devices(self, role: str) -> int:
        node, _, _ = self.system()
        r = self.data[role]
        return r["devices"] if r["devices"] > 0 else r["nodes"] * node.devices_per_node * self.data["device_split"]

    def _validate_instance(self, role, cfg, node, dev) -> None:
        s, r = self.source, self.data[role]
        for k in ("instances", "tp", "ep", "pp", "token_budget_per_device", "max_batch_per_device"):
            self._pos(f"{role}.{k}", r[k])
        for k in ("nodes", "devices", "attn_dp", "redundant_experts", "node_limit", "max_requests_per_step"):
            self._pos(f"{role}.{k}", r[k], True)
        n = self.instance_devices(role)
        if n <= 0:
            raise _err(s, f"{role}.nodes", "the instance has zero devices")
        if not 0.0 <= r["mtp_acceptance"] < 1.0:
            raise _err(s, f"{role}.mtp_acceptance", f"must be in [0, 1), got {r['mtp_acceptance']}")
        if r["mtp_acceptance"] > 0 and cfg.num_nextn_predict_layers < 1:
            raise _err(s, f"{role}.mtp_acceptance", f"model {cfg.name} has no MTP module")
        tp, pp, ep = r["tp"], r["pp"], r["ep"]
        dp = r["attn_dp"] or n // (tp * pp)
        if dp * tp * pp != n:
            raise _err(s, f"{role}.attn_dp", f"attn_dp {dp} x tp {tp} x pp {pp} must equal the {n} devices")
        if ep > n:
            raise _err(s, f"{role}.ep", f"EP degree {ep} exceeds the {n} devices of the instance")
        if cfg.is_moe:
            slots = cfg.n_routed_experts + r["redundant_experts"]
            if slots % ep:
                raise _err(s, f"{role}.ep", f"EP degree {ep} does not divide the {slots} expert slots "
                           f"({cfg.n_routed_experts} routed + {r['redundant_experts']} redundant)")
        elif ep > 1:
            raise _err(s, f"{role}.ep", f"model {cfg.name} has no experts")
        if cfg.num_hidden_layers < pp:
            raise _err(s, f"{role}.pp", f"{pp} stages for {cfg.num_hidden_layers} layers")
        cap = self.kv_capacity(role)
        if cap["kv_tokens_per_device"] < 1:
            raise _err(s, f"{role}.nodes", f"model does not fit in memory: weights {cap['weight_bytes_per_device'] / 1e9:.1f}"
                       f" GB + activation reserve {cap['activation_reserve_bytes'] / 1e9:.1f} GB per device "
                       f"exceed the {dev.memory_bytes / 1e9:.1f} GB of a {dev.id}")

    def parallelism(self, role: str):
        from dsref.sim.parallel import Parallelism
        node, _, _ = self.system()
        r, n = self.data[role], self.instance_devices(role)
        cfg = self.model()
        return Parallelism(devices=n, dp=r["attn_dp"] or n // (r["tp"] * r["pp"]), tp=r["tp"], ep=r["ep"], pp=r["pp"],
                           expert_slots=(cfg.n_routed_experts + r["redundant_experts"]) if cfg.is_moe else 0,
                           devices_per_node=(self.data.get("scaleup_devices", 0)
                                             or node.devices_per_node * self.data["device_split"]),
                           node_limit=r["node_limit"] or None)

    def kv_capacity(self, role: str) -> dict:
        """KV-cache tokens per device = (memory - weights under the parallel layout - activation reserve) / latent bytes per token."""
        from dsref.sim.local import activation_bytes
        cfg, q = self.model(), self.quant()
        _, _, dev = self.system()
        r = self.data[role]
        par = self.parallelism(role)
        w = par.weight_bytes_per_device(cfg, q)["total"]
        reserve = r["activation_reserve_bytes"]
        if reserve < 0:
            reserve = activation_bytes(cfg, q, 1, r["token_budget_per_device"])
        per_tok = cfg.kv_cache_bytes_per_token(q.kv_bytes) / par.pp
        free = dev.require("memory_bytes") - w - reserve
        return {"weight_bytes_per_device": w, "activation_reserve_bytes": reserve,
                "kv_bytes_per_token": per_tok, "kv_tokens_per_device": max(0.0, free) // per_tok,
                "kv_tokens_per_instance": max(0.0, free) // per_tok * par.dp}

    def trace_path(self) -> Path:
        p = Path(self.data["workload"]["trace"])
        return p if p.is_absolute() else self.base_dir / p

    # -------------------------------------------------------------- training
    def _validate_train(self) -> None:
        d, s = self.data, self.source
        cfg = self.model()
        self.quant()
        node, cluster, dev = self.system()
        for k in ("pp", "ep", "tp", "seq_len", "global_batch", "micro_batch", "token_budget"):
            self._pos(k, d[k])
        n = self.train_devices()
        if n <= 0:
            raise _err(s, "devices", "zero devices")
        if d["schedule"] not in ("dualpipe", "1f1b"):
            raise _err(s, "schedule", f"must be 'dualpipe' or '1f1b', got {d['schedule']!r}")
        if d["recompute"] not in ("none", "selective", "full"):
            raise _err(s, "recompute", f"must be none, selective or full, got {d['recompute']!r}")
        if d["stage_split"] not in ("even", "balanced"):
            raise _err(s, "stage_split", f"must be 'even' or 'balanced', got {d['stage_split']!r}")
        if n % (d["pp"] * d["tp"]):
            raise _err(s, "pp", f"pp {d['pp']} x tp {d['tp']} does not divide the {n} devices")
        dp = n // (d["pp"] * d["tp"])
        if cfg.is_moe and cfg.n_routed_experts % d["ep"]:
            raise _err(s, "ep", f"EP degree {d['ep']} does not divide the {cfg.n_routed_experts} experts")
        if d["ep"] > dp:
            raise _err(s, "ep", f"EP degree {d['ep']} exceeds the data-parallel degree {dp} (EP spans DP ranks)")
        if d["pp"] > cfg.num_hidden_layers:
            raise _err(s, "pp", f"{d['pp']} stages for {cfg.num_hidden_layers} layers")
        per_rank = d["global_batch"] / dp
        if per_rank != int(per_rank) or int(per_rank) % d["micro_batch"]:
            raise _err(s, "global_batch", f"{d['global_batch']} sequences do not split into DP {dp} ranks x "
                       f"micro-batches of {d['micro_batch']}")
        m = int(per_rank) // d["micro_batch"]
        rc = d["comm_reserved_cores"]
        if rc < 0 or (rc and (dev.cores is None or rc >= dev.cores)):
            raise _err(s, "comm_reserved_cores", f"{rc} reserved of the device's {dev.cores} cores "
                       f"({dev.source_file}: field 'cores')")
        if d["mtp"] and cfg.num_nextn_predict_layers < 1:
            raise _err(s, "mtp", f"model {cfg.name} has no MTP module (num_nextn_predict_layers = 0)")
        if not 0.0 < d["goodput"] <= 1.0:
            raise _err(s, "goodput", f"must be in (0, 1], got {d['goodput']}")
        if d["schedule"] == "dualpipe":
            if d["pp"] % 2:
                raise _err(s, "pp", "DualPipe needs an even number of stages")
            if m % 2 or m // 2 < d["pp"]:
                raise _err(s, "micro_batch", f"DualPipe needs an even number of micro-batches >= 2*pp; got {m}")

    def train_devices(self) -> int:
        node, cluster, _ = self.system()
        d = self.data
        if d["devices"]:
            return d["devices"]
        if d["nodes"]:
            return d["nodes"] * node.devices_per_node
        return cluster.num_devices if cluster is not None else node.devices_per_node


def split_device(dev, n: int):
    """A catalog device run as ``n`` logical devices (e.g. the two dies of an Ascend 910C):
    peaks, memory, bandwidths, power and price divided by n (thin adapter; the catalog is per package)."""
    figs = {k: (replace(f, value=f.value / n) if f.value is not None else f) for k, f in dev.figures.items()}

    def div(x):
        return None if x is None else x / n
    return replace(dev, id=f"{dev.id}/{n}", name=f"{dev.name} (1/{n})", figures=figs,
                   peak_flops={k: v / n for k, v in dev.peak_flops.items()}, memory_bytes=div(dev.memory_bytes),
                   memory_bandwidth=div(dev.memory_bandwidth), intra_node_bandwidth=div(dev.intra_node_bandwidth),
                   network_bandwidth=div(dev.network_bandwidth), power_w=div(dev.power_w),
                   price_usd_per_hour=div(dev.price_usd_per_hour))
