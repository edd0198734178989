"""Golden outputs of the simulator: every built-in scenario (and a few variants that reach other
code paths), run short and seeded, must reproduce the stored numbers.

This is the regression gate for refactors of sim/: a change that moves any simulated number
shows up here as a named field. The stored files (tests/golden/<case>.json) hold every
deterministic field of each result (nested dicts flattened to dotted keys); wall-clock fields
(sim_wall_s, sim_cpu_s, events_per_s) and the queue-length time series are left out.

Regenerate (only when a change of the numbers is intended, and say why in the commit):

    python -m tests.test_golden_outputs --regen

which rewrites tests/golden/*.json and nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
# Floating-point sums regrouped by a refactor may differ in the last bits; anything larger is a
# change of the model.
REL_TOL = 1e-9
# Fields that depend on the machine's speed, not on the model.
VOLATILE = {"sim_wall_s", "sim_cpu_s", "events_per_s", "queue_samples"}

# name -> (kind, scenario, overrides, run arguments). Serve durations are long enough for
# requests to finish (TPOT defined) and short enough to run in about a second.
SERVE_CASES = {
    "deepseek-day6": ("deepseek-day6", None, {"duration_s": 10.0, "seed": 0}),
    "sglang-h100": ("sglang-h100", None, {"duration_s": 40.0, "seed": 0}),
    "cloudmatrix-384": ("cloudmatrix-384", None, {"duration_s": 40.0, "seed": 0}),
    "single-node-h800": ("single-node-h800", None, {"duration_s": 20.0, "seed": 0}),
    # TP and PP inside an instance, exact decode contexts (no step-time cache quantum)
    "single-node-h800-tp2-pp2": ("single-node-h800", {"aggregated": {"tp": 2, "pp": 2}, "ctx_quantum_tokens": 0},
                                 {"duration_s": 20.0, "seed": 1}),
}
TRAIN_CASES = {
    "deepseek-v3-pretrain": ("deepseek-v3-pretrain", None),
    "deepseek-v3-pretrain-1f1b-full-even": (
        "deepseek-v3-pretrain", {"schedule": "1f1b", "recompute": "full", "stage_split": "even",
                                 "ep_overlap": False, "dp_overlap": False, "comm_reserved_cores": 0}),
    "deepseek-v3-pretrain-tp2-no-mtp": ("deepseek-v3-pretrain", {"tp": 2, "mtp": False, "recompute": "none"}),
}
# sim.local: (model, target, quant, keyword arguments)
LOCAL_CASES = {
    "local-deepseek-v2-h800-node-fp8": ("deepseek-v2", "h800-node", "fp8", {"context": 4096, "batch": 8}),
    "local-qwen2.5-14b-pi5-q4_k_m": ("qwen2.5-14b", "raspberry-pi-5", "q4_k_m", {"context": 4096}),
    "local-qwen2.5-14b-pi5-w7700-bf16": ("qwen2.5-14b", "raspberry-pi-5-w7700", "bf16", {}),
    "local-llama-3.2-3b-pi5-q4_k_m": ("llama-3.2-3b", "raspberry-pi-5", "q4_k_m", {"context": 2048}),
    "local-deepseek-v2-lite-pi5-w7700-q4_k_m-expanded": ("deepseek-v2-lite", "raspberry-pi-5-w7700", "q4_k_m",
                                                      {"mla_form": "expanded_cache", "context": 8192}),
}
CASES = sorted([*SERVE_CASES, *TRAIN_CASES, *LOCAL_CASES])


def run_case(name: str) -> dict:
    """The simulator's result for one case (the public entry points, as the CLI calls them)."""
    from dsref.sim import scenario, serve, train
    from dsref.sim.local import estimate
    if name in SERVE_CASES:
        sc_name, over, kw = SERVE_CASES[name]
        return serve.simulate(scenario.load(sc_name, over), **kw)
    if name in TRAIN_CASES:
        sc_name, over = TRAIN_CASES[name]
        return train.simulate(scenario.load(sc_name, over))
    model, target, quant, kw = LOCAL_CASES[name]
    return estimate(model, target, quant, **kw)


def flatten(d, prefix: str = "") -> dict:
    """Nested dicts and lists as {dotted.key: scalar}, volatile fields dropped."""
    out = {}
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        if k in VOLATILE:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list, tuple)):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v.item() if hasattr(v, "item") else v  # numpy scalars -> Python
    return out


def _path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=0.0) or (math.isnan(a) and math.isnan(b))
    return a == b


@pytest.mark.parametrize("name", CASES)
def test_golden(name):
    want = json.loads(_path(name).read_text())
    got = flatten(run_case(name))
    assert sorted(got) == sorted(want), f"{name}: fields differ: +{sorted(set(got) - set(want))} " \
                                        f"-{sorted(set(want) - set(got))}"
    bad = {k: (want[k], got[k]) for k in want if not _same(want[k], got[k])}
    assert not bad, f"{name}: {len(bad)} field(s) changed (stored, now): {bad}"


def regenerate(names=CASES) -> None:
    GOLDEN_DIR.mkdir(exist_ok=True)
    for name in names:
        _path(name).write_text(json.dumps(flatten(run_case(name)), indent=1, sort_keys=True) + "\n")
        print(f"wrote {_path(name)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regen", action="store_true", help="rewrite tests/golden/*.json from the current code")
    ap.add_argument("cases", nargs="*", help=f"cases to regenerate (default: all): {', '.join(CASES)}")
    a = ap.parse_args()
    if not a.regen:
        ap.error("nothing to do: pass --regen (the comparison runs under pytest)")
    regenerate(a.cases or CASES)
