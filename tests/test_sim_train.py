"""The training-step simulator: pipeline closed forms, DualPipe, the V3 pre-training scenario."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dsref.hwmodels.catalog import load_device
from dsref.sim import trace
from dsref.sim.scenario import ScenarioError, from_dict, load
from dsref.sim.train import StageTimes, TrainSim, balanced_ranges, schedule_1f1b, schedule_dualpipe, simulate, stage_ranges


def _uniform(schedule: str, pp: int, m: int, **extra) -> dict:
    d = {"kind": "train", "model": "deepseek-v2-lite", "quant": "bf16", "system": "h800-node",
         "devices": pp * 2, "pp": pp, "ep": 1, "tp": 1, "schedule": schedule, "global_batch": 2 * m,
         "micro_batch": 1, "seq_len": 1024}
    d.update(extra)
    return d


def _fixed(schedule: str, pp: int, m: int, f=1.0, b=2.0, w=0.0, p2p=0.0, record=False) -> TrainSim:
    """A pipeline with the same chunk times on every stage: F = f, B = b, W = w seconds, sends p2p."""
    return TrainSim(from_dict(_uniform(schedule, pp, m)), record=record, fixed=StageTimes(f, 0.0, b, 0.0, w),
                    p2p_s=p2p)


@pytest.mark.parametrize("pp, m", [(2, 1), (4, 8), (8, 16), (5, 3)])
def test_1f1b_uniform_bubble_is_exact(pp, m):
    r = _fixed("1f1b", pp, m).run()
    assert r["bubble_fraction"] == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)
    assert r["pipeline_time_s"] == pytest.approx((m + pp - 1) * 3.0, abs=1e-9)


def test_1f1b_with_sends_lengthens_the_critical_path():
    pp, m, p2p = 4, 8, 0.25
    base = _fixed("1f1b", pp, m).run()["pipeline_time_s"]
    r = _fixed("1f1b", pp, m, p2p=p2p).run()
    # at least the first forward and the last backward cross pp-1 sends each; the steady
    # state can lose more (a send sits on every F -> B -> F dependency cycle)
    assert r["pipeline_time_s"] >= base + 2 * (pp - 1) * p2p - 1e-9
    assert _fixed("1f1b", pp, m, p2p=2 * p2p).run()["pipeline_time_s"] > r["pipeline_time_s"]


def test_dualpipe_bubble_smaller_than_1f1b():
    pp, m = 8, 16
    # the same total backward work: 1F1B's backward = B + W, DualPipe can split it
    one = _fixed("1f1b", pp, m, f=1.0, b=1.0, w=1.0).run()
    dual = _fixed("dualpipe", pp, m, f=1.0, b=1.0, w=1.0).run()
    assert dual["bubble_fraction"] < one["bubble_fraction"]
    assert dual["pipeline_time_s"] < one["pipeline_time_s"]


def test_dualpipe_schedule_runs_every_chunk_once():
    pp, m = 8, 20
    for r in range(pp):
        cnt = Counter()
        for t in schedule_dualpipe(pp, r, m):
            if t[0] == "FB":
                cnt[("F",) + t[1]] += 1
                cnt[("B",) + t[2]] += 1
                cnt[("W",) + t[2]] += 1
            elif t[0] == "BW":
                cnt[("B", t[1], t[2])] += 1
                cnt[("W", t[1], t[2])] += 1
            else:
                cnt[t] += 1
        assert set(cnt.values()) == {1}
        assert len(cnt) == 3 * m
    assert len(schedule_1f1b(4, 0, 8)) == 16


def test_stage_ranges_cover_layers():
    r = stage_ranges(61, 16)
    assert r[0][0] == 0 and r[-1][1] == 61
    assert all(a[1] == b[0] for a, b in zip(r, r[1:]))


def test_v3_pretrain_gpu_hours_plausible():
    r = simulate(load("deepseek-v3-pretrain"))
    assert r["devices"] == 2048 and r["dp"] == 128 and r["micro_batches_per_step"] == 120
    # DeepSeek reports 2.664M H800 GPU-hours; an optimistic roofline should land within ~0.4x-2x
    assert 1.0e6 < r["device_hours"] < 5.5e6
    assert 0.1 < r["mfu"] < 0.8
    dev = load_device("h800")
    assert r["mfu_vs_fp8_peak"] == pytest.approx(r["mfu"] * dev.peak("bf16") / dev.peak("fp8"), rel=1e-12)
    assert 0 < r["bubble_fraction"] < 0.5
    assert r["cost_usd"] == pytest.approx(2.0 * r["device_hours"])


def test_v3_options_move_the_step_time_the_right_way():
    sc = load("deepseek-v3-pretrain")
    base = simulate(sc)["step_time_s"]
    assert simulate(sc.with_overrides({"recompute": "full"}))["step_time_s"] > base
    assert simulate(sc.with_overrides({"ep_overlap": False}))["step_time_s"] > base
    assert simulate(sc.with_overrides({"dp_overlap": False}))["step_time_s"] >= base
    assert simulate(sc.with_overrides({"quant": "bf16"}))["step_time_s"] > base


def test_train_trace_structure(tmp_path):
    ts = _fixed("dualpipe", 4, 8, f=1.0, b=1.0, w=1.0, record=True)
    ts.run()
    tr = trace.train_trace(ts)
    trace.validate(tr)
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert len({e["tid"] for e in xs}) == 4  # fixed chunk times: no DP traffic, compute threads only
    # a rank never runs two chunks at once
    by_tid: dict = {}
    for e in xs:
        by_tid.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for iv in by_tid.values():
        iv.sort()
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(iv, iv[1:]))
    p = tmp_path / "train.json"
    trace.write(p, tr)
    trace.validate(json.loads(p.read_text()))


def _brute_min_max(costs, pp):
    """Smallest achievable max stage cost over every contiguous split (exhaustive)."""
    from itertools import combinations
    n = len(costs)
    best = float("inf")
    for cuts in combinations(range(1, n), pp - 1):
        b = (0,) + cuts + (n,)
        best = min(best, max(sum(costs[b[i]:b[i + 1]]) for i in range(pp)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_balanced_ranges_is_optimal(seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    costs = list(rng.uniform(0.1, 3.0, size=9))
    for pp in (1, 2, 4, 9):
        r = balanced_ranges(costs, pp)
        assert r[0][0] == 0 and r[-1][1] == 9 and all(a[1] == b[0] and a[0] < a[1] for a, b in zip(r, r[1:]))
        assert max(sum(costs[lo:hi]) for lo, hi in r) == pytest.approx(_brute_min_max(costs, pp))
    with pytest.raises(ValueError):
        balanced_ranges(costs, 10)


def test_v3_mechanisms_each_move_the_result():
    """MTP, reserved SMs and goodput (the V3 scenario's tech-report mechanisms) each cost time;
    the balanced split beats the even one once the last stage carries the head and MTP."""
    sc = load("deepseek-v3-pretrain")
    base = simulate(sc)
    assert sc.mtp and sc.comm_reserved_cores == 20 and sc.stage_split == "balanced"
    no_mtp = simulate(sc.with_overrides({"mtp": False}))
    assert no_mtp["step_time_s"] < base["step_time_s"]
    all_sms = simulate(sc.with_overrides({"comm_reserved_cores": 0}))
    assert all_sms["step_time_s"] < base["step_time_s"]
    assert base["compute_share_while_communicating"] == pytest.approx(112 / 132)
    even = simulate(sc.with_overrides({"stage_split": "even"}))
    assert even["step_time_s"] > base["step_time_s"]
    # the published V3 GPU-hours are throughput x tokens (180K/T x 14.8T = 2.664M): goodput 1.0
    assert sc.goodput == 1.0
    lossy = simulate(sc.with_overrides({"goodput": 0.9}))
    assert lossy["step_time_s"] == base["step_time_s"]
    assert lossy["device_hours"] == pytest.approx(base["device_hours"] / 0.9)
    assert lossy["device_hours_at_full_goodput"] == pytest.approx(base["device_hours"])


def test_ep_intra_and_inter_legs_overlap():
    """Dispatch (and combine) over NVLink and InfiniBand run at once: the slower leg counts."""
    from dsref.reference.presets import get_preset
    from dsref.sim.comm import CommOp, ep_comm, grouped_time
    from dsref.sim.parallel import Parallelism
    ops = ep_comm(get_preset("deepseek-v3"), 4096, Parallelism(ep=64, node_limit=4))
    assert {c.group for c in ops} == {"ep_dispatch", "ep_combine"}
    t = {c.name: float(i + 1) for i, c in enumerate(ops)}
    want = sum(max(t[c.name] for c in ops if c.group == g) for g in ("ep_dispatch", "ep_combine"))
    assert grouped_time(ops, lambda c: t[c.name]) == want
    lone = CommOp("pp", 1.0, "inter", "p2p")
    assert grouped_time(ops + [lone, lone], lambda c: t.get(c.name, 2.5)) == want + 5.0


def test_fp8_keeps_the_head_in_bf16():
    from dsref.reference.presets import get_preset
    from dsref.sim import costmodel
    ops = costmodel.decode_ops(get_preset("tiny-v3"), "fp8", 1, 8)
    assert [o.precision for o in ops if o.kind == "head"] == ["bf16"]
    assert {o.precision for o in ops if o.kind == "moe_gemm"} == {"fp8"}


@pytest.mark.parametrize("patch, field", [
    ({"comm_reserved_cores": 132}, "comm_reserved_cores"),  # all of the H800's 132 SMs
    ({"mtp": True, "model": "llama-3.2-3b"}, "mtp"),
    ({"goodput": 0.0}, "goodput"),
    ({"stage_split": "greedy"}, "stage_split"),
    ({"ep": 3, "devices": 8, "pp": 2}, "ep"),
    ({"schedule": "dualpipe", "pp": 3, "devices": 6}, "pp"),
    ({"global_batch": 7}, "global_batch"),
    ({"devices": 0, "system": "no-such-system"}, "system"),
    ({"schedule": "gpipe"}, "schedule"),
])
def test_train_errors_name_the_field(patch, field):
    d = _uniform("1f1b", 2, 4)
    d.update(patch)
    with pytest.raises(ScenarioError) as e:
        from_dict(d, "train.toml")
    assert str(e.value).startswith(f"train.toml: field '{field}'")


def test_train_cli_json(capsys):
    from dsref.experiments.cli import main
    assert main(["sim", "train", "--scenario", "deepseek-v3-pretrain", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for k in ("step_time_s", "bubble_fraction", "mfu", "tokens_per_day", "device_hours", "cost_usd"):
        assert k in r
    assert set(r["mechanism_effects"]["added_s"]) == {"attention_backward", "wgrad_gemm", "fp8_cast"}
    assert r["breakdown"]["step_attribution"]["total_s"] == pytest.approx(r["step_time_s"])


def test_kernel_mechanism_multipliers_follow_their_sources():
    from dsref.sim import train
    # FA backward: 2.5x the forward FLOPs at 542 vs 638 TFLOP/s, against the cost model's 2x at one rate
    r = train.attention_backward_time_ratio
    assert r(4096) == pytest.approx(1.25 * 638 / 542)
    assert r(512) == pytest.approx(1.25 * 467 / 316) and r(256) == r(512)      # clamped below the figure
    assert r(131072) == r(16384) == pytest.approx(1.25 * 648 / 561)            # and above it
    assert r(4096) < r(3000) < r(2048)                                          # log2-linear in between
    # wgrad slower than the forward GEMM at every DeepGEMM shape pair but one (the K = 512 forward is
    # the worst shape of its table); the equal-FLOP time ratio > 1 for both kernel families
    assert 1.0 < train.WGRAD_TIME_RATIO["gemm"] < train.WGRAD_TIME_RATIO["moe_gemm"] < 1.5
    assert train.equal_flop_time_ratio({1: 500.0, 2: 1000.0}, {1: 1000.0, 2: 1000.0}) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        train.equal_flop_time_ratio({1: 1.0}, {2: 1.0})


def test_fp8_cast_widths_count_every_gemm_operand():
    from dsref.reference.presets import get_preset
    from dsref.sim.train import fp8_gemm_widths
    cfg = get_preset("deepseek-v3")
    D, F, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    ins_d, outs_d = fp8_gemm_widths(cfg, moe=False)
    ins_m, outs_m = fp8_gemm_widths(cfg, moe=True)
    attn_in = D + 1536 + 512 + 128 * 128            # x (q_a, kv_a), q latent, kv latent, o_proj input
    assert ins_d == attn_in + D + cfg.intermediate_size
    assert ins_m == attn_in + D + F + k * F          # MoE input once, shared + routed down inputs
    # gradients of every GEMM output: gate/up (2F) and down (D) per routed row and for the shared expert
    assert outs_m - outs_d == pytest.approx((k + 1) * (2 * F + D) - (2 * cfg.intermediate_size + D))


def test_v3_step_attribution_adds_up_and_mechanisms_cost_time():
    from dsref.sim.train import MECHANISMS, TrainSim, mechanism_effects
    sc = load("deepseek-v3-pretrain")
    sim = TrainSim(sc)
    r = sim.run()
    att = r["breakdown"]["step_attribution"]
    # every second of the critical rank is accounted for, once
    assert att["total_s"] == pytest.approx(r["step_time_s"], rel=1e-9)
    assert att["compute_s"] == pytest.approx(sum(att["compute_by_kind_s"].values()), rel=1e-12)
    busy = r["breakdown"]["rank_busy_s"][att["rank"]]
    assert busy == pytest.approx(att["compute_s"] + att["sm_reserved_for_ep_s"] + att["ep_comm_exposed_s"], rel=1e-9)
    assert {"attention", "moe_gemm", "gemm", "head", "mtp", "recompute"} <= set(att["compute_by_kind_s"])
    # the per-kind stage parts add up to the chunk times the pipeline runs
    for st, parts in zip(sim.stages, sim.parts):
        assert st.f_c == pytest.approx(sum(parts["F"].values()), rel=1e-12)
        assert st.b_c == pytest.approx(sum(parts["B"].values()) + sum(parts["R"].values()), rel=1e-12)
        assert st.w_c == pytest.approx(sum(parts["W"].values()), rel=1e-12)
    # DualPipe's published bubble formula, with the simulator's chunk times, is positive and below a step
    f = r["breakdown"]["dualpipe_bubble_formula_s"]
    assert 0 < f < r["pipeline_time_s"]
    # the TR's ~1:1 computation : all-to-all of cross-node EP, within a factor of two
    assert 0.5 < r["breakdown"]["middle_stage_forward_compute_to_all_to_all"] < 2.0
    eff = mechanism_effects(sc, r)
    assert set(eff["added_s"]) == set(MECHANISMS)
    assert all(v > 0 for v in eff["added_s"].values())
    assert eff["plain_cost_model_step_time_s"] < r["step_time_s"]
    plain = TrainSim(sc, mechanisms=())
    assert plain.stages[1].b_c < sim.stages[1].b_c and plain.stages[1].w_c < sim.stages[1].w_c
    # the forward changes only by its FP8 casts
    assert plain.stages[1].f_c == pytest.approx(sim.stages[1].f_c - sim.parts[1]["F"]["fp8_cast"], rel=1e-12)
    with pytest.raises(ValueError, match="unknown training mechanism"):
        TrainSim(sc, mechanisms=("magic",))


def test_mtp_input_block_is_costed():
    """eh_proj ([T, 2D] x [2D, D]) and the two norms of each MTP depth: no faster than the FP8 peak,
    backward split into B and W, part of the last stage's MTP share."""
    from dsref.sim.train import TrainSim
    sim = TrainSim(load("deepseek-v3-pretrain"))
    D, T = sim.cfg.hidden_size, 4096
    t = sim._mtp_input_s(T)
    assert t["F"] >= 2.0 * T * 2 * D * D / sim.device.peak("fp8")
    assert t["B"] > 0 and t["W"] > 0 and t["R"] == 0
    assert sim.parts[-1]["F"]["mtp"] > t["F"]


def test_balanced_ranges_do_not_hang_on_rounding():
    """Identical layers make many pipeline splits equally good; their stage costs then differ only in
    the last bits of the prefix sums, which a NumPy release may round differently (a golden output
    changed that way). Perturbing every layer's cost by a few ulps must not move the layout
    (the plain argmin moved it in 136 of 200 draws)."""
    import numpy as np
    costs = np.array([1.3] + [0.7] * 3 + [1.0] * 56 + [1.9])  # embedding+dense, dense, MoE..., MoE+head
    base = balanced_ranges(costs, 16)
    rng = np.random.default_rng(0)
    moved = sum(balanced_ranges(costs * (1 + rng.uniform(-4e-16, 4e-16, costs.shape)), 16) != base
                for _ in range(50))
    assert moved == 0
    assert base[0] == (0, 4) and base[-1] == (58, 61)  # the earliest of the equal splits
