"""experiments/training_study.py: the statistics it reports with, the data split, its shared
training step against Trainer.step, and --fast end to end (every arm, nothing outside --out-dir)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsref.experiments import training_study as ts

REPO = Path(__file__).resolve().parents[1]


def test_compare_matches_welch_by_hand_and_tells_apart_only_real_differences():
    """a = 1,2,3 vs b = 4,5,6: means 2 and 5, sample variances 1, so t = -3 / sqrt(2/3) = -3.674 with
    Welch-Satterthwaite dof = (2/3)^2 / (2 * (1/3)^2 / 2) = 4, and for 4 dof the two-sided p has a
    closed form (Student t, nu = 4): p = 1 - x (3 - x^2) / 2 with x = |t| / sqrt(t^2 + 4) = 0.0213."""
    c = ts.compare([1, 2, 3], [4, 5, 6])
    t = -3 / math.sqrt(2 / 3)
    x = abs(t) / math.sqrt(t * t + 4)
    p = 1 - x * (3 - x * x) / 2  # two-sided tail of Student's t with 4 degrees of freedom
    assert c["diff"] == pytest.approx(-3.0)
    assert c["welch_t"] == pytest.approx(t)
    assert c["dof"] == pytest.approx(4.0)
    assert c["p"] == pytest.approx(p, rel=1e-9)
    assert c["distinguishable"]
    lo, hi = c["boot_ci95"]
    assert lo <= -3.0 <= hi and hi < 0
    # heavily overlapping samples: not distinguishable; the CI straddles 0
    same = ts.compare([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert not same["distinguishable"] and same["p"] > 0.5
    assert same["boot_ci95"][0] < 0 < same["boot_ci95"][1]
    # unequal variances and sizes: agrees with scipy's Welch test (an independent implementation)
    from scipy import stats
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 5), rng.normal(1, 3, 8)
    ref = stats.ttest_ind(a, b, equal_var=False)
    c = ts.compare(a, b)
    assert c["welch_t"] == pytest.approx(ref.statistic) and c["p"] == pytest.approx(ref.pvalue)
    # paired by seed: differences -0.5, -0.4, -0.6 -> t = -0.5 / (0.1 / sqrt 3) with 2 dof, whose
    # two-sided p is 1 - |t| / sqrt(t^2 + 2) (Student t, nu = 2)
    pc = ts.compare([1.0, 2.0, 3.0], [1.5, 2.4, 3.6])
    tp = -0.5 / (0.1 / math.sqrt(3))
    assert pc["paired_t"] == pytest.approx(tp) and pc["paired_p"] == pytest.approx(1 - abs(tp) / math.sqrt(tp * tp + 2))
    assert pc["paired_p"] < 0.05 < pc["p"]  # the shared seed spread hides it from Welch, not from the pairs
    flat = ts.compare([1.0, 1.0], [2.0, 2.0])  # no spread: t undefined (JSON null), the difference certain
    assert flat["welch_t"] is None and flat["p"] == 0.0 and flat["distinguishable"]
    with pytest.raises(ValueError, match="2 values"):
        ts.compare([1.0], [2.0, 3.0])


def test_random_routing_floor():
    """One token to 4 of 16 experts: 4 loads of 1, mean 1/4, MaxVio = 3 exactly; many tokens: near 0."""
    assert ts.random_routing_maxvio(1, 16, 4, trials=5) == pytest.approx(3.0)
    assert ts.random_routing_maxvio(200_000, 16, 4, trials=3) < 0.02


def test_split_by_topic_has_no_overlap_and_held_out_windows_are_fixed():
    train, held = ts.split_topics()
    assert set(train).isdisjoint(held) and len(held) >= 5 and len(train) > 5 * len(held)
    ids = np.arange(10_000)
    b = ts.held_out_batches(ids, ts.FULL)
    assert b.shape == (ts.FULL.eval_batches, ts.FULL.batch, ts.FULL.seq + 1)
    flat = b.reshape(-1, ts.FULL.seq + 1)
    assert (np.diff(flat, axis=1) == 1).all()  # each window is consecutive text
    assert (flat[1:, 0] >= flat[:-1, -1]).all()  # windows do not overlap
    with pytest.raises(ValueError, match="held-out"):
        ts.held_out_batches(np.arange(100), ts.FULL)


@pytest.mark.expensive
def test_shared_step_equals_trainer_step():
    """The study's one compiled step (lambda, alpha, gamma traced) against Trainer.step with the same
    values static, on an arm where all three matter: the losses and the parameters (balancing
    biases included) after 3 steps agree (measured on study-v3 over 12 steps: losses bit-identical,
    parameters within 2.2e-5 -- XLA fuses the two programs differently). Two compiles: slow."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsref.reference.model import DeepseekModel
    from dsref.reference.presets import get_preset
    from dsref.reference.train import TrainConfig, Trainer, windows

    cfg = get_preset("tiny-v3")
    size = ts.FAST
    weights = (0.3, 1e-2, 1e-2)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 5000)
    toks = [windows(ids, 2, 16, np.random.default_rng(i)) for i in range(3)]
    tca = ts.tc_all(size)
    a = Trainer(DeepseekModel(cfg, rngs=nnx.Rngs(0), with_mtp=True), tca)
    step = ts._step_fn()
    mine = []
    for tk in toks:
        a.params, a.opt_state, o = step(a.graphdef, a.params, a.opt_state, jnp.asarray(tk), a.tx, tca, a.layer_map,
                                        jnp.asarray(weights, jnp.float32))
        mine.append(float(o[0]))
    tc = TrainConfig(steps=size.steps, lr=size.lr, warmup=size.warmup, mtp_weight=0.3, balance_alpha=1e-2,
                     bias_gamma=1e-2)
    b = Trainer(DeepseekModel(cfg, rngs=nnx.Rngs(0), with_mtp=True), tc)
    ref = [float(b.step(tk).loss) for tk in toks]
    assert mine == pytest.approx(ref, rel=1e-6, abs=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fast_study_end_to_end(tmp_path):
    """--fast into a tmp dir (measured 47 s on an idle-ish 2-core machine without the FP8 arms, 227 s
    with them under a load of ~6: each arm configuration that compiles costs 15-60 s), from an empty working directory: the page, the PNGs and the JSON
    appear there with every arm and finite numbers; nothing else is written (the working directory
    and the repository's docs are untouched)."""
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    docs_json = REPO / "docs" / "training_study.json"
    before = docs_json.stat().st_mtime_ns if docs_json.exists() else None
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO.parent) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "dsref.experiments.training_study", "--out-dir", str(out), "--fast",
                        "--json"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "out"]
    assert (docs_json.stat().st_mtime_ns if docs_json.exists() else None) == before
    res = json.loads((out / "training_study.json").read_text())
    assert json.loads(r.stdout)["analysis"] == res["analysis"]
    arms = [a[0] for a in ts.BALANCE_ARMS] + [a[0] for a in ts.MTP_ARMS]
    if res["fp8"]["available"]:
        arms += [a[0] for a in ts.FP8_ARMS]
        assert set(res["analysis"]["fp8"]) >= {"rel_gap_train_last_quarter", "rel_gap_held_final", "held"}
    assert set(res["runs"]) == set(arms)
    for a in arms:
        runs = ts._runs(res, a)
        assert len(runs) == ts.FAST.seeds
        for rec in runs:
            assert len(rec["train_main"]) == ts.FAST.steps
            assert [e["step"] for e in rec["eval"]] == res["settings"]["eval_steps"]
            vals = rec["train_main"] + rec["train_mtp"] + [e["main"] for e in rec["eval"]] + sum(rec["maxvio_batch"], [])
            assert all(math.isfinite(v) for v in vals)
    for key in ("aux-free vs aux 1e-4", "aux-free vs aux 1e-3", "aux-free vs aux 1e-2", "aux-free vs none"):
        assert set(res["analysis"]["balance"][key]) == {"held_main", "maxvio_batch", "maxvio_global"}
    assert "mtp 0.3 vs mtp off" in res["analysis"]["mtp"]
    # arms that differ only in alpha differ in their losses (the arm weights reach the step)
    l1 = ts._runs(res, "aux 1e-2")[0]["train_main"][-1]
    l0 = ts._runs(res, "none")[0]["train_main"][-1]
    assert l1 != l0
    for img in res["images"]:
        assert (out / img).stat().st_size > 1000
    text = (out / "training-experiments.md").read_text()
    assert "--fast toy run" in text and "distinguishable" in text
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files left


def _synthetic_study(steps=20, seeds=3, fp8_scale=1.002):
    """A study JSON with every arm, made up: arm losses offset by known amounts, FP8 = BF16 x fp8_scale."""
    rng = np.random.default_rng(0)
    size = ts.Size("tiny", 256, steps=steps, batch=2, seq=16, seeds=seeds, eval_every=10, eval_batches=1)
    evals = [0, 10, 20]

    def rec(seed, off, vio):
        main = list(5 + off + np.linspace(1, 0, steps) + 0.01 * rng.standard_normal(steps))
        return {"seed": seed, "train_main": main, "train_mtp": main, "train_balance": [0.0] * steps,
                "grad_norm": [1.0] * steps, "maxvio_batch": [[vio, vio, vio, 9.0]] * steps,
                "eval": [{"step": s, "main": 5 + off + 0.01 * seed, "mtp": 5.1, "maxvio_global": [vio, vio, vio, 9.0]}
                         for s in evals]}
    runs = {n: {"seeds": [rec(s, 0.1 * i, 1.0 + i) for s in range(seeds)]}
            for i, (n, *_) in enumerate(ts.BALANCE_ARMS)}
    runs["mtp 0.3"] = {"same_as": "aux-free"}
    runs["mtp off"] = {"seeds": [rec(s, 0.0, 1.0) for s in range(seeds)]}
    runs["bf16"] = {"seeds": [rec(s, 0.0, 1.0) for s in range(seeds)]}
    runs["fp8"] = {"seeds": [{**r, "train_main": [x * fp8_scale for x in r["train_main"]]}
                             for r in runs["bf16"]["seeds"]]}
    settings = {**ts.asdict(size), "config": "tiny-v3", "params": 1, "mtp_params": 1, "activated_params": 1,
                "n_routed_experts": 16, "experts_per_token": 4, "moe_layers": 3, "eval_steps": evals}
    data = {"train": 1000, "held": 100, "train_topics": 9, "held_topics": 1, "tokenizer_vocab": 256,
            "held_unigram_entropy": 5.5, "held_windows": 2, "maxvio_floor_batch": 0.3, "maxvio_floor_global": 0.2}
    return {"settings": settings, "data": data, "runs": runs, "fp8": {"available": True, "wall_s": 1.0},
            "wall_s": 60.0}


def test_analysis_and_page_of_a_known_study(tmp_path):
    """Made-up runs with known answers: FP8 = BF16 x 1.002 gives a +0.2% gap (within V3's 0.25%), x 1.004
    gives +0.4% (outside); MaxVio counts only the main model's MoE layers (the fourth row, 9.0, is the
    MTP module's); the page and every PNG, FP8's included, are written from the JSON (--replot)."""
    out = _synthetic_study()
    an = ts.analyse(out)
    assert an["fp8"]["rel_gap_train_last_quarter"]["mean"] == pytest.approx(0.002)
    assert an["table"]["aux-free"]["maxvio_batch"]["mean"] == pytest.approx(1.0)
    assert an["table"]["none"]["maxvio_global"]["mean"] == pytest.approx(5.0)
    assert an["balance"]["aux-free vs none"]["maxvio_global"]["diff"] == pytest.approx(-4.0)
    (tmp_path / "training_study.json").write_text(json.dumps(out))
    res = ts.replot(str(tmp_path))
    assert sorted(res["images"]) == sorted(f"img/train_{n}.png" for n in ("loss_curves", "balance", "mtp", "fp8"))
    page = (tmp_path / "training-experiments.md").read_text()
    assert "+0.200%" in page and "within it" in page
    far = _synthetic_study(fp8_scale=1.004)
    (tmp_path / "training_study.json").write_text(json.dumps(far))
    ts.replot(str(tmp_path))
    assert "outside it" in (tmp_path / "training-experiments.md").read_text()
