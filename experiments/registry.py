"""Published claims, the records experiments return, and the list of experiments.

A *record* compares one simulated number with one published number:
``error = (predicted - published) / published`` (signed). Each record says
which reading was taken where the claim is ambiguous and, in one line, the
mechanism that produces the number.

Status of a record
  * ``predicted``     -- the number comes out of the simulator / cost model.
  * ``derived``       -- arithmetic on published *inputs* only (e.g. cost =
    GPU-hours x price); reported, but excluded from the error statistics.
  * ``not_modelled``  -- outside what the simulator models; ``predicted`` is
    None and ``note`` says why. Never a made-up number.

Claims that are *inputs* of the scenarios (cluster size, parallel plan, token
counts, prices ...) are listed in ``INPUT_IDS`` with the reason; no
experiment may return a record for them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

STATUSES = ("predicted", "derived", "not_modelled")

#: Claim ids the scenarios take as given, with the reason (listed in docs/validation.md).
INPUT_IDS: dict[str, str] = {
    "dsv3_tr_gpu_price": "rental price assumption ($2/H800-hour); the catalog's h800 price (hwmodels/data/devices/h800.toml)",
    "dsv3_tr_tokens": "pre-training token budget (14.8T): the training scenario's token_budget",
    "dsv3_tr_cluster": "cluster size (2048 H800): the h800-cluster-2048 system preset",
    "dsv3_tr_node": "8 GPUs per node, NVLink + IB: the h800-node preset",
    "dsv3_tr_parallel": "parallel plan (PP16 DualPipe, EP64, ZeRO-1 DP, no TP): the training scenario's plan",
    "dsv3_tr_model_config": "model hyper-parameters: the deepseek-v3 preset (reference/presets.py)",
    "dsv3_tr_nvlink_vs_ib": ("link figures (NVLink ~160 GB/s effective, IB 50 GB/s): the catalog's link bandwidths and "
                             "the cited source of efficiency.toml's gpu.all_reduce/all_to_all factors -- predicting "
                             "them would be circular"),
    "isca_h800_nvlink": "hardware spec (H800 NVLink 400 GB/s bidirectional): hwmodels/data/devices/h800.toml",
    "d6_prefill_ep": "deployment plan (prefill EP32 units of 4 nodes): the deepseek-day6 scenario",
    "d6_decode_ep": "deployment plan (decode EP144 units of 18 nodes): the deepseek-day6 scenario",
    "d6_nodes": "deployment size (226.75 nodes average, 278 peak): sizes the scenario's prefill/decode pools",
    "d6_input_tokens": "offered load (608B input tokens/day, 56.3% prefix-cache hits): the scenario's workload",
    "d6_output_tokens": "offered load (168B output tokens/day): the scenario's request rate and output lengths",
}


#: The published claims (with their sources), shipped as package data of dsref.experiments.
CLAIMS_RESOURCE = ("data", "public_claims.json")


def claims_resource():
    """The packaged public_claims.json as an importlib.resources Traversable."""
    res = resources.files("dsref.experiments")
    for part in CLAIMS_RESOURCE:
        res = res / part
    return res


@lru_cache(maxsize=1)
def _packaged() -> tuple[dict, ...]:
    return tuple(json.loads(claims_resource().read_text(encoding="utf-8")))


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict, ...]:
    return tuple(json.loads(Path(path).read_text(encoding="utf-8")))


def load_claims(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """{claim id: claim dict}: the packaged experiments/data/public_claims.json, or the file at ``path``."""
    rows = _packaged() if path is None else _load(str(path))
    return {c["id"]: dict(c) for c in rows}


@dataclass(frozen=True)
class Record:
    """One simulated-vs-published comparison (see the module docstring)."""

    id: str
    predicted: float | None
    published: float | None
    unit: str
    source: str
    status: str = "predicted"
    part: str = ""          # which entry of a multi-valued claim (e.g. 'total' of [total, active])
    reading: str = ""       # the interpretation taken for an ambiguous claim
    note: str = ""          # the mechanism, in one line

    @property
    def error(self) -> float | None:
        return signed_error(self.predicted, self.published)

    @property
    def key(self) -> str:
        return f"{self.id}:{self.part}" if self.part else self.id

    def to_dict(self) -> dict:
        d = asdict(self)
        d["error"] = self.error
        d["key"] = self.key
        return d


def signed_error(predicted: float | None, published: float | None) -> float | None:
    """(predicted - published) / published; None when either is missing or published is 0."""
    if predicted is None or published is None or published == 0:
        return None
    if not (math.isfinite(predicted) and math.isfinite(published)):
        return None
    return (predicted - published) / published


def record(claims: dict[str, dict], cid: str, predicted: float | None, *, part: str = "",
           published: float | None = None, unit: str | None = None, status: str = "predicted",
           reading: str = "", note: str = "") -> Record:
    """A Record for claim ``cid``; published value and unit default to the claim's own
    (pass ``published`` for one entry of a list/dict-valued claim)."""
    if cid not in claims:
        raise KeyError(f"claim id {cid!r} is not in public_claims.json")
    if cid in INPUT_IDS:
        raise ValueError(f"claim {cid!r} is a scenario input ({INPUT_IDS[cid]}), not a prediction")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    c = claims[cid]
    if published is None:
        v = c["value"]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"claim {cid!r} has a non-scalar value {v!r}; pass published= and part=")
        published = float(v)
    if status == "not_modelled":
        predicted = None
    src = f"{c['source']} -- {c.get('source_detail', '')}".rstrip(" -")
    return Record(cid, None if predicted is None else float(predicted), float(published),
                  unit if unit is not None else c["unit"], src, status, part, reading, note)


#: (module, function) of every experiment; each is run(claims, fast=False) -> list[Record].
EXPERIMENTS: tuple[tuple[str, str], ...] = (
    ("dsref.experiments.isca_kv_flops", "run"),
    ("dsref.experiments.isca_tpot", "run"),
    ("dsref.experiments.dsv3_training", "run"),
    ("dsref.experiments.day6_serving", "run"),
    ("dsref.experiments.edge_devices", "run"),
    ("dsref.experiments.ascend_vs_h100", "run"),
)


def experiment_names() -> list[str]:
    return [m.rsplit(".", 1)[1] for m, _ in EXPERIMENTS]


def get_experiment(name: str):
    import importlib
    for mod, fn in EXPERIMENTS:
        if mod.rsplit(".", 1)[1] == name:
            return getattr(importlib.import_module(mod), fn)
    raise KeyError(f"unknown experiment {name!r}; known: {', '.join(experiment_names())}")
