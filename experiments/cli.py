"""dsref: the DeepSeek-V3 family reference model, its correctness oracle, and a simulator
of what it costs to run.

    dsref info MODEL [--json]              parameters, KV cache, architecture, self-check
    dsref generate --checkpoint DIR        text out of a Hugging Face checkpoint
    dsref golden / compare / conformance   the correctness oracle for other engines
    dsref hw list|show|probe               the hardware catalog
    dsref sim local|serve|train            the cost model and the SimPy simulator
    dsref validate                         the simulator against published measurements

Run `dsref COMMAND --help` for each command's options.
"""
# The root lives here because experiments is the top layer: it imports reference, hwmodels
# and sim, and nothing imports it. Each package's CLI module adds its own subcommands with
# register(subparsers); they are imported plainly, so a broken one fails loudly. They keep
# heavy imports (numpy, jax, simpy) inside their handlers, so building the parser is cheap.

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from dsref.hwmodels import cli as hw_cli
from dsref.reference import cli as info_cli
from dsref.reference import generate_cli, init_checkpoint
from dsref.reference.oracle import cli as oracle_cli
from dsref.sim import cli as sim_cli

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


def _version() -> str:
    try:
        return version("deepseek-ref")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsref", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"dsref {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for module in (info_cli, generate_cli, init_checkpoint, oracle_cli, hw_cli, sim_cli):  # help order
        module.register(sub)
    register(sub)
    return p


def main(argv=None) -> int:
    from dsref.reference.config import ConfigError
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe surfaces here, inside the handler below
        return rc
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # Bad input (checkpoint, scenario, hardware file, option value): one clear line, no traceback.
        print(f"dsref: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`dsref ... | head`): stop quietly. Point stdout at devnull so
        # the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
