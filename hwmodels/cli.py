"""`dsref hw ...` subcommands: list / show / probe the hardware catalog.

The main CLI calls ``register(subparsers)``; every handler is attached with
``set_defaults(func=handler)`` and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .catalog import DEVICES_DIR, CatalogError, Device, Figure, list_devices, load_device, looks_like_path, read_toml
from .systems import SYSTEMS_DIR, Cluster, Node, load_system

_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "u"), (1e-9, "n"))

HW_HELP = """\
Hardware catalog. Every number is a datasheet (or measured) figure with a
source and a confidence (high / medium / low / measured):
  peak FLOP/s  dense tensor throughput per precision (no 2:4 sparsity);
               int precisions are in OP/s (TOPS)
  memory       device memory capacity (HBM/GDDR/DRAM) and its peak bandwidth
  intra-node   per-device bandwidth into the scale-up fabric (NVLink, HCCS,
               UB, ICI, PCIe), one direction
  network      per-device scale-out bandwidth (InfiniBand/RoCE/Ethernet NIC),
               one direction
  price        typical rental price per device-hour, where published
'unknown' means no source we could verify publishes the figure."""


def _si(value: float | None, unit: str) -> str:
    if value is None:
        return "unknown"
    for scale, prefix in _PREFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"


def _fmt_figure(fig: Figure) -> str:
    if fig.unit_si == "USD/h":
        return "unknown" if fig.value is None else f"{fig.value:.2f} USD/h"
    if fig.unit_si == "fraction":
        return f"{fig.value:.2f}"
    if fig.unit_si == "B" and fig.value is not None:
        return _si(fig.value, "B")
    return _si(fig.value, fig.unit_si)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _safe_peak(dev: Device, precision: str) -> float | None:
    try:
        return dev.peak(precision)
    except CatalogError:
        return None


def device_summary(dev: Device) -> dict[str, Any]:
    """JSON-ready summary of a device (SI units)."""
    return {
        "id": dev.id,
        "name": dev.name,
        "vendor": dev.vendor,
        "device_class": dev.device_class,
        "peak_bf16_flops": _safe_peak(dev, "bf16"),
        "peak_flops": dev.peak_flops,
        "memory_bytes": dev.memory_bytes,
        "memory_bandwidth": dev.memory_bandwidth,
        "intra_node_bandwidth": dev.intra_node_bandwidth,
        "network_bandwidth": dev.network_bandwidth,
        "power_w": dev.power_w,
        "price_usd_per_hour": dev.price_usd_per_hour,
        "unknown": dev.unknown_figures,
        "source_file": dev.source_file,
    }


def _figure_json(fig: Figure) -> dict[str, Any]:
    return {
        "value": fig.value, "unit": fig.unit_si, "as_written": fig.raw, "direction": fig.direction,
        "unidirectional": fig.unidirectional if fig.direction else None,
        "source": fig.source, "confidence": fig.confidence,
    }


def cmd_list(args: argparse.Namespace) -> int:
    devices = list_devices()  # CatalogError (a ValueError): `dsref: error: ...`, exit 2
    if args.json:
        print(json.dumps([device_summary(d) for d in devices], indent=2))
        return 0
    rows = []
    for d in devices:
        price = d.price_usd_per_hour
        rows.append([
            d.id, d.device_class, _si(_safe_peak(d, "bf16"), "FLOP/s"), _si(d.memory_bytes, "B"),
            _si(d.memory_bandwidth, "B/s"), _si(d.intra_node_bandwidth, "B/s"),
            _si(d.network_bandwidth, "B/s"), "-" if price is None else f"{price:.2f}",
        ])
    header = ["id", "class", "bf16 dense", "memory", "mem BW", "intra-node/dir", "network/dir", "USD/h"]
    print(_table(rows, header))
    print("\n`dsref hw show ID` lists every figure with its source; 'unknown' = not published.")
    return 0


def _show_device(dev: Device, as_json: bool) -> int:
    if as_json:
        out = device_summary(dev)
        out["figures"] = {k: _figure_json(f) for k, f in dev.figures.items()}
        out["efficiency_overrides"] = {k: _figure_json(f) for k, f in dev.efficiency_overrides.items()}
        out["notes"] = dev.notes
        for key, c, x in _curves(dev):
            out[key] = {x: list(c.rows), "value": list(c.values), "source": c.source, "confidence": c.confidence}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{dev.name}  [{dev.id}, {dev.device_class}, {dev.vendor}]")
    if dev.notes:
        print(dev.notes)
    rows = []
    for key, fig in dev.figures.items():
        shown = _fmt_figure(fig)
        if fig.direction == "bidirectional" and fig.value is not None:
            shown += f" bidir = {_si(fig.unidirectional, fig.unit_si)}/dir"
        rows.append([key, shown, fig.raw, fig.confidence, fig.source])
    for op, fig in dev.efficiency_overrides.items():
        rows.append([f"efficiency.{op}", _fmt_figure(fig), "", fig.confidence, fig.source])
    print(_table(rows, ["figure", "value (SI)", "as written", "confidence", "source"]))
    for key, c, x in _curves(dev):
        pts = ", ".join(f"{r if x == 'rows' else _si(r, 'B')}: {v:.3g}" for r, v in zip(c.rows, c.values))
        print(f"\n[{key}] ({x} -> fraction; {c.confidence}): {pts}\n  source: {c.source}")
    print(f"\nfrom {dev.source_file}")
    return 0


def _curves(dev: Device):
    """The measured curves a device file may carry: (table name, curve, x key)."""
    for key, c, x in (("gemm_rows_efficiency", dev.gemm_rows_curve, "rows"),
                      ("gemv_bandwidth_efficiency", dev.gemv_bandwidth_curve, "bytes")):
        if c is not None:
            yield key, c, x


def _show_system(sys_: Node | Cluster, as_json: bool) -> int:
    if as_json:
        base = {"name": sys_.name, "kind": type(sys_).__name__.lower(), "description": sys_.description,
                "num_devices": sys_.num_devices, "device": sys_.device.id,
                "figures": {k: _figure_json(f) for k, f in sys_.figures.items()},
                "source_file": sys_.source_file}
        if isinstance(sys_, Cluster):
            base.update(node=sys_.node.name, num_nodes=sys_.num_nodes, topology=sys_.topology, planes=sys_.planes)
        else:
            base.update(devices_per_node=sys_.devices_per_node, fabric=sys_.fabric, nics_per_node=sys_.nics_per_node,
                        network_bandwidth_per_device=sys_.network_bandwidth_per_device)
        print(json.dumps(base, indent=2))
        return 0
    print(f"{sys_.name}: {sys_.description}")
    print(f"{sys_.num_devices} x {sys_.device.id}")
    rows = [[k, _fmt_figure(f), f.direction or "", f.confidence, f.source] for k, f in sys_.figures.items()]
    print(_table(rows, ["figure", "value (SI)", "direction", "confidence", "source"]))
    return 0


def _load_named(name: str) -> Device | Node | Cluster:
    """A device or system by catalog name or .toml path; CatalogError (a ValueError) with one
    line naming it otherwise (unknown names list the known devices and systems)."""
    from .systems import list_system_names

    if looks_like_path(name):
        p = Path(name)
        if not p.exists():
            raise CatalogError(f"{name}: file not found")
        if not p.is_file():
            raise CatalogError(f"{name}: not a file (expected a device or system .toml)")
        try:
            data = read_toml(p)
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError(f"{name}: cannot read ({type(exc).__name__}: {exc})") from None
        if isinstance(data.get("kind"), str) and data["kind"] in ("node", "cluster"):
            return load_system(name)
        return load_device(name)
    try:
        return load_device(name)
    except CatalogError as dev_exc:
        try:
            return load_system(name)
        except CatalogError:
            pass
        if name == "host":
            raise
        catalog_files = (DEVICES_DIR / f"{name}.toml", SYSTEMS_DIR / f"{name}.toml")
        if any(p.exists() for p in catalog_files):  # a catalog file that does not load: its own message
            raise dev_exc from None
        known_dev = ", ".join(sorted(p.stem for p in DEVICES_DIR.glob("*.toml")))
        known_sys = ", ".join(list_system_names())
        raise CatalogError(f"hw show: unknown device or system {name!r}; known devices: {known_dev}; "
                           f"known systems: {known_sys} (or give a path to a .toml file)") from None


def cmd_show(args: argparse.Namespace) -> int:
    obj = _load_named(args.name)
    if isinstance(obj, Device):
        return _show_device(obj, args.json)
    return _show_system(obj, args.json)


def _probe_out(path: str | None) -> str | None:
    """Check --out before probing (seconds of measurement): a file path whose folder exists
    or can be made, not a directory."""
    if path is None:
        return None
    if not path.strip():
        raise ValueError("--out: empty path")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--out {path}: is a directory; give a file path such as {p / 'host.toml'}")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {path}: {parent} is not a directory")
            break
    return path


def cmd_probe(args: argparse.Namespace) -> int:
    out = _probe_out(args.out)
    from .probe import write_probe  # imports numpy/jax only when probing

    try:
        path = write_probe(out, quick=args.quick)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write the device file ({exc.strerror or exc})") from None
    dev = load_device(path)
    print(f"wrote {path}")
    return _show_device(dev, as_json=False)


def cmd_kernels(args: argparse.Namespace) -> int:
    """A device's kernel profile (hwmodels/data/kernels.toml): floors, latencies, GEMM curves, sources."""
    from .kernels import kernel_profile
    dev = load_device(args.device)
    prof = kernel_profile(dev)
    rows = [1, 16, 64, 128, 256, 1024, 4096]
    gemm = {str(r): {"dense": prof.gemm_efficiency(r, False), "grouped": prof.gemm_efficiency(r, True)} for r in rows}
    coll = {}
    for link in ("intra", "inter", "pcie"):
        for c in ("all_reduce", "all_to_all", "p2p"):
            if prof.has_collective(link, c):
                coll[f"{link}.{c}"] = {str(n): prof.collective_latency_s(link, c, n) for n in (2, 8, 16, 64)}
    ep = {str(e): prof.ep_low_latency_s(e, 128) for e in (8, 32, 64, 128, 256)}
    out = {"device": dev.id, "profile": prof.name, "launch_eager_s": prof.launch_eager_s,
           "launch_graph_s": prof.launch_graph_s, "step_overhead_s": prof.step_overhead_s,
           "gemm_efficiency": gemm, "collective_latency_s": coll, "ep_low_latency_s_at_128_tokens": ep,
           "attention_efficiency": {k: prof.attention_efficiency(k) for k in ("decode", "prefill")},
           "sources": prof.sources, "confidence": prof.confidence, "omitted": prof.omitted}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    us = lambda s: "n/a" if s is None else f"{s * 1e6:,.2f} us"  # noqa: E731
    print(f"{dev.id}: kernel profile '{prof.name}' (hwmodels/data/kernels.toml; docs/kernels.md)")
    print(f"  launch floor   eager {us(prof.launch_eager_s)} per kernel, CUDA graph {us(prof.launch_graph_s)}")
    print("  host overhead  " + ", ".join(f"{k} {us(v)} per step" for k, v in (prof.step_overhead_s or {}).items()))
    print("  GEMM rows      fraction of peak compute / of peak bandwidth (grouped: rows per expert)")
    for r, g in gemm.items():
        print(f"  {r:>8s} rows   " + ("flat catalog efficiencies" if g["dense"] is None else
                                     f"dense {g['dense'][0]:.2f} / {g['dense'][1]:.2f}")
              + ("" if g["grouped"] is None else f", grouped {g['grouped'][0]:.2f} / {g['grouped'][1]:.2f}"))
    for k, v in coll.items():
        print(f"  {k:17s} " + ", ".join(f"{n} ranks {us(t)}" for n, t in v.items()))
    if any(v is not None for v in ep.values()):
        print("  EP low-latency " + ", ".join(f"EP{e}: {us(v[0])} + {us(v[1])}" for e, v in ep.items() if v))
    for k, src in sorted(prof.sources.items()):
        print(f"  - {k} [{prof.confidence.get(k, '?')}]: {src}")
    for k, why in sorted(prof.omitted.items()):
        print(f"  - {k}: omitted ({why})")
    return 0


def cmd_hw_help(args: argparse.Namespace) -> int:
    args.hw_parser.print_help()
    return 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``hw`` subcommand (list / show / probe) to a CLI."""
    from dsref.reference.cli_common import HelpFormatter
    hw = subparsers.add_parser(
        "hw", help="hardware catalog: list, show and probe devices",
        description=HW_HELP, epilog="examples:\n  dsref hw list\n  dsref hw show h800\n  dsref hw kernels h800\n  dsref hw probe",
        formatter_class=HelpFormatter,
    )
    hw.set_defaults(func=cmd_hw_help, hw_parser=hw)
    sub = hw.add_subparsers(dest="hw_command")

    p_list = sub.add_parser("list", help="one line per device: dense bf16 peak, memory, bandwidths, price",
                            description="One line per catalog device: dense bf16 peak, memory, memory bandwidth, "
                                        "intra-node and\nnetwork bandwidth per direction, price per hour.\n\n"
                                        + HW_HELP, epilog="example:\n  dsref hw list --json",
                            formatter_class=HelpFormatter)
    p_list.add_argument("--json", action="store_true", help="print a JSON list (SI units: FLOP/s, B, B/s, W, USD/h)")
    p_list.set_defaults(func=cmd_list)

    p_show = sub.add_parser(
        "show", help="every figure of one device (or system preset) with unit, source, confidence",
        description="Every figure of one device or system preset (a node or a cluster): value in SI units, as "
                    "written in\nthe source, confidence and source; measured efficiency curves where the "
                    "device has them.",
        epilog="examples:\n  dsref hw show h800\n  dsref hw show host      # after `dsref hw probe`",
        formatter_class=HelpFormatter)
    p_show.add_argument("name", metavar="NAME",
                        help="device id (see `dsref hw list`), 'host', a path to a .toml, or a system preset name")
    p_show.add_argument("--json", action="store_true", help="print JSON (SI units)")
    p_show.set_defaults(func=cmd_show)

    p_probe = sub.add_parser(
        "probe", help="measure this machine (memory bandwidth, matmul FLOP/s, cores, RAM) and save it as device 'host'",
        description="Measure this machine's achieved (not peak) rates: multi-threaded memory read bandwidth\n"
                    "over a 1 GiB array and matrix-multiply FLOP/s in fp32 and bf16, plus cores and RAM.\n"
                    "Saves them as device 'host' ($DSREF_HOME/devices/host.toml, by default\n"
                    "~/.cache/dsref/devices/host.toml), which `dsref hw show host` and\n"
                    "`dsref sim local --device host` then use.",
        epilog="example:\n  dsref hw probe --quick",
        formatter_class=HelpFormatter,
    )
    p_probe.add_argument("--out", default=None, help="write the device file here instead of the host path")
    p_probe.add_argument("--quick", action="store_true", help="small sizes, ~3 s, rough numbers")
    p_probe.set_defaults(func=cmd_probe)

    p_k = sub.add_parser(
        "kernels", help="a device's kernel profile: launch floors, host overhead, collective latency, GEMM curves",
        description="The kernel-level figures the simulators charge on a device (hwmodels/data/kernels.toml):\n"
                    "per-kernel launch floor (eager / CUDA graph), per-step host overhead, collective latency\n"
                    "per call by link and group size, GEMM efficiency by rows (DeepGEMM tables), the DeepEP\n"
                    "low-latency EP table, each with its source and confidence.",
        epilog="examples:\n  dsref hw kernels h800\n  dsref hw kernels b200 --json", formatter_class=HelpFormatter)
    p_k.add_argument("device", metavar="DEVICE", help="device id (see `dsref hw list`)")
    p_k.add_argument("--json", action="store_true", help="print JSON (seconds, fractions)")
    p_k.set_defaults(func=cmd_kernels)
    return hw
