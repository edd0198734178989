"""Checks of two chapters of the docs site: docs/chapters/rope-yarn.md and docs/chapters/mtp.md.

Run by tests/test_docs_site.py (``test_chapter``) against its one strict build of the site. Numbers
are looked for in the pages' cell outputs (tests/docs_html.cell_outputs) and recomputed here from
the package, so a page that shows a stale or hand-typed number fails. A few checks read the
chapters' sources or the reference code instead: where the prose states what the code does, the
check fails when the code stops doing it.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from tests.docs_html import cell_outputs, page_images, page_text

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _regimes(cfg) -> dict[str, np.ndarray]:
    """Pair indices that YaRN extrapolates, ramps and interpolates, from rope_frequencies."""
    from dsref.reference.numpy_ref import rope_frequencies
    theta, _ = rope_frequencies(cfg.replace(rope_scaling=None))
    scaled, _ = rope_frequencies(cfg)
    slow = theta / scaled
    ext, inter = np.isclose(slow, 1.0), np.isclose(slow, cfg.rope_scaling.factor)
    return {"extrapolated": np.flatnonzero(ext), "ramp": np.flatnonzero(~ext & ~inter),
            "interpolated": np.flatnonzero(inter)}


def _span(idx: np.ndarray) -> str:
    return f"{idx[0]}-{idx[-1]} ({len(idx)})" if len(idx) else "none"


# ------------------------------------------------------------------ rope-yarn
def check_rope_yarn_computes_the_v3_ramp_pairs_and_scale(site):
    import dataclasses

    from dsref.reference.presets import get_preset
    page = site / "chapters" / "rope-yarn.html"
    out = cell_outputs(page)
    v3 = get_preset("deepseek-v3")
    reg = _regimes(v3)
    assert (_span(reg["extrapolated"]), _span(reg["ramp"]), _span(reg["interpolated"])) == \
        ("0-10 (11)", "11-22 (12)", "23-31 (9)")  # the prose names these pairs
    assert ("pairs: " + ", ".join(f"{k} {_span(v)}" for k, v in reg.items())) in out
    assert f"softmax_scale = {v3.softmax_scale / v3.qk_head_dim ** -0.5:.5f} / sqrt({v3.qk_head_dim}) = " \
           f"{v3.softmax_scale:.5f}" in out
    assert f"{v3.softmax_scale:.5f}" == "0.13523"
    # the exercises' answers
    rs = v3.rope_scaling
    x80 = v3.replace(rope_scaling=dataclasses.replace(rs, factor=80.0))
    l8k = v3.replace(rope_scaling=dataclasses.replace(rs, original_max_position_embeddings=8192, factor=20.0))
    kimi = get_preset("kimi-k2")
    for c in (x80, l8k, kimi):
        reg_c = _regimes(c)
        assert (", ".join(f"{k} {_span(v)}" for k, v in reg_c.items()) + f"; softmax_scale {c.softmax_scale:.5f}") in out
    assert len(_regimes(kimi)["ramp"]) == 0  # "the ramp is a step"
    imgs = page_images(page, site)
    assert imgs and all(i.stat().st_size > 10_000 for i in imgs), imgs  # the per-pair figure


def check_rope_yarn_shows_why_mla_decouples_rope(site):
    page = site / "chapters" / "rope-yarn.html"
    out = cell_outputs(page)
    m = re.search(r"the best single (\d+)-dim query misses by (\d+)%", out)
    assert m and int(m.group(2)) >= 10, "the coupled (rotated content key) case must fail to absorb"
    m = re.search(r"decoupled RoPE: max \|naive - absorbed\| / max \|naive\| = ([0-9.e+-]+)", out)
    assert m and float(m.group(1)) < 1e-12
    assert "q.k at positions (5, 12):" in out and "half-split on de-interleaved vectors" in out
    src = page_text(page)
    for fn in ("def rope_frequencies(cfg: ModelConfig)", "def apply_rope_interleaved(", "def apply_rope_half(",
               "def rope_attention_factor(", "def yarn_get_mscale(", "def softmax_scale(self)"):
        assert fn in src, fn  # included from reference/numpy_ref.py and reference/config.py


def check_rope_yarn_prose_on_rope_interleave_matches_the_code(site):
    """The chapter says both references honour ``rope_interleave`` (half-split pairs when false): the
    NumPy MLA's rotary part changes with the flag, and the included lines are the ones that read it."""
    from dsref.reference import numpy_ref
    from dsref.reference.presets import get_preset
    for f in ("reference/numpy_ref.py", "reference/model.py"):
        assert re.search(r"\bcfg\.rope_interleave\b", (ROOT / f).read_text()), f"{f} no longer reads rope_interleave"
    assert "so do both references here" in (DOCS / "chapters" / "rope-yarn.md").read_text()
    assert "rope = apply_rope_interleaved if cfg.rope_interleave else apply_rope_half" in page_text(
        site / "chapters" / "rope-yarn.html")
    cfg = get_preset("tiny-v3")
    x = np.random.default_rng(0).normal(size=(1, 3, cfg.qk_rope_head_dim))
    cos, sin = numpy_ref.rope_cos_sin(cfg, np.arange(3)[None])
    assert not np.allclose(numpy_ref.apply_rope_interleaved(x, cos, sin), numpy_ref.apply_rope_half(x, cos, sin))


# ------------------------------------------------------------------ mtp
def check_mtp_shows_both_conventions_on_the_numpy_reference(site):
    page = site / "chapters" / "mtp.html"
    out = cell_outputs(page)
    for key in ("hidden first instead of embedding first: MTP logits change by",
                "pre-norm instead of post-norm h: MTP logits change by"):
        m = re.search(re.escape(key) + r" (\d+)%", out)
        assert m and int(m.group(1)) >= 10, key
    m = re.search(r"the two choices differ by ([0-9.e+-]+) \(epsilon only\)", out)
    assert m and float(m.group(1)) < 1e-5
    m = re.search(r"JAX float32 vs NumPy float64, MTP logits: max \|difference\| / max \|NumPy\| = ([0-9.e+-]+)", out)
    assert m and float(m.group(1)) < 1e-5  # JAX mtp_logits == numpy mtp_forward
    src = page_text(page)
    for fn in ("def mtp_hidden(", "def mtp_forward(", "def mtp_logits(", "def loss_fn(",
               "def mtp_tokens_per_step(", "def mtp_speedup("):
        assert fn in src, fn
    # the included docstring states the project's choices; the page's table must say the same
    assert "embedding FIRST" in src and "AFTER its final norm" in src
    md = (DOCS / "chapters" / "mtp.md").read_text()
    assert "| concatenation order | eq. 21: hidden first | vLLM, SGLang: embedding first | embedding first |" in md
    assert re.search(r"\| \$h_i\$ before or after the final norm \| not stated \|[^|]*\| after \|", md)
    from dsref.reference.presets import get_preset  # the parameter counts the prose quotes
    pc = get_preset("deepseek-v3").param_counts()
    assert (f"{pc['checkpoint_params'] / 1e9:.2f}B parameters in the published checkpoint against "
            f"{pc['total_params'] / 1e9:.2f}B + {pc['mtp_params'] / 1e9:.2f}B") in " ".join(md.split())


def check_mtp_computes_the_speculative_decoding_tables(site):
    from dsref.experiments.dsv3_training import mtp_speedup
    from dsref.experiments.registry import load_claims
    from dsref.sim.deployment import mtp_tokens_per_step
    out = cell_outputs(site / "chapters" / "mtp.html")
    claim = load_claims()["dsv3_tr_mtp_accept"]["value"]
    lo, hi = (a / 100 for a in claim["acceptance_pct"])
    assert f"one draft: {1 + lo:.2f}-{1 + hi:.2f} tokens per step" in out
    assert f"{(1 + lo) / claim['tps_speedup'] - 1:.1%} to {(1 + hi) / claim['tps_speedup'] - 1:.1%} longer" in out
    for p in (0.70, lo, hi):
        for d in (1, 2, 3):
            assert math.isclose(mtp_tokens_per_step([p] * d), sum(p ** k for k in range(d + 1)))
            assert f"{mtp_tokens_per_step([p] * d):.3f}" in out
    assert f"speed-up at 1 sequence per GPU {mtp_speedup(0.85, 1):.2f}x (acceptance 0.85)" in out
    assert f"two modules (0.9, 0.75): {mtp_tokens_per_step([0.9, 0.75]):.3f} tokens per step" in out


def check_mtp_reports_the_training_study_from_its_json(site):
    from dsref.experiments.training_study import compare
    page = site / "chapters" / "mtp.html"
    out = cell_outputs(page)
    study = json.loads((DOCS / "training_study.json").read_text())
    runs = study["runs"]
    seeds = lambda a: runs[runs[a]["same_as"]]["seeds"] if "same_as" in runs[a] else runs[a]["seeds"]
    held = {a: [s["eval"][-1]["main"] for s in seeds(a)] for a in ("mtp 0.3", "mtp off")}
    res = compare(held["mtp 0.3"], held["mtp off"])
    assert f"MTP 0.3 minus off: {res['diff']:+.3f} nats/token (Welch t = {res['welch_t']:.2f}, " \
           f"dof {res['dof']:.1f}, p = {res['p']:.2f};" in out
    assert f"distinguishable at the 5% level: {res['distinguishable']}" in out
    assert any(i.name == "train_mtp.png" and i.stat().st_size > 10_000 for i in page_images(page, site))
