"""Checks of the gate chapter (docs/chapters/moe-gate.md) on a built site.

Run by tests/test_docs_site.py::test_chapter (every ``check_*(site)`` here). Each check recomputes
with the project's code (the presets, reference/numpy_ref.py's gate, reference/train.py's
update_biases and balance_loss, experiments/training_study.py's summarise) what a cell of the page
printed, and looks for it in the cell outputs, never in the prose.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from tests.docs_html import cell_outputs, page_images

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Published figures the page uses that experiments/data/public_claims.json does not hold
V3_GAMMA = 0.001  # bias update speed; DeepSeek-V3 report (arXiv 2412.19437) sec. 2.1.2 and 4.2
V3_GAMMA_TOKENS = 14.3e12  # gamma = 0.001 for the first 14.3T tokens (sec. 4.2)
V3_FROZEN_TOKENS = 500e9  # gamma = 0 for the remaining 500B tokens (sec. 4.2)
V3_ALPHA = 1e-4  # sequence-wise balance factor alpha = 0.0001 (sec. 4.2)

# The synthetic router of the page's bias-update cell (same seed and sizes)
SIM_STEPS, SIM_T, SIM_SEED = 800, 512, 0


def _page(site: Path) -> Path:
    return site / "chapters" / "moe-gate.html"


def check_rho_names_the_scaling_factor(site: Path) -> None:
    """rho is routed_scaling_factor; gamma is left to the bias update speed (the report's letter)."""
    from dsref.reference.presets import get_preset
    src = (DOCS / "chapters" / "moe-gate.md").read_text()
    assert r"g_{t,i} = \rho\, \frac" in src and r"\gamma\, \frac" not in src
    assert r"b_i \leftarrow b_i + \gamma \operatorname{sign}" in src
    out = cell_outputs(_page(site))
    tiny = get_preset("tiny-v3")
    assert f"topk_group = {tiny.topk_group}, rho = {tiny.routed_scaling_factor}" in out
    assert f"every token's weights sum to rho = {tiny.routed_scaling_factor}" in out
    assert f"gamma = {tiny.routed_scaling_factor}" not in out


def check_node_limited_routing(site: Path) -> None:
    """V3's groups are its training nodes; the limit keeps every token on <= topk_group nodes."""
    from dsref.experiments.registry import load_claims
    from dsref.reference.presets import get_preset
    v3, claims = get_preset("deepseek-v3"), load_claims()
    E, k, G, M = v3.n_routed_experts, v3.num_experts_per_tok, v3.n_group, v3.topk_group
    gpus = claims["dsv3_tr_node"]["value"]
    ep = 64
    assert "64-way expert parallel across 8 nodes" in claims["dsv3_tr_parallel"]["claim"]
    assert ep // gpus == G and claims["dsv3_tr_model_config"]["value"]["max_nodes_per_token"] == M
    out = cell_outputs(_page(site))
    assert f"E = {E} experts, G = n_group = {G} groups of {E // G}" in out
    assert f"EP{ep} = {ep // gpus} nodes x {gpus} GPUs: {E // ep} experts per GPU, {E // (ep // gpus)} per node" in out
    assert f"sum of the top k / topk_group = {k} / {M} = {k // M} biased scores" in out
    assert f"a token reaches at most M = topk_group = {M} of {G} nodes" in out
    # the nodes-per-token table: no token beyond M nodes with the limit, some without it
    table = out.split("nodes plain top-k node-limited")[1].split("mean nodes per token")[0]
    rows = [(int(n), float(a), float(b)) for n, a, b in re.findall(r"(\d+) ([\d.]+)% ([\d.]+)%", table)]
    assert [r[0] for r in rows] == list(range(1, k + 1))
    assert all(b == 0.0 for n, _, b in rows if n > M) and sum(a for n, a, _ in rows if n > M) > 50
    free, limited = map(float, re.search(r"mean nodes per token \(bounds its IB copies\) ([\d.]+) ([\d.]+)", out).groups())
    assert limited <= M < free
    assert "topk_group = 3: a token reaches at most 3 nodes" in out  # exercise 4
    assert "<table" in _page(site).read_text()


def check_bias_update(site: Path) -> None:
    """gamma is V3's and the trainer's; the synthetic router's bias grows to hundreds of gamma."""
    import jax.numpy as jnp

    from dsref.reference.numpy_ref import gate
    from dsref.reference.presets import get_preset
    from dsref.reference.train import BIAS, TrainConfig, update_biases
    gamma = TrainConfig().bias_gamma
    assert gamma == V3_GAMMA
    out = cell_outputs(_page(site))
    assert (f"gamma = {V3_GAMMA} for the first {V3_GAMMA_TOKENS / 1e12:.1f}T tokens, "
            f"0 for the last {V3_FROZEN_TOKENS / 1e9:.0f}B") in out

    cfg = get_preset("tiny-v3")
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    skew = np.linspace(1.0, -1.0, E)
    rng = np.random.default_rng(SIM_SEED)
    b = np.zeros(E)
    first = None
    for step in range(SIM_STEPS):
        ids = gate(skew + rng.normal(size=(SIM_T, E)),
                   {"mlp.gate.weight": np.eye(E), "mlp.gate.e_score_correction_bias": b}, cfg, "mlp.")[1]
        c = np.bincount(ids.ravel(), minlength=E)
        first = c.max() / c.mean() if first is None else first
        b_next = b + gamma * np.sign(c.mean() - c)
        if step % 200 == 0:  # the trainer's rule gives the same update, checked along the way
            params = {"stacks": {"0": {BIAS: jnp.asarray(b[None], jnp.float32)}}}
            moved = update_biases(params, jnp.asarray(c[None], jnp.float32), gamma, ((0, 0),))
            assert np.allclose(np.asarray(moved["stacks"]["0"][BIAS][0]), b_next, atol=1e-6)
        b = b_next
    big = int(np.argmax(np.abs(b)))
    assert abs(b[big]) > 100 * gamma  # gamma is a speed, not the bias's size
    assert f"max/mean load {first:.2f} at step 1" in out
    assert (f"after {SIM_STEPS} steps: largest |b_i| = {abs(b[big]):.3f} (expert {big}) = "
            f"{abs(b[big]) / gamma:.0f} gamma; b_0 = {b[0]:+.3f}, b_{E - 1} = {b[-1]:+.3f}") in out
    m = re.search(r"max/mean load ([\d.]+) with zero bias, ([\d.]+) with the final bias", out)
    assert m and float(m.group(2)) < float(m.group(1))
    # exercise 3: n overloaded steps give -n gamma
    assert f"after 300 overloaded steps: b_0 = {-300 * gamma:+.3f} = -300 gamma" in out
    imgs = page_images(_page(site), site)
    assert len(imgs) >= 2 and all(i.stat().st_size > 10_000 for i in imgs), imgs


def check_balance_loss(site: Path) -> None:
    """L_Bal = alpha exactly for even choices; larger when a sequence piles onto its favourite experts."""
    import jax.numpy as jnp

    from dsref.reference.presets import get_preset
    from dsref.reference.train import balance_loss
    cfg = get_preset("tiny-v3")
    E, k, T = cfg.n_routed_experts, cfg.num_experts_per_tok, 64

    def total(logits, ids):
        return float(balance_loss(jnp.asarray(logits[None], jnp.float32), jnp.asarray(ids[None]), E, "sigmoid"))

    z = np.random.default_rng(4).normal(size=(T, E))  # the page's first draw of its sequence rng
    hot = 2 * np.linspace(1.0, -1.0, E)
    even = total(z, (np.arange(T * k) % E).reshape(T, k))
    high = total(z + hot, np.tile(np.arange(k), (T, 1)))
    low = total(z + hot, np.tile(np.arange(E - k, E), (T, 1)))
    assert abs(even - 1) < 1e-6 and low < 1 < high
    out = cell_outputs(_page(site))
    assert f"T = {T} tokens, E = {E}, k = {k}, alpha = {V3_ALPHA}" in out
    assert f"even choices (each expert k T / E times) 1.00 {even:.4f} {V3_ALPHA * even:.3e}" in out
    assert f"all tokens on the k experts of highest affinity {E / k:.2f} {high:.4f} {V3_ALPHA * high:.3e}" in out
    assert f"all tokens on the k experts of lowest affinity {E / k:.2f} {low:.4f} {V3_ALPHA * low:.3e}" in out
    assert f"all tokens on {k} experts, equal affinities: L_Bal / alpha = 1.0000" in out  # exercise 5


def check_training_study(site: Path) -> None:
    """The study's balance numbers, recomputed from docs/training_study.json with its own summarise."""
    from dsref.experiments.training_study import summarise
    study = json.loads((DOCS / "training_study.json").read_text())
    st, n = study["settings"], study["settings"]["moe_layers"]
    out = cell_outputs(_page(site))
    assert f"{st['steps']} steps of {st['batch']} x {st['seq']} tokens, {st['seeds']} seeds per arm" in out
    for arm in ("aux-free", "aux 1e-4", "aux 1e-3", "aux 1e-2", "none"):
        per = [summarise(r, n) for r in study["runs"][arm]["seeds"]]
        w = study["runs"][arm]["weights"]

        def ms(v, f="{:.2f}"):
            return f"{f.format(np.mean(v))} ± {f.format(np.std(v, ddof=1))}"
        row = (f"{arm} {w['bias_gamma']:g} {w['balance_alpha']:g} {ms([1 + s['maxvio_batch'] for s in per])} "
               f"{ms([1 + s['maxvio_global'] for s in per])} {ms([s['held_main'] for s in per], '{:.3f}')}")
        assert row in out, row
    assert f"a bias moves by at most {V3_GAMMA * st['steps']:.2f}" in out
    t = study["analysis"]["table"]
    assert t["aux-free"]["maxvio_global"]["mean"] < t["none"]["maxvio_global"]["mean"]  # the page's reading
    assert len(page_images(_page(site), site)) >= 2
