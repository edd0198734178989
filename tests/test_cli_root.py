"""The CLI root (dsref.experiments.cli): every command registered by plain imports, a broken
subcommand module fails loudly, --version, and a closed pipe ends quietly."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dsref.experiments.cli import build_parser

COMMANDS = {"info", "generate", "golden", "compare", "conformance", "hw", "sim", "validate"}


def test_every_command_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert COMMANDS <= set(sub.choices)
    sim = next(a for a in sub.choices["sim"]._actions if a.dest == "sim_command")
    assert {"local", "serve", "train"} <= set(sim.choices)


@pytest.mark.parametrize("module", ["dsref.sim.cli", "dsref.sim.serve_cli", "dsref.reference.oracle.cli"])
def test_a_broken_subcommand_module_fails_loudly(module):
    """Blocking one subcommand module must make the root fail, not drop the command silently."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from dsref.experiments.cli import main\n"
            "sys.exit(main(['--help']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "ImportError" in r.stderr or "ModuleNotFoundError" in r.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("dsref ")


def test_closed_pipe_ends_quietly():
    """`dsref ... --json | head -c 10`: the reader is gone; no BrokenPipeError traceback."""
    import os
    r, w = os.pipe()
    os.close(r)  # every write to w now fails with EPIPE
    try:
        p = subprocess.run([sys.executable, "-m", "dsref.experiments.cli", "hw", "list", "--json"],
                           stdout=w, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(w)
    err = p.stderr.decode()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert p.returncode == 1


def _parsers(parser, path=("dsref",)):
    """(command path, parser) for the root and every subcommand, depth first."""
    import argparse
    yield path, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_help_has_an_example_and_shows_defaults():
    """`dsref ... --help` is for users: what the command does, an example, each option's default."""
    import argparse
    seen = set()
    for path, p in _parsers(build_parser()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        text = p.format_help()
        cmd = " ".join(path)
        assert p.description and "example" in (p.epilog or ""), cmd
        for word in ("register(", "set_defaults", ".py", "sim.local", "numpy_ref"):
            assert word not in text, (cmd, word)
        for a in p._actions:
            if a.option_strings and a.nargs != 0 and a.default not in (None, argparse.SUPPRESS):
                assert a.help and "default" in p._get_formatter()._get_help_string(a), (cmd, a.dest)
