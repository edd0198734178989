"""What every `dsref` command shares: the --help layout, the option value types, the memory check.

HelpFormatter is the --help layout every parser uses (pass it as ``formatter_class`` to each
add_parser: argparse does not hand a parser's formatter on to its subparsers).

Descriptions and epilogs are printed as written (RawDescriptionHelpFormatter), so they carry
their own line breaks and an ``example:`` block. Every option with a default shows it, as
ArgumentDefaultsHelpFormatter does, except where it says nothing: flags (store_true), options
whose default is None (their help says what happens without them), and help strings that
already state their default in their own words ("(default: ...").

The option types (``integer``, ``number``) are argparse type functions: a bad value exits 2
with "argument --OPTION: ...", argparse naming the option, before anything is loaded or
written. No numpy or jax here: building the parser stays cheap (``compile_cache`` imports jax
when a command that compiles enters it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if ("%(default)" in help or "(default" in help or action.default is None
                or action.default is argparse.SUPPRESS or action.nargs == 0):
            return help
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return help + " (default: %(default)s)"
        return help


# ------------------------------------------------------------------ option types
INT_MAX = 2**63 - 1  # seeds and counts stay int64 (numpy, JSON consumers, jax.random.key's C long)
_INT = re.compile(r"\s*-?[0-9]+\s*")  # plain decimal: no '1e3', '2.5', '+1' or '1_000'


def integer(minimum: int = 0, maximum: int = INT_MAX, why: str = ""):
    """An integer in [minimum, maximum]; ``why`` explains the upper bound in the message."""
    def parse(s: str) -> int:
        if not _INT.fullmatch(s):
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
        v = int(s)
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {s!r}")
        if v > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:,}" + (f" ({why})" if why else "")
                                             + f", got {s!r}")
        return v
    parse.__name__ = "integer"  # argparse's "invalid integer value" wording when it wraps an error
    return parse


positive_int = integer(1)
nonneg_int = integer(0)
seed = integer(0, INT_MAX)


def mesh_arg(s: str):
    """--mesh AXIS=SIZE,... (reference/mesh.py), checked when the command line is parsed."""
    from dsref.reference.mesh import MeshError, parse_mesh
    try:
        return parse_mesh(s, option="")
    except MeshError as e:
        raise argparse.ArgumentTypeError(str(e).lstrip()) from None


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False, why: str = "",
           what: str = ""):
    """A finite number in [low, high] (low_open: (low, high]); ``why`` explains the upper bound,
    ``what`` replaces the range in the message (e.g. "in (0, 1] (1 = off)")."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s!r}")
        if v < low or (low_open and v == low):
            rng = what or (f"> {low:g}" if low_open else f">= {low:g}")
            raise argparse.ArgumentTypeError(f"must be {rng}, got {s!r}")
        if v > high:
            rng = what or (f"<= {high:,g}" + (f" ({why})" if why else ""))
            raise argparse.ArgumentTypeError(f"must be {rng}, got {s!r}")
        return v
    parse.__name__ = "number"
    return parse


# ------------------------------------------------------------------ memory
def host_memory_available() -> tuple[int, str] | None:
    """(bytes, where): MemAvailable from /proc/meminfo, else physical memory; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
    except (AttributeError, OSError, ValueError):
        return None


# ------------------------------------------------------------------ compilation cache
NO_COMPILE_CACHE_ENV = "DSREF_NO_COMPILE_CACHE"
CACHE_DIR_ENV = "DSREF_CACHE_DIR"
_warned_cache: set[str] = set()


def compile_cache_dir() -> str:
    """Where compiled programs are kept: $DSREF_CACHE_DIR, else $XDG_CACHE_HOME/dsref/jax, else
    ~/.cache/dsref/jax."""
    if os.environ.get(CACHE_DIR_ENV):
        return os.environ[CACHE_DIR_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dsref", "jax")


def compile_cache_disabled() -> bool:
    """$DSREF_NO_COMPILE_CACHE set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(NO_COMPILE_CACHE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def compile_cache(disable: bool = False):
    """JAX's persistent compilation cache for the duration of a command that compiles; yields the
    directory, or None when off.

    Off with ``disable`` (a command's --no-compile-cache) or $DSREF_NO_COMPILE_CACHE=1. A directory
    that cannot be created or written is not an error: one warning on stderr, then the command runs
    uncached. Every compile is kept (jax_persistent_cache_min_compile_time_secs 0: the default 1 s
    would skip small models' steps). The previous settings come back on exit, so a caller that runs
    a command in its own process (the tests) is left as it was. Commands call this; library code
    never does.
    """
    if disable or compile_cache_disabled():
        yield None
        return
    path = os.path.abspath(os.path.expanduser(compile_cache_dir()))
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as e:
        if path not in _warned_cache:
            _warned_cache.add(path)
            why = e.strerror or str(e)
            print(f"dsref: warning: compilation cache directory {path} cannot be used ({why}); continuing "
                  f"without it (set {CACHE_DIR_ENV}=DIR, or {NO_COMPILE_CACHE_ENV}=1 to turn it off)", file=sys.stderr)
        yield None
        return
    import jax
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {n: getattr(jax.config, n) for n in names}
    _set_cache(jax, {names[0]: path, names[1]: 0.0})
    try:
        yield path
    finally:
        _set_cache(jax, before)


def _set_cache(jax, settings: dict) -> None:
    for name, value in settings.items():
        jax.config.update(name, value)
    try:  # JAX opens its cache at the first compile and keeps it: start over with the new directory
        from jax._src import compilation_cache as cc
        cc.reset_cache()
    except (ImportError, AttributeError):  # a JAX without it: the first directory set stays
        pass
