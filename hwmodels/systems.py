"""Systems: nodes (devices + fabric + NICs + host) and clusters (nodes + network).

Presets live in ``hwmodels/data/systems/<name>.toml`` with ``kind = "node"``
or ``kind = "cluster"``.  Figures use the same table format as device files
(value/unit/source/confidence, plus ``direction`` for link bandwidths); the
API exposes unidirectional bandwidths in B/s.

Node file keys::

    name, kind = "node", description, device (catalog id or "host"),
    devices_per_node, fabric (name), nics_per_node, host_cpu (optional id)
    [fabric_bandwidth]       per device; required when devices_per_node > 1
    [nic_bandwidth]          per NIC; required when nics_per_node > 0
    [host_memory]            defaults to host_cpu's memory_capacity
    [host_memory_bandwidth]  defaults to host_cpu's memory_bandwidth
    [pcie_bandwidth]         host <-> one accelerator link (optional)

Cluster file keys::

    name, kind = "cluster", description, node (node preset name), num_nodes,
    topology, planes (optional)
    [hop_bandwidth]   scale-out bandwidth per device
    [hop_latency]     end-to-end latency through one switch level
    [max_latency]     (optional) latency across the full tree
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .catalog import (
    DATA_DIR,
    CatalogError,
    Device,
    Figure,
    _err,
    get_int,
    get_str,
    host_device_path,
    load_device,
    parse_figure,
    read_toml,
)

SYSTEMS_DIR = DATA_DIR / "systems"
HOST_SYSTEM = "host"

_NODE_KEYS = {
    "name", "kind", "description", "device", "devices_per_node", "fabric", "nics_per_node",
    "host_cpu", "fabric_bandwidth", "nic_bandwidth", "host_memory", "host_memory_bandwidth",
    "pcie_bandwidth",
}
_CLUSTER_KEYS = {
    "name", "kind", "description", "node", "num_nodes", "topology", "planes",
    "hop_bandwidth", "hop_latency", "max_latency",
}


@dataclass(frozen=True)
class Node:
    """A node: ``devices_per_node`` accelerators sharing a fabric, NICs and a host.

    All bandwidths are unidirectional B/s; None means unknown / not present.
    fabric_bandwidth: per device into the intra-node fabric.
    nic_bandwidth: per NIC.  pcie_bandwidth: host <-> one accelerator.
    """

    name: str
    description: str
    device: Device
    devices_per_node: int
    fabric: str
    fabric_bandwidth: float | None
    nics_per_node: int
    nic_bandwidth: float | None
    host_memory_bytes: float | None
    host_memory_bandwidth: float | None
    host_cpu: Device | None
    pcie_bandwidth: float | None
    figures: dict[str, Figure]
    source_file: str

    @property
    def network_bandwidth_per_device(self) -> float | None:
        """Scale-out bandwidth per device (B/s, unidirectional): NICs shared evenly."""
        if self.nics_per_node == 0 or self.nic_bandwidth is None:
            return None
        return self.nics_per_node * self.nic_bandwidth / self.devices_per_node

    @property
    def num_devices(self) -> int:
        return self.devices_per_node


@dataclass(frozen=True)
class Cluster:
    """``num_nodes`` copies of ``node`` joined by a scale-out network."""

    name: str
    description: str
    node: Node
    num_nodes: int
    topology: str
    planes: int | None
    hop_bandwidth: float | None
    hop_latency_s: float | None
    max_latency_s: float | None
    figures: dict[str, Figure]
    source_file: str

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.node.devices_per_node

    @property
    def device(self) -> Device:
        return self.node.device


def _check_keys(data: Mapping[str, Any], file: Path, allowed: set[str]) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise _err(file, extra[0], f"unknown key; allowed: {sorted(allowed)}")


def _fig(data: Mapping[str, Any], file: Path, key: str, si: str, *, link: bool = False) -> Figure | None:
    if key not in data:
        return None
    return parse_figure(data[key], file, key, (si,), needs_direction=link)


def _uni(fig: Figure | None) -> float | None:
    return fig.unidirectional if fig is not None else None


def _load_dev(dev_id: str, file: Path, field_name: str, device_dir: Path | None) -> Device:
    try:
        return load_device(dev_id, directory=device_dir if dev_id != "host" else None)
    except CatalogError as exc:
        raise _err(file, field_name, f"cannot load device {dev_id!r}: {exc}") from None


def _parse_node(data: Mapping[str, Any], file: Path, device_dir: Path | None) -> Node:
    _check_keys(data, file, _NODE_KEYS)
    name = get_str(data, file, "name")
    dev_id = get_str(data, file, "device")
    assert name is not None and dev_id is not None
    device = _load_dev(dev_id, file, "device", device_dir)
    per_node = get_int(data, file, "devices_per_node", minimum=1)
    nics = get_int(data, file, "nics_per_node", minimum=0)
    assert per_node is not None and nics is not None
    host_id = get_str(data, file, "host_cpu", required=False)
    host_cpu = _load_dev(host_id, file, "host_cpu", device_dir) if host_id else None

    figures: dict[str, Figure] = {}
    for key, si, link in (
        ("fabric_bandwidth", "B/s", True),
        ("nic_bandwidth", "B/s", True),
        ("host_memory", "B", False),
        ("host_memory_bandwidth", "B/s", False),
        ("pcie_bandwidth", "B/s", True),
    ):
        fig = _fig(data, file, key, si, link=link)
        if fig is not None:
            figures[key] = fig
    if per_node > 1 and "fabric_bandwidth" not in figures:
        raise _err(file, "fabric_bandwidth", "missing (required when devices_per_node > 1)")
    if nics > 0 and "nic_bandwidth" not in figures:
        raise _err(file, "nic_bandwidth", "missing (required when nics_per_node > 0)")
    for key, dev_key in (("host_memory", "memory_capacity"), ("host_memory_bandwidth", "memory_bandwidth")):
        if key not in figures:
            if host_cpu is None:
                raise _err(file, key, "missing (write value = \"unknown\", or name a host_cpu device)")
            figures[key] = host_cpu.figures[dev_key]
    return Node(
        name=name,
        description=get_str(data, file, "description", required=False) or "",
        device=device,
        devices_per_node=per_node,
        fabric=get_str(data, file, "fabric", required=per_node > 1) or "none",
        fabric_bandwidth=_uni(figures.get("fabric_bandwidth")),
        nics_per_node=nics,
        nic_bandwidth=_uni(figures.get("nic_bandwidth")),
        host_memory_bytes=figures["host_memory"].value,
        host_memory_bandwidth=figures["host_memory_bandwidth"].value,
        host_cpu=host_cpu,
        pcie_bandwidth=_uni(figures.get("pcie_bandwidth")),
        figures=figures,
        source_file=str(file),
    )


def _parse_cluster(data: Mapping[str, Any], file: Path, system_dir: Path, device_dir: Path | None) -> Cluster:
    _check_keys(data, file, _CLUSTER_KEYS)
    name = get_str(data, file, "name")
    node_name = get_str(data, file, "node")
    assert name is not None and node_name is not None
    try:
        node = load_system(node_name, directory=system_dir, device_directory=device_dir)
    except CatalogError as exc:
        raise _err(file, "node", f"cannot load node preset {node_name!r}: {exc}") from None
    if not isinstance(node, Node):
        raise _err(file, "node", f"{node_name!r} is a cluster, expected a node preset")
    num_nodes = get_int(data, file, "num_nodes", minimum=1)
    assert num_nodes is not None
    figures: dict[str, Figure] = {}
    for key, si, link, required in (
        ("hop_bandwidth", "B/s", True, True),
        ("hop_latency", "s", False, True),
        ("max_latency", "s", False, False),
    ):
        fig = _fig(data, file, key, si, link=link)
        if fig is None:
            if required:
                raise _err(file, key, "missing (write value = \"unknown\" if not published)")
            continue
        figures[key] = fig
    max_lat = figures.get("max_latency")
    return Cluster(
        name=name,
        description=get_str(data, file, "description", required=False) or "",
        node=node,
        num_nodes=num_nodes,
        topology=get_str(data, file, "topology") or "",
        planes=get_int(data, file, "planes", required=False, minimum=1),
        hop_bandwidth=_uni(figures["hop_bandwidth"]),
        hop_latency_s=figures["hop_latency"].value,
        max_latency_s=max_lat.value if max_lat else None,
        figures=figures,
        source_file=str(file),
    )


def load_system_file(
    path: str | os.PathLike,
    *,
    directory: str | os.PathLike | None = None,
    device_directory: str | os.PathLike | None = None,
) -> Node | Cluster:
    """Load one system TOML file; clusters resolve their node in ``directory``."""
    file = Path(path)
    data = read_toml(file)
    kind = data.get("kind")
    system_dir = Path(directory) if directory is not None else file.parent
    dev_dir = Path(device_directory) if device_directory is not None else None
    if kind == "node":
        return _parse_node(data, file, dev_dir)
    if kind == "cluster":
        return _parse_cluster(data, file, system_dir, dev_dir)
    raise _err(file, "kind", f"{kind!r} must be \"node\" or \"cluster\"")


def load_system(
    name: str | os.PathLike,
    *,
    directory: str | os.PathLike | None = None,
    device_directory: str | os.PathLike | None = None,
) -> Node | Cluster:
    """Load a system preset by name (or path to a .toml file).

    'host' is this machine as written by ``dsref hw probe``; it raises
    CatalogError telling you to run the probe if the file is absent.
    """
    key = os.fspath(name)
    if isinstance(name, Path) or os.sep in key or key.endswith(".toml"):
        return load_system_file(key, directory=directory, device_directory=device_directory)
    base = Path(directory) if directory is not None else SYSTEMS_DIR
    path = base / f"{key}.toml"
    if not path.exists():
        known = ", ".join(list_system_names(directory=base))
        raise CatalogError(f"{path}: unknown system {key!r}; known systems: {known}")
    system = load_system_file(path, directory=base, device_directory=device_directory)
    if system.name != key:
        raise _err(path, "name", f"{system.name!r} does not match the file name {key!r}")
    return system


def list_system_names(*, directory: str | os.PathLike | None = None) -> list[str]:
    """Preset names (file stems) without loading them."""
    base = Path(directory) if directory is not None else SYSTEMS_DIR
    if not base.is_dir():
        raise CatalogError(f"{base}: system directory not found")
    return sorted(p.stem for p in base.glob("*.toml"))


def list_systems(
    *,
    directory: str | os.PathLike | None = None,
    device_directory: str | os.PathLike | None = None,
    include_host: bool | None = None,
) -> list[Node | Cluster]:
    """Load every preset.  The 'host' preset is included only when the probe
    file exists (``include_host=None``), always (True) or never (False)."""
    if include_host is None:
        include_host = host_device_path().exists()
    out: list[Node | Cluster] = []
    for name in list_system_names(directory=directory):
        if name == HOST_SYSTEM and not include_host:
            continue
        out.append(load_system(name, directory=directory, device_directory=device_directory))
    return out
