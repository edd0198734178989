"""hwmodels/data/kernels.toml and its loader (hwmodels/kernels.py): every figure is sourced,
curves are monotone where physics says so, interpolation matches its closed form, profiles
resolve device -> generation -> class, and bad files fail naming the file and key."""
from __future__ import annotations

import math
import statistics
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsref.hwmodels import kernels as K
from dsref.hwmodels.catalog import CONFIDENCES, CatalogError, list_devices

DATA = tomllib.loads(K.KERNELS_FILE.read_text())
FIGURE_MARKERS = ("value", "raw", "participants", "ep", "rows")


def _figures(node, path=""):
    """Every figure table in the raw TOML (a table carrying a value/curve)."""
    if isinstance(node, dict):
        if any(m in node for m in FIGURE_MARKERS):
            yield path, node
            return
        for k, v in node.items():
            yield from _figures(v, f"{path}.{k}" if path else k)


def dev(id_, cls="gpu"):
    return SimpleNamespace(id=id_, device_class=cls)


# ---------------------------------------------------------------- the shipped file

def test_every_figure_has_source_and_confidence():
    figs = list(_figures(DATA))
    assert len(figs) > 30
    for path, fig in figs:
        assert isinstance(fig.get("source"), str) and len(fig["source"].strip()) > 20, path
        assert fig.get("confidence") in CONFIDENCES, path


def test_profiles_and_their_sources():
    names = K.profile_names()
    for expected in ("hopper", "blackwell", "ampere", "ada", "ascend", "gpu", "npu", "tpu", "cpu", "soc"):
        assert expected in names
    for name in names:
        p = K.get_profile(name)
        assert p.launch_graph_s <= p.launch_eager_s, name
        assert set(p.step_overhead_s) == {"decode", "prefill"}
        assert all(0 <= v < 0.1 for v in p.step_overhead_s.values())
        assert {"launch_eager", "launch_graph", "step_overhead.decode", "step_overhead.prefill"} <= set(p.sources)
        assert all(s.strip() for s in p.sources.values())
        assert set(p.sources) == set(p.confidence)


def test_catalog_devices_resolve():
    by_id = {d.id: K.kernel_profile(d).name for d in list_devices()}
    assert by_id["h100"] == by_id["h800"] == "hopper"
    assert by_id["h20"] == "h20" and by_id["h200"] == "h200"      # hopper less the H800 GEMM table
    assert by_id["b200"] == by_id["gb200"] == "blackwell"
    assert by_id["a100"] == "ampere"
    assert by_id["ascend-910b"] == "ascend"
    assert by_id["tpu-v5e"] == "tpu" and by_id["epyc-9654"] == "cpu" and by_id["m3-ultra"] == "soc"
    # ids a generation lists resolve even before their device file exists; unknown ids fall back
    assert K.kernel_profile(dev("rtx-3090")).name == "ampere"
    assert K.kernel_profile(dev("rtx-4090")).name == "ada"
    assert K.kernel_profile(dev("no-such-gpu", "npu")).name == "npu"


def test_collective_curves_grow_with_participants():
    for name in K.profile_names():
        p = K.get_profile(name)
        for (link, coll), curve in p.collectives.items():
            ns = list(curve.participants) + [2 * curve.participants[-1]]
            lat = [p.collective_latency_s(link, coll, n) for n in ns]
            assert all(b >= a for a, b in zip(lat, lat[1:])), (name, link, coll, lat)
            assert 0 < lat[0] < 1e-3


def test_collective_interpolation_and_edges():
    gpu = K.get_profile("gpu")
    c = DATA["class"]["gpu"]["collective"]["intra"]["all_reduce"]
    v4, v8 = c["value"][1] * 1e-6, c["value"][2] * 1e-6
    # 6 ranks: log2 interpolation between the 4- and 8-rank points
    f = (math.log2(6) - 2) / 1
    assert gpu.collective_latency_s("intra", "all_reduce", 6) == pytest.approx(v4 + f * (v8 - v4))
    assert gpu.collective_latency_s("intra", "all_reduce", 4096) == pytest.approx(c["value"][-1] * 1e-6)  # clamped
    assert gpu.collective_latency_s("intra", "all_reduce", 1) == 0.0
    # NCCL tuning model: ring/LL over NVLink 6.6 + 2(n-1) x 0.6 us, or NVLS at a flat 25 us
    for n, v in zip(c["participants"], c["value"]):
        assert v == pytest.approx(min(6.6 + 2 * (n - 1) * 0.6, 25.0))
    with pytest.raises(CatalogError, match="unknown link"):
        gpu.collective_latency_s("nvlink", "all_reduce", 8)
    with pytest.raises(CatalogError, match="collective.inter.all_reduce"):
        K.get_profile("tpu").collective_latency_s("inter", "all_reduce", 16)
    assert not K.get_profile("cpu").has_collective("intra", "all_reduce")


def test_h20_h200_drop_the_h800_gemm_fractions_but_keep_the_rest():
    hop = K.get_profile("hopper")
    for name in ("h20", "h200"):
        p = K.get_profile(name)
        assert p.gemm_efficiency(64, False) is None and p.gemm_efficiency(64, True) is None
        assert set(p.omitted) == {"gemm.dense", "gemm.grouped"} and all(len(r) > 40 for r in p.omitted.values())
        assert "gemm.dense" not in p.sources
        assert p.ep_low_latency_s(8, 128) == hop.ep_low_latency_s(8, 128)
        assert p.attention_efficiency("decode") == hop.attention_efficiency("decode")
    assert hop.gemm_efficiency(64, False) is not None and not hop.omitted


def test_generation_overrides_only_what_it_gives():
    amp, gpu = K.get_profile("ampere"), K.get_profile("gpu")
    assert amp.collective_latency_s("intra", "all_reduce", 8) == pytest.approx(33.7e-6)
    assert amp.collective_latency_s("inter", "all_reduce", 16) == gpu.collective_latency_s("inter", "all_reduce", 16)
    assert amp.launch_eager_s == gpu.launch_eager_s
    assert amp.sources["collective.intra.all_reduce"] != gpu.sources["collective.intra.all_reduce"]


def test_gemm_curve_is_the_median_of_the_published_rows():
    hop = K.get_profile("hopper")
    for kind, grouped in (("dense", False), ("grouped", True)):
        t = DATA["generation"]["hopper"]["gemm"][kind]
        ms = sorted({r[1] for r in t["raw"]})
        for m in ms:
            rows = [r for r in t["raw"] if r[1] == m]
            c = statistics.median(r[4] for r in rows) / t["peak_tflops"]
            b = statistics.median(r[5] for r in rows) / t["peak_gbs"]
            assert hop.gemm_efficiency(m, grouped) == pytest.approx((c, b))
        assert hop.gemm_efficiency(1, grouped) == hop.gemm_efficiency(ms[0], grouped)      # clamp low
        assert hop.gemm_efficiency(1e6, grouped) == hop.gemm_efficiency(ms[-1], grouped)   # clamp high
        comp = [hop.gemm_efficiency(m, grouped)[0] for m in ms]
        assert all(b >= a for a, b in zip(comp, comp[1:]))
    # the DeepGEMM normal-GEMM medians by hand: M=64 -> (287+289)/2 TFLOPS, M=128 -> (510+533)/2
    assert hop.gemm_efficiency(64, False)[0] == pytest.approx(288 / 1979)
    assert hop.gemm_efficiency(128, False)[0] == pytest.approx(521.5 / 1979)
    c64, c128 = hop.gemm_efficiency(64, False)[0], hop.gemm_efficiency(128, False)[0]
    assert hop.gemm_efficiency(96, False)[0] == pytest.approx(c64 + math.log2(1.5) * (c128 - c64))
    assert K.get_profile("blackwell").gemm_efficiency(128, True) is None
    assert K.get_profile("ampere").gemm_efficiency(128, False) is None
    with pytest.raises(CatalogError):
        hop.gemm_efficiency(0, False)


@pytest.mark.parametrize("section", [("generation", "hopper"), ("device", "ascend-910c")])
def test_ep_low_latency_rows(section):
    kind, name = section
    prof, t = K.get_profile(name), DATA[kind][name]["ep_low_latency"]
    for i, ep in enumerate(t["ep"]):
        d, c = prof.ep_low_latency_s(ep, t["tokens_per_rank"])
        assert d == pytest.approx(t["dispatch_us"][i] * 1e-6) and c == pytest.approx(t["combine_us"][i] * 1e-6)
        # latency x bandwidth is the byte count the benchmark divides by (within rounding)
        assert t["dispatch_us"][i] * t["dispatch_gbs"][i] * 1e3 == pytest.approx(
            t["tokens_per_rank"] * t["dispatch_bytes_per_token"], rel=0.03)
        assert t["combine_us"][i] * t["combine_gbs"][i] * 1e3 == pytest.approx(
            t["tokens_per_rank"] * t["combine_bytes_per_token"], rel=0.03)


def test_ascend_910c_has_its_own_section():
    from dsref.hwmodels.catalog import load_device
    p910c, p910b = K.kernel_profile(load_device("ascend-910c")), K.kernel_profile(load_device("ascend-910b"))
    assert p910c.name == "ascend-910c" and p910b.name == "ascend"
    assert p910c.ep_low_latency_s(8, 128) == pytest.approx((132e-6, 126e-6))
    assert p910b.ep_low_latency_s(8, 128) is None
    assert p910c.launch_eager_s == p910b.launch_eager_s            # inherited
    assert p910c.collective_latency_s("intra", "all_reduce", 8) == p910b.collective_latency_s("intra", "all_reduce", 8)


def test_ep_low_latency_table():
    hop = K.get_profile("hopper")
    # fewer tokens keep the latency floor; more add (tokens - 128) x bytes / bandwidth
    assert hop.ep_low_latency_s(8, 1) == hop.ep_low_latency_s(8, 128)
    d, c = hop.ep_low_latency_s(8, 256)
    assert d == pytest.approx(77e-6 + 128 * 59264 / 98e9)
    assert c == pytest.approx(114e-6 + 128 * 114688 / 127e9)
    assert hop.ep_low_latency_s(1024, 128) == hop.ep_low_latency_s(256, 128)
    assert K.get_profile("ampere").ep_low_latency_s(8, 128) is None


def test_blackwell_gemm_bandwidth_column_is_derived_from_its_tflops():
    # vLLM publishes only TFLOP/s; the file's GB/s = (MK + NK + 2MN) bytes / kernel time
    t = DATA["generation"]["blackwell"]["gemm"]["dense"]
    for _, m, n, k, tflops, gbs in t["raw"]:
        seconds = 2 * m * n * k / (tflops * 1e12)
        assert gbs * 1e9 == pytest.approx((m * k + n * k + 2 * m * n) / seconds, rel=2e-3)
    comp = K.get_profile("blackwell").gemm.get("dense").compute
    assert all(b >= a for a, b in zip(comp, comp[1:]))


def test_ep_normal_bandwidth():
    hop = K.get_profile("hopper")
    assert hop.ep_normal_bandwidth(8) == pytest.approx((153e9, 158e9))
    assert hop.ep_normal_bandwidth(4) == hop.ep_normal_bandwidth(8)          # clamped
    assert hop.ep_normal_bandwidth(256) == pytest.approx((51e9, 50e9))
    d = hop.ep_normal_bandwidth(12)[0]
    assert d == pytest.approx(153e9 + math.log2(1.5) * (43e9 - 153e9))
    assert K.get_profile("blackwell").ep_normal_bandwidth(8)[0] > hop.ep_normal_bandwidth(8)[0]
    assert K.get_profile("gpu").ep_normal_bandwidth(8) is None


def test_attention_efficiency():
    hop = K.get_profile("hopper")
    assert hop.attention_efficiency("decode") == pytest.approx(3000 / 3350, abs=1e-3)
    assert 0 < hop.attention_efficiency("prefill") <= 1
    assert K.get_profile("blackwell").attention_efficiency("decode") is None
    assert K.get_profile("cpu").attention_efficiency("prefill") is None
    with pytest.raises(CatalogError, match="unknown attention kind"):
        hop.attention_efficiency("train")


# ---------------------------------------------------------------- synthetic files

MINIMAL = """
[class.gpu.launch_eager]
value = 5
unit = "us"
source = "test source"
confidence = "low"

[class.gpu.launch_graph]
value = 1
unit = "us"
source = "test source"
confidence = "low"

[class.gpu.step_overhead.decode]
value = 1
unit = "ms"
source = "test source"
confidence = "low"

[class.gpu.step_overhead.prefill]
value = 2
unit = "ms"
source = "test source"
confidence = "low"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "kernels.toml"
    p.write_text(MINIMAL + text)
    return p


def test_device_section_wins_and_inherits_the_rest(tmp_path):
    p = write(tmp_path, """
[generation.hopper]
devices = ["h20"]
inherits = "gpu"

[generation.hopper.attention.decode]
value = 0.9
source = "test source"
confidence = "low"

[device.h20]
inherits = "hopper"

[device.h20.launch_graph]
value = 0.5
unit = "us"
source = "h20 only"
confidence = "low"
""")
    prof = K.kernel_profile(dev("h20"), p)
    assert prof.name == "h20" and prof.launch_graph_s == pytest.approx(0.5e-6)
    assert prof.launch_eager_s == pytest.approx(5e-6) and prof.attention_efficiency("decode") == 0.9
    assert prof.step_overhead_s == {"decode": pytest.approx(1e-3), "prefill": pytest.approx(2e-3)}
    assert K.kernel_profile(dev("h100"), p).name == "gpu"
    with pytest.raises(CatalogError, match="no kernel profile for device 'x'"):
        K.kernel_profile(dev("x", "tpu"), p)


@pytest.mark.parametrize("extra, key", [
    ("[class.gpu.collective.intra.all_reduce]\nparticipants = [2, 4]\nvalue = [5, 4]\nunit = \"us\"\n"
     "source = \"s\"\nconfidence = \"low\"\n", "class.gpu.collective.intra.all_reduce.value"),
    ("[class.gpu.collective.intra.all_reduce]\nparticipants = [2, 4]\nvalue = [5, 6]\nunit = \"us\"\n"
     "confidence = \"low\"\n", "class.gpu.collective.intra.all_reduce.source"),
    ("[class.gpu.collective.intra.all_reduce]\nparticipants = [2, 4]\nvalue = [5, 6]\nunit = \"GB\"\n"
     "source = \"s\"\nconfidence = \"low\"\n", "class.gpu.collective.intra.all_reduce.unit"),
    ("[class.gpu.collective.nvlink.all_reduce]\nparticipants = [2]\nvalue = [5]\nunit = \"us\"\n"
     "source = \"s\"\nconfidence = \"low\"\n", "class.gpu.collective.nvlink"),
    ("[class.gpu.attention.decode]\nvalue = 1.2\nsource = \"s\"\nconfidence = \"high\"\n",
     "class.gpu.attention.decode.value"),
    ("[class.gpu.attention.decode]\nvalue = 0.5\nsource = \"s\"\nconfidence = \"sure\"\n",
     "class.gpu.attention.decode.confidence"),
    ("[class.gpu.gemm.dense]\nrows = [64, 128]\ncompute = [0.3, 0.2]\nmemory = [0.7, 0.6]\n"
     "source = \"s\"\nconfidence = \"low\"\n", "class.gpu.gemm.dense.compute"),
    ("[class.gpu.gemm.dense]\npeak_tflops = 100\npeak_gbs = 100\nraw = [[1, 64, 1, 1, 50]]\n"
     "source = \"s\"\nconfidence = \"low\"\n", "class.gpu.gemm.dense.raw[0]"),
    ("[generation.g]\ndevices = [\"a\"]\ninherits = \"nope\"\n", "generation.g.inherits"),
    ("[generation.g]\ndevices = [\"a\"]\ninherits = \"h\"\n[generation.h]\ndevices = [\"b\"]\ninherits = \"g\"\n",
     "generation.h.inherits"),
    ("[generation.g]\ndevices = [\"a\"]\n[generation.h]\ndevices = [\"a\"]\n", "generation.h.devices"),
    ("[device.a]\nlaunch_eager = 1\n", "device.a.inherits"),
    ("[class.gpu.ep_low_latency]\nep = [8]\ndispatch_us = [1]\ndispatch_gbs = [1]\ncombine_us = [1]\n"
     "source = \"s\"\nconfidence = \"low\"\n", "class.gpu.ep_low_latency.combine_gbs"),
    ("[widgets.x]\na = 1\n", "widgets"),
    ("[generation.g]\ndevices = [\"a\"]\ninherits = \"gpu\"\n[generation.g.omit]\n\"launch_graph\" = \"no\"\n",
     "generation.g.omit.launch_graph"),
    ("[generation.g]\ndevices = [\"a\"]\ninherits = \"gpu\"\n[generation.g.omit]\n\"gemm.dense\" = \"none here\"\n",
     "generation.g.omit.gemm.dense"),
    ("[generation.g]\ndevices = [\"a\"]\ninherits = \"gpu\"\n[generation.g.omit]\n\"attention.decode\" = \"\"\n",
     "generation.g.omit.attention.decode"),
])
def test_bad_file_names_file_and_key(tmp_path, extra, key):
    p = write(tmp_path, extra)
    with pytest.raises(CatalogError) as exc:
        K.load_kernel_table(p)
    msg = str(exc.value)
    assert str(p) in msg and f"'{key}'" in msg, msg


def test_missing_required_figure_and_bad_toml(tmp_path):
    p = tmp_path / "kernels.toml"
    p.write_text(MINIMAL.replace("[class.gpu.launch_graph]", "[class.gpu.unused]"))
    with pytest.raises(CatalogError, match="unexpected key"):
        K.load_kernel_table(p)
    p.write_text(MINIMAL.split("[class.gpu.launch_graph]")[0] + "[class.gpu.step_overhead.decode]" + MINIMAL.split("[class.gpu.step_overhead.decode]")[1])
    with pytest.raises(CatalogError, match="'class.gpu.launch_graph': missing"):
        K.load_kernel_table(p)
    p.write_text("[class.gpu\n")
    with pytest.raises(CatalogError, match="invalid TOML"):
        K.load_kernel_table(p)
