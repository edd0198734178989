"""Run every experiment, compare with the published claims; optionally write validation.{md,json} + plots.

``dsref validate`` (experiments/cli.py) and ``python -m dsref.experiments.validate`` call
``main``; files are written only under ``--out-dir`` (the repo's docs: ``dsref validate
--out-dir docs``). Error statistics (median / max absolute signed error) cover records of
role 'validation' with status 'predicted' only; 'derived' (arithmetic on inputs), 'identity'
(arithmetic on the architecture, exact by construction) and 'not_modelled' records are listed but not counted, and records of calibration claims (the
measurements a data-file number was solved from, registry module docstring) are listed
apart with their in-sample error, labelled "calibration, not counted".
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from dsref.reference.atomic import atomic_path, atomic_write_text
from dsref.experiments.registry import EXPERIMENTS, INPUT_IDS, Record, claims_with_role, load_claims

TARGET_MEDIAN = 0.10
TARGET_MAX = 0.30
BANDS = (0.10, 0.30)
CAL_LABEL = "calibration, not counted"
CTX_LABEL = "context, not counted"

ROLES_TEXT = """
## Roles of the claims: validation, calibration, input, context

Every claim in `experiments/data/public_claims.json` has a `role` (issue 17):

- **validation**: predicted by an experiment and never used to set a number in a data file. Only
  these (with status *predicted*) enter the statistics above.
- **calibration**: a measurement a data-file number was solved from; its `calibrates` field names
  each entry (`<repo path>#<toml key>`). Listed below with its in-sample error ("{cal}"): it says
  whether the stored number still solves its equations, not how good the model is.
- **input**: what a scenario takes as given (cluster size, plan, load, prices), with its
  `input_reason`; no experiment may return a record for it (`registry.record` refuses).
- **context**: a figure too weak to grade the model by (relayed second-hand, no stated workload
  or method), with its `context_reason`: predicted and listed ("{ctx}"), never counted.

The leak test (`tests/test_claims_roles.py`) walks every value of `hwmodels/data/**/*.toml` and
`sim/scenarios/*.toml` -- numbers, and numbers written inside strings such as sources ("22,310",
"52.3k", "14.76") -- and fails, naming the file, the key and the claim, when one with at least 3
significant digits is within 0.2% of a validation claim's published value: a validation figure
written into a data file was most likely used to set something, and must become a calibration
claim instead. Issue 17's case: `efficiency.toml` `gpu.overlap` had been solved from SGLang's decode
runs on 96 H100 (its source quoted 22,310 tok/s per node), the measurement
`sglang_h100_decode_node_tps` compares against; it is now set from a kernel-resource figure. Matches
that are two different quantities by coincidence (a 14.75 TFLOP/s peak against a 14.76 ms TPOT)
are listed one by one, with the reason, in the test's `ALLOWED`; a test writes a TOML file with a
validation value into a temporary directory and checks that the checker reports it.
""".format(cal=CAL_LABEL, ctx=CTX_LABEL)


def run_all(*, progress: bool = True, fast: bool = False, only: list[str] | None = None) -> list[Record]:
    """Every experiment's records, in registry order; tqdm on stderr when ``progress``."""
    import importlib
    claims = load_claims()
    todo = [(m, f) for m, f in EXPERIMENTS if only is None or m.rsplit(".", 1)[1] in only]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="exp", file=sys.stderr, leave=False)
    out: list[Record] = []
    for mod, fn in todo:
        if bar is not None:
            bar.set_description(mod.rsplit(".", 1)[1])
        out += getattr(importlib.import_module(mod), fn)(claims, fast=fast)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def role_of(r: Record) -> str:
    """The role of a record's claim as public_claims.json states it (a Record built by hand, bypassing
    registry.record, cannot promote a calibration claim into the statistics); the record's own role for
    an id the file does not have."""
    return load_claims().get(r.id, {}).get("role", r.role)


def counted(records: list[Record]) -> list[Record]:
    """The records the statistics cover: predicted figures of validation claims (Record.counted)."""
    return [r for r in records if r.counted and role_of(r) == "validation"]


def split(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(validation records, calibration records), each in registry order."""
    cal = [role_of(r) == "calibration" or r.role == "calibration" for r in records]
    return [r for r, c in zip(records, cal) if not c], [r for r, c in zip(records, cal) if c]


def summary(records: list[Record]) -> dict:
    pts = counted(records)
    errs = [abs(r.error) for r in pts]
    worst = max(pts, key=lambda r: abs(r.error), default=None)
    cal = split(records)[1]
    ident = [r for r in records if r.status == "identity" and r.error is not None]
    return {"n_predicted": len(errs), "n_calibration": len(cal), "n_identity": len(ident),
            "identity_max_abs_error": max((abs(r.error) for r in ident), default=None),
            "median_abs_error": statistics.median(errs) if errs else None,
            "max_abs_error": max(errs) if errs else None,
            "max_abs_error_id": worst.key if worst else None,
            "within_10pct": sum(e <= 0.10 for e in errs), "within_30pct": sum(e <= 0.30 for e in errs)}


def to_json(records: list[Record]) -> dict:
    """``claims``: every record (each with its ``role``); ``calibration``: the calibration records again,
    with the data-file entries each set; the statistics cover validation records only."""
    s = summary(records)
    cal_claims = claims_with_role("calibration")
    cal = [{**r.to_dict(), "role": "calibration", "label": CAL_LABEL,
            "calibrates": cal_claims.get(r.id, {}).get("calibrates", [])} for r in split(records)[1]]
    return {"claims": [r.to_dict() for r in records], **s, "statistics_cover": "role=validation, status=predicted",
            "calibration": cal, "inputs": INPUT_IDS,
            "targets": {"median_abs_error": TARGET_MEDIAN, "max_abs_error": TARGET_MAX}}


def _fmt(x) -> str:
    if x is None:
        return "--"
    if isinstance(x, str):
        return x
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 1e5 or ax < 1e-2:
        return f"{x:.3g}"
    return f"{x:,.4g}" if ax < 1000 else f"{x:,.0f}"


def _err(e) -> str:
    return "--" if e is None else f"{e:+.1%}"


def _status(r: Record) -> str:
    """The status column: a context claim's record says it is not counted, whatever its status."""
    role = role_of(r)
    return CTX_LABEL if role == "context" else CAL_LABEL if role == "calibration" else r.status


def table(records: list[Record]) -> str:
    """Validation records, then the calibration records under their own heading (one column layout)."""
    val, cal = split(records)
    rows = [("id", "predicted", "published", "unit", "error", "status")]
    for r in val:
        rows.append((r.key, _fmt(r.predicted), _fmt(r.published), r.unit[:34], _err(r.error), _status(r)))
    n_val = len(rows)
    for r in cal:
        rows.append((r.key, _fmt(r.predicted), _fmt(r.published), r.unit[:34], _err(r.error), CAL_LABEL))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    if cal:
        lines.insert(n_val, f"\ncalibration claims (in-sample: each set a data-file number; {CAL_LABEL}):")
    return "\n".join(lines)


# ------------------------------------------------------------------ plots
def plot_scatter(records: list[Record], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    pts = [r for r in counted(records) if r.predicted > 0]
    fig, ax = plt.subplots(figsize=(7, 6.5))
    # normalise each claim by its published value's order of magnitude? no: plot raw on log-log
    x = np.array([r.published for r in pts])
    y = np.array([r.predicted for r in pts])
    lo, hi = min(x.min(), y.min()) / 3, max(x.max(), y.max()) * 3
    g = np.geomspace(lo, hi, 100)
    ax.plot(g, g, "k-", lw=1, label="y = x")
    for b, a in zip(BANDS, (0.25, 0.12)):
        ax.fill_between(g, g * (1 - b), g * (1 + b), color="tab:green", alpha=a, lw=0, label=f"±{b:.0%}")
    colors = ["tab:red" if abs(r.error) > TARGET_MAX else "tab:orange" if abs(r.error) > TARGET_MEDIAN
              else "tab:blue" for r in pts]
    ax.scatter(x, y, c=colors, s=28, zorder=3)
    for r, xi, yi in zip(pts, x, y):
        ax.annotate(r.key, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("published (claim's unit)")
    ax.set_ylabel("predicted (same unit)")
    ax.set_title("Simulated vs published (validation claims, predicted)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a killed run leaves the old plot, not half a PNG
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_errors(records: list[Record], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = counted(records)
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(pts) + 1.2))
    y = range(len(pts))
    errs = [r.error * 100 for r in pts]
    colors = ["tab:red" if abs(e) > 30 else "tab:orange" if abs(e) > 10 else "tab:blue" for e in errs]
    ax.barh(list(y), errs, color=colors)
    ax.set_yticks(list(y))
    ax.set_yticklabels([r.key for r in pts], fontsize=7)
    for b in (10, 30):
        ax.axvline(b, color="gray", ls="--", lw=0.8)
        ax.axvline(-b, color="gray", ls="--", lw=0.8)
    ax.axvline(0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("signed error (predicted - published) / published, %")
    ax.set_xscale("symlog", linthresh=100, linscale=2)
    ticks = [t for t in (-100, -50, -30, -10, 0, 10, 30, 50, 100, 300, 1000) if t >= min(errs + [0]) - 10]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks], fontsize=7)
    ax.set_title("Error per predicted validation claim (dashed: ±10%, ±30%)")
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a killed run leaves the old plot, not half a PNG
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ markdown
def markdown(records: list[Record], closed_loop: dict | None = None) -> str:
    from dsref.experiments import docs_text
    s = summary(records)
    lines = [docs_text.HEADER.format(
        n=s["n_predicted"], med=_err(s["median_abs_error"]).lstrip("+"), mx=_err(s["max_abs_error"]).lstrip("+"),
        mxid=s["max_abs_error_id"], w10=s["within_10pct"], w30=s["within_30pct"])]
    val, cal = split(records)
    lines.append(f"Statistics cover the {s['n_predicted']} *predicted* figures of **validation** claims only; "
                 f"the {s['n_calibration']} calibration claims are listed apart below ({CAL_LABEL}), and the "
                 f"{s['n_identity']} identities (exact by construction, largest |error| "
                 f"{_err(s['identity_max_abs_error']).lstrip('+')}) are listed but not counted.\n")
    lines.append("| id | predicted | published | unit | error | status |\n|---|---:|---:|---|---:|---|")
    for r in val:
        lines.append(f"| `{r.key}` | {_fmt(r.predicted)} | {_fmt(r.published)} | {r.unit} | {_err(r.error)} | "
                     f"{_status(r)} |")
    lines.append(ROLES_TEXT)
    lines.append("### Calibration claims (in-sample; not counted)\n")
    lines.append("| id | predicted | published | unit | in-sample error | sets |\n|---|---:|---:|---|---:|---|")
    cal_claims = claims_with_role("calibration")
    for r in cal:
        sets = ", ".join(f"`{x}`" for x in cal_claims.get(r.id, {}).get("calibrates", []))
        lines.append(f"| `{r.key}` | {_fmt(r.predicted)} | {_fmt(r.published)} | {r.unit} | {_err(r.error)} "
                     f"({CAL_LABEL}) | {sets} |")
    lines.append("\n![predicted vs published](img/validation_scatter.png)\n")
    lines.append("![errors](img/validation_errors.png)\n")
    lines.append("## Readings and mechanisms\n")
    for r in records:
        note = r.note.rstrip()
        txt = f"- **`{r.key}`** ({_status(r)}). {note}" + ("" if not note or note.endswith(".") else ".")
        if r.reading:
            txt += f" *Reading:* {r.reading}."
        lines.append(txt)
    lines.append("\n## Claims treated as inputs\n")
    lines.append("These published figures are what the scenarios take as given; no experiment predicts them.\n")
    for cid, why in INPUT_IDS.items():
        lines.append(f"- `{cid}`: {why}")
    errs = {r.key: r.error for r in records if r.error is not None}
    cm = [e for k, e in errs.items() if k.startswith("cloudmatrix_")]
    lines.append(docs_text.MISSES.format(
        e={k: f"{v:+.0%}" for k, v in errs.items()}, e1={k: f"{v:+.1%}" for k, v in errs.items()},
        cloudmatrix=f"{max(cm):+.0%} to {min(cm):+.0%}" if cm else "--"))
    lines.append(docs_text.closed_loop_section(closed_loop))
    return "\n".join(lines) + "\n"


def write_outputs(records: list[Record], out_dir: Path, closed_loop: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    img = out_dir / "img"
    img.mkdir(parents=True, exist_ok=True)
    plot_scatter(records, img / "validation_scatter.png")
    plot_errors(records, img / "validation_errors.png")
    data = to_json(records)
    if closed_loop is not None:
        data["closed_loop"] = closed_loop
    atomic_write_text(out_dir / "validation.json", json.dumps(data, indent=1, default=float) + "\n")
    atomic_write_text(out_dir / "validation.md", markdown(records, closed_loop))
    return data


def load_closed_loop(out_dir: Path) -> dict | None:
    """The closed-loop result kept in a previous <out_dir>/validation.json (so a plain run keeps the
    section); its ``measured`` entry is the date it was measured."""
    p = Path(out_dir) / "validation.json"
    if p.exists():
        try:
            return json.loads(p.read_text()).get("closed_loop")
        except (json.JSONDecodeError, OSError):
            return None
    return None


def closed_loop_origin(cl: dict | None, stored_in: Path | None) -> str | None:
    """Where the closed-loop figures come from, in words (None when there are none)."""
    if not cl:
        return None
    if stored_in is None:
        return f"measured now ({cl.get('measured', 'today')})"
    return f"stored in {stored_in}, measured {cl.get('measured', 'on an unrecorded date')}; not rerun"


def main(*, as_json: bool = False, out_dir: str | None = None, closed_loop: bool = False,
         whatif: bool = False, fast: bool = False) -> int:
    """Run the experiments and print the comparison. Files are written only under ``out_dir``
    (validation.md, validation.json, img/validation_*.png, and the what-if pages with ``whatif``);
    without it nothing is written. Without ``closed_loop``, the closed-loop result stored in
    <out_dir>/validation.json is carried over and printed as stored, with its measurement date."""
    if whatif and not out_dir:
        print("dsref: error: --whatif writes pages; give --out-dir DIR", file=sys.stderr)
        return 2
    records = run_all(progress=not as_json, fast=fast)
    cl, stored_in = None, None
    if closed_loop:
        import datetime
        from dsref.experiments.closed_loop import run_closed_loop
        cl = run_closed_loop(fast=fast, progress=not as_json)
        cl["measured"] = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    elif out_dir:
        cl = load_closed_loop(Path(out_dir))
        stored_in = Path(out_dir) / "validation.json" if cl else None
    origin = closed_loop_origin(cl, stored_in)
    data = write_outputs(records, Path(out_dir), cl) if out_dir else {**to_json(records), "closed_loop": cl}
    if whatif:
        from dsref.experiments import whatif as wi
        from dsref.experiments import whatif_v32
        wi.main(out_dir=out_dir, fast=fast)
        whatif_v32.main(out_dir=out_dir, fast=fast)  # V3 vs V3.2 as context grows
        from dsref.experiments import whatif_v4
        whatif_v4.main(out_dir=out_dir, fast=fast)  # V3, V3.2, V4-Flash, V4-Pro: KV and decode cost by context
    if as_json:
        print(json.dumps({**data, "closed_loop_origin": origin}, indent=1, default=float))
        return 0
    print(table(records))
    s = summary(records)
    print(f"\npredicted validation claims: {s['n_predicted']} (calibration claims listed, not counted: "
          f"{s['n_calibration']}; identities, exact by construction, not counted: {s['n_identity']}); median |error| {_err(s['median_abs_error']).lstrip('+')} "
          f"(target <= {TARGET_MEDIAN:.0%}); max |error| {_err(s['max_abs_error']).lstrip('+')} "
          f"({s['max_abs_error_id']}; target <= {TARGET_MAX:.0%})")
    if cl:
        label = "STORED closed loop" if stored_in else "closed loop"
        print(f"{label} ({origin}; --closed-loop measures it on this machine):" if stored_in
              else f"{label} ({origin}):")
        for k in ("prefill", "decode"):
            c = cl[k]
            print(f"  {k}: measured {c['measured_tokens_per_s']:.1f} tok/s, predicted "
                  f"{c['predicted_tokens_per_s']:.1f}, error {_err(c['error'])}")
    else:
        print("closed loop: not run (--closed-loop measures it on this machine)")
    if out_dir:
        print(f"wrote {out_dir}/validation.md, {out_dir}/validation.json, {out_dir}/img/validation_*.png"
              + (", the what-if pages" if whatif else ""))
    else:
        print("nothing written (--out-dir DIR writes validation.md, validation.json and img/validation_*.png)")
    return 0


if __name__ == "__main__":
    import argparse

    from dsref.experiments import cli
    ap = argparse.ArgumentParser(prog="python -m dsref.experiments.validate")
    cli.add_arguments(ap)
    a = ap.parse_args()
    sys.exit(cli.cmd_validate(a))
