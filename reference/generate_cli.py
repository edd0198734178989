"""`dsref generate`: text (or token ids) out of a Hugging Face checkpoint directory.

Every option is checked before anything is loaded or printed: numbers by their argparse
``type=`` (exit 2, ``dsref generate: error: argument --top-p: ...``), the prompt against
the checkpoint's vocabulary and context length, --mtp against its weights, and the KV
cache against the memory available (exit 2, ``dsref: error: ...``).

A DeepSeek-V4 checkpoint (config_v4.is_v4_json) goes to reference/generate_v4.py, which shares
this module's prompt, context, stop-token, streaming and report helpers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from dsref.reference.cli_common import (compile_cache, host_memory_available, mesh_arg, nonneg_int, number,
                                       positive_int, seed)

_INT = re.compile(r"\s*[0-9]+\s*")  # one token id: plain decimal digits


_temperature = number(0.0, what=">= 0 (0 = greedy)")
_top_p = number(0.0, 1.0, low_open=True, what="in (0, 1] (1 = off; 0 would keep no token)")


def _parse_tokens(s: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]: comma-separated non-negative integers, nothing empty."""
    items = s.split(",")
    if not s.strip() or not all(_INT.fullmatch(t) for t in items):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated non-negative integers (token ids), e.g. 1,2,3; got {s!r}")
    return [int(t) for t in items]


def _available_memory(jax) -> tuple[int, str] | None:
    """(bytes free for the cache, where) on the default device; None when unknown."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        try:
            st = dev.memory_stats() or {}
            return int(st["bytes_limit"]) - int(st.get("bytes_in_use", 0)), f"{dev.platform} device memory"
        except Exception:  # noqa: BLE001 - a backend without memory stats: skip the check
            return None
    return host_memory_available()


def _check_mtp(path: str, cfg) -> None:
    """--mtp needs the MTP module's weights in the checkpoint (headers only)."""
    from dsref.reference.checkpoint import _Reader
    if cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"{path}: --mtp needs MTP weights, but they are missing: config.json declares "
                         "num_nextn_predict_layers=0 (drop --mtp)")
    name = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    if name not in _Reader(path).infos:
        raise ValueError(f"{path}: --mtp needs MTP weights, but they are missing (no tensor '{name}' in the "
                         "checkpoint; drop --mtp)")


# ---------------------------------------------------------------- shared by the V3 and V4 paths
def load_tokenizer(checkpoint: str):
    """(tokenizers.Tokenizer or None, its path or None): the checkpoint's tokenizer.json."""
    from dsref.reference.checkpoint import tokenizer_path
    tp = tokenizer_path(checkpoint)
    if tp is None:
        return None, None
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(tp)), tp
    except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
        why = str(e).splitlines()[0] if str(e).strip() else repr(e)
        raise ValueError(f"{tp}: not a valid tokenizer.json ({why})") from None


def prompt_ids(args, tok, tp, vocab_size: int) -> list[int]:
    """The prompt as token ids (--prompt encoded, or --tokens), checked against the vocabulary."""
    V = vocab_size
    if args.prompt is not None:
        if tok is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer.json, so --prompt cannot be encoded; "
                             "pass token ids with --tokens 1,2,3")
        prompt = tok.encode(args.prompt).ids
        if not prompt:
            raise ValueError("--prompt encodes to no tokens; give some text")
        bad = [t for t in prompt if t >= V]
        if bad:
            raise ValueError(f"{tp}: --prompt encodes to token id {bad[0]}, but "
                             f"{Path(args.checkpoint) / 'config.json'} has vocab_size {V} "
                             "(tokenizer and checkpoint do not match)")
        return prompt
    prompt = args.tokens
    bad = [t for t in prompt if t >= V]
    if bad:
        raise ValueError(f"--tokens: token id {bad[0]} is out of range: the checkpoint's vocab_size is {V} "
                         f"(ids 0..{V - 1})")
    return prompt


def check_context(args, prompt_len: int, ctx: int) -> None:
    """prompt + --max-new-tokens must fit in the model's max_position_embeddings ``ctx``."""
    if prompt_len + args.max_new_tokens > ctx:
        fit = ctx - prompt_len
        hint = (f"at most {fit} new tokens fit after this prompt" if fit > 0 else
                "the prompt alone fills the context; shorten it")
        raise ValueError(f"--max-new-tokens: {prompt_len} prompt tokens + {args.max_new_tokens} new tokens = "
                         f"{prompt_len + args.max_new_tokens} exceeds max_position_embeddings {ctx} of "
                         f"{args.checkpoint}; {hint}")


def stop_tokens(args, tok, extra: dict) -> list[int]:
    """--stop, else the config's eos_token_id (only with a tokenizer: without one, ids are the
    user's own and an eos id may mean nothing to them)."""
    stop = list(args.stop) if args.stop else []
    if not stop and tok is not None and extra.get("eos_token_id") is not None:
        eos = extra["eos_token_id"]
        stop = list(eos) if isinstance(eos, list) else [int(eos)]
    return stop


def streamer(args, tok, prompt: list[int], quiet: bool):
    """on_token(batch_index, token) printing text (or ids) as they come; echoes the prompt first.
    Nothing is printed with --json or on a process other than 0."""
    streamed: list[int] = []
    printed = [""]

    def on_token(_b, t):
        if args.json or quiet:
            return
        streamed.append(t)
        if tok is not None:
            text = tok.decode(streamed)
            sys.stdout.write(text[len(printed[0]):])
            printed[0] = text
        else:
            sys.stdout.write(f"{t} ")
        sys.stdout.flush()

    if not args.json and not quiet and tok is not None:
        sys.stdout.write(args.prompt if args.prompt is not None else tok.decode(prompt))
    return on_token


def report(args, res, *, prompt: list[int], tok, load_s: float, cache_dir, fields: dict, quiet: bool = False) -> int:
    """Print the run's JSON (--json) or its one-line summary on stderr. ``res`` a
    decode.GenerationResult; ``fields``: the path's own keys (placed after compile_cache_dir)."""
    steady = res.steady_decode_tokens_per_s
    # steady state: the decode steps after the first (compiled ahead; the first step still pays
    # first-execution costs); with a single decode step, that step; with none, null
    decode_rate = steady if steady is not None else (res.decode_tokens_per_s if res.steps else None)
    compile_s = sum(res.compile_s.values())
    out = {
        "tokens": res.tokens[0],
        "prompt_tokens": len(prompt),
        "prefill_tokens_per_s": res.prefill_tokens_per_s,
        "decode_tokens_per_s": decode_rate,
        "prefill_s": res.prefill_s, "decode_s": res.decode_s, "decode_steps": res.steps,
        "compile_s": compile_s,
        "compile_steps_s": res.compile_s,
        "load_s": load_s,
        "first_decode_step_s": res.first_step_s,
        "steady_decode_s": res.steady_s, "steady_decode_tokens": res.steady_tokens,
        "compile_cache_dir": cache_dir,
        **fields,
        "note": ("compile_s: tracing and compiling the prefill, sampling and decode steps before the clock starts "
                 "(seconds when JAX's persistent cache has them); prefill_s and decode_s exclude it; "
                 "decode_tokens_per_s: the decode steps after the first"),
    }
    if tok is not None:
        out["text"] = tok.decode(res.tokens[0])
    if quiet:
        return 0
    if args.json:
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        acc = "" if res.acceptance_rate is None else f", MTP acceptance {res.acceptance_rate:.0%}"
        dec = "n/a" if decode_rate is None else f"{decode_rate:,.1f}"
        cache = f"cache {cache_dir}" if cache_dir else "cache off"
        print(f"[{len(prompt)} prompt tokens: {res.prefill_tokens_per_s:,.1f} tok/s prefill; "
              f"{len(res.tokens[0])} new tokens: {dec} tok/s decode (steady state){acc}; "
              f"compile {compile_s:,.1f} s ({cache}); load {load_s:,.1f} s]", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    with compile_cache(disable=args.no_compile_cache) as cache_dir:
        return _generate(args, cache_dir)


def _generate(args, cache_dir: str | None) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsref.reference.checkpoint import _find_files, load_checkpoint, read_config
    from dsref.reference.config_v4 import is_v4_json
    from dsref.reference.decode import generate, kv_cache_alloc_bytes, kv_cache_length
    from dsref.reference.distributed import initialize_from_args
    from dsref.reference.mesh import make_mesh
    from dsref.reference.sharded_load import load_sharded

    if (args.prompt is None) == (args.tokens is None):
        raise ValueError("give exactly one of --prompt TEXT or --tokens 1,2,3")
    if is_v4_json(args.checkpoint):  # DeepSeek-V4: its own weights, caches and decode loop
        from dsref.reference.generate_v4 import generate_v4_cmd
        return generate_v4_cmd(args, cache_dir)
    if args.mtp and args.temperature > 0:
        raise ValueError("--mtp (self-speculative decoding) is greedy only: use --temperature 0 or drop --mtp")
    if args.mtp and args.layers != "scan":
        raise ValueError("--mtp runs the layer scan: drop --layers unrolled or drop --mtp")
    if args.mesh is not None and args.layers != "scan":
        raise ValueError("--mesh runs the layer scan: drop --layers unrolled or drop --mesh")
    info = initialize_from_args(args)  # several processes (docs/multi-host.md): before any device is touched
    if info.process_count > 1 and args.mesh is None:
        raise ValueError("--coordinator/--distributed: a multi-process run needs --mesh over every device")
    mesh = None if args.mesh is None else make_mesh(args.mesh)  # too few devices: one line, before loading
    quiet = info.process_index != 0  # every process computes, process 0 prints
    _find_files(args.checkpoint)  # refuse pickles before complaining about config.json
    cfg = read_config(args.checkpoint)
    tok, tp = load_tokenizer(args.checkpoint)
    prompt = prompt_ids(args, tok, tp, cfg.vocab_size)
    if args.mtp:
        _check_mtp(args.checkpoint, cfg)
    check_context(args, len(prompt), cfg.max_position_embeddings)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    need = kv_cache_alloc_bytes(cfg, 1, kv_cache_length(len(prompt), args.max_new_tokens, args.mtp), itemsize,
                                use_mtp=args.mtp)
    avail = _available_memory(jax)
    if avail is not None and need > avail[0]:
        per = cfg.kv_cache_bytes_per_token(itemsize)
        raise ValueError(f"--max-new-tokens: the KV cache for {len(prompt)} + {args.max_new_tokens} tokens needs "
                         f"{need / 2**30:,.2f} GiB ({per:,.0f} B/token, bucketed), more than the "
                         f"{avail[0] / 2**30:,.2f} GiB available ({avail[1]}); ask for fewer new tokens")
    t_load = time.perf_counter()
    if mesh is None:
        cfg, model = load_checkpoint(args.checkpoint, dtype=dtype, with_mtp=args.mtp)
    else:  # each device's shards read from the files, nothing else (reference/sharded_load.py)
        cfg, model = load_sharded(args.checkpoint, mesh, dtype=dtype, with_mtp=args.mtp)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    load_s = time.perf_counter() - t_load
    stop = stop_tokens(args, tok, cfg.extra)
    on_token = streamer(args, tok, prompt, quiet)
    res = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop_tokens=stop, use_mtp=args.mtp, on_token=on_token,
                   measure_compile=True, layers=args.layers, mesh=mesh)
    fields = {"layers": args.layers,
              "mesh": None if mesh is None else str(args.mesh), "devices": 1 if mesh is None else mesh.size,
              "mtp_acceptance_rate": res.acceptance_rate,
              "kv_cache_bytes_per_token": int(cfg.kv_cache_bytes_per_token(itemsize))}
    return report(args, res, prompt=prompt, tok=tok, load_s=load_s, cache_dir=cache_dir, fields=fields, quiet=quiet)


def register(sub) -> None:
    from dsref.reference.cli_common import HelpFormatter
    from dsref.reference.distributed import add_distributed_args
    # Decoding keeps MLA's latent cache (R+P values per token per layer); FP8 block-scaled weights
    # are dequantized on load (reference/checkpoint.py, reference/decode.py). V4: reference/generate_v4.py.
    p = sub.add_parser(
        "generate", help="generate text from a Hugging Face checkpoint (DeepSeek-V3 family or V4; bf16 or FP8)",
        description="""\
Generate text from a DeepSeek-V3/R1/V2/Moonlight/Kimi-K2 checkpoint directory (config.json +
safetensors; bf16, float32 or FP8 weights) or a DeepSeek-V4 one (bf16, float32, or the release's
FP8/FP4, either name set; recognised from config.json). V4 runs on one device without MTP:
--mtp, --mesh, --layers unrolled and the multi-host options are refused for it. The prompt is
given as text (needs the checkpoint's tokenizer.json) or as token ids; greedy when --temperature
is 0. Text is streamed to stdout; at the end (stderr) come prefill and steady-state decode
tokens/s (compilation excluded) and the seconds spent compiling and loading.

Compiled programs are kept in a cache directory ($DSREF_CACHE_DIR, else
$XDG_CACHE_HOME/dsref/jax, else ~/.cache/dsref/jax), so the next run on a model of the same
shapes skips most of the compilation. --no-compile-cache or DSREF_NO_COMPILE_CACHE=1 turns it
off; a directory that cannot be created only gives a warning.""",
        epilog="""\
example (a small random checkpoint, so the text is gibberish):
  dsref init-checkpoint --preset tiny-v3 --tokenizer --out /tmp/tiny
  dsref generate --checkpoint /tmp/tiny --prompt "def f" --max-new-tokens 8""",
        formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="directory with config.json and *.safetensors")
    p.add_argument("--prompt", help="text, encoded with the checkpoint's tokenizer.json")
    p.add_argument("--tokens", type=_parse_tokens, help="prompt as token ids, e.g. 1,2,3 (no tokenizer needed)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="at most this many new tokens (>= 1; prompt + new <= the model's max_position_embeddings)")
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (>= 0, finite)")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="sample among the k most likely (0 = off)")
    p.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=seed, default=0, help="random seed, an integer in [0, 2**63)")
    p.add_argument("--stop", nargs="*", type=nonneg_int,
                   help="stop token ids (default: the config's eos_token_id)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute precision")
    p.add_argument("--mtp", action="store_true",
                   help="self-speculative decoding with the checkpoint's MTP module (greedy only; not for V4 yet)")
    p.add_argument("--layers", choices=("scan", "unrolled"), default="scan",
                   help="how the decoder layers are compiled: 'scan' (default) compiles one body per layer kind, "
                        "so compile time does not grow with depth; 'unrolled' compiles every layer and a branch "
                        "per expert, reading each weight in place: a faster decode on CPU for small models "
                        "(up to 512 experts x MoE layers), a longer compile; V4: scan only (the default)")
    p.add_argument("--mesh", type=mesh_arg, metavar="AXIS=SIZE,...",
                   help="run over a device mesh: data=N splits the batch, expert=N puts E/N whole routed "
                        "experts on each device (tokens travel by all-to-all), tensor=N splits heads and FFN "
                        "(e.g. expert=4,tensor=2); the product is the device count (docs/scaling.md); not for V4 yet")
    add_distributed_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (tokens, text, timings: compile_s, prefill_s, decode_tokens_per_s, ...)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the persistent compilation cache (same as DSREF_NO_COMPILE_CACHE=1)")
    p.set_defaults(func=cmd_generate)
