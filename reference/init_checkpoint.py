"""`dsref init-checkpoint`: a randomly initialised Hugging Face checkpoint of a DeepSeek preset.

    dsref init-checkpoint --preset tiny-v3 --out DIR [--tokenizer] [--seed S]
                          [--dtype bfloat16|float32|fp8] [--mtp]

Weights come from the JAX model (``DeepseekModel(cfg, rngs=nnx.Rngs(seed))``) and are written
by ``checkpoint.save_checkpoint`` (config.json + model.safetensors, FP8 block-scaled with
--dtype fp8). --tokenizer adds a byte-level BPE tokenizer.json trained at the model's
vocabulary size on text that ships with Python (pydoc's topic help), so that
``dsref generate --checkpoint DIR --prompt "def f"`` works end to end.

Nothing is written outside --out: the checkpoint is assembled in a temporary directory
beside it and renamed into place when complete; --out must not exist yet or be an
empty directory. Refusals (unknown or dense preset, a non-empty --out, not enough
memory or disk) come before any weight is made.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from dsref.reference.cli_common import host_memory_available, seed

_OUT_DTYPES = ("bfloat16", "float32", "fp8")
_BYTES = {"float32": 4.0, "bfloat16": 2.0, "fp8": 1.0}  # on disk, per parameter (about)


def _check_out(out: str) -> Path:
    """--out must be a new path (or an empty directory) in an existing directory."""
    if not out.strip():
        raise ValueError("--out: empty path")
    p = Path(out)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise ValueError(f"--out {out}: exists and is not a directory; give a new directory")
    if p.is_dir() and any(p.iterdir()):
        raise ValueError(f"--out {out}: directory exists and is not empty; give a new or empty directory")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: parent directory {parent} is not writable")
    return p


def train_tokenizer(vocab_size: int, *, min_frequency: int = 2, texts=None):
    """A byte-level BPE (``tokenizers``) with at most ``vocab_size`` ids, trained on ``texts``
    (an iterable of strings; default CPython's pydoc topic help); every byte is a token, so any
    text encodes. Deterministic."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator((topics[k] for k in sorted(topics)) if texts is None else texts, trainer)
    return tok


def cmd_init_checkpoint(args) -> int:
    from dsref.reference.presets import get_preset

    out = _check_out(args.out)
    try:
        cfg = get_preset(args.preset)
    except ValueError as e:
        raise ValueError(f"--preset: {e}") from None
    if cfg.arch != "deepseek":
        raise ValueError(f"--preset {args.preset}: a dense GQA preset is described for the simulator "
                         "only; init-checkpoint makes DeepSeek MLA+MoE checkpoints (e.g. tiny-v3, tiny-v2, "
                         "small-v3, deepseek-v2-lite)")
    if args.mtp and cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"--mtp: preset {args.preset} has no MTP module (num_nextn_predict_layers=0)")
    if args.tokenizer and cfg.vocab_size < 256:
        raise ValueError(f"--tokenizer: a byte-level tokenizer needs vocab_size >= 256; preset {args.preset} "
                         f"has {cfg.vocab_size}")
    pc = cfg.param_counts()
    n = pc["total_params"] + (pc["mtp_params"] if args.mtp else 0)
    # float32 weights in memory, plus one converted tensor at a time while writing
    mem_need, mem = int(n * 4 * 1.25), host_memory_available()
    if mem is not None and mem_need > mem[0]:
        raise ValueError(f"--preset {args.preset}: {n:,} parameters need about {mem_need / 2**30:,.1f} GiB of "
                         f"memory to initialise, more than the {mem[0] / 2**30:,.1f} GiB available "
                         f"({mem[1]}); pick a smaller preset (tiny-v3, small-v3)")
    disk_need = int(n * _BYTES[args.dtype])
    free = shutil.disk_usage(out.absolute().parent).free
    if disk_need > free:
        raise ValueError(f"--out {args.out}: the checkpoint needs about {disk_need / 2**30:,.2f} GiB, only "
                         f"{free / 2**30:,.2f} GiB free there")

    from flax import nnx

    from dsref.reference.checkpoint import save_checkpoint
    from dsref.reference.model import DeepseekModel

    parent = out.absolute().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        model = DeepseekModel(cfg, rngs=nnx.Rngs(args.seed), with_mtp=args.mtp)
        save_checkpoint(model, cfg, tmp, dtype=args.dtype)
        del model
        tok_vocab = None
        if args.tokenizer:
            tok = train_tokenizer(cfg.vocab_size)
            tok_vocab = tok.get_vocab_size()
            assert tok_vocab <= cfg.vocab_size, (tok_vocab, cfg.vocab_size)
            tok.save(str(tmp / "tokenizer.json"))
        os.chmod(tmp, 0o777 & ~_umask())
        if out.is_dir():  # empty (checked above): replaced by the complete checkpoint
            out.rmdir()
        os.rename(tmp, out)
    except OSError as e:  # disk full, permissions: nothing is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"--out {args.out}: cannot write the checkpoint ({e.strerror or e}); nothing was "
                         "written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out.iterdir())
    extra = f", tokenizer.json ({tok_vocab} ids)" if tok_vocab else ""
    print(f"wrote {out}: {cfg.name}, {n:,} parameters{' (with MTP)' if args.mtp else ''}, {args.dtype}, "
          f"seed {args.seed}{extra}; files: {', '.join(files)}")
    if not args.tokenizer:
        print(f"  try: dsref generate --checkpoint {out} --tokens 1,2,3", file=sys.stderr)
    else:
        print(f"  try: dsref generate --checkpoint {out} --prompt \"def f\"", file=sys.stderr)
    return 0


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


DESCRIPTION = """\
Write a randomly initialised Hugging Face checkpoint (config.json + model.safetensors) of a
DeepSeek preset, to try `dsref generate`, `dsref golden` and the other commands without a
download. --tokenizer adds a byte-level BPE tokenizer.json (trained at the model's vocabulary
size on the help texts that ship with Python), so that `dsref generate --prompt TEXT` works.

Nothing is written outside --out: it must not exist yet or be an empty directory, and it
appears only once the checkpoint is complete. Unknown or dense presets, a non-empty --out and
too little memory or disk are refused before any weight is made."""


def register(sub) -> None:
    from dsref.reference.cli_common import HelpFormatter
    p = sub.add_parser(
        "init-checkpoint", help="write a randomly initialised checkpoint of a DeepSeek preset (for tests and demos)",
        description=DESCRIPTION, epilog="example:\n  dsref init-checkpoint --preset tiny-v3 --tokenizer --out /tmp/tiny",
        formatter_class=HelpFormatter)
    p.add_argument("--preset", required=True, help="a DeepSeek preset: tiny-v3, tiny-v2, tiny-v2-lite, small-v3, ...")
    p.add_argument("--out", required=True, help="new (or empty) directory to create")
    p.add_argument("--tokenizer", action="store_true",
                   help="also write tokenizer.json: byte-level BPE trained on Python's pydoc topics")
    p.add_argument("--seed", type=seed, default=0, help="random seed of the weights")
    p.add_argument("--dtype", choices=_OUT_DTYPES, default="bfloat16",
                   help="weights on disk (fp8: Linear weights e4m3 with block scales)")
    p.add_argument("--mtp", action="store_true", help="include the multi-token-prediction module's weights")
    p.set_defaults(func=cmd_init_checkpoint)
