"""Hardware catalog: devices, efficiency factors, systems, and a host probe.

Data files live in ``hwmodels/data`` (devices/*.toml, systems/*.toml,
efficiency.toml); see docs/hardware.md for the table and sources.
"""

from .catalog import (
    CatalogError,
    Device,
    Figure,
    efficiency,
    efficiency_figure,
    efficiency_source,
    host_device_path,
    list_devices,
    load_device,
)
from .systems import Cluster, Node, list_systems, load_system

__all__ = [
    "CatalogError", "Cluster", "Device", "Figure", "Node", "efficiency", "efficiency_figure",
    "efficiency_source", "host_device_path", "list_devices", "list_systems", "load_device", "load_system",
]
