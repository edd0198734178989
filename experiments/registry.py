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

Role of a claim (``"role"`` in public_claims.json; issue 17: keep calibration and
validation apart)
  * ``validation``   -- predicted by an experiment and never used to set a number in a
    data file. Only these enter the error statistics (tests/test_claims_roles.py fails
    when a validation claim's value shows up in hwmodels/data or sim/scenarios).
  * ``calibration``  -- used to set a number; ``"calibrates"`` lists each data-file entry
    it set (``"<repo path>#<toml key>"``). Its record shows the in-sample error, which
    says the solve still holds, not how good the model is: never counted.
  * ``input``        -- a scenario input (cluster size, parallel plan, token counts,
    prices ...), with ``"input_reason"``; ``INPUT_IDS`` is derived from the file and no
    experiment may return a record for them.
  * ``context``      -- a figure that is shown next to a prediction but is too weak to
    grade a model by (relayed second-hand, no stated workload or method), with
    ``"context_reason"``. Its record is listed, never counted.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

# "identity": a figure the model reproduces exactly by construction, because it is arithmetic on the
# architecture alone (KV-cache bytes per token, parameter counts): listed, never counted, so that
# zeros that cannot be anything else do not flatter the error statistics (issue 20)
STATUSES = ("predicted", "derived", "identity", "not_modelled")
ROLES = ("validation", "calibration", "input", "context")

#: The published claims (with their sources), shipped as package data of dsref.experiments.
CLAIMS_RESOURCE = ("data", "public_claims.json")


def claims_resource():
    """The packaged public_claims.json as an importlib.resources Traversable."""
    res = resources.files("dsref.experiments")
    for part in CLAIMS_RESOURCE:
        res = res / part
    return res


def check_roles(rows, where: str) -> None:
    """One clear ValueError (naming ``where`` and the claim) for a claim without a valid role or
    without the field its role needs."""
    seen = set()
    for i, c in enumerate(rows):
        cid = c.get("id") if isinstance(c, dict) else None
        if not cid:
            raise ValueError(f"{where}: claim #{i}: no 'id'")
        if cid in seen:
            raise ValueError(f"{where}: claim {cid!r}: duplicate id")
        seen.add(cid)
        role = c.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: claim {cid!r}: field 'role' must be one of {ROLES}, got {role!r}")
        if role == "calibration":
            cal = c.get("calibrates")
            if not (isinstance(cal, list) and cal and all(isinstance(x, str) and "#" in x for x in cal)):
                raise ValueError(f"{where}: claim {cid!r}: field 'calibrates' must be a non-empty list of "
                                 f"'<repo path>#<toml key>' strings, got {cal!r}")
        elif "calibrates" in c:
            raise ValueError(f"{where}: claim {cid!r}: field 'calibrates' is only for role 'calibration'")
        if role == "input":
            if not (isinstance(c.get("input_reason"), str) and c["input_reason"].strip()):
                raise ValueError(f"{where}: claim {cid!r}: role 'input' needs a non-empty 'input_reason'")
        elif "input_reason" in c:
            raise ValueError(f"{where}: claim {cid!r}: field 'input_reason' is only for role 'input'")
        if role == "context":
            if not (isinstance(c.get("context_reason"), str) and c["context_reason"].strip()):
                raise ValueError(f"{where}: claim {cid!r}: role 'context' needs a non-empty 'context_reason'")
        elif "context_reason" in c:
            raise ValueError(f"{where}: claim {cid!r}: field 'context_reason' is only for role 'context'")


@lru_cache(maxsize=1)
def _packaged() -> tuple[dict, ...]:
    rows = tuple(json.loads(claims_resource().read_text(encoding="utf-8")))
    check_roles(rows, "experiments/data/public_claims.json")
    return rows


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict, ...]:
    try:
        rows = tuple(json.loads(Path(path).read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    check_roles(rows, path)
    return rows


def load_claims(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """{claim id: claim dict}: the packaged experiments/data/public_claims.json, or the file at ``path``."""
    rows = _packaged() if path is None else _load(str(path))
    return {c["id"]: dict(c) for c in rows}


def claims_with_role(role: str, claims: dict[str, dict] | None = None) -> dict[str, dict]:
    """{claim id: claim} of the claims with ``role`` (of the packaged file unless ``claims``)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return {k: c for k, c in (load_claims() if claims is None else claims).items() if c["role"] == role}


#: Claim ids the scenarios take as given, with the reason (listed in docs/validation.md): derived from
#: the claims file (role 'input', field 'input_reason'), the one place they are written.
INPUT_IDS: dict[str, str] = {k: c["input_reason"] for k, c in claims_with_role("input").items()}


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
    role: str = "validation"  # 'validation' (counted), 'calibration' (in-sample) or 'context' (weak source): the last two never counted

    @property
    def counted(self) -> bool:
        """Whether the record enters the error statistics: a predicted figure of a validation claim."""
        return self.role == "validation" and self.status == "predicted" and self.error is not None

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
    c = claims[cid]
    role = c.get("role")
    if role == "input":
        raise ValueError(f"claim {cid!r} is a scenario input ({c.get('input_reason', '')}), not a prediction")
    if role not in ("validation", "calibration", "context"):
        raise ValueError(f"claim {cid!r}: field 'role' must be one of {ROLES}, got {role!r}")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if published is None:
        v = c["value"]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ValueError(f"claim {cid!r} has a non-scalar value {v!r}; pass published= and part=")
        published = float(v)
    if status == "not_modelled":
        predicted = None
    src = f"{c['source']} -- {c.get('source_detail', '')}".rstrip(" -")
    return Record(cid, None if predicted is None else float(predicted), float(published),
                  unit if unit is not None else c["unit"], src, status, part, reading, note, role)


#: (module, function) of every experiment; each is run(claims, fast=False) -> list[Record].
EXPERIMENTS: tuple[tuple[str, str], ...] = (
    ("dsref.experiments.isca_kv_flops", "run"),
    ("dsref.experiments.isca_tpot", "run"),
    ("dsref.experiments.dsv3_training", "run"),
    ("dsref.experiments.day6_serving", "run"),
    ("dsref.experiments.edge_devices", "run"),
    ("dsref.experiments.ascend_vs_h100", "run"),
    ("dsref.experiments.published_sglang_h100", "run"),
    ("dsref.experiments.published_cloudmatrix", "run"),
    ("dsref.experiments.published_deepseek_profile", "run"),
    ("dsref.experiments.published_lmsys_gb200", "run"),
    ("dsref.experiments.published_calibration", "run"),
)


def experiment_names() -> list[str]:
    return [m.rsplit(".", 1)[1] for m, _ in EXPERIMENTS]


def get_experiment(name: str):
    import importlib
    for mod, fn in EXPERIMENTS:
        if mod.rsplit(".", 1)[1] == name:
            return getattr(importlib.import_module(mod), fn)
    raise KeyError(f"unknown experiment {name!r}; known: {', '.join(experiment_names())}")
