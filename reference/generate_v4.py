"""`dsref generate` on DeepSeek-V4 checkpoints: the weights through checkpoint_v4 (bf16, float32,
or the release's FP8/FP4, dequantized on load), the per-layer caches of decode_v4.

The prompt is prefilled in one ``step_v4`` call, then one token per call; each next token is drawn
by decode.sample (the V3 path's sampler: greedy at temperature 0, else temperature, top-k and
top-p, seeded), so --temperature/--top-k/--top-p/--seed mean what they mean for V3 and the key
sequence is the same (split once before each token). The command-line checks and the output
(streamed text, --json keys, the stderr summary) are generate_cli's, shared with the V3 path.

Not for V4 yet, refused in one line naming the option: --mtp (no V4 MTP step), --mesh (decode_v4
runs on one device), --layers unrolled (V3's unrolled layer program), and the multi-process
options (they need --mesh).
"""

from __future__ import annotations

import math
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dsref.reference.config_v4 import ModelConfigV4
from dsref.reference.decode import GenerationResult, bucket, check_sampling, sample
from dsref.reference.decode_v4 import cache_bytes_v4, init_cache_v4, step_v4

F32 = jnp.float32
# XLA compiler options of the prefill and decode steps (step_v4's compiler_options); None: XLA's
# defaults. The tests set {"xla_backend_optimization_level": 0}: the same program, compiled about
# 3x faster on XLA:CPU for their 2-layer model (prefill 4.1 s vs 12.8 s, decode 3.6 s vs 8.6 s on a
# loaded 2-core machine), results differing in the last bits (model_v4.jit_forward_v4's docstring).
COMPILER_OPTIONS: dict | None = None

# option, how to tell it was given (argparse defaults: False / None / "scan"), why V4 lacks it
_ONE_PROCESS = "V4 generation runs in one process"
_NOT_FOR_V4 = (("--mtp", lambda a: a.mtp, "there is no V4 MTP decoding step"),
               ("--mesh", lambda a: a.mesh is not None, "V4 generation runs on one device"),
               ("--layers unrolled", lambda a: a.layers != "scan", "V4 has one layer program, no scan/unrolled choice"),
               ("--coordinator", lambda a: a.coordinator is not None, _ONE_PROCESS),
               ("--num-processes", lambda a: a.num_processes is not None, _ONE_PROCESS),
               ("--process-id", lambda a: a.process_id is not None, _ONE_PROCESS),
               ("--local-device-ids", lambda a: a.local_device_ids is not None, _ONE_PROCESS),
               ("--distributed", lambda a: a.distributed, _ONE_PROCESS))


def refuse_v3_only_options(args) -> None:
    """ValueError (one line, naming the option) for an option the V4 path does not implement."""
    for flag, given, why in _NOT_FOR_V4:
        if given(args):
            raise ValueError(f"{flag}: not supported for DeepSeek-V4 checkpoints yet ({why}); drop {flag}")


def cache_length_v4(prompt_len: int, max_new_tokens: int) -> int:
    """max_len of the V4 cache for a run: the last token is never fed back, so positions go up to
    prompt_len + max_new_tokens - 2; bucketed to a power of two (>= 16) so runs with nearby lengths
    share the decode step's compiled program (max_len is static in CacheV4)."""
    return bucket(prompt_len + max_new_tokens - 1)


def cache_shapes_v4(cfg: ModelConfigV4, max_len: int, dtype=F32):
    """init_cache_v4(cfg, 1, max_len, dtype) as ShapeDtypeStructs: nothing allocated."""
    return jax.eval_shape(lambda: init_cache_v4(cfg, 1, max_len, dtype))


def cache_bytes_per_token_v4(cfg: ModelConfigV4, dtype=F32) -> float:
    """Bytes one more token of context adds to the cache of one sequence, from the real cache's
    shapes: its growth between max_len M and 2M, M a multiple of both compression rates (so every
    entry array grows by exactly M / m rows; the rings and block state do not grow)."""
    M = math.lcm(cfg.compress_rate_csa, cfg.compress_rate_hca)
    return (cache_bytes_v4(cache_shapes_v4(cfg, 2 * M, dtype)) - cache_bytes_v4(cache_shapes_v4(cfg, M, dtype))) / M


@jax.jit
def _last(logits):
    """logits [B, T, V] -> [B, V] at the last position (jitted: compiled ahead, once per T)."""
    return logits[:, -1]


@partial(jax.jit, static_argnames=("top_k",))
def _pick(last, key, temperature, top_k: int, top_p):
    """(next token [B], next key) from the last position's logits [B, V]: decode.sample with a
    fresh subkey, split as the V3 loop splits. One jitted call of one shape for the prefill and
    every decode step (one compile, ahead of the clock)."""
    key, sub = jax.random.split(key)
    return sample(last, sub, temperature, top_k, top_p), key


def _compile_seconds(weights, cfg, toks, pos, cache, key, temperature, top_k, top_p) -> dict[str, float]:
    """Compile the prefill, the sampler (and the last-position slices of the prefill's and a
    decode step's logits) and the decode step for these shapes now: seconds each. The jitted step
    is decode_v4's own (step_v4 calls it), so the calls that follow find them compiled."""
    from dsref.reference.decode import _compile_now
    from dsref.reference.decode_v4 import _compiled
    step = _compiled(cfg, tuple(sorted((COMPILER_OPTIONS or {}).items())))  # the one step_v4 calls
    out = {}
    out["prefill"], logits = _compile_now(step, weights, toks, pos, cache)
    one = jnp.zeros((1, 1), jnp.int32)  # the empty cache stands for the prefilled one (same shapes)
    out["decode"], logits1 = _compile_now(step, weights, one, one, cache)
    slices = [_compile_now(_last, jnp.zeros(lg[0].shape, lg[0].dtype)) for lg in (logits, logits1)]
    picked, _ = _compile_now(_pick, jnp.zeros(slices[0][1].shape, slices[0][1].dtype), key, temperature,
                             top_k=top_k, top_p=top_p)
    out["sample"] = picked + sum(t for t, _ in slices)
    return out


def generate_v4(weights: dict, cfg: ModelConfigV4, prompt: list[int], max_new_tokens: int, *,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens=(),
                on_token=None, measure_compile: bool = False, dtype=F32) -> GenerationResult:
    """Generate for one prompt (a list of ids) with step_v4: prefill in one step, then one token
    per step until a stop token or max_new_tokens (module docstring). weights: model_v4.cast_weights
    output; dtype: the activation (cache) dtype. Returns decode.GenerationResult (tokens [[...]],
    stop token included; prefill_s / decode_s exclude compilation when measure_compile)."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    V, P = cfg.vocab_size, len(prompt)
    if P == 0 or any(t < 0 or t >= V for t in prompt):
        raise ValueError(f"prompt: needs at least one token id, each in [0, vocab_size={V})")
    if top_k >= V:  # keeps every token: the same as off (and lax.top_k needs k <= V)
        top_k = 0
    stop = set(int(s) for s in stop_tokens)
    cache = init_cache_v4(cfg, 1, cache_length_v4(P, max_new_tokens), dtype)
    toks = jnp.asarray(np.asarray([prompt], np.int32))
    pos = jnp.asarray(np.arange(P, dtype=np.int32)[None])
    key = jax.random.key(seed)
    compiled = (_compile_seconds(weights, cfg, toks, pos, cache, key, temperature, top_k, top_p)
                if measure_compile else None)

    def pick(logits, key):
        nxt, key = _pick(_last(logits), key, temperature, top_k=top_k, top_p=top_p)
        return int(nxt[0]), key  # int(): waits for the step

    t0 = time.perf_counter()
    logits, cache = step_v4(weights, cfg, toks, pos, cache, compiler_options=COMPILER_OPTIONS)
    nxt, key = pick(logits, key)
    t1 = t_first = time.perf_counter()
    out: list[int] = []
    steps = 0
    while True:
        out.append(nxt)
        if on_token:
            on_token(0, nxt)
        if nxt in stop or len(out) >= max_new_tokens:
            break
        logits, cache = step_v4(weights, cfg, jnp.asarray([[nxt]], jnp.int32),
                                jnp.asarray([[P + steps]], jnp.int32), cache, compiler_options=COMPILER_OPTIONS)
        nxt, key = pick(logits, key)
        steps += 1
        if steps == 1:
            t_first = time.perf_counter()
    t2 = time.perf_counter()
    return GenerationResult([out], t1 - t0, t2 - t1, P, len(out), steps, compile_s=compiled,
                            first_step_s=t_first - t1 if steps else 0.0, steady_s=t2 - t_first if steps > 1 else 0.0,
                            steady_tokens=max(steps - 1, 0))


def generate_v4_cmd(args, cache_dir: str | None) -> int:
    """`dsref generate` on a V4 checkpoint directory (args: generate_cli's parser)."""
    from dsref.reference import generate_cli as gc
    from dsref.reference.checkpoint import _find_files
    from dsref.reference.checkpoint_v4 import read_tensors_v4
    from dsref.reference.model_v4 import cast_weights

    refuse_v3_only_options(args)
    _find_files(args.checkpoint)  # refuse pickles before anything else, as the V3 path does
    cfg = ModelConfigV4.from_json(args.checkpoint)
    tok, tp = gc.load_tokenizer(args.checkpoint)
    prompt = gc.prompt_ids(args, tok, tp, cfg.vocab_size)
    gc.check_context(args, len(prompt), cfg.max_position_embeddings)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    S = cache_length_v4(len(prompt), args.max_new_tokens)
    need = cache_bytes_v4(cache_shapes_v4(cfg, S, dtype))
    avail = gc._available_memory(jax)
    if avail is not None and need > avail[0]:
        per = cache_bytes_per_token_v4(cfg, dtype)
        raise ValueError(f"--max-new-tokens: the V4 caches for {len(prompt)} + {args.max_new_tokens} tokens need "
                         f"{need / 2**30:,.2f} GiB ({per:,.0f} B/token beyond the fixed windows, {S} slots), more "
                         f"than the {avail[0] / 2**30:,.2f} GiB available ({avail[1]}); ask for fewer new tokens")
    t_load = time.perf_counter()
    weights = cast_weights(read_tensors_v4(args.checkpoint, cfg, mtp=False), cfg, dtype)
    jax.block_until_ready(list(weights.values()))
    load_s = time.perf_counter() - t_load
    stop = gc.stop_tokens(args, tok, cfg.extra)
    on_token = gc.streamer(args, tok, prompt, quiet=False)
    res = generate_v4(weights, cfg, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, stop_tokens=stop, on_token=on_token, measure_compile=True,
                      dtype=dtype)
    fields = {"arch": cfg.arch, "mesh": None, "devices": 1, "mtp_acceptance_rate": None,
              "kv_cache_bytes_per_token": int(cache_bytes_per_token_v4(cfg, dtype)),
              "kv_cache_bytes": need}
    return gc.report(args, res, prompt=prompt, tok=tok, load_s=load_s, cache_dir=cache_dir, fields=fields)
