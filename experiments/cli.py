"""dsref: the DeepSeek-V3 family reference model, its correctness oracle, and a simulator
of what it costs to run.

    dsref info MODEL                       parameters, KV cache, architecture, self-check
    dsref init-checkpoint --preset P ...   a small random checkpoint to try everything on
    dsref generate --checkpoint DIR        text out of a Hugging Face checkpoint
    dsref train --preset P --data TEXT ... train one on text (V3's objective, resumable)
    dsref golden / compare / conformance   the correctness oracle for other engines
    dsref hw list|show|probe               the hardware catalog
    dsref sim local|serve|train            the cost model and the serving/training simulator
    dsref plan --model M --system S ...    which device mesh fits a model (memory per device)
    dsref validate                         the simulator against published measurements

Run `dsref COMMAND --help` for each command's options and an example.
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
from dsref.reference import generate_cli, init_checkpoint, train_cli
from dsref.reference.oracle import cli as oracle_cli
from dsref.sim import cli as sim_cli
from dsref.sim import plan_cli

# `dsref validate` runs every experiment of experiments/registry.py against the claims in
# experiments/data/public_claims.json (dsref.experiments.validate.main). The docs are regenerated
# with `dsref validate --out-dir docs` (add --closed-loop to remeasure the closed loop).
DESCRIPTION = """\
Compare the simulator's predictions with the published figures they model (DeepSeek's reports,
vendor and third-party measurements): prints, per claim, the predicted and the published value,
the unit and the signed error, then the median and the largest |error| over the validation claims.
Each claim has a role (experiments/data/public_claims.json): 'validation' claims are predicted and
counted; 'calibration' claims (measurements a data-file number was solved from) are listed apart
with their in-sample error, "calibration, not counted"; 'input' claims are what the scenarios take
as given and are never predicted.

Nothing is written unless --out-dir is given; then DIR/validation.md, DIR/validation.json and
DIR/img/validation_*.png (with --whatif also the what-if pages). The closed loop (this machine
probed, the JAX model timed against the local cost model) runs only with --closed-loop; without
it, the closed-loop result stored in DIR/validation.json is printed, labelled as stored with the
date it was measured."""

EPILOG = """\
example:
  dsref validate                      # print the comparison, write nothing
  dsref validate --out-dir docs       # regenerate docs/validation.md and its plots"""


def cmd_validate(args) -> int:
    from dsref.experiments.validate import main
    if args.out_dir is not None:  # checked before the minute of simulations, not after
        if not args.out_dir.strip():
            raise ValueError("--out-dir: empty path")
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise ValueError(f"--out-dir {args.out_dir}: exists and is not a directory")
    return main(as_json=args.json, out_dir=args.out_dir, closed_loop=args.closed_loop, whatif=args.whatif,
                fast=args.fast)


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: the claims (each with its role), median_abs_error and "
                        "max_abs_error over validation claims, calibration, closed_loop, ... (no progress bar)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="write validation.md, validation.json and img/validation_*.png under DIR "
                        "(the repository's are in docs); without it nothing is written")
    p.add_argument("--closed-loop", action="store_true",
                   help="also probe this machine and time the JAX model (small-v3) against the local cost "
                        "model (slow)")
    p.add_argument("--whatif", action="store_true",
                   help="also write the what-if pages (DIR/whatif-*.md; needs --out-dir)")
    p.add_argument("--fast", action="store_true", help="short simulations and a tiny closed loop (quick check)")


def register(subparsers) -> None:
    from dsref.reference.cli_common import HelpFormatter
    p = subparsers.add_parser(
        "validate", help="compare simulated figures with the published measurements",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_validate)


def register_peer(subparsers) -> None:
    """``dsref peer aiconfigurator ...``: the same deployments predicted by another simulator, side by side."""
    from dsref.reference.cli_common import HelpFormatter
    p = subparsers.add_parser(
        "peer", help="side by side with another simulator (aiconfigurator) on published deployments",
        description="Predict the same published NVIDIA DeepSeek deployments with this simulator and a peer, and\n"
                    "tabulate both errors against the published figures (docs/peer_aiconfigurator.md).\n"
                    "The peer is an optional dependency: pip install 'deepseek-ref[peer]'; without it its\n"
                    "column says why. Options after the tool's name are the tool's: see\n"
                    "`dsref peer aiconfigurator --help`.",
        epilog="examples:\n  dsref peer aiconfigurator --fast\n"
               "  dsref peer aiconfigurator --out docs/peer_aiconfigurator.md",
        formatter_class=HelpFormatter)
    p.add_argument("tool", choices=("aiconfigurator",), help="the peer simulator")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its options (--out, --json, --fast, --timeout, --claim)")
    p.set_defaults(func=cmd_peer)


def cmd_peer(args) -> int:
    from dsref.experiments import peer_aiconfigurator
    try:
        return peer_aiconfigurator.main(list(args.args), prog=f"dsref peer {args.tool}")
    except SystemExit as e:  # its parser reports bad options (one line) and exits 2; --help exits 0
        return int(e.code or 0)


def _version() -> str:
    try:
        return version("deepseek-ref")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from dsref.reference.cli_common import HelpFormatter
    p = argparse.ArgumentParser(prog="dsref", description=__doc__, epilog="example:\n  dsref info deepseek-v3",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"dsref {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for module in (info_cli, generate_cli, init_checkpoint, train_cli, oracle_cli, hw_cli, sim_cli, plan_cli):  # help order
        module.register(sub)
    register(sub)
    register_peer(sub)
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
    except OSError as e:
        # A path the user gave cannot be written or read (a file where a folder is needed, no
        # permission, disk full): the OS's message names the path.
        print(f"dsref: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
