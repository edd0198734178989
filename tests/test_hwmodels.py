"""Tests for the hardware catalog (hwmodels)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from dsref.hwmodels import cli
from dsref.hwmodels.catalog import (
    CONFIDENCES,
    DEVICE_CLASSES,
    DEVICES_DIR,
    EFFICIENCY_OPS,
    CatalogError,
    efficiency,
    efficiency_source,
    list_devices,
    load_device,
    load_efficiency_table,
)
from dsref.hwmodels.systems import SYSTEMS_DIR, Cluster, Node, list_system_names, list_systems, load_system

REQUIRED_IDS = {
    "h800", "h100", "h200", "h20", "a100", "b200", "gb200", "ascend-910b", "ascend-910c",
    "tpu-v5e", "tpu-v5p", "raspberry-pi-5", "radeon-pro-w7700", "ampereone-a192-32x",
    "epyc-9654", "m3-ultra", "biren-br100", "moore-threads-s4000", "kunlunxin-p800",
    "hygon-k100", "enflame-s60", "metax-c500", "iluvatar-tiangai-150",
}
REQUIRED_SYSTEMS = {
    "h800-node", "h800-cluster-2048", "h100-node", "h200-node", "b200-node", "gb200-nvl72",
    "cloudmatrix-384", "raspberry-pi-5", "raspberry-pi-5-w7700", "ampereone-server", "host",
}
TERA = 1e12


# ---------------------------------------------------------------- catalog ----

def test_required_devices_present_and_file_name_is_id():
    devices = list_devices()
    assert REQUIRED_IDS <= {d.id for d in devices}
    for d in devices:
        assert Path(d.source_file).stem == d.id
        assert d.device_class in DEVICE_CLASSES


def test_every_figure_has_source_and_confidence():
    for d in list_devices():
        for name, fig in {**d.figures, **{f"efficiency.{k}": v for k, v in d.efficiency_overrides.items()}}.items():
            assert fig.source.strip(), (d.id, name)
            assert fig.confidence in CONFIDENCES, (d.id, name)
        for key in ("memory_capacity", "memory_bandwidth", "power"):
            assert key in d.figures, (d.id, key)


def test_h800_spot_checks():
    d = load_device("h800")
    assert d.peak("bf16") == pytest.approx(989 * TERA)
    assert d.peak("fp8") == pytest.approx(1979 * TERA)
    assert d.memory_bandwidth == pytest.approx(3.35 * TERA)
    assert d.memory_bytes == pytest.approx(80e9)
    # NVLink 400 GB/s is bidirectional: the API exposes 200 GB/s per direction
    assert d.figures["intra_node_bandwidth"].direction == "bidirectional"
    assert d.intra_node_bandwidth == pytest.approx(200e9)
    assert d.network_bandwidth == pytest.approx(50e9)  # 400 Gb/s
    assert d.price_usd_per_hour == pytest.approx(2.0)


def test_other_spot_checks():
    assert load_device("h100").intra_node_bandwidth == pytest.approx(450e9)
    assert load_device("h200").memory_bandwidth == pytest.approx(4.8 * TERA)
    assert load_device("m3-ultra").memory_bandwidth == pytest.approx(819e9)
    assert load_device("m3-ultra").memory_bytes == pytest.approx(512e9)
    assert load_device("tpu-v5e").intra_node_bandwidth == pytest.approx(200e9)
    pi = load_device("raspberry-pi-5")
    assert pi.peak("fp32") == pytest.approx(4 * 2.4e9 * 16)
    assert pi.memory_bandwidth == pytest.approx(17.07e9)
    assert load_device("epyc-9654").memory_bandwidth == pytest.approx(12 * 4800e6 * 8)
    assert load_device("ampereone-a192-32x").memory_bandwidth == pytest.approx(8 * 5200e6 * 8)


def test_peak_fallbacks_and_unknowns():
    h100 = load_device("h100")
    assert "int4" not in h100.peak_flops
    assert h100.peak("int4") == h100.peak("int8")  # no int4 units on Hopper
    assert h100.peak("fp16") == h100.peak("bf16")
    a100 = load_device("a100")
    assert a100.peak("fp8") == a100.peak("bf16")  # no fp8 units on Ampere
    assert a100.peak("int4") == pytest.approx(1248 * TERA)
    v5e = load_device("tpu-v5e")
    with pytest.raises(CatalogError, match="unknown"):
        v5e.peak("fp32")  # explicitly unknown never falls back
    p800 = load_device("kunlunxin-p800")
    assert p800.memory_bytes is None and "memory_bandwidth" in p800.unknown_figures
    with pytest.raises(CatalogError, match="unknown"):
        p800.require("memory_bandwidth")
    with pytest.raises(CatalogError, match="precision"):
        h100.peak("fp64")


def test_unknown_device_id_error_lists_known():
    with pytest.raises(CatalogError, match="known ids"):
        load_device("no-such-device")


# ------------------------------------------------------------- validation ----

GOOD = """
id = "{id}"
name = "Test"
vendor = "T"
device_class = "gpu"

[flops.bf16]
value = 100
unit = "TFLOP/s"
source = "test"
confidence = "high"

[memory_capacity]
value = 16
unit = "GB"
source = "test"
confidence = "high"

[memory_bandwidth]
value = {bw}
unit = "{bw_unit}"
source = "test"
confidence = "high"

[power]
value = 100
unit = "W"
source = "test"
confidence = "low"
"""


def _write(dirpath: Path, fname: str, text: str) -> Path:
    path = dirpath / fname
    path.write_text(text)
    return path


def test_good_tmp_device_loads_from_path_and_directory(tmp_path):
    path = _write(tmp_path, "t1.toml", GOOD.format(id="t1", bw=1, bw_unit="TB/s"))
    assert load_device(path).memory_bandwidth == pytest.approx(1e12)
    assert load_device(str(path)).id == "t1"
    assert [d.id for d in list_devices(directory=tmp_path)] == ["t1"]
    assert load_device("t1", directory=tmp_path).peak("bf16") == pytest.approx(100 * TERA)


@pytest.mark.parametrize(
    "text, field",
    [
        (GOOD.format(id="bad", bw=-1, bw_unit="TB/s"), "memory_bandwidth.value"),
        (GOOD.format(id="bad", bw=1, bw_unit="furlongs/s"), "memory_bandwidth.unit"),
        (GOOD.format(id="bad", bw=1, bw_unit="GB"), "memory_bandwidth.unit"),
        (GOOD.format(id="bad", bw='"fast"', bw_unit="TB/s"), "memory_bandwidth.value"),
        (GOOD.format(id="bad", bw=1, bw_unit="TB/s").replace('confidence = "low"', 'confidence = "sure"'), "power.confidence"),
        (GOOD.format(id="bad", bw=1, bw_unit="TB/s").replace('source = "test"\nconfidence = "low"', 'confidence = "low"'), "power.source"),
        (GOOD.format(id="bad", bw=1, bw_unit="TB/s").replace("[power]\nvalue = 100", "[powr]\nvalue = 100"), "powr"),
        (GOOD.format(id="bad", bw=1, bw_unit="TB/s").replace('device_class = "gpu"', 'device_class = "fpga"'), "device_class"),
        (GOOD.format(id="bad", bw=1, bw_unit="TB/s").replace('unit = "TFLOP/s"', 'unit = "TOPS"'), "flops.bf16.unit"),
    ],
)
def test_invalid_device_rejected_with_file_and_field(tmp_path, text, field):
    path = _write(tmp_path, "bad.toml", text)
    with pytest.raises(CatalogError) as exc:
        load_device(path)
    assert str(path) in str(exc.value)
    assert f"'{field}'" in str(exc.value)


def test_missing_required_figure_rejected(tmp_path):
    text = GOOD.format(id="bad", bw=1, bw_unit="TB/s")
    text = text[: text.index("[memory_bandwidth]")] + text[text.index("[power]"):]
    path = _write(tmp_path, "bad.toml", text)
    with pytest.raises(CatalogError, match=r"bad\.toml: field 'memory_bandwidth': missing"):
        load_device(path)


def test_link_bandwidth_needs_direction(tmp_path):
    text = GOOD.format(id="bad", bw=1, bw_unit="TB/s") + (
        '\n[intra_node_bandwidth]\nvalue = 100\nunit = "GB/s"\nsource = "t"\nconfidence = "low"\n'
    )
    path = _write(tmp_path, "bad.toml", text)
    with pytest.raises(CatalogError, match="intra_node_bandwidth.direction"):
        load_device(path)


def test_duplicate_id_rejected(tmp_path):
    _write(tmp_path, "a.toml", GOOD.format(id="dup", bw=1, bw_unit="TB/s"))
    b = _write(tmp_path, "b.toml", GOOD.format(id="dup", bw=2, bw_unit="TB/s"))
    with pytest.raises(CatalogError, match="defined twice") as exc:
        list_devices(directory=tmp_path)
    assert str(b) in str(exc.value) and "'id'" in str(exc.value)


def test_invalid_toml_syntax_names_file(tmp_path):
    path = _write(tmp_path, "broken.toml", "id = \n")
    with pytest.raises(CatalogError, match="broken.toml: invalid TOML"):
        load_device(path)


# ------------------------------------------------------------- efficiency ----

def test_efficiency_table_complete_and_sourced():
    table = load_efficiency_table()
    assert len(table) == len(DEVICE_CLASSES) * len(EFFICIENCY_OPS)
    for (cls, op), fig in table.items():
        assert 0 < fig.value <= 1, (cls, op)
        assert fig.source.strip()
    assert efficiency("gpu", "all_to_all") == pytest.approx(0.8)
    assert "DeepSeek" in efficiency_source("gpu", "all_to_all")


def test_device_efficiency_override():
    pi = load_device("raspberry-pi-5")
    assert "gemm" in pi.efficiency_overrides
    assert pi.efficiency("gemm") == pi.efficiency_overrides["gemm"].value
    assert pi.efficiency("gemm") != efficiency("cpu", "gemm")
    assert pi.efficiency("attention") == efficiency("cpu", "attention")  # no override: the class value
    with pytest.raises(CatalogError, match="op type"):
        efficiency("gpu", "teleport")


def test_efficiency_file_missing_entry_rejected(tmp_path):
    src = (Path(DEVICES_DIR).parent / "efficiency.toml").read_text()
    start = src.index("[soc.overlap]")  # the file's last table
    path = _write(tmp_path, "eff.toml", src[:start])
    with pytest.raises(CatalogError, match="'soc.overlap': missing"):
        load_efficiency_table(path)


# ---------------------------------------------------------------- systems ----

@pytest.fixture
def probed_home(tmp_path, monkeypatch):
    """DSREF_HOME pointing at a tmp dir holding a quick-probe host file."""
    from dsref.hwmodels.probe import write_probe

    monkeypatch.setenv("DSREF_HOME", str(tmp_path / "home"))
    write_probe(quick=True)
    return tmp_path / "home"


def test_every_system_preset_loads(probed_home):
    assert REQUIRED_SYSTEMS <= set(list_system_names())
    systems = {s.name: s for s in list_systems()}
    assert set(systems) == set(list_system_names())
    for s in systems.values():
        assert s.num_devices >= 1
        for name, fig in s.figures.items():
            assert fig.source.strip() and fig.confidence in CONFIDENCES, (s.name, name)


def test_host_missing_gives_probe_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("DSREF_HOME", str(tmp_path))
    with pytest.raises(CatalogError, match="dsref hw probe"):
        load_device("host")
    with pytest.raises(CatalogError, match="dsref hw probe"):
        load_system("host")
    assert "host" not in {s.name for s in list_systems()}


def test_system_spot_checks():
    node = load_system("h800-node")
    assert isinstance(node, Node)
    assert node.devices_per_node == 8
    assert node.fabric_bandwidth == pytest.approx(200e9)
    assert node.network_bandwidth_per_device == pytest.approx(50e9)
    cluster = load_system("h800-cluster-2048")
    assert isinstance(cluster, Cluster)
    assert cluster.num_devices == 2048 and cluster.planes == 8
    assert cluster.hop_latency_s == pytest.approx(2.8e-6)
    cm = load_system("cloudmatrix-384")
    assert cm.num_devices == 384 and cm.device.id == "ascend-910c"
    assert load_system("gb200-nvl72").num_devices == 72
    pi_gpu = load_system("raspberry-pi-5-w7700")
    assert pi_gpu.device.id == "radeon-pro-w7700" and pi_gpu.host_cpu.id == "raspberry-pi-5"
    assert pi_gpu.pcie_bandwidth < 1.1e9  # PCIe x1, not the card's x16
    assert pi_gpu.host_memory_bandwidth == pytest.approx(17.07e9)  # from host_cpu
    amp = load_system("ampereone-server")
    assert amp.host_memory_bytes == pytest.approx(512e9)


def test_invalid_system_rejected(tmp_path):
    for p in SYSTEMS_DIR.glob("h800-*.toml"):
        shutil.copy(p, tmp_path / p.name)
    bad = tmp_path / "h800-node.toml"
    bad.write_text(bad.read_text().replace("devices_per_node = 8", "devices_per_node = 0"))
    with pytest.raises(CatalogError, match="h800-node.toml: field 'devices_per_node'"):
        load_system("h800-node", directory=tmp_path)
    with pytest.raises(CatalogError, match="h800-cluster-2048.toml: field 'node'"):
        load_system("h800-cluster-2048", directory=tmp_path)
    bad.write_text("name = \"h800-node\"\nkind = \"rack\"\n")
    with pytest.raises(CatalogError, match="field 'kind'"):
        load_system("h800-node", directory=tmp_path)


# ------------------------------------------------------------ probe + CLI ----

def test_probe_quick_writes_loadable_host(probed_home):
    host = load_device("host")
    assert host.device_class == "cpu"
    assert Path(host.source_file) == probed_home / "devices" / "host.toml"
    assert host.peak("fp32") > 0 and host.peak("bf16") > 0
    assert host.memory_bandwidth > 0 and host.memory_bytes > 0 and host.cores >= 1
    assert host.figures["memory_bandwidth"].confidence == "measured"
    assert "measured by dsref hw probe" in host.figures["flops.fp32"].source
    assert load_system("host").device.id == "host"


def _run_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="dsref")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(argv)
    rc = args.func(args)
    return rc, capsys.readouterr()


def test_cli_list_json(capsys):
    rc, out = _run_cli(["hw", "list", "--json"], capsys)
    assert rc == 0
    rows = json.loads(out.out)
    by_id = {r["id"]: r for r in rows}
    assert REQUIRED_IDS <= set(by_id)
    h800 = by_id["h800"]
    for key in ("name", "vendor", "device_class", "peak_bf16_flops", "memory_bytes", "memory_bandwidth", "price_usd_per_hour"):
        assert key in h800
    assert h800["peak_bf16_flops"] == pytest.approx(989 * TERA)
    assert by_id["kunlunxin-p800"]["peak_bf16_flops"] is None


def test_cli_show_json_and_text(capsys):
    rc, out = _run_cli(["hw", "show", "h800", "--json"], capsys)
    assert rc == 0
    data = json.loads(out.out)
    assert data["figures"]["memory_bandwidth"]["value"] == pytest.approx(3.35 * TERA)
    assert data["figures"]["intra_node_bandwidth"]["unidirectional"] == pytest.approx(200e9)
    assert all(f["source"] for f in data["figures"].values())
    rc, out = _run_cli(["hw", "show", "h800-cluster-2048"], capsys)
    assert rc == 0 and "2048 x h800" in out.out
    with pytest.raises(CatalogError, match="unknown device or system 'nonexistent'"):
        _run_cli(["hw", "show", "nonexistent"], capsys)
    rc, out = _run_cli(["hw", "list"], capsys)
    assert rc == 0 and "989 TFLOP/s" in out.out


def test_cli_probe_quick(tmp_path, capsys):
    target = tmp_path / "me.toml"
    rc, out = _run_cli(["hw", "probe", "--quick", "--out", str(target)], capsys)
    assert rc == 0 and target.exists()
    assert load_device(target).id == "host"
