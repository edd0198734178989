"""DeepSeek-V4 in the cost model (sim/costmodel_v4.py) and `dsref sim local`: each op's FLOPs and
bytes against the hand formula on a tiny V4, cache bytes against `dsref info`'s per-token figures,
weights against the release layout of reference/params_v4.py."""

import json
import subprocess
import sys

import pytest

from dsref.reference.cli import info_dict_v4
from dsref.reference.config_v4 import CSA, HCA, SLIDING
from dsref.reference.params_v4 import release_bytes, tensors
from dsref.reference.presets import get_preset
from dsref.sim import costmodel, costmodel_v4 as c4
from dsref.sim.local import estimate, estimate_v4
from dsref.sim.quant import get_quant

Q = get_quant("fp8")


@pytest.fixture(scope="module")
def tiny():
    # tiny-v4 with an expert width that has an FP4 release layout (a multiple of 32 inputs)
    return get_preset("tiny-v4").replace(moe_intermediate_size=32)


def _op(ops, name, layer):
    (op,) = [o for o in ops if o.name == name and o.layer == layer]
    return op


def test_release_bytes_one_source(tiny):
    for cfg in (tiny, get_preset("deepseek-v4-flash")):
        rows = sum(c4.release_row_bytes(t, cfg.n_routed_experts) for t in tensors(cfg, mtp=True))
        assert rows == release_bytes(cfg)
    # FP4 expert: 0.5 byte per weight + one scale byte per 32 inputs
    D, F, E = tiny.hidden_size, tiny.moe_intermediate_size, tiny.n_routed_experts
    (t,) = [t for t in tensors(tiny) if t.layer == 0 and t.rel == "mlp.experts.down_proj"]
    assert c4.release_row_bytes(t, E) == E * (D * F / 2 + D * F / 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        c4.weight_bytes(get_preset("tiny-v4"))  # expert width 24


def test_pair_sums_match_brute_force():
    for P, T, W, m, K in ((0, 1, 6, 4, 3), (5, 17, 6, 4, 3), (100, 1, 128, 4, 2), (3, 40, 6, 8, 100), (63, 9, 4, 4, 5)):
        assert c4.window_pairs(P, T, W) == sum(min(W, p + 1) for p in range(P, P + T))
        assert c4.entry_pairs(P, T, m) == sum((p + 1) // m for p in range(P, P + T))
        assert c4.entry_pairs(P, T, m, K) == sum(min(K, (p + 1) // m) for p in range(P, P + T))


def test_decode_ops_hand_formulas(tiny):
    c = tiny
    B, S = 3, 50                      # the new token at position 50: 51 // 4 = 12 CSA entries > top-3
    ops = c4.decode_ops(c, Q, B, S)
    D, H, d, Qr, g, dg = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank, c.o_groups, c.o_lora_rank
    I, J, K, W, n = c.index_n_heads, c.index_head_dim, c.index_topk, c.sliding_window, c.hc_mult
    M = B
    assert _op(ops, "q_b_proj", 1).flops == 2 * M * Qr * H * d
    assert _op(ops, "o_a_proj", 1).flops == 2 * M * H * d * dg       # g blocks of H*d/g -> d_g
    assert _op(ops, "o_b_proj", 1).flops == 2 * M * g * dg * D
    assert _op(ops, "compressor_kv_proj", 1).flops == 2 * M * D * 2 * d   # CSA: two overlapping series
    assert _op(ops, "compressor_kv_proj", 2).flops == 2 * M * D * d       # HCA: one
    nc, nh = (S + 1) // 4, (S + 1) // 8
    assert _op(ops, "index_scores", 1).flops == 2 * B * nc * I * J
    assert _op(ops, "index_scores", 1).kv_bytes_read == B * nc * J * Q.kv_bytes
    # attention: window W + top-K entries (CSA) / all entries (HCA) / window only; K = V, d dims each
    assert _op(ops, "attention", 1).flops == 2 * 2 * B * H * (W + K) * d
    assert _op(ops, "attention", 2).flops == 2 * 2 * B * H * (W + nh) * d
    assert _op(ops, "attention", 0).flops == 2 * 2 * B * H * W * d
    # hyper-connections: mixing matmul and the stream update
    assert _op(ops, "attn_hc_fn", 0).flops == 2 * M * n * D * (2 + n) * n
    assert _op(ops, "attn_hc_post", 0).flops == M * n * (2 * n + 1) * D
    assert _op(ops, "attn_hc_post", 0).act_bytes_written == M * n * D * Q.act_bytes
    # hash layer 0 reads k int64 ids per token; layer 2 routes by the biased scores
    assert _op(ops, "router_hash", 0).weight_bytes == M * c.num_experts_per_tok * 8
    assert not [o for o in ops if o.name == "router_hash" and o.layer == 2]
    re = _op(ops, "routed_experts", 2)
    assert re.flops == M * c.num_experts_per_tok * 3 * 2 * D * c.moe_intermediate_size
    per_expert = 3 * (D * c.moe_intermediate_size / 2 + D * c.moe_intermediate_size / 32)
    assert re.weight_bytes <= min(c.n_routed_experts, M * c.num_experts_per_tok) * per_expert + 1e-6
    assert re.weight_bytes >= per_expert * c.num_experts_per_tok


def test_decode_kv_read_matches_info_per_token(tiny):
    for cfg in (tiny, get_preset("deepseek-v4-flash")):
        info = info_dict_v4(cfg)
        per = info["kv_cache_bytes_per_token_by_layer_type"]
        window_per_layer = info["kv_window_bytes_per_sequence"] / cfg.num_hidden_layers
        m, mh = cfg.compress_rate_csa, cfg.compress_rate_hca
        # a context whose CSA entries stay within the top-k: every entry and key is read
        S = min(cfg.index_topk * m - 2, 4000)
        nc, nh = (S + 1) // m, (S + 1) // mh
        got = c4.decode_kv_read_by_type(cfg, 2.0, S)
        assert got[SLIDING] == window_per_layer
        assert got[CSA] == pytest.approx(window_per_layer + per[CSA] * m * nc)
        assert got[HCA] == pytest.approx(window_per_layer + per[HCA] * mh * nh)
        # the op list reads exactly that, layer by layer (attention + indexer cache reads)
        ops = c4.decode_ops(cfg, "fp8", 2, S)
        for i in range(cfg.num_hidden_layers):
            r = sum(o.kv_bytes_read for o in ops if o.layer == i)
            assert r == pytest.approx(2 * got[cfg.layer_type(i)])
    # past the top-k a CSA layer reads K entries but every indexer key
    c = tiny
    S = 400
    got = c4.decode_kv_read_by_type(c, 2.0, S)
    assert got[CSA] == c.sliding_window * c.head_dim * 2 + (c.index_topk * c.head_dim + (S + 1) // 4 * c.index_head_dim) * 2


def test_kv_cache_bytes_matches_info(tiny):
    cfg = get_preset("deepseek-v4-pro")
    L = 1 << 20   # a multiple of both rates: the per-token figure times the context, plus the windows
    info = info_dict_v4(cfg)
    assert c4.kv_cache_bytes(cfg, 2.0, L) == pytest.approx(info["kv_cache_bytes_per_token"] * L
                                                          + info["kv_window_bytes_per_sequence"])


def test_prefill_counts_and_flash_only(tiny):
    c = tiny
    ops = c4.prefill_ops(c, Q, 2, 20)
    # queries 0..19: window keys sum min(6, p+1), HCA entries sum (p+1)//8
    W = c.sliding_window
    pairs = sum(min(W, p + 1) + (p + 1) // 8 for p in range(20))
    assert _op(ops, "attention", 2).flops == 2 * 2 * 2 * c.num_attention_heads * pairs * c.head_dim
    assert _op(ops, "lm_head", None).flops == 2 * 2 * c.hidden_size * c.vocab_size   # last token only
    with pytest.raises(ValueError, match="attn_impl"):
        c4.forward_ops(c, Q, costmodel.StepShape(1, 4, 0, attn_impl="masked"))


def test_estimate_v4_flash_and_pro():
    r = estimate("deepseek-v4-flash", "b200", "fp8", context=8192, batch=4)
    assert r["fits"] and r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    # memory-bound decode: the step cannot beat the bytes it moves at the catalog bandwidth
    assert r["decode_step_s"] >= r["decode_bytes_per_step"] / 8e12
    assert r["weights_bytes"] == c4.weight_bytes(get_preset("deepseek-v4-flash"))["total"]
    pro = estimate_v4(get_preset("deepseek-v4-pro"), "b200-node", "fp8", context=131072, batch=2)
    assert pro["fits"] and pro["decode_tokens_per_s"] > 0
    small = estimate("deepseek-v4-pro", "h20", "fp8")
    assert not small["fits"] and small["decode_tokens_per_s"] is None


def test_v4_bad_inputs():
    with pytest.raises(ValueError, match="quant bf16"):
        estimate("deepseek-v4-flash", "b200", "bf16")
    with pytest.raises(ValueError, match="offload"):
        estimate("deepseek-v4-flash", "b200", "fp8", offload="experts")


def test_cli_sim_local_v4_json():
    out = subprocess.run([sys.executable, "-m", "dsref.experiments.cli", "sim", "local", "--model",
                          "deepseek-v4-flash", "--device", "b200", "--context", "8192", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["quant"] == "fp8" and d["fits"] and d["decode_tokens_per_s"] > 0


def test_whatif_v4_decode_cells():
    from dsref.experiments import whatif_v4 as w
    r = w.decode_at("deepseek-v4-flash", "h800-node", 8192)
    assert 1 <= r["batch_per_device"] <= w.MAX_BATCH_PER_DEVICE
    assert r["chip_s_per_token"] == pytest.approx(r["step_s"] / r["batch_per_device"])
    assert r["step_s"] <= 1 / w.SLO_TOKENS_PER_S
    # V3 supports 160K tokens: no 1M cell; V4's cache per sequence is the config's, windows included
    assert w.decode_at("deepseek-v3", "h800-node", 1 << 20)["chip_s_per_token"] is None
    assert w.kv_per_sequence("deepseek-v4-pro", 1 << 20) == c4.kv_cache_bytes(get_preset("deepseek-v4-pro"), 2.0, 1 << 20)


# ---------------------------------------------------------------- `dsref sim serve` with V4
def _small_flash():
    """V4-Flash's geometry (window 128, CSA rate 4 with top-512, HCA rate 128, its experts) with four
    layers, one of each kind and a hash layer: it fits one H800, so a serving run has no comm."""
    return get_preset("deepseek-v4-flash").replace(
        num_hidden_layers=4, layer_types=(SLIDING, CSA, HCA, CSA), mlp_layer_types=("hash_moe", "moe", "moe", "moe"))


def test_stepcost_v4_fit_matches_forward_ops():
    import numpy as np
    from dsref.hwmodels.catalog import load_device
    from dsref.sim import roofline
    from dsref.sim.parallel import Parallelism
    from dsref.sim.stepcost import OpTable, RequestTable, StepCost, feature_key, request, uniform
    cfg, dev = _small_flash(), load_device("h800")
    g = feature_key(cfg)
    W, cut, mh = cfg.sliding_window, cfg.index_topk * cfg.compress_rate_csa, cfg.compress_rate_hca
    rng = np.random.default_rng(7)
    # prefixes below / at / past the window, on and around HCA block and CSA top-k boundaries
    edges = [0, 1, W - 1, W, W + 1, mh - 1, mh, 5 * mh + 3, cut - 2, cut - 1, cut, cut + 1, 3 * cut + 17]
    shapes = [(int(rng.integers(1, 6)), int(t), int(p)) for p in edges for t in (1, rng.integers(2, 700))]
    shapes += [(int(rng.integers(1, 9)), int(rng.integers(1, 3000)), int(rng.integers(0, 60000))) for _ in range(6)]
    for logits in ("last", "all"):
        tab = OpTable.build(cfg, Q, dev, mla_form="absorbed", logits=logits)
        sc = StepCost(cfg, Q, dev, Parallelism(), mla_form="absorbed", logits=logits, table=tab, kernel_floors=False)
        for b, t, p in shapes:
            ops = c4.forward_ops(cfg, Q, costmodel.StepShape(b, t, p, logits=logits))
            x = uniform(b, t, p, g).vector()
            for coef, get in ((tab.flops, lambda o: o.flops),
                              (tab.act, lambda o: o.act_bytes_read + o.act_bytes_written),
                              (tab.kv, lambda o: o.kv_bytes_read + o.kv_bytes_written)):
                ref = sum(get(o) * o.count for o in ops)
                assert float((coef @ x) @ tab.count) == pytest.approx(ref, rel=1e-9, abs=1e-6), (b, t, p, logits)
            # the step time too (weights and routed experts included)
            assert sc.compute_s(uniform(b, t, p, g), b * t) == pytest.approx(
                roofline.step_time(ops, dev).time_s, rel=1e-9), (b, t, p, logits)
    # per-request features sum (prefix sums over a queue), and the array forms equal the scalar ones
    ts, ps = rng.integers(1, 3000, 50), rng.integers(0, 9000, 50)
    table = RequestTable(ts, ps, g)
    tot = request(ts[3], ps[3], g)
    for t, p in zip(ts[4:20], ps[4:20]):
        tot = tot + request(t, p, g)
    assert np.allclose(table.span(3, 20), tot, rtol=1e-12)
    for t, p in zip(ts[:10], ps[:10]):
        f = request(t, p, g)
        assert f.win_pairs == c4.window_pairs(p, t, W)
        assert f.csa_sel == c4.entry_pairs(p, t, 4, cfg.index_topk) and f.hca_pairs == c4.entry_pairs(p, t, mh)


def _serve_dict(model: str, trace: str, tp: int = 1) -> dict:
    return {"kind": "serve", "model": model, "quant": "fp8", "system": "h800-node", "mode": "aggregated",
            "duration_s": 30.0, "ctx_quantum_tokens": 0, "kernel_floors": False,
            "workload": {"arrival": "trace", "trace": trace},
            "aggregated": {"instances": 1, "devices": tp, "tp": tp, "token_budget_per_device": 16384}}


def test_serve_v4_decode_tpot_is_the_roofline_of_decode_ops(tmp_path):
    """B requests arrive together: one prefill step of B prompts, then decode steps of B sequences
    at contexts prompt + i. TTFT and TPOT are the roofline times of costmodel_v4's op lists; with
    TP 2 each device runs half of every FLOP, weight and activation byte (the single K=V head's
    cache is not split) plus two all-reduces of [B, D] per layer, computed here by hand."""
    from dataclasses import replace

    import numpy as np
    from dsref.hwmodels.catalog import load_device
    from dsref.hwmodels.systems import load_system
    from dsref.sim import roofline
    from dsref.sim.comm import CommOp, ring_allreduce_bytes
    from dsref.sim.scenario import from_dict
    from dsref.sim.serve import ServeSim
    cfg, dev, node = _small_flash(), load_device("h800"), load_system("h800-node")
    cfg.save(tmp_path / "config.json")   # the config.json path of `--model`
    B, prompt, out = 4, 3000, 6          # contexts past the window and past the CSA top-k (2048)
    tr = tmp_path / "reqs.jsonl"
    tr.write_text("".join(json.dumps({"t": 0.0, "prompt_tokens": prompt, "output_tokens": out}) + "\n"
                          for _ in range(B)))

    def split(ops, tp):
        return [replace(o, flops=o.flops / tp, weight_bytes=o.weight_bytes / tp, act_bytes_read=o.act_bytes_read / tp,
                        act_bytes_written=o.act_bytes_written / tp) for o in ops]

    for tp in (1, 2):
        r = ServeSim(from_dict(_serve_dict(str(tmp_path / "config.json"), str(tr), tp))).run()
        assert r["requests_finished"] == B

        def comm(tokens):
            if tp == 1:
                return 0.0
            x = ring_allreduce_bytes(tokens * cfg.hidden_size * Q.act_bytes, tp)
            return roofline.comm_time(CommOp("ar", x, "intra", "all_reduce", count=2 * cfg.num_hidden_layers,
                                             participants=tp), dev, node=node)
        pre = roofline.step_time(split(c4.prefill_ops(cfg, Q, B, prompt), tp), dev).time_s + comm(B * prompt)
        tpot = np.mean([roofline.step_time(split(c4.decode_ops(cfg, Q, B, prompt + i), tp), dev).time_s + comm(B)
                        for i in range(out - 1)])
        assert r["ttft_p50_s"] == pytest.approx(pre, rel=1e-9)
        assert r["tpot_p50_s"] == pytest.approx(tpot, rel=1e-9)


def test_serve_v4_disaggregated_ttft_includes_the_v4_kv_transfer(tmp_path):
    """One request, one prefill and one decode device: TTFT = prefill + the transfer of its cache,
    whose bytes are V4's (windows + compressed entries, booked as (c + kv_fixed_tokens) tokens),
    not a latent per token as for V3."""
    from dsref.hwmodels.catalog import load_device
    from dsref.hwmodels.systems import load_system
    from dsref.sim import roofline
    from dsref.sim.comm import CommOp
    from dsref.sim.scenario import from_dict
    from dsref.sim.serve import ServeSim
    cfg, dev, node = _small_flash(), load_device("h800"), load_system("h800-node")
    cfg.save(tmp_path / "config.json")
    prompt = 5000
    tr = tmp_path / "one.jsonl"
    tr.write_text(json.dumps({"t": 0.0, "prompt_tokens": prompt, "output_tokens": 3}) + "\n")
    d = _serve_dict(str(tmp_path / "config.json"), str(tr))
    inst = d.pop("aggregated")
    d.update(mode="disaggregated", prefill=inst, decode=inst)
    sim = ServeSim(from_dict(d))
    r = sim.run()
    pre = roofline.step_time(c4.prefill_ops(cfg, Q, 1, prompt), dev).time_s
    fixed = sim.capacity["decode"]["kv_fixed_tokens"]
    booked = (prompt + fixed) * cfg.kv_cache_bytes_per_token(Q.kv_bytes)
    kv = roofline.comm_time(CommOp("kv", booked, "inter", "p2p"), dev, node=node)
    assert r["ttft_p50_s"] == pytest.approx(pre + kv, rel=1e-9)
    real = roofline.comm_time(CommOp("kv", c4.kv_cache_bytes(cfg, Q.kv_bytes, prompt), "inter", "p2p"), dev, node=node)
    assert real <= kv < real * 1.01


def test_serve_v4_kv_booking_and_v3_ratio():
    """A V4 request of c tokens is booked as (c + kv_fixed_tokens) x kv_bytes_per_token: never below
    costmodel_v4.kv_cache_bytes, above it by less than the window below W and one block per
    compressed layer; at 128K V4-Flash holds a small fraction of V3's latent cache per request."""
    from dsref.sim.scenario import load
    sc = load("sglang-h100", {"model": "deepseek-v4-flash"})
    cfg, cap = sc._deployment.cfg, sc._deployment.capacity["decode"]
    kvb = sc._deployment.quant.kv_bytes
    per_tok = cfg.kv_cache_bytes_per_token(kvb)
    assert cap["kv_bytes_per_token"] == per_tok
    slack = cfg.kv_window_bytes(kvb) + sum(cfg.layer_counts()[t] * cfg.kv_bytes_per_token_by_type(kvb)[t]
                                           * cfg.compress_rate(t) for t in (CSA, HCA))
    for c in (1, 100, 128, 129, 4095, 131072, 131071, 1 << 20):
        real = c4.kv_cache_bytes(cfg, kvb, c)
        booked = (c + cap["kv_fixed_tokens"]) * per_tok
        assert real <= booked * (1 + 1e-12) and booked - real <= slack
    v3 = get_preset("deepseek-v3")
    ratio = c4.kv_cache_bytes(cfg, kvb, 131072) / (v3.kv_cache_bytes_per_token(kvb) * 131072)
    assert ratio < 0.15
    # the deployment's tokens per instance follow: the same free bytes hold more V4 tokens
    v3sc = load("sglang-h100")
    assert cap["kv_tokens_per_instance"] > 5 * v3sc._deployment.capacity["decode"]["kv_tokens_per_instance"]
    # V4-Pro resolves on a layout that fits it (its 850 GB of release weights over 128 decode H800)
    pro = load("deepseek-profile", {"model": "deepseek-v4-pro"})._deployment
    assert pro.capacity["decode"]["weight_bytes_per_device"] < 80e9 and pro.capacity["decode"]["kv_fixed_tokens"] > 0


def test_simulator_doc_v4_example_is_current_output(capsys):
    """docs/simulator.md's `sim serve --model deepseek-v4-flash` block is rerun and diffed (all but
    the simulator's wall time)."""
    import re
    from pathlib import Path

    from dsref.experiments.cli import main
    text = (Path(__file__).resolve().parent.parent / "docs" / "simulator.md").read_text()
    m = re.search(r"```text\n\$ dsref (sim serve [^\n]*deepseek-v4-flash[^\n]*)\n(.*?)```", text, re.S)
    assert m, "docs/simulator.md lost its V4 `sim serve` example"
    assert main(m.group(1).split()) == 0
    got, want = capsys.readouterr().out.splitlines(), m.group(2).splitlines()
    wall = re.compile(r"in [0-9.]+ s$")
    assert [wall.sub("", x) for x in got] == [wall.sub("", x) for x in want], (
        "docs/simulator.md: the V4 `sim serve` output changed; paste the new output")


def test_cli_sim_serve_v4_json(capsys):
    from dsref.experiments.cli import main
    assert main(["sim", "serve", "--scenario", "sglang-h100", "--model", "deepseek-v4-flash", "--duration", "30",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == "deepseek-v4-flash" and r["requests_finished"] > 0
    assert 0 < r["ttft_p50_s"] < 60 and 1e-4 < r["tpot_p50_s"] < 1.0
    assert r["output_tokens_per_s"] > 0 and r["roles"]["decode"]["kv_tokens_per_instance"] > 0


@pytest.mark.parametrize("args, field", [
    (["--scenario", "deepseek-day6"], "field 'decode.mtp_acceptance'"),     # V4's MTP is not costed
    (["--scenario", "cloudmatrix-384"], "field 'quant'"),                   # int8: not V4's release storage
])
def test_cli_sim_serve_v4_refusals(capsys, args, field):
    from dsref.experiments.cli import main
    assert main(["sim", "serve", *args, "--model", "deepseek-v4-flash", "--duration", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and "V4" in err and len(err.splitlines()) == 1


def test_serve_v4_weights_per_device_and_training_refused():
    """Release bytes (FP8 + FP4 experts) split as Parallelism splits V3's: experts over the slots / ep,
    the rest / tp, layers / pp; every byte of weight_bytes is placed once over an EP x TP layout."""
    from dsref.sim.deployment import v4_weight_bytes_per_device
    from dsref.sim.parallel import Parallelism
    from dsref.sim.scenario import ScenarioError, from_dict, load
    cfg = get_preset("deepseek-v4-flash")
    total = c4.weight_bytes(cfg)["total"]
    assert v4_weight_bytes_per_device(cfg, Parallelism())["total"] == pytest.approx(total, rel=1e-12)
    split = c4.weight_split(cfg)
    p = Parallelism(devices=8, dp=4, tp=2, ep=8, pp=1)
    w = v4_weight_bytes_per_device(cfg, p)
    assert w["experts"] * 8 == pytest.approx(split["experts"])
    assert w["non_expert"] * 2 == pytest.approx(split["non_expert"])
    d = {"kind": "serve", "model": "deepseek-v4-flash", "system": "h800-node", "mode": "aggregated",
         "aggregated": {"nodes": 1, "pp": 2, "ep": 4}}
    w2 = from_dict(d)._deployment.capacity["aggregated"]["weight_bytes_per_device"]
    assert w2 == pytest.approx(v4_weight_bytes_per_device(cfg, Parallelism(devices=8, dp=4, pp=2, ep=4))["total"])
    with pytest.raises(ScenarioError, match="field 'model'.*training"):
        load("deepseek-v3-pretrain", {"model": "deepseek-v4-flash"})


def test_serve_v4_kv_pressure_books_windows(monkeypatch, tmp_path):
    """Near a full cache every running V4 request holds at least prompt + kv_fixed_tokens booked
    tokens, so at most cap // (prompt + kv_fixed_tokens) run at once (booking V3's way, tokens only,
    13 of these run); the fast admission path equals one request at a time."""
    from dsref.hwmodels.catalog import load_device
    from dsref.sim import serve
    from dsref.sim.scenario import from_dict
    cfg = _small_flash()
    cfg.save(tmp_path / "config.json")
    prompt, out, want_cap = 2000, 400, 28_000
    d = _serve_dict(str(tmp_path / "config.json"), "")
    d["workload"] = {"arrival": "poisson", "rate_per_s": 50.0, "prompt_tokens": {"dist": "fixed", "mean": prompt},
                     "output_tokens": {"dist": "fixed", "mean": out}}
    d["duration_s"] = 10.0
    probe = from_dict(d)._deployment.capacity["aggregated"]
    free = load_device("h800").memory_bytes - probe["weight_bytes_per_device"]
    d["aggregated"]["activation_reserve_bytes"] = free - want_cap * probe["kv_bytes_per_token"]
    sc = from_dict(d)
    cap = sc._deployment.capacity["aggregated"]
    fx, kv = cap["kv_fixed_tokens"], cap["kv_tokens_per_instance"]
    assert fx > 500 and abs(kv - want_cap) <= 1
    sim = serve.ServeSim(sc)
    fast = sim.run()
    assert fast["preemptions"] > 0 and fast["kv_blocked_steps"] > 0
    peak = max(s[3] for s in sim.samples)
    assert kv // (prompt + fx) - 1 <= peak <= kv // (prompt + fx) < kv // (prompt + out)   # the cache binds
    monkeypatch.setattr(serve.Instance, "fast_admission", False)
    ref = serve.ServeSim(sc).run()
    for k in ("preemptions", "kv_blocked_steps", "requests_finished", "tpot_p50_s", "ttft_p99_s",
              "output_tokens_per_s"):
        assert fast[k] == ref[k], k
