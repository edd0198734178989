"""`dsref validate`: run every experiment against the published claims (see experiments/validate.py)."""

from __future__ import annotations


def cmd_validate(args) -> int:
    from dsref.experiments.validate import main
    return main(as_json=args.json, out_dir=args.out_dir, closed_loop=args.closed_loop, whatif=args.whatif,
                fast=args.fast)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "validate", help="compare simulated figures with the published claims (docs/validation.md)",
        description=("Run every experiment (experiments/registry.py) against the published claims shipped in experiments/data/public_claims.json: "
                     "prints id, predicted, published, unit, signed error; writes <out-dir>/validation.md, "
                     "validation.json and img/validation_*.png; reports median and largest |error|."))
    p.add_argument("--json", action="store_true",
                   help='print {"claims": [...], "median_abs_error", "max_abs_error"} (no progress bar)')
    p.add_argument("--out-dir", default="docs", help="where validation.md/.json and img/ go (default: docs)")
    p.add_argument("--closed-loop", action="store_true",
                   help="also probe this machine and run the JAX reference (small-v3) vs sim.local (slow)")
    p.add_argument("--whatif", action="store_true", help="also write the what-if pages (docs/whatif-*.md)")
    p.add_argument("--fast", action="store_true", help="short simulations and a tiny closed loop (for tests)")
    p.set_defaults(func=cmd_validate)
