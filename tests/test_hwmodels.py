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
    "rtx-3090", "rtx-4090", "epyc-9135", "epyc-9755", "epyc-9654-2s",
}
REQUIRED_SYSTEMS = {
    "h800-node", "h800-cluster-2048", "h100-node", "h200-node", "b200-node", "gb200-nvl72",
    "cloudmatrix-384", "raspberry-pi-5", "raspberry-pi-5-w7700", "ampereone-server", "host",
    "h20-node", "ascend-910b-node", "epyc-9654-2s", "epyc-9654-2s-rtx-4090", "epyc-9135-rtx-4090",
    "epyc-9654-rtx-3090", "tpu-v5p-64",
}
# Presets that are one host CPU plus one accelerator over PCIe (partial offload / CPU+GPU hybrid):
# (preset, accelerator, host CPU, host memory in GB as configured in the preset).
OFFLOAD_NODES = (
    ("epyc-9654-2s-rtx-4090", "rtx-4090", "epyc-9654-2s", 1536),
    ("epyc-9135-rtx-4090", "rtx-4090", "epyc-9135", 768),
    ("epyc-9654-rtx-3090", "rtx-3090", "epyc-9654", 384),
)
PCIE4_X16 = 16e9 * 16 * 128 / 130 / 8  # B/s per direction: 16 GT/s x 16 lanes, 128b/130b
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


# ------------------------------------------- deployments added for V3/R1 ----

def test_consumer_gpu_figures_match_whitepaper_arithmetic():
    g4, g3 = load_device("rtx-4090"), load_device("rtx-3090")
    # GDDR6X: per-pin rate x 384-bit bus / 8
    assert g4.memory_bandwidth == pytest.approx(21e9 * 384 / 8)
    assert g3.memory_bandwidth == pytest.approx(19.5e9 * 384 / 8)
    assert g4.memory_bytes == g3.memory_bytes == pytest.approx(24e9)
    # non-tensor fp32 = CUDA cores x 2 (FMA) x boost clock
    assert g4.peak("fp32") == pytest.approx(16384 * 2 * 2.52e9, rel=1e-3)
    assert g3.peak("fp32") == pytest.approx(10496 * 2 * 1.695e9, rel=1e-3)
    # the files use the FP32-accumulate tensor rates: on GeForce that is 2x the fp32 rate for
    # fp16/bf16 (the FP16-accumulate rate would be 4x), fp8 twice that, int8 4x bf16
    for g in (g4, g3):
        assert g.peak("fp16") == g.peak("bf16") == pytest.approx(2 * g.peak("fp32"), rel=5e-3)
        assert g.peak("int8") == pytest.approx(4 * g.peak("bf16"), rel=1e-3)
        assert g.peak("int4") == pytest.approx(2 * g.peak("int8"))
        assert g.intra_node_bandwidth == pytest.approx(PCIE4_X16, rel=1e-3)
        assert g.price_usd_per_hour is not None and g.figures["price"].confidence == "low"
    assert g4.peak("fp8") == pytest.approx(2 * g4.peak("bf16"), rel=1e-3)
    assert "fp8" not in g3.peak_flops and g3.peak("fp8") == g3.peak("bf16")  # Ampere: no FP8 units
    assert g4.peak("fp4") == g4.peak("fp8")  # Ada: no FP4 units
    assert (g4.power_w, g3.power_w) == (450, 350)


def test_epyc_closed_forms():
    e9135, e9755, e9654, e2s = (load_device(i) for i in ("epyc-9135", "epyc-9755", "epyc-9654", "epyc-9654-2s"))
    # memory bandwidth = channels x MT/s x 8 B
    assert e9135.memory_bandwidth == pytest.approx(12 * 6000e6 * 8)
    assert e9755.memory_bandwidth == pytest.approx(12 * 6000e6 * 8)
    assert e2s.memory_bandwidth == pytest.approx(24 * 4800e6 * 8) == pytest.approx(2 * e9654.memory_bandwidth)
    # fp32 = cores x base GHz x FLOP/cycle: Zen 5 runs AVX-512 on 512-bit pipes (64), Zen 4 as 2 x 256 (32)
    assert e9135.peak("fp32") == pytest.approx(16 * 3.65e9 * 64)
    assert e9755.peak("fp32") == pytest.approx(128 * 2.7e9 * 64)
    assert e2s.peak("fp32") == pytest.approx(192 * 2.4e9 * 32)
    assert e9654.peak("fp32") == pytest.approx(96 * 2.4e9 * 32, rel=1e-3)
    for d in (e9135, e9755, e2s):
        assert d.peak("bf16") == pytest.approx(2 * d.peak("fp32"))  # VDPBF16PS
        assert d.peak("int8") == pytest.approx(4 * d.peak("fp32"))  # VPDPBUSD
        assert d.device_class == "cpu"
    # the dual-socket device is exactly two sockets
    assert e2s.cores == 2 * e9654.cores
    assert e2s.memory_bytes == pytest.approx(2 * e9654.memory_bytes)
    assert e2s.power_w == pytest.approx(2 * e9654.power_w)
    assert (e9135.power_w, e9755.power_w) == (200, 500)


def test_per_generation_gemm_overrides():
    base = efficiency("gpu", "gemm")
    for dev_id in ("b200", "gb200", "h20", "rtx-4090"):
        d = load_device(dev_id)
        fig = d.efficiency_overrides["gemm"]
        assert d.efficiency("gemm") == fig.value != base, dev_id
        assert "microbenchmark" in fig.source.lower() and fig.confidence == "low", dev_id
    # Blackwell: vLLM's SM100 CUTLASS FP8 GEMM at M=16384, N=K=4096 ran 2,447-2,545 of 4,500 TFLOP/s
    for dev_id in ("b200", "gb200"):
        assert 2447 / 4500 - 0.005 <= load_device(dev_id).efficiency("gemm") <= 2545 / 4500 + 0.005
    # H20 and 4090: same-harness square-GEMM fraction, scaled by the H100's in that harness onto
    # gpu.gemm's basis; these are the four fp16/bf16 numbers at 8192^2 and 10240^2 cited in the files
    h100 = (736.19 + 668.42 + 797.51 + 719.72) / 4 / 989
    for dev_id, runs, peak in (("rtx-4090", (155.50, 156.88, 160.17, 158.54), 165.2),
                               ("h20", (138.52, 142.09, 138.60, 142.25), 148)):
        expect = base * (sum(runs) / 4 / peak) / h100
        assert load_device(dev_id).efficiency("gemm") == pytest.approx(expect, abs=0.01), dev_id
    # no kernel-level GEMM benchmark of the 3090 was found: the class default stays, and the file says so
    g3 = load_device("rtx-3090")
    assert "gemm" not in g3.efficiency_overrides and g3.efficiency("gemm") == base
    assert "class default" in g3.notes


def test_new_node_presets():
    h20 = load_system("h20-node")
    assert isinstance(h20, Node) and h20.device.id == "h20" and h20.devices_per_node == 8
    assert h20.fabric_bandwidth == pytest.approx(450e9)  # 900 GB/s bidirectional NVLink
    assert h20.network_bandwidth_per_device == pytest.approx(50e9)  # one 400 Gb/s NIC per GPU
    assert h20.host_memory_bytes is None and h20.pcie_bandwidth == pytest.approx(63e9)
    a2 = load_system("ascend-910b-node")
    assert a2.device.id == "ascend-910b" and a2.num_devices == 8
    assert a2.fabric_bandwidth == pytest.approx(a2.device.intra_node_bandwidth) == pytest.approx(196e9)
    assert a2.network_bandwidth_per_device == pytest.approx(a2.device.network_bandwidth) == pytest.approx(25e9)
    cpu2 = load_system("epyc-9654-2s")
    assert cpu2.device.id == cpu2.host_cpu.id == "epyc-9654-2s"
    assert cpu2.host_memory_bandwidth == pytest.approx(921.6e9)
    for name, acc, host, gb in OFFLOAD_NODES:
        n = load_system(name)
        assert (n.device.id, n.host_cpu.id, n.devices_per_node, n.nics_per_node) == (acc, host, 1, 0), name
        assert n.pcie_bandwidth == pytest.approx(PCIE4_X16, rel=1e-3), name
        assert n.host_memory_bytes == pytest.approx(gb * 1e9), name
        assert "configuration choice" in n.figures["host_memory"].source.lower(), name
        assert n.host_memory_bandwidth == pytest.approx(n.host_cpu.memory_bandwidth), name


def test_offload_nodes_resolve_as_sim_local_targets():
    from dsref.sim.local import resolve_target

    for name, acc, host, gb in OFFLOAD_NODES:
        t = resolve_target(name)
        assert (t.device.id, t.host.id, t.n_devices) == (acc, host, 1), name
        assert t.host_memory_bytes == pytest.approx(gb * 1e9) and t.pcie_bandwidth == pytest.approx(PCIE4_X16, rel=1e-3)
    t = resolve_target("epyc-9654-2s")  # the device id wins; either way a CPU-only target
    assert t.device.id == "epyc-9654-2s" and t.host is None


def test_cli_lists_and_shows_new_entries(capsys):
    rc, out = _run_cli(["hw", "list", "--json"], capsys)
    by_id = {r["id"]: r for r in json.loads(out.out)}
    assert rc == 0
    assert by_id["rtx-4090"]["peak_bf16_flops"] == pytest.approx(165.2 * TERA)
    assert by_id["epyc-9135"]["memory_bandwidth"] == pytest.approx(576e9)
    for dev_id in ("rtx-3090", "rtx-4090", "epyc-9135", "epyc-9755", "epyc-9654-2s"):
        rc, out = _run_cli(["hw", "show", dev_id, "--json"], capsys)
        data = json.loads(out.out)
        assert rc == 0 and all(f["source"] for f in data["figures"].values()), dev_id
        rc, out = _run_cli(["hw", "show", dev_id], capsys)
        assert rc == 0 and dev_id in out.out
    for name in ("h20-node", "ascend-910b-node") + tuple(n for n, *_ in OFFLOAD_NODES):
        rc, out = _run_cli(["hw", "show", name, "--json"], capsys)
        data = json.loads(out.out)
        assert rc == 0 and data["name"] == name and data["kind"] == "node", name
        rc, out = _run_cli(["hw", "show", name], capsys)
        assert rc == 0 and f"x {data['device']}" in out.out, name
