"""Device catalog: hardware figures read from TOML data files.

Every hardware number used by the simulator lives in a data file under
``hwmodels/data/devices/<id>.toml`` (one file per device, file name = device
id).  Each figure is a TOML table::

    [memory_bandwidth]
    value = 3.35            # a number, or the string "unknown"
    unit = "TB/s"
    source = "NVIDIA H100 datasheet"
    confidence = "high"     # high | medium | low | measured

Bandwidth figures for links additionally carry ``direction =
"unidirectional" | "bidirectional"``; the API always exposes the
unidirectional per-device value (a bidirectional aggregate is halved).

Values are converted to SI base units on load (FLOP/s, B, B/s, W, s, USD/h).
Bad data raises :class:`CatalogError` naming the file and the field.

Efficiency factors (achievable fraction of peak per device class and op type)
live in ``hwmodels/data/efficiency.toml`` and can be overridden per device with
an ``[efficiency.<op>]`` table in the device file.

A device file may also give how its GEMM rate depends on the row count M of an
[M, K] x [K, N] product (``dsref hw probe`` measures it for the host)::

    [gemm_rows_efficiency]
    rows = [1, 16, 128, 2048]        # increasing positive integers
    value = [0.08, 0.4, 0.85, 0.9]   # fraction of peak x efficiency.gemm at that M
    unit = "fraction"
    source = "..."
    confidence = "measured"

Between points the factor is interpolated linearly in log2(M); outside them the
nearest point is used. Devices without the table have no row dependence.

And how fast a one-row product streams its weight matrix, by the matrix's size
(``dsref hw probe`` measures it for the host: small matrices do not reach the
streaming rate of large ones on a CPU runtime)::

    [gemv_bandwidth_efficiency]
    bytes = [262144, 4194304, 134217728]   # bytes of one weight matrix, increasing
    value = [0.3, 0.75, 0.8]               # fraction of memory_bandwidth
    unit = "fraction"
    source = "..."
    confidence = "measured"

It replaces ``efficiency.memory`` for GEMM ops that record their matrix size
(sim/costmodel.py ``gemm_matrix_bytes``); interpolated in log2(bytes) likewise.
"""

from __future__ import annotations

import math
import functools
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

def package_data_dir(package: str, *parts: str) -> Path:
    """A data folder shipped inside ``package``, found with importlib.resources (never a path
    into the source tree). Regular installs -- a wheel unpacked into site-packages or an
    editable install -- give a real directory, returned as is; a zipped install is extracted
    once, for the life of the process (Python >= 3.12)."""
    res = resources.files(package)
    for part in parts:
        res = res / part
    if isinstance(res, os.PathLike):
        return Path(res)
    import atexit
    import contextlib
    stack = contextlib.ExitStack()
    atexit.register(stack.close)
    return Path(stack.enter_context(resources.as_file(res)))


DATA_DIR = package_data_dir("dsref.hwmodels", "data")
DEVICES_DIR = DATA_DIR / "devices"
EFFICIENCY_FILE = DATA_DIR / "efficiency.toml"

DEVICE_CLASSES = ("gpu", "npu", "tpu", "cpu", "soc")
CONFIDENCES = ("high", "medium", "low", "measured")
DIRECTIONS = ("unidirectional", "bidirectional")
UNKNOWN = "unknown"

#: Precisions a device file may list under ``[flops.<precision>]``.
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "fp4", "int8", "int4")
INT_PRECISIONS = ("int8", "int4")

#: Where ``Device.peak`` looks when a precision is *absent* from the file
#: (i.e. the device has no dedicated units for it and runs it at the rate of
#: the next wider format).  Precisions explicitly marked "unknown" never fall
#: back.  fp32 is the base format and has no fallback.
PEAK_FALLBACK: Mapping[str, tuple[str, ...]] = {
    "fp32": (),
    "fp16": ("bf16", "fp32"),
    "bf16": ("fp32",),
    "fp8": ("bf16", "fp16", "fp32"),
    "fp4": ("fp8", "bf16", "fp16", "fp32"),
    "int8": ("bf16", "fp16", "fp32"),
    "int4": ("int8", "bf16", "fp16", "fp32"),
}

#: Operation types that have an efficiency factor.
EFFICIENCY_OPS = ("gemm", "memory", "attention", "all_to_all", "all_reduce", "pcie", "overlap")

_BITS_PER_BYTE = 8

# unit -> (SI unit, multiplier to SI)
UNITS: Mapping[str, tuple[str, float]] = {
    # floating-point throughput
    "FLOP/s": ("FLOP/s", 1.0),
    "GFLOP/s": ("FLOP/s", 1e9),
    "TFLOP/s": ("FLOP/s", 1e12),
    "PFLOP/s": ("FLOP/s", 1e15),
    # integer throughput (only accepted for int precisions)
    "GOPS": ("OP/s", 1e9),
    "TOPS": ("OP/s", 1e12),
    "POPS": ("OP/s", 1e15),
    # bytes
    "B": ("B", 1.0),
    "MB": ("B", 1e6),
    "GB": ("B", 1e9),
    "TB": ("B", 1e12),
    "MiB": ("B", 2.0**20),
    "GiB": ("B", 2.0**30),
    "TiB": ("B", 2.0**40),
    # bandwidth
    "B/s": ("B/s", 1.0),
    "MB/s": ("B/s", 1e6),
    "GB/s": ("B/s", 1e9),
    "TB/s": ("B/s", 1e12),
    "GiB/s": ("B/s", 2.0**30),
    "Mb/s": ("B/s", 1e6 / _BITS_PER_BYTE),
    "Gb/s": ("B/s", 1e9 / _BITS_PER_BYTE),
    "Gbit/s": ("B/s", 1e9 / _BITS_PER_BYTE),
    "Tb/s": ("B/s", 1e12 / _BITS_PER_BYTE),
    # power, time, money, dimensionless
    "W": ("W", 1.0),
    "kW": ("W", 1e3),
    "s": ("s", 1.0),
    "ms": ("s", 1e-3),
    "us": ("s", 1e-6),
    "ns": ("s", 1e-9),
    "USD/h": ("USD/h", 1.0),
    "fraction": ("fraction", 1.0),
}

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class CatalogError(ValueError):
    """Invalid or missing hardware data; the message names the file and field."""


def _err(file: str | os.PathLike, field_name: str, msg: str) -> CatalogError:
    return CatalogError(f"{file}: field '{field_name}': {msg}")


@dataclass(frozen=True)
class Figure:
    """One hardware figure with provenance.

    ``value`` is in SI units (``unit_si``) or None when the file marks it
    "unknown".  ``raw`` keeps the figure as written (e.g. "400 GB/s").
    ``direction`` is set for link bandwidths; ``value`` is then the figure as
    published (bidirectional aggregates are *not* halved here -- use the
    Device/Node attributes for the unidirectional value).
    """

    value: float | None
    unit_si: str
    source: str
    confidence: str
    raw: str = ""
    direction: str | None = None
    note: str = ""

    @property
    def known(self) -> bool:
        return self.value is not None

    @property
    def unidirectional(self) -> float | None:
        """Per-direction value: bidirectional aggregates are halved."""
        if self.value is None:
            return None
        if self.direction == "bidirectional":
            return self.value / 2
        return self.value


# --------------------------------------------------------------------------
# generic parsing helpers (shared with systems.py)
# --------------------------------------------------------------------------


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML file, turning syntax errors into CatalogError."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise CatalogError(f"{p}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{p}: invalid TOML: {exc}") from None


def parse_figure(
    raw: Any,
    file: str | os.PathLike,
    name: str,
    si_units: tuple[str, ...],
    *,
    needs_direction: bool = False,
) -> Figure:
    """Validate one figure table and convert its value to SI."""
    if not isinstance(raw, dict):
        raise _err(file, name, f"must be a table with value/unit/source/confidence, got {type(raw).__name__}")
    allowed = {"value", "unit", "source", "confidence", "direction", "note"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise _err(file, name, f"unexpected key(s) {extra}; allowed: {sorted(allowed)}")
    for key in ("value", "unit", "source", "confidence"):
        if key not in raw:
            raise _err(file, f"{name}.{key}", "missing")
    source = raw["source"]
    if not isinstance(source, str) or not source.strip():
        raise _err(file, f"{name}.source", "must be a non-empty string")
    conf = raw["confidence"]
    if conf not in CONFIDENCES:
        raise _err(file, f"{name}.confidence", f"{conf!r} not one of {list(CONFIDENCES)}")
    unit = raw["unit"]
    if not isinstance(unit, str) or unit not in UNITS:
        raise _err(file, f"{name}.unit", f"unknown unit {unit!r}; accepted: {sorted(UNITS)}")
    si, mult = UNITS[unit]
    if si not in si_units:
        raise _err(file, f"{name}.unit", f"unit {unit!r} measures {si}, expected one of {list(si_units)}")
    direction = raw.get("direction")
    if needs_direction and direction not in DIRECTIONS:
        raise _err(file, f"{name}.direction", f"{direction!r} must be one of {list(DIRECTIONS)}")
    if not needs_direction and direction is not None:
        raise _err(file, f"{name}.direction", "only link bandwidths carry a direction")
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise _err(file, f"{name}.note", "must be a string")
    value = raw["value"]
    if value == UNKNOWN:
        return Figure(None, si, source, conf, f"unknown {unit}", direction, note)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(file, f"{name}.value", f"must be a number or \"unknown\", got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise _err(file, f"{name}.value", f"must be a finite non-negative number, got {value!r}")
    return Figure(float(value) * mult, si, source, conf, f"{value:g} {unit}", direction, note)


def get_str(data: Mapping[str, Any], file: str | os.PathLike, key: str, *, required: bool = True) -> str | None:
    if key not in data:
        if required:
            raise _err(file, key, "missing")
        return None
    val = data[key]
    if not isinstance(val, str) or not val.strip():
        raise _err(file, key, f"must be a non-empty string, got {val!r}")
    return val


def get_int(data: Mapping[str, Any], file: str | os.PathLike, key: str, *, required: bool = True, minimum: int = 0) -> int | None:
    if key not in data:
        if required:
            raise _err(file, key, "missing")
        return None
    val = data[key]
    if isinstance(val, bool) or not isinstance(val, int):
        raise _err(file, key, f"must be an integer, got {val!r}")
    if val < minimum:
        raise _err(file, key, f"must be >= {minimum}, got {val}")
    return val


# --------------------------------------------------------------------------
# efficiency factors
# --------------------------------------------------------------------------


def _parse_efficiency_entry(raw: Any, file: str | os.PathLike, name: str) -> Figure:
    if isinstance(raw, dict) and "unit" not in raw:
        raw = {**raw, "unit": "fraction"}
    fig = parse_figure(raw, file, name, ("fraction",))
    if fig.value is None or fig.value > 1.0:
        raise _err(file, f"{name}.value", "efficiency must be a number in [0, 1]")
    return fig


def load_efficiency_table(path: str | os.PathLike | None = None) -> dict[tuple[str, str], Figure]:
    """Read efficiency.toml: {(device_class, op_type): Figure}; every pair required.

    Parsed once per (path, modification time): the cost model asks for factors per op.
    """
    file = Path(path) if path is not None else EFFICIENCY_FILE
    return dict(_load_efficiency_cached(str(file), file.stat().st_mtime_ns if file.exists() else 0))


@functools.lru_cache(maxsize=8)
def _load_efficiency_cached(file_name: str, _mtime: int) -> dict[tuple[str, str], Figure]:
    file = Path(file_name)
    data = read_toml(file)
    out: dict[tuple[str, str], Figure] = {}
    for cls in data:
        if cls not in DEVICE_CLASSES:
            raise _err(file, cls, f"unknown device class; expected one of {list(DEVICE_CLASSES)}")
    for cls in DEVICE_CLASSES:
        table = data.get(cls)
        if not isinstance(table, dict):
            raise _err(file, cls, "missing table of op efficiencies")
        for op in table:
            if op not in EFFICIENCY_OPS:
                raise _err(file, f"{cls}.{op}", f"unknown op type; expected one of {list(EFFICIENCY_OPS)}")
        for op in EFFICIENCY_OPS:
            if op not in table:
                raise _err(file, f"{cls}.{op}", "missing")
            out[(cls, op)] = _parse_efficiency_entry(table[op], file, f"{cls}.{op}")
    return out


def efficiency_figure(
    device_class: str,
    op_type: str,
    *,
    device: "Device | None" = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Efficiency factor with provenance; a device's own [efficiency] wins."""
    if op_type not in EFFICIENCY_OPS:
        raise CatalogError(f"unknown op type {op_type!r}; expected one of {list(EFFICIENCY_OPS)}")
    if device is not None and op_type in device.efficiency_overrides:
        return device.efficiency_overrides[op_type]
    if device_class not in DEVICE_CLASSES:
        raise CatalogError(f"unknown device class {device_class!r}; expected one of {list(DEVICE_CLASSES)}")
    return load_efficiency_table(path)[(device_class, op_type)]


def efficiency(
    device_class: str,
    op_type: str,
    *,
    device: "Device | None" = None,
    path: str | os.PathLike | None = None,
) -> float:
    """Achievable fraction of peak for ``op_type`` on a ``device_class``.

    op_type: gemm (dense matmul vs peak FLOP/s), memory (streaming weights/KV
    vs peak memory bandwidth), attention (attention kernels vs peak FLOP/s),
    all_to_all / all_reduce (collectives vs link bandwidth), pcie (host<->device
    copies vs PCIe link bandwidth).  Pass ``device`` to honour its overrides.
    """
    value = efficiency_figure(device_class, op_type, device=device, path=path).value
    assert value is not None  # guaranteed by _parse_efficiency_entry
    return value


def efficiency_source(device_class: str, op_type: str, *, device: "Device | None" = None) -> str:
    """The cited source of an efficiency factor."""
    return efficiency_figure(device_class, op_type, device=device).source


# --------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------

_FLOP_UNITS = ("FLOP/s",)
_INT_UNITS = ("OP/s", "FLOP/s")
_DEVICE_KEYS = {
    "id", "name", "vendor", "device_class", "notes", "cores", "flops",
    "memory_capacity", "memory_bandwidth", "intra_node_bandwidth", "intra_node_link",
    "network_bandwidth", "power", "price", "efficiency", "gemm_rows_efficiency", "gemv_bandwidth_efficiency",
}
_REQUIRED_FIGURES = ("memory_capacity", "memory_bandwidth", "power")


@dataclass(frozen=True)
class GemmRowsCurve:
    """GEMM efficiency as a function of the row count M (``[gemm_rows_efficiency]``); the
    same shape holds ``[gemv_bandwidth_efficiency]`` (``rows`` are then matrix bytes).

    values[i]: achieved GEMM rate at ``rows[i]`` rows as a fraction of
    ``peak x efficiency("gemm")`` (may exceed 1 where a shape beats the
    reference measurement).
    """

    rows: tuple[int, ...]
    values: tuple[float, ...]
    source: str
    confidence: str

    def at(self, rows: float) -> float:
        """Factor at ``rows`` rows: linear in log2(rows) between points, clamped outside."""
        if not rows > 0:
            raise ValueError(f"curve argument (GEMM rows or matrix bytes) must be positive, got {rows!r}")
        if rows <= self.rows[0]:
            return self.values[0]
        if rows >= self.rows[-1]:
            return self.values[-1]
        for (r0, v0), (r1, v1) in zip(zip(self.rows, self.values), zip(self.rows[1:], self.values[1:])):
            if rows <= r1:
                f = (math.log2(rows) - math.log2(r0)) / (math.log2(r1) - math.log2(r0))
                return v0 + f * (v1 - v0)
        raise AssertionError("unreachable")  # pragma: no cover


def parse_gemm_rows_curve(raw: Any, file: str | os.PathLike, name: str = "gemm_rows_efficiency",
                          x_key: str = "rows") -> GemmRowsCurve:
    """Validate a ``[gemm_rows_efficiency]`` table, or (x_key "bytes") a
    ``[gemv_bandwidth_efficiency]`` table (see the module docstring)."""
    if not isinstance(raw, dict):
        raise _err(file, name, f"must be a table with {x_key}/value/unit/source/confidence, got {type(raw).__name__}")
    allowed = {x_key, "value", "unit", "source", "confidence"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise _err(file, name, f"unexpected key(s) {extra}; allowed: {sorted(allowed)}")
    for key in sorted(allowed):
        if key not in raw:
            raise _err(file, f"{name}.{key}", "missing")
    if raw["unit"] != "fraction":
        raise _err(file, f"{name}.unit", f"must be \"fraction\", got {raw['unit']!r}")
    source = raw["source"]
    if not isinstance(source, str) or not source.strip():
        raise _err(file, f"{name}.source", "must be a non-empty string")
    if raw["confidence"] not in CONFIDENCES:
        raise _err(file, f"{name}.confidence", f"{raw['confidence']!r} not one of {list(CONFIDENCES)}")
    rows, values = raw[x_key], raw["value"]
    what = "row counts" if x_key == "rows" else "byte counts"
    if not isinstance(rows, list) or not rows:
        raise _err(file, f"{name}.{x_key}", f"must be a non-empty list of {what}")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rows):
        raise _err(file, f"{name}.{x_key}", f"{what} must be integers >= 1, got {rows!r}")
    if any(b <= a for a, b in zip(rows, rows[1:])):
        raise _err(file, f"{name}.{x_key}", f"{what} must be strictly increasing, got {rows!r}")
    if not isinstance(values, list) or len(values) != len(rows):
        raise _err(file, f"{name}.value", f"must be a list of {len(rows)} numbers (one per {what[:-1]})")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise _err(file, f"{name}.value", f"factors must be finite positive numbers, got {v!r}")
    return GemmRowsCurve(tuple(rows), tuple(float(v) for v in values), source, raw["confidence"])


@dataclass(frozen=True)
class Device:
    """One accelerator / CPU / SoC.  All numbers SI; None = unknown/not present.

    peak_flops: FLOP/s (or OP/s for int precisions) per precision, *dense*
    (no structured-sparsity doubling), only for precisions the file gives a
    known value.  fp32 means IEEE fp32 on vector/CUDA cores (not TF32).
    intra_node_bandwidth / network_bandwidth: unidirectional, per device, B/s.
    """

    id: str
    name: str
    vendor: str
    device_class: str
    peak_flops: dict[str, float]
    memory_bytes: float | None
    memory_bandwidth: float | None
    intra_node_bandwidth: float | None
    network_bandwidth: float | None
    power_w: float | None
    price_usd_per_hour: float | None
    figures: dict[str, Figure]
    source_file: str
    intra_node_link: str | None = None
    notes: str = ""
    cores: int | None = None
    efficiency_overrides: dict[str, Figure] = field(default_factory=dict)
    gemm_rows_curve: GemmRowsCurve | None = None
    gemv_bandwidth_curve: GemmRowsCurve | None = None  # x: bytes of one weight matrix

    @property
    def unknown_figures(self) -> list[str]:
        """Names of figures the data file explicitly marks unknown."""
        return sorted(k for k, f in self.figures.items() if f.value is None)

    def resolve_precision(self, precision: str) -> str:
        """The precision whose rate ``peak(precision)`` returns (see ``peak``)."""
        if precision not in PEAK_FALLBACK:
            raise CatalogError(f"{self.source_file}: unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
        for cand in (precision, *PEAK_FALLBACK[precision]):
            key = f"flops.{cand}"
            if key in self.figures:
                if self.figures[key].value is None:
                    raise CatalogError(
                        f"{self.source_file}: field '{key}': peak {cand} rate of device "
                        f"'{self.id}' is unknown (needed for {precision})"
                    )
                return cand
        raise CatalogError(
            f"{self.source_file}: field 'flops.{precision}': device '{self.id}' has no {precision} "
            f"rate and no fallback ({' -> '.join(PEAK_FALLBACK[precision]) or 'none'}) is given"
        )

    def peak(self, precision: str) -> float:
        """Dense peak throughput (FLOP/s, or OP/s for int) at ``precision``.

        Fallback rule: if the data file has *no entry* for ``precision`` the
        device is taken to lack dedicated units for it and to run it at the
        rate of the next wider format, in this order:

        * int4 -> int8 -> bf16 -> fp16 -> fp32
        * int8 -> bf16 -> fp16 -> fp32   (dequantise to 16-bit)
        * fp4  -> fp8  -> bf16 -> fp16 -> fp32
        * fp8  -> bf16 -> fp16 -> fp32   (e.g. A100, Ascend 910B/C, TPU v5e)
        * fp16 -> bf16 -> fp32   (same-width 16-bit format first)
        * bf16 -> fp32           (bf16 widens losslessly to fp32, not to fp16)
        * fp32: no fallback.

        A precision the file marks "unknown" never falls back: CatalogError.
        """
        return self.figures[f"flops.{self.resolve_precision(precision)}"].value  # type: ignore[return-value]

    def efficiency(self, op_type: str) -> float:
        """Efficiency factor for this device (own override, else class default)."""
        return efficiency(self.device_class, op_type, device=self)

    def gemm_rows_efficiency(self, rows: float) -> float:
        """GEMM rate factor at ``rows`` rows per call (1.0 when the file has no curve)."""
        return self.gemm_rows_curve.at(rows) if self.gemm_rows_curve is not None else 1.0

    def require(self, attr: str) -> float:
        """Return a numeric attribute, raising CatalogError if it is unknown."""
        val = getattr(self, attr)
        if val is None:
            raise CatalogError(f"{self.source_file}: device '{self.id}' has unknown {attr}")
        return val


def parse_device(data: Mapping[str, Any], file: str | os.PathLike) -> Device:
    """Validate a parsed device TOML document and build a Device."""
    extra = sorted(set(data) - _DEVICE_KEYS)
    if extra:
        raise _err(file, extra[0], f"unknown key; allowed: {sorted(_DEVICE_KEYS)}")
    dev_id = get_str(data, file, "id")
    assert dev_id is not None
    if not _ID_RE.match(dev_id):
        raise _err(file, "id", f"{dev_id!r} must be lowercase letters, digits and '-'")
    name = get_str(data, file, "name")
    vendor = get_str(data, file, "vendor")
    device_class = get_str(data, file, "device_class")
    if device_class not in DEVICE_CLASSES:
        raise _err(file, "device_class", f"{device_class!r} not one of {list(DEVICE_CLASSES)}")
    notes = get_str(data, file, "notes", required=False) or ""
    cores = get_int(data, file, "cores", required=False, minimum=1)
    link = get_str(data, file, "intra_node_link", required=False)

    figures: dict[str, Figure] = {}
    flops = data.get("flops")
    if not isinstance(flops, dict) or not flops:
        raise _err(file, "flops", "missing: need at least one [flops.<precision>] table")
    for prec, raw in flops.items():
        if prec not in PRECISIONS:
            raise _err(file, f"flops.{prec}", f"unknown precision; expected one of {list(PRECISIONS)}")
        units = _INT_UNITS if prec in INT_PRECISIONS else _FLOP_UNITS
        figures[f"flops.{prec}"] = parse_figure(raw, file, f"flops.{prec}", units)

    for key in _REQUIRED_FIGURES:
        if key not in data:
            raise _err(file, key, "missing (write value = \"unknown\" if not published)")
    figures["memory_capacity"] = parse_figure(data["memory_capacity"], file, "memory_capacity", ("B",))
    figures["memory_bandwidth"] = parse_figure(data["memory_bandwidth"], file, "memory_bandwidth", ("B/s",))
    figures["power"] = parse_figure(data["power"], file, "power", ("W",))
    for key in ("intra_node_bandwidth", "network_bandwidth"):
        if key in data:
            figures[key] = parse_figure(data[key], file, key, ("B/s",), needs_direction=True)
    if "price" in data:
        figures["price"] = parse_figure(data["price"], file, "price", ("USD/h",))

    overrides: dict[str, Figure] = {}
    eff = data.get("efficiency", {})
    if not isinstance(eff, dict):
        raise _err(file, "efficiency", "must be a table of [efficiency.<op>] tables")
    for op, raw in eff.items():
        if op not in EFFICIENCY_OPS:
            raise _err(file, f"efficiency.{op}", f"unknown op type; expected one of {list(EFFICIENCY_OPS)}")
        overrides[op] = _parse_efficiency_entry(raw, file, f"efficiency.{op}")

    curve = parse_gemm_rows_curve(data["gemm_rows_efficiency"], file) if "gemm_rows_efficiency" in data else None
    gemv = (parse_gemm_rows_curve(data["gemv_bandwidth_efficiency"], file, "gemv_bandwidth_efficiency", "bytes")
            if "gemv_bandwidth_efficiency" in data else None)

    def uni(key: str) -> float | None:
        fig = figures.get(key)
        return fig.unidirectional if fig else None

    return Device(
        id=dev_id,
        name=name or dev_id,
        vendor=vendor or "",
        device_class=device_class,
        peak_flops={k.split(".", 1)[1]: f.value for k, f in figures.items() if k.startswith("flops.") and f.value is not None},
        memory_bytes=figures["memory_capacity"].value,
        memory_bandwidth=figures["memory_bandwidth"].value,
        intra_node_bandwidth=uni("intra_node_bandwidth"),
        network_bandwidth=uni("network_bandwidth"),
        power_w=figures["power"].value,
        price_usd_per_hour=figures["price"].value if "price" in figures else None,
        figures=figures,
        source_file=str(file),
        intra_node_link=link,
        notes=notes,
        cores=cores,
        efficiency_overrides=overrides,
        gemm_rows_curve=curve,
        gemv_bandwidth_curve=gemv,
    )


def dsref_home() -> Path:
    """$DSREF_HOME, default ~/.cache/dsref."""
    return Path(os.environ.get("DSREF_HOME") or Path.home() / ".cache" / "dsref").expanduser()


def host_device_path() -> Path:
    """Where `dsref hw probe` writes this machine's device file."""
    return dsref_home() / "devices" / "host.toml"


def load_device_file(path: str | os.PathLike) -> Device:
    """Load one device TOML file (any location)."""
    return parse_device(read_toml(path), path)


def looks_like_path(s: str) -> bool:
    """A catalog argument that names a file rather than an id (a separator, or a .toml suffix)."""
    return os.sep in s or s.endswith(".toml") or (os.altsep is not None and os.altsep in s)


def load_device(id_or_path: str | os.PathLike, *, directory: str | os.PathLike | None = None) -> Device:
    """Load a device by catalog id, by path to a .toml file, or 'host'.

    'host' is the file written by ``dsref hw probe``
    ($DSREF_HOME/devices/host.toml).  ``directory`` replaces the bundled
    catalog directory for id lookups.
    """
    key = os.fspath(id_or_path)
    if isinstance(id_or_path, Path) or looks_like_path(key):
        return load_device_file(key)
    if key == "host" and directory is None:
        path = host_device_path()
        if not path.exists():
            raise CatalogError(
                f"{path}: no host device file; run `dsref hw probe` to measure this machine "
                "(or set DSREF_HOME to where it was written)"
            )
        return load_device_file(path)
    base = Path(directory) if directory is not None else DEVICES_DIR
    path = base / f"{key}.toml"
    if not path.exists():
        known = ", ".join(d.id for d in list_devices(directory=base))
        raise CatalogError(f"{path}: unknown device id {key!r}; known ids: {known}")
    dev = load_device_file(path)
    if dev.id != key:
        raise _err(path, "id", f"{dev.id!r} does not match the file name {key!r}")
    return dev


def list_devices(*, directory: str | os.PathLike | None = None) -> list[Device]:
    """Every device in ``directory`` (default: the bundled catalog), by id.

    Raises CatalogError on any invalid file or on two files defining one id.
    """
    base = Path(directory) if directory is not None else DEVICES_DIR
    if not base.is_dir():
        raise CatalogError(f"{base}: device directory not found")
    seen: dict[str, str] = {}
    out = []
    for path in sorted(base.glob("*.toml")):
        dev = load_device_file(path)
        if dev.id in seen:
            raise _err(path, "id", f"device id {dev.id!r} is defined twice (also in {seen[dev.id]})")
        seen[dev.id] = str(path)
        out.append(dev)
    return sorted(out, key=lambda d: d.id)
