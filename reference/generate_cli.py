"""`dsref generate`: text (or token ids) out of a Hugging Face checkpoint directory."""

from __future__ import annotations

import json
import sys


def _parse_tokens(s: str) -> list[int]:
    try:
        return [int(t) for t in s.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--tokens must be comma-separated integers, got {s!r}") from None


def cmd_generate(args) -> int:
    import jax.numpy as jnp

    from dsref.reference.checkpoint import load_checkpoint, tokenizer_path
    from dsref.reference.decode import generate

    if (args.prompt is None) == (args.tokens is None):
        raise ValueError("give exactly one of --prompt TEXT or --tokens 1,2,3")
    tok = None
    tp = tokenizer_path(args.checkpoint)
    if tp is not None:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tp))
    if args.prompt is not None:
        if tok is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer.json, so --prompt cannot be encoded; "
                             "pass token ids with --tokens 1,2,3")
        prompt = tok.encode(args.prompt).ids
    else:
        prompt = _parse_tokens(args.tokens)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    cfg, model = load_checkpoint(args.checkpoint, dtype=dtype, with_mtp=args.mtp)
    stop = [int(s) for s in args.stop] if args.stop else []
    if not stop and tok is not None and cfg.extra.get("eos_token_id") is not None:
        eos = cfg.extra["eos_token_id"]
        stop = list(eos) if isinstance(eos, list) else [int(eos)]
    streamed: list[int] = []
    printed = [""]

    def on_token(_b, t):
        if args.json:
            return
        streamed.append(t)
        if tok is not None:
            text = tok.decode(streamed)
            sys.stdout.write(text[len(printed[0]):])
            printed[0] = text
        else:
            sys.stdout.write(f"{t} ")
        sys.stdout.flush()

    if not args.json and tok is not None:
        sys.stdout.write(args.prompt if args.prompt is not None else tok.decode(prompt))
    res = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop_tokens=stop, use_mtp=args.mtp, on_token=on_token)
    out = {
        "tokens": res.tokens[0],
        "prompt_tokens": len(prompt),
        "prefill_tokens_per_s": res.prefill_tokens_per_s,
        "decode_tokens_per_s": res.decode_tokens_per_s,
        "prefill_s": res.prefill_s, "decode_s": res.decode_s, "decode_steps": res.steps,
        "mtp_acceptance_rate": res.acceptance_rate,
        "kv_cache_bytes_per_token": int(cfg.kv_cache_bytes_per_token(jnp.dtype(dtype).itemsize)),
        "note": "first call includes jit compilation; see benchmarks/bench_decode.py for steady-state rates",
    }
    if tok is not None:
        out["text"] = tok.decode(res.tokens[0])
    if args.json:
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        acc = "" if res.acceptance_rate is None else f", MTP acceptance {res.acceptance_rate:.0%}"
        print(f"[{len(prompt)} prompt tokens: {res.prefill_tokens_per_s:,.1f} tok/s prefill; "
              f"{len(res.tokens[0])} new tokens: {res.decode_tokens_per_s:,.1f} tok/s decode{acc}; "
              f"first call includes compilation]", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a Hugging Face checkpoint (bf16 or FP8)",
        description="Load a DeepSeek-V3/R1/V2/Moonlight/Kimi-K2 checkpoint directory (config.json + "
        "safetensors, FP8 block-scaled dequantized on load), prefill the prompt, then decode with the "
        "latent MLA cache (R+P values per token per layer). Greedy when --temperature is 0. Text is "
        "streamed; prefill and decode tokens/s are printed at the end (stderr).")
    p.add_argument("--checkpoint", required=True, help="directory with config.json and *.safetensors")
    p.add_argument("--prompt", help="text, encoded with the checkpoint's tokenizer.json")
    p.add_argument("--tokens", help="prompt as token ids, e.g. 1,2,3 (no tokenizer needed)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", nargs="*", help="stop token ids (default: the config's eos_token_id)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--mtp", action="store_true",
                   help="self-speculative decoding with the checkpoint's MTP module (greedy only)")
    p.add_argument("--json", action="store_true", help="print one JSON object (tokens, text, timings)")
    p.set_defaults(func=cmd_generate)
