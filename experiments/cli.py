"""`dsref validate`: run every experiment against the published claims (see experiments/validate.py)."""

from __future__ import annotations

DESCRIPTION = """\
Run every experiment (experiments/registry.py) against the published claims shipped in
experiments/data/public_claims.json: prints id, predicted, published, unit, signed error, and the
median and largest |error|. Writes files only with --out-dir: <out-dir>/validation.md,
validation.json and img/validation_*.png (and, with --whatif, the what-if pages); without it
nothing is written. The repository's docs are regenerated with `dsref validate --out-dir docs`
(add --closed-loop to remeasure the closed loop). Without --closed-loop, the closed-loop result
stored in <out-dir>/validation.json is kept and printed, labelled as stored with the date it was
measured."""


def cmd_validate(args) -> int:
    from dsref.experiments.validate import main
    return main(as_json=args.json, out_dir=args.out_dir, closed_loop=args.closed_loop, whatif=args.whatif,
                fast=args.fast)


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true",
                   help='print {"claims": [...], "median_abs_error", "max_abs_error", "closed_loop", ...} '
                        "(no progress bar)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="write validation.md, validation.json and img/validation_*.png under DIR "
                        "(the repo's: docs); default: write nothing")
    p.add_argument("--closed-loop", action="store_true",
                   help="also probe this machine and run the JAX reference (small-v3) vs sim.local (slow)")
    p.add_argument("--whatif", action="store_true",
                   help="also write the what-if pages (DIR/whatif-*.md; needs --out-dir)")
    p.add_argument("--fast", action="store_true", help="short simulations and a tiny closed loop (for tests)")


def register(subparsers) -> None:
    import argparse
    p = subparsers.add_parser(
        "validate", help="compare simulated figures with the published claims (--out-dir docs: docs/validation.md)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_validate)
