"""Kernel-level floors and size-dependent kernel efficiencies, read from ``data/kernels.toml``.

The roofline (sim/roofline.py) charges every op max(FLOPs / (peak x eff), bytes / (bw x eff))
with one efficiency per device class. This module adds what a roofline cannot see, each figure
taken from a published kernel table or microbenchmark (never solved from an end-to-end serving
or training throughput):

* a per-kernel launch floor, eager (host launches one by one) or inside a captured graph;
* a per-step host/runtime overhead of a serving framework step (scheduler, sampling, ...);
* the fixed cost (alpha) of one small collective, by link, collective and participant count;
* GEMM compute / memory-bandwidth fractions of peak as a function of the row count M
  (DeepGEMM README tables for Hopper), plain or grouped (MoE, rows per expert);
* DeepEP low-latency dispatch/combine times by EP size, and its normal (high-throughput)
  kernels' bottleneck bandwidths by EP size;
* attention kernel efficiencies (FlashMLA decode bandwidth, prefill compute fraction).

File layout (every figure carries ``source`` and ``confidence``)::

    [class.<device_class>]          defaults for a device class (gpu, npu, tpu, cpu, soc)
    [generation.<name>]             devices = ["h100", ...]; inherits = "<class or generation>"
    [device.<id>]                   inherits = "<profile>"; figures for one device only

A section takes every figure it does not give itself from the section it ``inherits``
(figure by figure: e.g. ``collective.inter.all_reduce`` alone can be overridden), less those
it lists in ``[<section>.omit]`` (``"gemm.dense" = "why this table does not apply here"``).
Profile names (class, generation and device ids) share one namespace.

Bad data raises :class:`dsref.hwmodels.catalog.CatalogError` naming the file and key.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from dsref.hwmodels.catalog import CONFIDENCES, DATA_DIR, DEVICE_CLASSES, UNITS, CatalogError, read_toml

KERNELS_FILE = DATA_DIR / "kernels.toml"

LINKS = ("intra", "inter", "pcie")
COLLECTIVES = ("all_reduce", "all_to_all", "p2p")
PHASES = ("decode", "prefill")
GEMM_KINDS = ("dense", "grouped")
_SECTION_KINDS = ("class", "generation", "device")
_FIGURE_KEYS = ("launch_eager", "launch_graph", "step_overhead", "collective", "gemm", "ep_low_latency", "ep_normal",
                "attention")
_META_KEYS = ("description", "devices", "inherits", "omit")
# Figures every profile must have after inheritance: they cannot be omitted.
_REQUIRED = ("launch_eager", "launch_graph", "step_overhead", "step_overhead.decode", "step_overhead.prefill")
# Columns of a GEMM table's ``raw`` rows, as the DeepGEMM README prints them (groups = 1 for
# normal GEMMs): keeping the published rows lets a reader check the derived curve.
GEMM_RAW_COLUMNS = ("groups", "m", "n", "k", "tflops", "gbs")


def _err(file: Any, key: str, msg: str) -> CatalogError:
    return CatalogError(f"{file}: key '{key}': {msg}")


def _interp_log2(xs: tuple[float, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear in log2(x) between points, clamped to the end values outside them.
    log2 because the tables are sampled at powers of two and the quantities (GEMM occupancy,
    tree/hop counts) change with the doubling of M or of participants."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if x <= x1:
            f = (math.log2(x) - math.log2(x0)) / (math.log2(x1) - math.log2(x0))
            return y0 + f * (y1 - y0)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------
# parsed pieces
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectiveCurve:
    """Latency (s) of one tiny collective at published participant counts."""

    participants: tuple[int, ...]
    seconds: tuple[float, ...]
    source: str
    confidence: str

    def at(self, participants: float) -> float:
        return _interp_log2(self.participants, self.seconds, participants)


@dataclass(frozen=True)
class GemmCurve:
    """Compute and memory-bandwidth fractions of peak at row counts M (rows per expert when
    grouped). ``raw`` keeps the published rows the fractions come from (empty when the file
    gives the fractions directly)."""

    rows: tuple[int, ...]
    compute: tuple[float, ...]
    memory: tuple[float, ...]
    source: str
    confidence: str
    raw: tuple[tuple[float, ...], ...] = ()

    def at(self, rows: float) -> tuple[float, float]:
        return (_interp_log2(self.rows, self.compute, rows), _interp_log2(self.rows, self.memory, rows))


@dataclass(frozen=True)
class EpTable:
    """DeepEP-style low-latency dispatch/combine: latency (s) and bandwidth (B/s) per EP size,
    measured at ``tokens_per_rank`` tokens; bytes_per_token is what the benchmark counts per
    token sent (all its top-k copies), so latency x bandwidth ~ tokens x bytes_per_token."""

    ep: tuple[int, ...]
    dispatch_s: tuple[float, ...]
    dispatch_bw: tuple[float, ...]
    combine_s: tuple[float, ...]
    combine_bw: tuple[float, ...]
    tokens_per_rank: float
    dispatch_bytes_per_token: float
    combine_bytes_per_token: float
    source: str
    confidence: str

    def at(self, ep: float, tokens_per_rank: float) -> tuple[float, float]:
        extra = max(0.0, tokens_per_rank - self.tokens_per_rank)
        out = []
        for lat, bw, per_tok in ((self.dispatch_s, self.dispatch_bw, self.dispatch_bytes_per_token),
                                 (self.combine_s, self.combine_bw, self.combine_bytes_per_token)):
            out.append(_interp_log2(self.ep, lat, ep) + extra * per_tok / _interp_log2(self.ep, bw, ep))
        return out[0], out[1]


@dataclass(frozen=True)
class EpNormalTable:
    """DeepEP normal (high-throughput) kernels: bottleneck bandwidth (B/s) per EP size."""

    ep: tuple[int, ...]
    dispatch_bw: tuple[float, ...]
    combine_bw: tuple[float, ...]
    source: str
    confidence: str

    def at(self, ep: float) -> tuple[float, float]:
        return _interp_log2(self.ep, self.dispatch_bw, ep), _interp_log2(self.ep, self.combine_bw, ep)


@dataclass(frozen=True)
class KernelProfile:
    """Kernel-level figures for one device / generation / class (see the module docstring).

    Times are seconds. ``sources`` and ``confidence`` map a figure key (``launch_eager``,
    ``step_overhead.decode``, ``collective.intra.all_reduce``, ``gemm.dense``,
    ``ep_low_latency``, ``attention.decode``, ...) to its cited source / confidence;
    ``omitted`` maps an inherited figure this profile drops to the reason.
    """

    name: str
    launch_eager_s: float
    launch_graph_s: float
    step_overhead_s: dict
    sources: dict
    confidence: dict = field(default_factory=dict)
    collectives: dict = field(default_factory=dict)   # (link, collective) -> CollectiveCurve
    gemm: dict = field(default_factory=dict)          # "dense" | "grouped" -> GemmCurve
    ep_table: EpTable | None = None
    attention: dict = field(default_factory=dict)     # "decode" | "prefill" -> fraction
    ep_normal: EpNormalTable | None = None
    omitted: dict = field(default_factory=dict)       # figure key -> why an inherited figure is dropped

    def has_collective(self, link: str, collective: str) -> bool:
        return (link, collective) in self.collectives

    def collective_latency_s(self, link: str, collective: str, participants: int) -> float:
        """Fixed cost of ONE collective call of a tiny message (the alpha of alpha-beta), by
        link 'intra' (NVLink/HCCS/ICI), 'inter' (IB/RoCE scale-out), 'pcie', and collective
        'all_reduce' | 'all_to_all' | 'p2p'. Piecewise linear in log2(participants) between the
        published points, clamped outside them; 0 for a single participant (no call is made).
        Raises CatalogError for an unknown link/collective or one this profile has no figure for."""
        if link not in LINKS:
            raise CatalogError(f"unknown link {link!r}; expected one of {list(LINKS)}")
        if collective not in COLLECTIVES:
            raise CatalogError(f"unknown collective {collective!r}; expected one of {list(COLLECTIVES)}")
        if not participants > 0:
            raise CatalogError(f"collective participants must be >= 1, got {participants!r}")
        if participants <= 1:
            return 0.0
        curve = self.collectives.get((link, collective))
        if curve is None:
            raise CatalogError(f"{KERNELS_FILE.name}: kernel profile '{self.name}' has no figure "
                               f"'collective.{link}.{collective}'")
        return curve.at(participants)

    def gemm_efficiency(self, rows: float, grouped: bool) -> tuple[float, float] | None:
        """(compute fraction of dense peak at the GEMM's precision, memory-bandwidth fraction of
        peak HBM bandwidth) achieved by a GEMM with ``rows`` rows (M; grouped MoE GEMMs: rows
        per expert), from the median over the published shapes at each M. Piecewise linear in
        log2(rows) between table points, clamped at the ends. None when the profile has no table.
        A step charges max(FLOPs / (peak x compute), bytes / (bw x memory)): at a table point
        each term runs at the median published rate. The fractions are what the kernels achieved
        on the table's device (a memory-bound point has a low compute fraction and vice versa),
        so they hold for devices of the same compute / bandwidth balance; profiles of other
        devices omit them (kernels.toml [device.h20.omit])."""
        if not rows > 0:
            raise CatalogError(f"GEMM rows must be positive, got {rows!r}")
        curve = self.gemm.get("grouped" if grouped else "dense")
        return None if curve is None else curve.at(rows)

    def ep_low_latency_s(self, ep: int, tokens_per_rank: float) -> tuple[float, float] | None:
        """(dispatch, combine) seconds of one MoE layer's low-latency EP all-to-all: the table's
        latency at ``ep`` (piecewise linear in log2(ep), clamped), plus, for tokens beyond the
        table's token count, (tokens - table tokens) x bytes per token / the table's bandwidth.
        Fewer tokens than the table's keep its latency (the floor). None when no table."""
        if not ep > 0:
            raise CatalogError(f"EP size must be positive, got {ep!r}")
        if not tokens_per_rank >= 0:
            raise CatalogError(f"tokens per rank must be >= 0, got {tokens_per_rank!r}")
        return None if self.ep_table is None else self.ep_table.at(ep, tokens_per_rank)

    def ep_normal_bandwidth(self, ep: int) -> tuple[float, float] | None:
        """(dispatch, combine) bottleneck bandwidth in B/s per GPU of the normal (prefill /
        training) EP kernels at EP size ``ep``: piecewise linear in log2(ep) between the
        table's sizes, clamped outside. A layer's dispatch then takes bytes sent per GPU / this
        bandwidth. None when the profile has no table."""
        if not ep > 0:
            raise CatalogError(f"EP size must be positive, got {ep!r}")
        return None if self.ep_normal is None else self.ep_normal.at(ep)

    def attention_efficiency(self, kind: str) -> float | None:
        """'decode': memory-bandwidth fraction of a decode attention kernel; 'prefill': compute
        fraction of a prefill attention kernel. None when the profile has no figure."""
        if kind not in PHASES:
            raise CatalogError(f"unknown attention kind {kind!r}; expected one of {list(PHASES)}")
        return self.attention.get(kind)


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------


def _str(raw: Mapping, file: Any, key: str, name: str) -> str:
    val = raw.get(name)
    if not isinstance(val, str) or not val.strip():
        raise _err(file, f"{key}.{name}", f"must be a non-empty string, got {val!r}")
    return val


def _provenance(raw: Any, file: Any, key: str, allowed: set[str]) -> tuple[str, str]:
    if not isinstance(raw, dict):
        raise _err(file, key, f"must be a table, got {type(raw).__name__}")
    extra = sorted(set(raw) - allowed - {"source", "confidence", "note"})
    if extra:
        raise _err(file, key, f"unexpected key(s) {extra}; allowed: {sorted(allowed | {'source', 'confidence', 'note'})}")
    source = _str(raw, file, key, "source")
    conf = raw.get("confidence")
    if conf not in CONFIDENCES:
        raise _err(file, f"{key}.confidence", f"{conf!r} not one of {list(CONFIDENCES)}")
    return source, conf


def _number(val: Any, file: Any, key: str, *, positive: bool = True) -> float:
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val < 0 \
            or (positive and val == 0):
        raise _err(file, key, f"must be a finite {'positive' if positive else 'non-negative'} number, got {val!r}")
    return float(val)


def _numbers(raw: Mapping, file: Any, key: str, name: str, n: int | None = None, *, positive: bool = True) -> tuple[float, ...]:
    vals = raw.get(name)
    if not isinstance(vals, list) or not vals or (n is not None and len(vals) != n):
        want = f"{n} numbers" if n is not None else "numbers"
        raise _err(file, f"{key}.{name}", f"must be a non-empty list of {want}, got {vals!r}")
    return tuple(_number(v, file, f"{key}.{name}", positive=positive) for v in vals)


def _increasing_ints(raw: Mapping, file: Any, key: str, name: str, minimum: int) -> tuple[int, ...]:
    vals = raw.get(name)
    if not isinstance(vals, list) or not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in vals):
        raise _err(file, f"{key}.{name}", f"must be a non-empty list of integers >= {minimum}, got {vals!r}")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise _err(file, f"{key}.{name}", f"must be strictly increasing, got {vals!r}")
    return tuple(vals)


def _time_scale(raw: Mapping, file: Any, key: str) -> float:
    unit = raw.get("unit")
    if not isinstance(unit, str) or UNITS.get(unit, ("",))[0] != "s":
        raise _err(file, f"{key}.unit", f"must be a time unit (s, ms, us, ns), got {unit!r}")
    return UNITS[unit][1]


def _time_figure(raw: Any, file: Any, key: str) -> tuple[float, str, str]:
    source, conf = _provenance(raw, file, key, {"value", "unit"})
    scale = _time_scale(raw, file, key)
    return _number(raw.get("value"), file, f"{key}.value", positive=False) * scale, source, conf


def _fraction_figure(raw: Any, file: Any, key: str) -> tuple[float, str, str]:
    source, conf = _provenance(raw, file, key, {"value", "unit"})
    if raw.get("unit", "fraction") != "fraction":
        raise _err(file, f"{key}.unit", f"must be \"fraction\", got {raw.get('unit')!r}")
    val = _number(raw.get("value"), file, f"{key}.value")
    if val > 1:
        raise _err(file, f"{key}.value", f"a fraction of peak must be in (0, 1], got {val!r}")
    return val, source, conf


def _collective(raw: Any, file: Any, key: str) -> CollectiveCurve:
    source, conf = _provenance(raw, file, key, {"participants", "value", "unit"})
    parts = _increasing_ints(raw, file, key, "participants", 2)
    scale = _time_scale(raw, file, key)
    vals = _numbers(raw, file, key, "value", len(parts))
    # A collective among more participants never finishes sooner (more hops / tree levels).
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise _err(file, f"{key}.value", f"latency must not decrease with participants, got {list(vals)}")
    return CollectiveCurve(parts, tuple(v * scale for v in vals), source, conf)


def _gemm(raw: Any, file: Any, key: str) -> GemmCurve:
    source, conf = _provenance(raw, file, key, {"raw", "peak_tflops", "peak_gbs", "rows", "compute", "memory"})
    if "raw" in raw:
        # Published rows: the curve is the median over shapes at each M, as fractions of peaks.
        for name in ("rows", "compute", "memory"):
            if name in raw:
                raise _err(file, f"{key}.{name}", "give either 'raw' (with peak_tflops/peak_gbs) or rows/compute/memory, not both")
        peak_c = _number(raw.get("peak_tflops"), file, f"{key}.peak_tflops")
        peak_m = _number(raw.get("peak_gbs"), file, f"{key}.peak_gbs")
        rows_raw = raw["raw"]
        if not isinstance(rows_raw, list) or not rows_raw:
            raise _err(file, f"{key}.raw", f"must be a non-empty list of rows {list(GEMM_RAW_COLUMNS)}")
        parsed: list[tuple[float, ...]] = []
        for i, row in enumerate(rows_raw):
            if not isinstance(row, list) or len(row) != len(GEMM_RAW_COLUMNS):
                raise _err(file, f"{key}.raw[{i}]", f"must be a row {list(GEMM_RAW_COLUMNS)}, got {row!r}")
            parsed.append(tuple(_number(v, file, f"{key}.raw[{i}]") for v in row))
        by_m: dict[float, list[tuple[float, ...]]] = {}
        for row in parsed:
            by_m.setdefault(row[1], []).append(row)
        rows = tuple(int(m) for m in sorted(by_m))
        compute = tuple(statistics.median(r[4] for r in by_m[m]) / peak_c for m in sorted(by_m))
        memory = tuple(statistics.median(r[5] for r in by_m[m]) / peak_m for m in sorted(by_m))
        raw_rows = tuple(parsed)
    else:
        rows = _increasing_ints(raw, file, key, "rows", 1)
        compute = _numbers(raw, file, key, "compute", len(rows))
        memory = _numbers(raw, file, key, "memory", len(rows))
        raw_rows = ()
    for name, vals in (("compute", compute), ("memory", memory)):
        if any(v > 1 for v in vals):
            raise _err(file, f"{key}.{name}", f"fractions of peak must be <= 1, got {[round(v, 4) for v in vals]}")
    # More rows per weight tile means more reuse: a GEMM's compute fraction must not fall with M.
    if any(b < a for a, b in zip(compute, compute[1:])):
        raise _err(file, f"{key}.compute", f"compute fraction must not decrease with rows, got {[round(v, 4) for v in compute]}")
    return GemmCurve(rows, compute, memory, source, conf, raw_rows)


def _ep(raw: Any, file: Any, key: str) -> EpTable:
    names = {"ep", "dispatch_us", "dispatch_gbs", "combine_us", "combine_gbs", "tokens_per_rank",
             "dispatch_bytes_per_token", "combine_bytes_per_token"}
    source, conf = _provenance(raw, file, key, names)
    ep = _increasing_ints(raw, file, key, "ep", 2)
    cols = {n: _numbers(raw, file, key, n, len(ep)) for n in ("dispatch_us", "dispatch_gbs", "combine_us", "combine_gbs")}
    scalars = {n: _number(raw.get(n), file, f"{key}.{n}") for n in ("tokens_per_rank", "dispatch_bytes_per_token", "combine_bytes_per_token")}
    return EpTable(ep, tuple(v * 1e-6 for v in cols["dispatch_us"]), tuple(v * 1e9 for v in cols["dispatch_gbs"]),
                   tuple(v * 1e-6 for v in cols["combine_us"]), tuple(v * 1e9 for v in cols["combine_gbs"]),
                   scalars["tokens_per_rank"], scalars["dispatch_bytes_per_token"], scalars["combine_bytes_per_token"],
                   source, conf)


def _ep_normal(raw: Any, file: Any, key: str) -> EpNormalTable:
    source, conf = _provenance(raw, file, key, {"ep", "dispatch_gbs", "combine_gbs", "tokens_per_rank"})
    ep = _increasing_ints(raw, file, key, "ep", 2)
    d = _numbers(raw, file, key, "dispatch_gbs", len(ep))
    c = _numbers(raw, file, key, "combine_gbs", len(ep))
    if "tokens_per_rank" in raw:
        _number(raw["tokens_per_rank"], file, f"{key}.tokens_per_rank")
    return EpNormalTable(ep, tuple(v * 1e9 for v in d), tuple(v * 1e9 for v in c), source, conf)


def _without(tree: Mapping, path: list[str]) -> dict:
    """A copy of ``tree`` without the entry at ``path`` (an empty parent table is dropped)."""
    out = dict(tree)
    if len(path) == 1:
        out.pop(path[0], None)
    else:
        sub = _without(out[path[0]], path[1:])
        if sub:
            out[path[0]] = sub
        else:
            out.pop(path[0])
    return out


def _merge(child: Mapping, parent: Mapping) -> dict:
    """Child figures win; nested tables (step_overhead, collective.<link>, gemm, attention) merge
    key by key. A table with a ``source`` is one figure and is taken whole."""
    out = dict(parent)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "source" not in v:
            out[k] = _merge(v, out[k])
        else:
            out[k] = v
    return out


@dataclass(frozen=True)
class KernelTable:
    profiles: dict          # name -> KernelProfile
    generation_of: dict     # device id -> generation name
    device_sections: frozenset
    file: str


def _build_profile(name: str, data: Mapping, file: Any, key: str) -> KernelProfile:
    sources: dict[str, str] = {}
    confs: dict[str, str] = {}

    def note(k: str, source: str, conf: str) -> None:
        sources[k], confs[k] = source, conf

    vals = {}
    for k in ("launch_eager", "launch_graph"):
        if k not in data:
            raise _err(file, f"{key}.{k}", "missing (and not inherited)")
        vals[k], s, c = _time_figure(data[k], file, f"{key}.{k}")
        note(k, s, c)
    step = data.get("step_overhead")
    if not isinstance(step, dict):
        raise _err(file, f"{key}.step_overhead", "missing table of decode/prefill figures (and not inherited)")
    extra = sorted(set(step) - set(PHASES))
    if extra:
        raise _err(file, f"{key}.step_overhead", f"unexpected key(s) {extra}; expected {list(PHASES)}")
    step_s = {}
    for ph in PHASES:
        if ph not in step:
            raise _err(file, f"{key}.step_overhead.{ph}", "missing")
        step_s[ph], s, c = _time_figure(step[ph], file, f"{key}.step_overhead.{ph}")
        note(f"step_overhead.{ph}", s, c)

    collectives = {}
    coll = data.get("collective", {})
    if not isinstance(coll, dict):
        raise _err(file, f"{key}.collective", "must be a table of links")
    for link, table in coll.items():
        if link not in LINKS:
            raise _err(file, f"{key}.collective.{link}", f"unknown link; expected one of {list(LINKS)}")
        if not isinstance(table, dict):
            raise _err(file, f"{key}.collective.{link}", "must be a table of collectives")
        for cname, craw in table.items():
            ck = f"{key}.collective.{link}.{cname}"
            if cname not in COLLECTIVES:
                raise _err(file, ck, f"unknown collective; expected one of {list(COLLECTIVES)}")
            curve = _collective(craw, file, ck)
            collectives[(link, cname)] = curve
            note(f"collective.{link}.{cname}", curve.source, curve.confidence)

    gemm = {}
    graw = data.get("gemm", {})
    if not isinstance(graw, dict):
        raise _err(file, f"{key}.gemm", "must be a table with dense/grouped")
    for kind, t in graw.items():
        if kind not in GEMM_KINDS:
            raise _err(file, f"{key}.gemm.{kind}", f"unknown GEMM kind; expected one of {list(GEMM_KINDS)}")
        gemm[kind] = _gemm(t, file, f"{key}.gemm.{kind}")
        note(f"gemm.{kind}", gemm[kind].source, gemm[kind].confidence)

    ep_table = None
    if "ep_low_latency" in data:
        ep_table = _ep(data["ep_low_latency"], file, f"{key}.ep_low_latency")
        note("ep_low_latency", ep_table.source, ep_table.confidence)

    ep_normal = None
    if "ep_normal" in data:
        ep_normal = _ep_normal(data["ep_normal"], file, f"{key}.ep_normal")
        note("ep_normal", ep_normal.source, ep_normal.confidence)

    attention = {}
    araw = data.get("attention", {})
    if not isinstance(araw, dict):
        raise _err(file, f"{key}.attention", "must be a table with decode/prefill")
    for kind, t in araw.items():
        if kind not in PHASES:
            raise _err(file, f"{key}.attention.{kind}", f"unknown attention kind; expected one of {list(PHASES)}")
        attention[kind], s, c = _fraction_figure(t, file, f"{key}.attention.{kind}")
        note(f"attention.{kind}", s, c)

    return KernelProfile(name, vals["launch_eager"], vals["launch_graph"], step_s, sources, confs,
                         collectives, gemm, ep_table, attention, ep_normal)


def load_kernel_table(path: str | os.PathLike | None = None) -> KernelTable:
    """Parse and validate kernels.toml (cached per path and modification time)."""
    file = Path(path) if path is not None else KERNELS_FILE
    return _load_cached(str(file), file.stat().st_mtime_ns if file.exists() else 0)


@functools.lru_cache(maxsize=8)
def _load_cached(file_name: str, _mtime: int) -> KernelTable:
    file = Path(file_name)
    data = read_toml(file)
    for top in data:
        if top not in _SECTION_KINDS:
            raise _err(file, top, f"unknown top-level table; expected one of {list(_SECTION_KINDS)}")
    sections: dict[str, tuple[str, dict]] = {}   # profile name -> (key prefix, raw table)
    for kind in _SECTION_KINDS:
        tables = data.get(kind, {})
        if not isinstance(tables, dict):
            raise _err(file, kind, "must be a table of sections")
        for name, raw in tables.items():
            key = f"{kind}.{name}"
            if not isinstance(raw, dict):
                raise _err(file, key, "must be a table")
            if kind == "class" and name not in DEVICE_CLASSES:
                raise _err(file, key, f"unknown device class; expected one of {list(DEVICE_CLASSES)}")
            if name in sections:
                raise _err(file, key, f"profile name already used by '{sections[name][0]}'")
            extra = sorted(set(raw) - set(_FIGURE_KEYS) - set(_META_KEYS))
            if extra:
                raise _err(file, key, f"unexpected key(s) {extra}; allowed: {sorted(_FIGURE_KEYS + _META_KEYS)}")
            if "devices" in raw and kind != "generation":
                raise _err(file, f"{key}.devices", "only a generation lists devices")
            if kind == "class" and "inherits" in raw:
                raise _err(file, f"{key}.inherits", "a class default inherits nothing")
            if kind == "device" and "inherits" not in raw:
                raise _err(file, f"{key}.inherits", "missing: name the generation or class whose figures this device takes")
            sections[name] = (key, raw)

    generation_of: dict[str, str] = {}
    for name, (key, raw) in sections.items():
        if not key.startswith("generation."):
            continue
        devs = raw.get("devices")
        if not isinstance(devs, list) or not devs or any(not isinstance(d, str) or not d for d in devs):
            raise _err(file, f"{key}.devices", f"must be a non-empty list of device ids, got {devs!r}")
        for d in devs:
            if d in generation_of:
                raise _err(file, f"{key}.devices", f"device {d!r} already listed by generation '{generation_of[d]}'")
            generation_of[d] = name

    def resolved(name: str, chain: tuple[str, ...]) -> tuple[dict, dict]:
        """(figures after inheritance and omissions, {omitted key: reason})."""
        key, raw = sections[name]
        own = {k: v for k, v in raw.items() if k in _FIGURE_KEYS}
        parent = raw.get("inherits")
        if parent is None:
            merged, omitted = own, {}
        else:
            if not isinstance(parent, str) or parent not in sections:
                raise _err(file, f"{key}.inherits", f"{parent!r} is not a profile in this file")
            if parent in chain:
                raise _err(file, f"{key}.inherits", f"inheritance cycle {' -> '.join(chain + (parent,))}")
            inherited, omitted = resolved(parent, chain + (parent,))
            merged, omitted = _merge(own, inherited), dict(omitted)
        omit = raw.get("omit", {})
        if not isinstance(omit, dict):
            raise _err(file, f"{key}.omit", "must be a table of \"figure.key\" = \"reason\"")
        for fig_key, reason in omit.items():
            ok = f"{key}.omit.{fig_key}"
            if not isinstance(reason, str) or not reason.strip():
                raise _err(file, ok, "the reason must be a non-empty string")
            if fig_key in _REQUIRED:
                raise _err(file, ok, "a required figure cannot be omitted")
            *path, leaf = fig_key.split(".")
            node = merged
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict) or leaf not in node:
                raise _err(file, ok, "no such inherited figure to omit")
            # copy the tables on the way down so the parent's resolved figures stay intact
            merged = _without(merged, path + [leaf])
            omitted[fig_key] = reason
        return merged, omitted

    profiles = {}
    for name, (key, _) in sections.items():
        figures, omitted = resolved(name, (name,))
        profiles[name] = replace(_build_profile(name, figures, file, key), omitted=omitted)
    devices = frozenset(n for n, (k, _) in sections.items() if k.startswith("device."))
    return KernelTable(profiles, generation_of, devices, str(file))


def kernel_profile(device, path: str | os.PathLike | None = None) -> KernelProfile:
    """Profile for a catalog Device (anything with ``.id`` and ``.device_class``): its own
    [device.<id>] section first, else the generation listing its id, else [class.<device_class>]."""
    table = load_kernel_table(path)
    if device.id in table.device_sections:
        return table.profiles[device.id]
    gen = table.generation_of.get(device.id)
    if gen is not None:
        return table.profiles[gen]
    if device.device_class in table.profiles and device.device_class in DEVICE_CLASSES:
        return table.profiles[device.device_class]
    raise CatalogError(f"{table.file}: no kernel profile for device '{device.id}' "
                       f"(no [device.{device.id}], no generation lists it, no [class.{device.device_class}])")


def profile_names(path: str | os.PathLike | None = None) -> list[str]:
    """Names of all profiles in the file (classes, generations, devices), sorted."""
    return sorted(load_kernel_table(path).profiles)


def get_profile(name: str, path: str | os.PathLike | None = None) -> KernelProfile:
    """A profile by name (class, generation or device id)."""
    table = load_kernel_table(path)
    if name not in table.profiles:
        raise CatalogError(f"{table.file}: no kernel profile '{name}'; known: {sorted(table.profiles)}")
    return table.profiles[name]
