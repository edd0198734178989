"""The command contract every engine adapter follows (see oracle.conformance.CommandEngine).

``adapter_main(argv, prog=..., description=..., run=...)`` parses ``--checkpoint``,
``--tokens``, ``--out`` (plus the adapter's own options), checks the tokens against the
checkpoint's config, calls ``run(args, checkpoint, tokens, cfg) -> (dump, engine_name)``
or ``(dump, engine_name, dtype)`` (the precision the engine really ran in, which picks the
tolerances it is graded with; default ``dtype``) and writes the dump with golden-style metadata (``engine``, ``dtype``, ``config_hash``,
``tokens_sha256``). Exit codes:

    0  dump written
    1  the engine failed; the last line of stderr is ``PROG: error: TYPE: MESSAGE``
    2  bad input (a file, a tensor, an option), one line naming it
    3  ``unsupported: REASON`` on stderr: the engine cannot express this checkpoint at all
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

UNSUPPORTED_EXIT = 3


class EngineUnsupported(RuntimeError):
    """An engine cannot run a checkpoint at all (reported as UNSUPPORTED, with the reason)."""


class AdapterInputError(ValueError):
    """Bad input to an adapter's own options (e.g. --engine-path), raised by its ``check_args``:
    exit 2 with this one line."""


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` (the summary a report shows)."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}".rstrip(": ")


def adapter_main(argv, *, prog: str, description: str,
                 run: Callable[[argparse.Namespace, Path, np.ndarray, object], tuple],
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 check_args: Callable[[argparse.Namespace], None] | None = None,
                 dtype: str = "float32", example: str = "", v4: bool = False) -> int:
    """v4: the engine runs DeepSeek-V4 checkpoints too; otherwise a V4 checkpoint is UNSUPPORTED
    (exit 3) before ``run`` is called, with cfg a ModelConfig."""
    from dsref.reference.checkpoint import CheckpointError
    from dsref.reference.oracle.golden import (OracleError, check_tokens, golden_metadata, load_tokens,
                                              read_any_config, write_dump)
    p = argparse.ArgumentParser(
        prog=f"python -m {prog}", description=description,
        epilog=("exit 0 written, 1 engine error (last stderr line: the summary), 2 bad input, "
                f"{UNSUPPORTED_EXIT} with 'unsupported: REASON' on stderr when the engine cannot run the "
                "checkpoint at all" + (f"\n\nexample:\n  {example}" if example else "")),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokens", required=True, help="token ids [batch, seq], integer .npy")
    p.add_argument("--out", required=True, help="output .safetensors dump")
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    name = prog.rsplit(".", 1)[-1]
    try:
        if check_args is not None:  # the adapter's own options (AdapterInputError), before any file is read
            check_args(args)
        cfg = read_any_config(args.checkpoint)
        tokens = load_tokens(args.tokens)
        check_tokens(tokens, cfg, f"--tokens {args.tokens}")
    except (OracleError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    try:
        if cfg.arch == "deepseek_v4" and not v4:
            raise EngineUnsupported(f"{name}: DeepSeek-V4 checkpoints (compressed attention, hyper-connections) "
                                    "are not implemented by this engine")
        got = run(args, Path(args.checkpoint), tokens, cfg)
        out, engine_name = got[0], got[1]
        dtype = got[2] if len(got) > 2 else dtype
    except EngineUnsupported as e:
        print(f"unsupported: {e}", file=sys.stderr)
        return UNSUPPORTED_EXIT
    except Exception as e:  # the engine's own failure: traceback for the developer, summary last
        traceback.print_exc(file=sys.stderr)
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return 1
    write_dump(out, args.out, golden_metadata(cfg, tokens, dtype, engine=engine_name))
    return 0
