"""In-sample check of the calibration claims (role 'calibration' in public_claims.json).

Each of these published measurements was used to *set* a number in a data file (their
``calibrates`` field names it): Jeff Geerling's Llama 3.2 3B / Llama 3.1 8B eval rates
solve, per target, the device's [efficiency.memory] and llama.cpp's per-graph-node cost
(hwmodels/data/llama_cpp_overhead.toml) -- two equations, two unknowns
(experiments/edge_devices.calibrate). Re-predicting them with the stored values through
``sim.local.estimate`` gives the in-sample error: ~0 while the stored numbers still solve
the equations, drifting when the simulator's mechanisms change under them (then the data
files need re-solving). These records carry role 'calibration' and never enter the
validation statistics: a model always matches what it was solved from.
"""

from __future__ import annotations

from dsref.experiments.registry import Record, record

#: calibration claim id -> (sim.local target of experiments/edge_devices.CALIBRATION, model preset)
CASES = {
    "geer_cal_pi5_llama32_3b": ("raspberry-pi-5", "llama-3.2-3b"),
    "geer_cal_pi5_llama31_8b": ("raspberry-pi-5", "llama-3.1-8b"),
    "geer_cal_ampereone_llama32_3b": ("ampereone-server", "llama-3.2-3b"),
    "geer_cal_ampereone_llama31_8b": ("ampereone-server", "llama-3.1-8b"),
    "geer_cal_pi5w7700_llama32_3b": ("raspberry-pi-5-w7700", "llama-3.2-3b"),
    "geer_cal_pi5w7700_llama31_8b": ("raspberry-pi-5-w7700", "llama-3.1-8b"),
}


def run(claims: dict, *, fast: bool = False) -> list[Record]:
    from dsref.experiments import edge_devices as ed
    from dsref.sim.local import estimate
    out = []
    for cid, (target, model) in CASES.items():
        cal = ed.CALIBRATION[target]
        if (model, cid) not in cal["fit"]:  # edge_devices reads the rate from this claim (one copy)
            raise ValueError(f"experiments/edge_devices.CALIBRATION[{target!r}] does not list {cid} for {model}")
        r = estimate(model, target, ed.QUANT, context=cal["context"], prompt_tokens=ed.PROMPT)
        out.append(record(claims, cid, r["decode_tokens_per_s"],
                          reading=f"eval rate at mean KV length {cal['context']} (as edge_devices.calibrate)",
                          note=(f"sim.local.estimate({model}, {target}, {ed.QUANT}) with the stored solution of "
                                f"this claim and its pair; sets {', '.join(claims[cid]['calibrates'])}")))
    return out
