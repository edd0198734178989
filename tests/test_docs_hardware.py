"""docs/hardware.md shows real catalog output: the `dsref hw list` block is rerun and diffed,
and every number of the wider "Catalog" table is checked against the device TOML files
(the table is written by hand, so without this it goes stale when a data file changes)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsref.experiments.cli import main
from dsref.hwmodels.catalog import list_devices

PAGE = Path(__file__).resolve().parent.parent / "docs" / "hardware.md"
ROW = re.compile(r"\| ([a-z0-9-]+) \| (gpu|cpu|npu|tpu|soc) \|(.*)\|$")


def test_hw_list_block_is_current_output(capsys):
    m = re.search(r"```text\n\$ dsref hw list\n(.*?)```", PAGE.read_text(), re.S)
    assert m, "docs/hardware.md lost its `dsref hw list` block"
    assert main(["hw", "list"]) == 0
    assert capsys.readouterr().out == m.group(1), (
        "docs/hardware.md's `dsref hw list` block differs from the command's output; paste the new output")


def _cell(s: str) -> float | None:
    # "—" (no entry) and "unknown" both mean no number; "31.5 (PCIe 4.0 x16)" keeps its number
    try:
        return float(s.split()[0].replace(",", ""))
    except ValueError:
        return None


def test_catalog_table_matches_device_files():
    rows = {m.group(1): [c.strip() for c in m.group(3).split("|")]
            for m in map(ROW.match, PAGE.read_text().splitlines()) if m}
    devices = list_devices()
    assert set(rows) == {d.id for d in devices}, "the Catalog table and hwmodels/data/devices/ list different ids"
    for d in devices:
        r = rows[d.id]
        want = [(d.peak_flops.get(p), 1e12) for p in ("fp32", "bf16", "fp8", "int8")] + [
            (d.memory_bytes, 1e9), (d.memory_bandwidth, 1e9), (d.intra_node_bandwidth, 1e9),
            (d.network_bandwidth, 1e9), (d.power_w, 1.0), (d.price_usd_per_hour, 1.0)]
        for col, ((value, scale), cell) in enumerate(zip(want, r)):
            got = _cell(cell)
            if value is None:
                assert got is None, (d.id, col, cell)
            else:
                # the table rounds to 3-4 significant digits
                assert got == pytest.approx(value / scale, rel=0.01), (d.id, col, cell, value)
