"""Cached decoding and generation: prefill, then one token (or an MTP-verified pair) per step.

The absorbed-MLA cache holds, per layer, the normalised latent c_kv [B, S, R] and the
rotated shared key k_pe [B, S, P] — nothing per head. The naive cache (expanded keys
[B, S, H, N+P] and values [B, S, H, A]) exists for comparison.

Shapes are static under jit: prompts are right-padded to a power-of-two bucket and
the cache length S is bucketed too, so a session compiles a handful of programs.
Padded positions write junk into cache slots beyond each sequence's length; the
causal-by-position mask (key position <= query position) never shows them, and
decoding overwrites them before they become visible.
"""

from __future__ import annotations

import math
import time
import dataclasses
from dataclasses import dataclass
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsref.reference import unrolled
from dsref.reference.mesh import current_mesh, fetch, padded_batch, place_batch
from dsref.reference.model import DeepseekModel, cache_kind, forward, mtp_logits


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def init_cache(model: DeepseekModel, batch: int, length: int, form: str = "absorbed", dtype=None,
               layers: int | None = None) -> list:
    """Zeroed cache: one LatentCache (form 'absorbed') or ExpandedCache ('naive') per layer
    stack of the model, its fields stacked over the stack's layers ([L, B, S, ...]); for V3.2
    the Indexed variants, which add the indexer's keys k_idx (``model.cache_kind``).
    ``layers=n``: one stack of n layers instead (the MTP module's cache: layers=1)."""
    cfg = model.cfg
    kind = cache_kind(cfg, form)
    counts = [st.count for st in model.stacks] if layers is None else [layers]
    return [kind.zeros(cfg, batch, length, dtype or model.dtype, layers=n) for n in counts]


def cache_bytes(cache) -> int:
    return int(sum(a.size * a.dtype.itemsize for layer in cache for a in layer))


def kv_cache_length(prompt_len: int, max_new_tokens: int, use_mtp: bool = False) -> int:
    """Cache slots S that ``generate`` allocates per sequence (bucketed; MTP needs two more)."""
    return bucket(prompt_len + max_new_tokens + (3 if use_mtp else 1))


def kv_cache_alloc_bytes(cfg, batch: int, length: int, itemsize: int, form: str = "absorbed",
                         use_mtp: bool = False) -> int:
    """Bytes of the zeroed caches ``generate`` allocates (``init_cache``): every layer, plus the
    MTP module's one layer when ``use_mtp``; computed from the config, nothing allocated."""
    per_token = cfg.kv_cache_bytes_per_token(itemsize, absorbed=form == "absorbed")
    if use_mtp:
        per_token += per_token / cfg.num_hidden_layers
    return int(per_token * batch * length)


# ------------------------------------------------------------------ compiled steps
def _merge(graphdef, treedef, leaves) -> DeepseekModel:
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _step_fn(graphdef, treedef, leaves, tokens, positions, cache):
    """Run tokens [B, T] at positions [B, T] through the cached model: (logits, hidden, cache)."""
    model = _merge(graphdef, treedef, leaves)
    out = forward(model, tokens, positions, cache)
    return out.logits, out.hidden, out.cache


def _prefill_fn(graphdef, treedef, leaves, tokens, positions, cache, last):
    """Prefill tokens [B, T] (positions 0..T-1) into an empty cache: (logits [B, V] at index
    ``last`` [B] of each sequence, hidden [B, T, D], cache). Attention runs within the prompt in
    the naive (expanded) MLA form -- DeepSeek's prefill form, cheaper than the latent form when
    every key is new -- instead of over all S cache slots, and the LM head only at ``last``."""
    model = _merge(graphdef, treedef, leaves)
    out = forward(model, tokens, positions, cache, mla_form="naive", chunk_only=True, logits_at=last)
    return out.logits, out.hidden, out.cache


def _decode_fn(graphdef, treedef, leaves, tokens, positions, cache, key, temperature, top_p, greedy: bool, top_k: int):
    """One decode step fused with sampling: one dispatch per generated token."""
    model = _merge(graphdef, treedef, leaves)
    out = forward(model, tokens, positions, cache)
    return _pick(out, key, temperature, top_p, greedy, top_k)


def _pick(out, key, temperature, top_p, greedy, top_k):
    cache, last = out.cache, out.logits[:, -1]
    nxt = jnp.argmax(last, -1).astype(jnp.int32) if greedy else sample(last, key, temperature, top_k, top_p)
    return nxt, cache


def _mtp_fn(graphdef, treedef, leaves, next_tokens, hidden, positions, cache):
    model = _merge(graphdef, treedef, leaves)
    out = mtp_logits(model, next_tokens, hidden, positions, cache=cache)
    return out.logits, out.cache


_CACHE_ARG = {"donate_argnames": ("cache",)}


def _unrolled_prefill_fn(layout, weights, tokens, positions, cache, last):
    out = unrolled.forward(layout, weights, tokens, positions, cache, mla_form="naive", chunk_only=True,
                           logits_at=last)
    return out.logits, out.hidden, out.cache


def _unrolled_decode_fn(layout, weights, tokens, positions, cache, key, temperature, top_p, greedy: bool, top_k: int):
    return _pick(unrolled.forward(layout, weights, tokens, positions, cache), key, temperature, top_p, greedy, top_k)


@dataclass(frozen=True)
class _Steps:
    """The jitted steps of one model structure; each takes (leaves, ...) with the cache donated,
    leaves being the model state's flat list of arrays (``compiled_steps``)."""

    step: object
    prefill: object
    decode: object
    mtp: object


@lru_cache(maxsize=16)
def _steps_for(graphdef, treedef) -> _Steps:
    """The compiled steps with the model structure bound, built once per structure.

    Passed as a static jit argument instead, the NNX GraphDef is hashed and compared at
    every call: the Python side of a small-v3 decode step took 2-3 ms that way against
    ~1 ms bound (2-core EPYC; the step itself computes for ~25-30 ms), paid before each
    step can start since the next token comes back to the host first. The state goes in
    as its flat list of arrays: flattening the NNX State (one Python call per variable;
    ~800 in small-v3 with per-expert weights) cost another ~1 ms per step.
    """
    return _Steps(step=jax.jit(partial(_step_fn, graphdef, treedef), **_CACHE_ARG),
                  prefill=jax.jit(partial(_prefill_fn, graphdef, treedef), **_CACHE_ARG),
                  decode=jax.jit(partial(_decode_fn, graphdef, treedef), static_argnames=("greedy", "top_k"),
                                 **_CACHE_ARG),
                  mtp=jax.jit(partial(_mtp_fn, graphdef, treedef), **_CACHE_ARG))


@lru_cache(maxsize=16)
def _unrolled_steps_for(graphdef, treedef, layout) -> _Steps:
    """The prefill and decode steps with the layers unrolled (reference/unrolled.py); they take
    the split weights instead of the state leaves. The others (step, mtp) stay the scan's."""
    scan = _steps_for(graphdef, treedef)
    return _Steps(step=scan.step,
                  prefill=jax.jit(partial(_unrolled_prefill_fn, layout), **_CACHE_ARG),
                  decode=jax.jit(partial(_unrolled_decode_fn, layout), static_argnames=("greedy", "top_k"),
                                 **_CACHE_ARG),
                  mtp=scan.mtp)


LAYER_MODES = ("scan", "unrolled")


def compiled_steps(model: DeepseekModel, layers: str = "scan") -> tuple[_Steps, list]:
    """(the jitted steps of this model's structure, what their first argument takes: the flat
    state leaves, or with layers='unrolled' the split weights of reference/unrolled.py for the
    prefill and decode steps -- the step and mtp functions always take the leaves)."""
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    if layers == "unrolled":
        return _unrolled_steps_for(graphdef, treedef, unrolled.Layout.of(model)), unrolled.split_weights(model)
    return _steps_for(graphdef, treedef), leaves


@partial(jax.jit, static_argnames=("top_k",))
def sample(logits, key, temperature, top_k: int, top_p):
    """Next token from logits [B, V]: greedy when temperature == 0, else temperature,
    then top-k (0 = off), then nucleus top-p (1 = off) sampling."""
    greedy = jnp.argmax(logits, -1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    # keep the smallest prefix whose mass reaches top_p (always the first token)
    keep_sorted = ((jnp.cumsum(probs, -1) - probs) < top_p).at[..., 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    scaled = jnp.where(keep, scaled, -jnp.inf)
    drawn = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


# ------------------------------------------------------------------ generation
@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (prompt excluded, stop token included)
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    new_tokens: int
    steps: int
    mtp_accepted: int = 0
    mtp_drafted: int = 0
    # measure_compile=True: seconds spent tracing, lowering and compiling each step before the
    # clock started (prefill_s and decode_s then exclude compilation); None otherwise
    compile_s: dict[str, float] | None = None
    first_step_s: float = 0.0  # the first decode step (includes first-execution costs)
    steady_s: float = 0.0  # from the end of the first decode step to the end of decoding
    steady_tokens: int = 0  # tokens produced by the decode steps after the first

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        # tokens produced by decode steps (the first new token comes from the prefill)
        n = self.new_tokens - len(self.tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def steady_decode_tokens_per_s(self) -> float | None:
        """Tokens/s of the decode steps after the first (the first compiles, when nothing was
        compiled ahead, and pays first-execution costs); None with fewer than two steps."""
        return self.steady_tokens / self.steady_s if self.steady_tokens and self.steady_s > 0 else None

    @property
    def acceptance_rate(self) -> float | None:
        return self.mtp_accepted / self.mtp_drafted if self.mtp_drafted else None


def _prefill_inputs(prompts, S, form, model):
    """(tokens [B, T] padded, lengths, the prefill's arguments after the state)."""
    B = len(prompts)
    lens = np.array([len(p) for p in prompts])
    T = bucket(int(lens.max()))
    toks = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        toks[b, : len(p)] = p
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    cache = init_cache(model, B, S, form)
    mesh = current_mesh()
    if mesh is not None:  # split the batch (the caches' dim 1) over the mesh's data and expert axes
        cache = jax.tree.map(lambda a: place_batch(a, mesh, 1), cache)
    return toks, lens, (place_batch(jnp.asarray(toks), mesh), place_batch(jnp.asarray(pos), mesh), cache,
                        jnp.asarray(lens - 1, jnp.int32))


def _compile_now(fn, *args, **static) -> tuple[float, object]:
    """Trace, lower and compile the jitted ``fn`` for these arguments now: (seconds, the output
    ShapeDtypeStructs). jit keeps the executable, so the call that follows with arguments of the
    same shapes runs without compiling (its first execution still pays one-time costs: ~0.15 s
    on tiny-v3's prefill against 8 ms later). Nothing is executed and donated arguments stay valid."""
    t = time.perf_counter()
    lowered = fn.lower(*args, **static)
    lowered.compile()
    return time.perf_counter() - t, lowered.out_info


def _zeros_like(s):
    return jnp.zeros(s.shape, s.dtype)


SEED_MAX = 2**63 - 1  # jax.random.key takes a C long


def check_sampling(*, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> None:
    """ValueError naming the first invalid sampling setting: temperature finite and >= 0 (0 =
    greedy), top_k an integer >= 0 (0 = off), top_p in (0, 1] (1 = off), seed in [0, 2**63)."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    try:
        t, p = float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise ValueError(f"temperature and top_p must be numbers, got {temperature!r}, {top_p!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
    if not (0 < p <= 1):  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")


def generate(model: DeepseekModel, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens=(), form: str = "absorbed",
             use_mtp: bool = False, on_token=None, measure_compile: bool = False,
             layers: str = "scan", mesh=None) -> GenerationResult:
    """Generate for a batch of prompts (lists of ids, any lengths). Seeded and reproducible.

    on_token(batch_index, token_id) is called as tokens are produced (streaming).
    use_mtp: self-speculative decoding with the MTP module (greedy only): the MTP
    head drafts one token, the main model verifies it together with the next one.
    measure_compile: compile the prefill, sampling and decode steps for these shapes before
    the clock starts and report the seconds each took in ``compile_s`` (a step already
    compiled in this process, or found in JAX's persistent cache, takes little); prefill_s
    and decode_s then time execution only.
    layers: "scan" (one compiled body per layer kind: compile time independent of depth) or
    "unrolled" (reference/unrolled.py: weights read in place, faster decode on XLA:CPU,
    compile time growing with layers x experts; plain decoding only, not with use_mtp).
    mesh: a ``jax.sharding.Mesh`` (reference/mesh.py) the model's weights were placed on
    (``shard_model`` or ``load_sharded``): the batch is split over its data and expert axes
    (padded with copies of the last prompt to a multiple of their product; the copies are
    dropped from the result) and the MoE runs expert parallel.
    """
    if mesh is not None:
        return _generate_on_mesh(model, prompts, max_new_tokens, mesh, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, stop_tokens=stop_tokens, form=form, use_mtp=use_mtp,
                                 on_token=on_token, measure_compile=measure_compile, layers=layers)
    if layers not in LAYER_MODES:
        raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    V = model.cfg.vocab_size
    if any(t < 0 or t >= V for p in prompts for t in p):
        raise ValueError(f"token ids must be in [0, vocab_size={V})")
    if use_mtp:
        if layers != "scan":
            raise ValueError("MTP self-speculative decoding runs the layer scan (layers='scan')")
        if temperature > 0:
            raise ValueError("MTP self-speculative decoding is implemented for greedy decoding (temperature 0)")
        if not len(model.mtp):
            raise ValueError("use_mtp needs a model loaded with its MTP module (with_mtp=True)")
        return _generate_mtp(model, prompts, max_new_tokens, stop_tokens, form, on_token, measure_compile)
    if top_k >= V:  # keeps every token: the same as off (and lax.top_k needs k <= V)
        top_k = 0
    fns, state = compiled_steps(model, layers)
    B = len(prompts)
    stop = set(int(s) for s in stop_tokens)
    S = kv_cache_length(max(len(p) for p in prompts), max_new_tokens)
    key = jax.random.key(seed)
    toks, lens, pargs = _prefill_inputs(prompts, S, form, model)
    compiled = None
    if measure_compile:
        compiled = {}
        compiled["prefill"], (logits_s, _, _) = _compile_now(fns.prefill, state, *pargs)
        compiled["sample"], _ = _compile_now(sample, _zeros_like(logits_s), key, temperature, top_k, top_p)
        one = jnp.zeros((B, 1), jnp.int32)  # the empty cache stands for the prefilled one (same shapes)
        compiled["decode"], _ = _compile_now(fns.decode, state, one, one, pargs[2], key,
                                             temperature, top_p, greedy=temperature <= 0, top_k=top_k)
    t0 = time.perf_counter()
    last, _, cache = fns.prefill(state, *pargs)
    key, sub = jax.random.split(key)
    nxt = fetch(sample(last, sub, temperature, top_k, top_p))
    t1 = time.perf_counter()
    out = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    pos = lens.copy()
    steps = 0
    t_first = t1
    emitted = []  # tokens emitted per round: the prefill's, then each decode step's
    while True:
        emitted.append(int((~done).sum()))
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
                if on_token:
                    on_token(b, int(nxt[b]))
                done[b] = int(nxt[b]) in stop or len(out[b]) >= max_new_tokens
        if done.all():
            break
        key, sub = jax.random.split(key)
        nxt, cache = fns.decode(state, jnp.asarray(nxt[:, None]), jnp.asarray(pos[:, None].astype(np.int32)),
                                  cache, sub, temperature, top_p, greedy=temperature <= 0, top_k=top_k)
        nxt = fetch(nxt)  # waits for the step: the next token is back on the host (every process's)
        pos = pos + 1
        steps += 1
        if steps == 1:
            t_first = time.perf_counter()
    t2 = time.perf_counter()
    return GenerationResult(out, t1 - t0, t2 - t1, int(lens.sum()), sum(map(len, out)), steps,
                            compile_s=compiled, first_step_s=t_first - t1 if steps else 0.0,
                            steady_s=t2 - t_first if steps > 1 else 0.0, steady_tokens=sum(emitted[2:]))


def _generate_on_mesh(model, prompts, max_new_tokens, mesh, *, on_token=None, layers="scan", **kw):
    """``generate`` with the batch padded to the mesh's batch split, under ``jax.set_mesh``."""
    if layers != "scan":
        raise ValueError("layers='unrolled' runs on one device; on a mesh use the layer scan")
    B = len(prompts)
    padded = list(prompts) + [prompts[-1]] * (padded_batch(B, mesh) - B) if prompts else []

    def real(b, t):  # padding rows are not the caller's
        if on_token and b < B:
            on_token(b, t)

    with jax.set_mesh(mesh):
        r = generate(model, padded, max_new_tokens, on_token=real, **kw)
    drop = r.tokens[B:]
    extra = sum(len(p) for p in padded[B:])
    return dataclasses.replace(r, tokens=r.tokens[:B], prompt_tokens=r.prompt_tokens - extra,
                               new_tokens=r.new_tokens - sum(map(len, drop)))


def _generate_mtp(model, prompts, max_new_tokens, stop_tokens, form, on_token,
                  measure_compile: bool = False) -> GenerationResult:
    """Greedy self-speculative decoding with MTP depth 0 (see module docstring).

    Invariant per sequence b: tokens x_0..x_{n-1} are in the main cache, x_n (the last
    emitted token) is not yet, and d is the MTP draft for x_{n+1}. A step runs the
    main model on [x_n, d] at [n, n+1]: its prediction y at n is the true x_{n+1};
    if y == d the prediction at n+1 is x_{n+2} too (two tokens for one step). The
    MTP module then consumes (h_n, x_{n+1}) and (h_{n+1}, x_{n+2}) and drafts again.
    A rejected draft leaves junk at position n+1 that the next step overwrites.
    """
    fns, state = compiled_steps(model)
    B = len(prompts)
    stop = set(int(s) for s in stop_tokens)
    S = kv_cache_length(max(len(p) for p in prompts), max_new_tokens, use_mtp=True)
    bidx = np.arange(B)
    toks, lens, pargs = _prefill_inputs(prompts, S, form, model)
    T = toks.shape[1]
    pos_all = jnp.asarray(np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)))
    mcache = init_cache(model, B, S, form, layers=1)
    compiled = None
    if measure_compile:
        compiled = {}
        compiled["prefill"], (_, hidden_s, _) = _compile_now(fns.prefill, state, *pargs)
        compiled["mtp_prefill"], _ = _compile_now(fns.mtp, state, pargs[0], _zeros_like(hidden_s), pos_all, mcache)
        two = jnp.zeros((B, 2), jnp.int32)
        compiled["decode"], (_, hidden2_s, _) = _compile_now(fns.step, state, two, two, pargs[2])
        compiled["mtp_decode"], _ = _compile_now(fns.mtp, state, two, _zeros_like(hidden2_s), two, mcache)
    t0 = time.perf_counter()
    logits, hidden, cache = fns.prefill(state, *pargs)
    x_n = fetch(jnp.argmax(logits, -1)).astype(np.int32)  # logits at each prompt's last position
    # MTP prefill: position t pairs h_t with x_{t+1} (x_n appended after the prompt)
    nxt_toks = np.zeros_like(toks)
    nxt_toks[:, :-1] = toks[:, 1:]
    nxt_toks[bidx, lens - 1] = x_n
    mlog, mcache = fns.mtp(state, jnp.asarray(nxt_toks), hidden, pos_all, mcache)
    draft = fetch(jnp.argmax(mlog, -1))[bidx, lens - 1].astype(np.int32)
    t1 = time.perf_counter()
    out = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    n = lens.copy()  # position of x_n

    def emit(b, t):
        if not done[b]:
            out[b].append(int(t))
            if on_token:
                on_token(b, int(t))
            done[b] = int(t) in stop or len(out[b]) >= max_new_tokens

    for b in range(B):
        emit(b, x_n[b])
    steps = accepted = drafted = 0
    t_first, steady_from = t1, 0
    while not done.all():
        if steps == 1:
            t_first, steady_from = time.perf_counter(), sum(map(len, out))
        pos = np.stack([n, n + 1], 1).astype(np.int32)
        logits, hidden, cache = fns.step(state, jnp.asarray(np.stack([x_n, draft], 1)), jnp.asarray(pos), cache)
        pred = fetch(jnp.argmax(logits, -1)).astype(np.int32)  # [B, 2]
        ok = pred[:, 0] == draft
        steps += 1
        drafted += int((~done).sum())
        accepted += int((ok & ~done).sum())
        for b in range(B):
            emit(b, pred[b, 0])
            if ok[b]:
                emit(b, pred[b, 1])
        # next x_n: pred[:,1] if accepted (at n+2) else pred[:,0] (at n+1)
        new_x = np.where(ok, pred[:, 1], pred[:, 0]).astype(np.int32)
        m_in = np.stack([pred[:, 0], np.where(ok, pred[:, 1], 0)], 1).astype(np.int32)
        mlog, mcache = fns.mtp(state, jnp.asarray(m_in), hidden, jnp.asarray(pos), mcache)
        draft = fetch(jnp.argmax(mlog, -1))[bidx, ok.astype(np.int64)].astype(np.int32)
        n = n + 1 + ok
        x_n = new_x
    t2 = time.perf_counter()
    return GenerationResult(out, t1 - t0, t2 - t1, int(lens.sum()), sum(map(len, out)), steps,
                            mtp_accepted=accepted, mtp_drafted=drafted, compile_s=compiled,
                            first_step_s=(t_first if steps > 1 else t2) - t1 if steps else 0.0,
                            steady_s=t2 - t_first if steps > 1 else 0.0,
                            steady_tokens=sum(map(len, out)) - steady_from if steps > 1 else 0)
