"""Comparing dumps: a candidate engine's dump graded against the reference's, tensor by tensor.

Tolerances are per the candidate's dtype (``TOLERANCES``, rationale in
docs/oracle.md); layers are walked in order, so a report names the first layer
out of tolerance. Dump files and their names: ``oracle.golden``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsref.reference.oracle.golden import _LAYER_RE, OracleError, canonicalize, read_dump

KINDS = ("index_ids", "attn_out", "router_logits", "topk_ids", "topk_weights", "hidden")  # order within a layer
SELECTIONS = ("index_ids", "topk_ids")  # sets per token, graded by the share of tokens that differ
# Annotations of the reference's dump (V3.2 tie flags, oracle.golden): used to grade index_ids,
# never compared themselves, and not expected from a candidate.
REFERENCE_ONLY = ("index_tie", "index_tie_keys")

# Default tolerances by the candidate's dtype (rationale in docs/oracle.md).
#   rel      max|ref - cand| / max|ref|  (per tensor)
#   cos      cosine similarity of the flattened tensors, at least
#   routing  share of tokens whose selected expert SET differs, at most
#   atol     max|ref - cand|, at most (None: not checked)
TOLERANCES: dict[str, dict[str, float | None]] = {
    "float64": {"rel": 1e-9, "cos": 1 - 1e-12, "routing": 0.0, "atol": None},
    "float32": {"rel": 1e-4, "cos": 0.99999, "routing": 0.0, "atol": None},
    "bf16": {"rel": 5e-2, "cos": 0.999, "routing": 0.10, "atol": None},
    "fp8": {"rel": 2.5e-1, "cos": 0.98, "routing": 0.35, "atol": None},
}
_DTYPE_ALIASES = {"float64": "float64", "f64": "float64", "float32": "float32", "f32": "float32",
                  "bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "float8": "fp8"}


def normalize_dtype(name: str) -> str:
    key = _DTYPE_ALIASES.get(str(name).lower())
    if key is None:
        raise OracleError(f"unknown dtype {name!r}; expected one of {sorted(TOLERANCES)}")
    return key


# ------------------------------------------------------------------ comparison
def layer_key(name: str) -> tuple[float, int, str]:
    """Walk order: layer 0 (attn_out, router, ids, weights, hidden), layer 1, ..., logits last."""
    m = _LAYER_RE.match(name)
    if m is None:
        return (math.inf, 0, name)
    kind = m.group(2)
    return (int(m.group(1)), KINDS.index(kind) if kind in KINDS else len(KINDS), name)


def tensor_kind(name: str) -> str:
    m = _LAYER_RE.match(name)
    return m.group(2) if m else name


@dataclass
class TensorResult:
    name: str
    layer: int | None
    kind: str
    shape: list[int]
    ok: bool
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    routing_mismatch: float | None = None
    compared_tokens: int | None = None
    limits: dict[str, float | None] = field(default_factory=dict)
    why: str = ""
    compared: bool = True             # False: nothing of it was compared (e.g. no token routed the same)
    nonfinite: dict[str, int] | None = None  # NaN / Inf counts of a tensor that has any (a failure)
    excused_ties: int | None = None   # index_ids: rows that chose differently among exactly tied keys


@dataclass
class Report:
    reference: str
    candidate: str
    dtype: str
    tolerances: dict[str, Any]
    tensors: list[TensorResult]
    only_in_reference: list[str]
    only_in_candidate: list[str]
    ok: bool
    first_failure: str | None
    first_failing_layer: int | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return json.loads(json.dumps(d, default=float))


_TOL_RANGES = {"rel": (0.0, math.inf, "a finite number >= 0"), "atol": (0.0, math.inf, "a finite number >= 0"),
               "cos": (-1.0, 1.0, "in [-1, 1] (a cosine similarity)"),
               "routing": (0.0, 1.0, "in [0, 1] (a share of tokens)")}


def check_tolerance(key: str, value) -> float:
    """The tolerance ``key`` (rel, cos, routing, atol, or KIND.rel etc.) as a float; OracleError naming
    the key for a non-number, NaN/Inf or a value outside its range (e.g. a negative rel)."""
    base = key.split(".")[-1]
    if base not in _TOL_RANGES:
        raise OracleError(f"unknown tolerance {key!r}: use rel, cos, routing, atol or KIND.rel etc. "
                          f"(KIND one of logits, {', '.join(KINDS)})")
    if "." in key and key.split(".")[0] not in ("logits", *KINDS):
        raise OracleError(f"unknown tensor kind in tolerance {key!r}")
    lo, hi, what = _TOL_RANGES[base]
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise OracleError(f"tolerance {key!r} must be {what}, got {value!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise OracleError(f"tolerance {key!r} must be {what}, got {value!r}")
    return v


def resolve_tolerances(dtype: str, overrides: dict[str, float] | None = None) -> dict[str, Any]:
    """Defaults for dtype, then overrides: 'rel', 'cos', 'routing', 'atol', or per kind 'KIND.rel' etc."""
    tol: dict[str, Any] = dict(TOLERANCES[normalize_dtype(dtype)])
    for k, v in (overrides or {}).items():
        tol[k] = check_tolerance(k, v)
    return tol


def _limit(tol: dict[str, Any], kind: str, what: str):
    return tol.get(f"{kind}.{what}", tol.get(what))


def _float_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if not (np.isfinite(b).all()):
        return math.inf, math.inf, -1.0
    d = np.abs(a - b)
    max_abs = float(d.max()) if d.size else 0.0
    scale = float(np.abs(a).max()) if a.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        cos = 1.0
    elif na == 0 or nb == 0:
        cos = 0.0
    else:
        cos = float(np.dot(a, b) / (na * nb))
    return max_abs, max_rel, cos


def _nonfinite(a: np.ndarray, who: str):
    """(who, {'NaN': n, 'Inf': m}) when the float tensor ``a`` holds any NaN or Inf, else None."""
    if a.dtype.kind not in "fc" or np.isfinite(a).all():
        return None
    return who, {"NaN": int(np.isnan(a).sum()), "Inf": int(np.isinf(a).sum())}


def _pad_ids(a: np.ndarray, width: int) -> np.ndarray:
    """index_ids padded with -1 to ``width`` columns (an engine may pad every row to index_topk)."""
    return np.concatenate([a, np.full((*a.shape[:-1], width - a.shape[-1]), -1, a.dtype)], -1)


def _tie_excused(ref_ids: np.ndarray, cand_ids: np.ndarray, tie_keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[B, T] True where a differing index selection is one the reference's ties allow: every key
    the reference selected above the tie is there, the others are among the keys tied at its
    boundary (index_tie_keys: (b, t, s) triples), and as many keys are selected."""
    tied: dict[tuple[int, int], set[int]] = {}
    for b, t, k in np.asarray(tie_keys, np.int64).reshape(-1, 3).tolist():
        tied.setdefault((b, t), set()).add(k)
    ok = np.zeros(rows.shape, bool)
    for b, t in zip(*np.nonzero(rows)):
        ties = tied.get((int(b), int(t)))
        if not ties:
            continue
        ref = {int(v) for v in ref_ids[b, t] if v >= 0}
        cand = [int(v) for v in cand_ids[b, t] if v >= 0]
        sure = ref - ties
        ok[b, t] = len(cand) == len(set(cand)) == len(ref) and sure <= set(cand) and set(cand) - sure <= ties
    return ok


def _token_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """A [B, T] token mask flattened for a tensor of ``shape`` [B, T, ...] (or the MTP logits'
    [B, T-1, ...], position t of which reads the main model's token t); None if it does not fit."""
    if mask is None or mask.ndim != 2 or len(shape) < 3:
        return None
    B, T = mask.shape
    if shape[:2] == (B, T):
        return mask.ravel()
    if shape[:2] == (B, T - 1):
        return mask[:, :-1].ravel()
    return None


def compare_dumps(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], dtype: str = "float32",
                  overrides: dict[str, float] | None = None, *, ref_name: str = "reference",
                  cand_name: str = "candidate") -> Report:
    """Grade cand against ref, tensor by tensor, walking layers in order.

    Tokens that legitimately diverge are left out of what follows, and counted: a token routed to
    a different expert set within the routing tolerance (a near-tie) from the later tensors; a
    V3.2 query whose indexer chose differently among exactly tied keys (excused, index_tie_keys)
    from the later tensors, and, from the next layer on, the later positions of its sequence too
    (they attend to it)."""
    tol = resolve_tolerances(dtype, overrides)
    ref, cand = canonicalize(ref), canonicalize(cand)
    notes_ann = {n: ref[n] for n in ref if tensor_kind(n) in REFERENCE_ONLY}
    ref = {n: v for n, v in ref.items() if tensor_kind(n) not in REFERENCE_ONLY}
    cand = {n: v for n, v in cand.items() if tensor_kind(n) not in REFERENCE_ONLY}
    common = sorted(set(ref) & set(cand), key=layer_key)
    if not common:
        raise OracleError(f"{cand_name}: no tensor in common with {ref_name} "
                          f"(reference has {', '.join(sorted(ref)[:4])}...)")
    for n in common:
        a, b = ref[n], cand[n]
        if tensor_kind(n) == "index_ids" and a.shape[:-1] == b.shape[:-1] and a.ndim == 3:
            # an engine may pad every row to index_topk; one selecting more keys than the reference
            # differs on those rows (graded below), it is not a malformed dump
            w = max(a.shape[-1], b.shape[-1])
            ref[n], cand[n] = _pad_ids(a, w), _pad_ids(b, w)
        if ref[n].shape != cand[n].shape:
            raise OracleError(f"{cand_name}: tensor '{n}' has shape {list(cand[n].shape)}, "
                              f"{ref_name} has {list(ref[n].shape)}")
    same_set: dict[int, np.ndarray] = {}
    flipped: np.ndarray | None = None  # [B, T]: tokens that diverged at an earlier point
    cones: list[tuple[int, np.ndarray]] = []  # (layer, [B, T]): excluded in the layers after it
    excused_total = 0
    results = []
    for n in common:
        kind = tensor_kind(n)
        m = _LAYER_RE.match(n)
        layer = int(m.group(1)) if m else None
        a, b = ref[n], cand[n]
        r = TensorResult(n, layer, kind, list(a.shape), True)
        cone = None
        for li, c in cones:
            if layer is None or li < layer:
                cone = c if cone is None else cone | c
        if kind in SELECTIONS:
            k = a.shape[-1]
            lead = a.shape[:-1]
            ra = a.reshape(-1, k).astype(np.int64)
            rb = b.reshape(-1, k).astype(np.int64)
            if kind == "topk_ids":
                rb = np.sort(rb, -1)
            diff = (ra != rb).any(-1).reshape(lead)
            excused = np.zeros(lead, bool)
            keys = notes_ann.get(f"layers.{layer}.index_tie_keys")
            if kind == "index_ids" and keys is not None and diff.any() and a.ndim == 3:
                excused = _tie_excused(a, b, keys, diff)
            keep = np.ones(lead, bool) if cone is None or cone.shape != lead else ~cone
            bad = diff & ~excused & keep
            if kind == "topk_ids":
                same_set[layer] = ~diff.ravel()
            new = bad | excused
            flipped = new if flipped is None or flipped.shape != new.shape else (flipped | new)
            if excused.any() and a.ndim == 3:
                first = np.where(excused.any(-1), excused.argmax(-1), excused.shape[1])
                cones.append((layer, np.arange(excused.shape[1])[None, :] >= first[:, None]))
                r.excused_ties = int(excused.sum())
                excused_total += r.excused_ties
            r.compared_tokens = int(keep.sum()) if not keep.all() else None
            r.routing_mismatch = float(bad.sum() / max(int(keep.sum()), 1))
            r.limits = {"routing": _limit(tol, kind, "routing")}
            r.ok = r.routing_mismatch <= r.limits["routing"] + 1e-12
            what = "expert set" if kind == "topk_ids" else "indexer's key set"
            if not r.ok:
                r.why = f"{what} differs on {bad.sum()}/{keep.sum()} tokens"
        else:
            drop = None
            for msk in (flipped, cone):
                t = _token_mask(msk, a.shape) if msk is not None else None
                if t is not None:
                    drop = t if drop is None else drop | t
            if kind == "topk_weights" and layer in same_set:  # weights only where the experts agree
                keep = same_set[layer] if drop is None or drop.shape != same_set[layer].shape else \
                    same_set[layer] & ~drop
                a2, b2 = a.reshape(-1, a.shape[-1])[keep], b.reshape(-1, b.shape[-1])[keep]
                r.compared_tokens = int(keep.sum())
                a, b = a2, b2
            elif drop is not None and drop.any():
                # A divergence within tolerance (a near-tie) or among exact ties legitimately changes that
                # token's downstream values: compare the tokens that went the same way so far (count reported).
                keep = ~drop
                a, b = a.reshape(drop.size, -1)[keep], b.reshape(drop.size, -1)[keep]
                r.compared_tokens = int(keep.sum())
            bad_vals = _nonfinite(a, "reference") or _nonfinite(b, "candidate")
            if bad_vals is not None:
                who, counts = bad_vals
                r.ok, r.nonfinite = False, counts
                r.why = (f"{who} has " + " and ".join(f"{n:,} {k}" for k, n in counts.items() if n)
                         + f" value{'s' if sum(counts.values()) > 1 else ''} (of {a.size:,})")
            elif a.size == 0:
                r.compared = False
                r.why = ("no token routed the same so far" if kind != "topk_weights" else
                         "no token with the same expert set")
            else:
                r.max_abs, r.max_rel, r.cosine = _float_stats(a, b)
                r.limits = {w: _limit(tol, kind, w) for w in ("rel", "cos", "atol")}
                bad = []
                if not r.max_rel <= r.limits["rel"]:
                    bad.append(f"rel {r.max_rel:.3g} > {r.limits['rel']:.3g}")
                if not r.cosine >= r.limits["cos"]:
                    bad.append(f"cos {r.cosine:.8f} < {r.limits['cos']}")
                if r.limits["atol"] is not None and not r.max_abs <= r.limits["atol"]:
                    bad.append(f"abs {r.max_abs:.3g} > {r.limits['atol']:.3g}")
                r.ok = not bad
                r.why = "; ".join(bad)
        results.append(r)
    first = next((r for r in results if not r.ok), None)
    notes = []
    if excused_total:
        notes.append(f"{excused_total} indexer selection(s) chose differently among exactly tied keys (allowed: "
                     "the order of ties is implementation-defined); those tokens, and from the next layer on the "
                     "later positions of their sequences, are left out of the tensors that follow")
    return Report(reference=ref_name, candidate=cand_name, dtype=normalize_dtype(dtype), tolerances=tol,
                  tensors=results, only_in_reference=sorted(set(ref) - set(cand), key=layer_key),
                  only_in_candidate=sorted(set(cand) - set(ref), key=layer_key), ok=first is None,
                  first_failure=None if first is None else first.name,
                  first_failing_layer=None if first is None else first.layer, notes=notes)


def compare_files(reference: str | Path, candidate: str | Path, dtype: str | None = None,
                  overrides: dict[str, float] | None = None) -> Report:
    """compare_dumps on two dump files. dtype: candidate's dtype (default: its metadata, else float32)."""
    ref, rmeta = read_dump(reference)
    cand, cmeta = read_dump(candidate)
    notes = []
    if dtype is None:
        dtype = cmeta.get("dtype", "float32")
        if dtype not in _DTYPE_ALIASES:
            notes.append(f"candidate metadata dtype {dtype!r} unknown: float32 tolerances used")
            dtype = "float32"
    if "config_hash" in rmeta and "config_hash" in cmeta and rmeta["config_hash"] != cmeta["config_hash"]:
        raise OracleError(f"{candidate}: config_hash {cmeta['config_hash'][:12]}... differs from {reference}'s "
                          f"{rmeta['config_hash'][:12]}...: the dumps are of different models")
    for key, what in (("tokens_sha256", "token ids"), ("tokens_shape", "token shape")):
        if key in rmeta and key in cmeta and rmeta[key] != cmeta[key]:
            raise OracleError(f"{candidate}: metadata {key} differs from {reference}'s: the dumps are of "
                              f"different {what}")
    rep = compare_dumps(ref, cand, dtype, overrides, ref_name=str(reference), cand_name=str(candidate))
    rep.notes.extend(notes)
    return rep


def format_report(rep: Report) -> str:
    lines = [f"reference {rep.reference}", f"candidate {rep.candidate}  (tolerances for {rep.dtype}: rel "
             f"{rep.tolerances['rel']:g}, cos >= {rep.tolerances['cos']:.12g}, routing <= "
             f"{rep.tolerances['routing']:g}" + (f", atol {rep.tolerances['atol']:g}" if rep.tolerances.get('atol')
                                                 is not None else "") + ")",
             f"{'tensor':<26} {'max abs':>10} {'max rel':>10} {'cosine':>12} {'routing':>8}  ok"]
    for r in rep.tensors:
        f = lambda v, p: "-".rjust(int(p.split(".")[0])) if v is None else format(v, p)  # noqa: E731
        lines.append(f"{r.name:<26} {f(r.max_abs, '10.3e')} {f(r.max_rel, '10.3e')} {f(r.cosine, '12.9f')} "
                     f"{f(r.routing_mismatch, '8.3f')}  "
                     f"{('ok' if r.compared else 'not compared: ' + r.why) if r.ok else 'FAIL ' + r.why}")
    for n in rep.only_in_reference:
        lines.append(f"{n:<26} (missing from candidate: not compared)")
    for note in rep.notes:
        lines.append(f"note: {note}")
    skipped = sum(not r.compared for r in rep.tensors)
    if rep.ok:
        lines.append(f"PASS: {len(rep.tensors) - skipped} tensors within tolerance"
                     + (f", {skipped} not compared" if skipped else ""))
    else:
        where = f"layer {rep.first_failing_layer}" if rep.first_failing_layer is not None else "the logits"
        lines.append(f"FAIL: first leaves tolerance at {where} ({rep.first_failure}); "
                     f"{sum(not r.ok for r in rep.tensors)}/{len(rep.tensors)} tensors out of tolerance"
                     + (f", {skipped} not compared" if skipped else ""))
    return "\n".join(lines)
