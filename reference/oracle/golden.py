"""Golden dumps: the reference's outputs on one batch of token ids, in one safetensors file.

A *dump* is one safetensors file holding, for one batch of token ids [B, T]:

    logits                   [B, T, V]   final logits
    layers.{i}.attn_out      [B, T, D]   output of the attention block (after o_proj, before the residual add)
    layers.{i}.hidden        [B, T, D]   output of decoder layer i (residual stream after the MLP/MoE)
    layers.{i}.router_logits [B, T, E]   MoE layers: x W_gate (before sigmoid/softmax)
    layers.{i}.topk_ids      [B, T, k]   MoE layers: selected experts, sorted by expert id per token
    layers.{i}.topk_weights  [B, T, k]   MoE layers: their gate weights, in the same (sorted) order
    layers.{i}.index_ids     [B, T, k']  V3.2: the keys the lightning indexer selected for each query,
                                         ascending, -1 padded (k' = min(index_topk, T); a row with
                                         fewer visible keys selects them all)
    layers.{i}.index_tie     [B, T]      V3.2, reference only: the row's index_topk-th and next best
                                         scores are exactly equal (its selection is implementation-defined)
    layers.{i}.index_tie_keys [n, 3]     V3.2, reference only: (b, t, s) of every key tied at the
                                         boundary of a tie row: any of them may fill the selection

Sorting the top-k by expert id (and the index ids by position) makes dumps comparable across
engines (the order top-k kernels return is arbitrary). ``write_golden`` writes the reference's
dump; ``oracle.compare`` grades a candidate dump against it (see docs/oracle.md).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from dsref.reference.atomic import atomic_path
from dsref.reference.checkpoint import CheckpointError, read_config, read_safetensors_header, read_tensors
from dsref.reference.config import ModelConfig


class OracleError(ValueError):
    """Bad input to golden/compare (file, tensor or shape): names the file and the tensor."""


_LAYER_RE = re.compile(r"^layers\.(\d+)\.(\w+)$")  # layers.{i}.{kind}


# ------------------------------------------------------------------ metadata
def config_hash(cfg: ModelConfig) -> str:
    """sha256 of the canonical config JSON (HF field names, sorted keys; name and storage dtype left out).
    A ModelConfigV4 hashes the same way (its to_hf_dict: transformers' DeepseekV4Config spelling)."""
    d = cfg.to_hf_dict()
    for k in ("_dsref_name", "dtype", "torch_dtype"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("deepseek-ref", "jax", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover - source tree without install
            out[pkg] = "unknown"
    return out


# ------------------------------------------------------------------ inputs
def load_tokens(path: str | Path) -> np.ndarray:
    """Token ids [batch, seq] from a .npy file (never unpickled)."""
    p = Path(path)
    if not p.is_file():
        raise OracleError(f"{p}: no such tokens file")
    try:
        a = np.load(p, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise OracleError(f"{p}: tokens array holds Python objects (dtype=object); we never unpickle. "
                              "Save an integer array, e.g. np.save(path, np.asarray(ids, np.int32))") from None
        raise OracleError(f"{p}: not a .npy array ({e})") from None
    except (OSError, EOFError) as e:
        raise OracleError(f"{p}: not a .npy array ({e})") from None
    if not isinstance(a, np.ndarray):
        raise OracleError(f"{p}: expected one .npy array, got {type(a).__name__}")
    if a.dtype.kind not in "iu":
        raise OracleError(f"{p}: tokens must be an integer array, got dtype {a.dtype}")
    if a.ndim != 2 or a.size == 0:
        raise OracleError(f"{p}: tokens must have shape [batch, seq] (non-empty), got {a.shape}")
    return a.astype(np.int64)


def check_tokens(tokens: np.ndarray, cfg: ModelConfig, source: str = "tokens") -> None:
    """Token ids [batch, seq] the model can run: ids in [0, vocab_size), seq <= max_position_embeddings."""
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise OracleError(f"{source}: token ids must lie in [0, {cfg.vocab_size}) (vocab_size), "
                          f"got min {tokens.min()} max {tokens.max()}")
    seq = tokens.shape[-1]
    if seq > cfg.max_position_embeddings:
        raise OracleError(f"{source}: sequence length {seq} exceeds the model's max_position_embeddings "
                          f"{cfg.max_position_embeddings}; give at most {cfg.max_position_embeddings} tokens "
                          "per sequence")


# ------------------------------------------------------------------ running the reference
def canonicalize(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """numpy arrays; topk_ids/topk_weights sorted per token by expert id (ids int32); index_ids
    ascending with the -1 padding last (int32); a captured index_tied mask [B, T, S] turned into
    its index_tie_keys list [n, 3] (the dump stays small: ties are rare)."""
    out = {k: np.asarray(v) for k, v in outputs.items()}
    for name in list(out):
        m = _LAYER_RE.match(name)
        if m is not None and m.group(2) == "index_ids":
            ids = out[name].astype(np.int64)
            big = np.iinfo(np.int64).max
            ids = np.sort(np.where(ids < 0, big, ids), -1)
            out[name] = np.where(ids == big, -1, ids).astype(np.int32)
        if m is not None and m.group(2) == "index_tied" and out[name].ndim == 3:
            out[f"layers.{m.group(1)}.index_tie_keys"] = np.argwhere(out.pop(name)).astype(np.int32).reshape(-1, 3)
        if m is None or m.group(2) != "topk_ids":
            continue
        ids = out[name]
        order = np.argsort(ids, axis=-1, kind="stable")
        out[name] = np.take_along_axis(ids, order, -1).astype(np.int32)
        wname = f"layers.{m.group(1)}.topk_weights"
        if wname in out:
            out[wname] = np.take_along_axis(out[wname], order, -1)
    return out


def numpy_outputs(weights: dict[str, np.ndarray], cfg: ModelConfig, tokens: np.ndarray,
                  numerics: str = "exact") -> dict[str, np.ndarray]:
    """float64 NumPy reference with capture (weights: {our_name: array}); with the MTP module's
    logits ``mtp.0.logits`` [B, T-1, V] when the config has one and its weights are given.
    numerics: numpy_ref.mla's ('exact', the oracle, or V3.2's 'deepseek-fp8')."""
    from dsref.reference import numpy_ref
    cap: dict[str, Any] = {}
    kw = {} if numerics == "exact" else {"numerics": numerics}  # fault injections patch the plain form
    logits, hn = numpy_ref.forward(tokens, weights, cfg, capture=cap, return_hidden=True, **kw)
    if _has_mtp(cfg, weights.__contains__, tokens):
        cap[MTP_LOGITS] = numpy_ref.mtp_forward(tokens, hn, weights, cfg, **kw)
    return canonicalize({"logits": logits, **cap})


MTP_LOGITS = "mtp.0.logits"  # depth-0 MTP module: position t predicts token t+2 (dump name)


def _has_mtp(cfg: ModelConfig, has, tokens) -> bool:
    return (cfg.num_nextn_predict_layers > 0 and np.shape(tokens)[1] >= 2
            and has(f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"))


def _jax_capture(graphdef, state, tokens):
    from flax import nnx

    from dsref.reference.model import forward, mtp_logits
    cap: dict[str, Any] = {}
    model = nnx.merge(graphdef, state)
    out = forward(model, tokens, capture=cap)
    if len(model.mtp):
        cap[MTP_LOGITS] = mtp_logits(model, tokens[:, 1:], out.hidden[:, :-1]).logits
    return out.logits, cap


def _jit_capture(graphdef, state, tokens):
    import jax
    return jax.jit(_jax_capture, static_argnums=0)(graphdef, state, tokens)


def jax_outputs(model, tokens: np.ndarray, mesh=None) -> dict[str, np.ndarray]:
    """The JAX model's logits and per-layer captures, under jit (capture is returned as an output).
    mesh: the model's weights are on it (reference/mesh.py); the batch is split over its data and
    expert axes, padded with copies of the last row to a multiple of their product (dropped after)."""
    import contextlib

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsref.reference.mesh import fetch, padded_batch, place_batch
    B = tokens.shape[0]
    if mesh is not None:
        tokens = np.concatenate([tokens, np.repeat(tokens[-1:], padded_batch(B, mesh) - B, axis=0)])
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        logits, cap = _jit_capture(graphdef, state, place_batch(jnp.asarray(tokens), mesh))
    out = {"logits": fetch(logits)[:B].astype(np.float32)}
    for k, v in cap.items():
        v = fetch(v)[:B]
        out[k] = v if v.dtype.kind in "iub" else v.astype(np.float32)
    return canonicalize(out)


def jax_outputs_chunked(model, tokens: np.ndarray, chunk: int) -> dict[str, np.ndarray]:
    """``jax_outputs`` computed as an engine serving a long prompt does: prefilled ``chunk`` tokens at a
    time into the model's caches (absorbed MLA; each chunk attends to every cached key by position),
    the per-layer captures of the chunks concatenated along the sequence. No MTP logits."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsref.reference.decode import init_cache
    from dsref.reference.model import forward
    B, T = tokens.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tok, pos, cache):
        cap: dict[str, Any] = {}
        out = forward(nnx.merge(graphdef, state), tok, pos, cache, capture=cap)
        return out.logits, out.cache, cap
    cache = init_cache(model, B, T)
    parts: list[dict[str, np.ndarray]] = []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        pos = jnp.broadcast_to(jnp.arange(a, b), (B, b - a))
        logits, cache, cap = step(state, jnp.asarray(tokens[:, a:b]), pos, cache)
        parts.append({"logits": np.asarray(logits), **{k: np.asarray(v) for k, v in cap.items()}})
    out = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}
    return canonicalize({k: v if v.dtype.kind in "iub" else v.astype(np.float32) for k, v in out.items()})


def run_reference(checkpoint: str | Path, tokens: np.ndarray, dtype: str = "float32",
                  mesh=None, prefill_chunk: int | None = None, numerics: str = "exact") -> dict[str, np.ndarray]:
    """Dump of the reference on a checkpoint dir: float64 (NumPy) or float32/bfloat16 (JAX); the MTP
    module's logits too when the checkpoint has its weights. mesh (JAX dtypes only): the model is
    loaded shard by shard onto it (reference/sharded_load.py) and runs over it. prefill_chunk (JAX
    dtypes only): run the prompt through the caches that many tokens at a time (jax_outputs_chunked).
    numerics (float64 only): 'exact' (the oracle) or V3.2's 'deepseek-fp8' (numpy_ref.mla)."""
    checkpoint = Path(checkpoint)
    if is_v4_checkpoint(checkpoint):
        return run_reference_v4(checkpoint, tokens, dtype, mesh, prefill_chunk, numerics)
    cfg = read_config(checkpoint)
    check_tokens(tokens, cfg)
    mtp = wants_mtp(checkpoint, cfg, tokens)
    if mesh is not None and dtype == "float64":
        raise OracleError("--mesh runs the JAX reference (float32); float64 is the NumPy reference on one CPU")
    if prefill_chunk and (dtype == "float64" or mesh is not None):
        raise OracleError("a chunked prefill runs the JAX reference (float32 or bfloat16) on one device")
    if numerics != "exact" and dtype != "float64":
        raise OracleError(f"numerics {numerics!r} runs the float64 NumPy reference: use dtype float64")
    if dtype == "float64":
        from dsref.reference.numpy_ref import check_numerics
        try:
            check_numerics(cfg, numerics)
        except ValueError as e:
            raise OracleError(f"{checkpoint}: {e}") from None
        w = {k: np.asarray(v, np.float64) for k, v in read_tensors(checkpoint, cfg, with_mtp=mtp)}
        return numpy_outputs(w, cfg, tokens, numerics)
    import jax.numpy as jnp

    from dsref.reference.checkpoint import load_checkpoint
    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}.get(dtype)
    if jdt is None:
        raise OracleError(f"dtype must be float64, float32 or bfloat16, got {dtype!r}")
    if mesh is not None:
        from dsref.reference.sharded_load import load_sharded
        _, model = load_sharded(checkpoint, mesh, dtype=jdt, with_mtp=mtp)
    else:
        _, model = load_checkpoint(checkpoint, dtype=jdt, with_mtp=mtp and not prefill_chunk)
    if prefill_chunk:
        return jax_outputs_chunked(model, tokens, int(prefill_chunk))
    return jax_outputs(model, tokens, mesh)


def wants_mtp(checkpoint: str | Path, cfg: ModelConfig, tokens) -> bool:
    """Whether a golden dump has mtp.0.logits: the config has an MTP module, there are >= 2 tokens
    per sequence and the checkpoint stores the module's weights (also for oracle/stream.py)."""
    return cfg.num_nextn_predict_layers > 0 and np.shape(tokens)[1] >= 2 and _stores_mtp(Path(checkpoint), cfg)


def _stores_mtp(checkpoint: Path, cfg: ModelConfig) -> bool:
    """Whether the checkpoint has the MTP module's weights (many conversions drop them)."""
    from dsref.reference.checkpoint import INDEX_FILE, SINGLE_FILE
    name = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    idx = checkpoint / INDEX_FILE
    if idx.is_file():
        try:
            return name in json.loads(idx.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError):
            return False
    single = checkpoint / SINGLE_FILE
    return single.is_file() and name in read_safetensors_header(single)


# ------------------------------------------------------------------ DeepSeek-V4
# What ``layers.{i}.hidden`` is on V4. A V4 layer's output is not one [B, T, D] vector but hc_mult
# residual streams [B, T, n, D] (manifold-constrained hyper-connections). We dump all n streams,
# flattened stream-major to [B, T, n*D] (stream j is columns j*D..(j+1)*D, i.e. a plain reshape of
# the [B, T, n, D] tensor every V4 engine holds between layers), not a collapse of them: a mean or
# a pre-weighted sum would need the next layer's hc_pre weights (not what the engine stores) and
# would hide a bug that mixes the streams wrongly (e.g. comb read untransposed) when the streams
# still average the same. Rank 3 keeps the [B, T, ...] layout compare's token masks rely on.
V4_HIDDEN_LAYOUT = "hc_mult residual streams, [B, T, n, D] flattened stream-major to [B, T, n*D]"
# Capture keys of numpy_v4 / model_v4 left out of the dump: the MoE block's output before hc_post
# is an intermediate no other dump format has (attn_out's sibling); attn_out and the streams after
# it bracket it already.
_V4_NOT_DUMPED = ("mlp_out",)


def is_v4_checkpoint(checkpoint: str | Path) -> bool:
    from dsref.reference.config_v4 import is_v4_json
    return Path(checkpoint).is_dir() and is_v4_json(checkpoint)


def read_any_config(checkpoint: str | Path):
    """The checkpoint's config: ModelConfigV4 for a DeepSeek-V4 config.json (any of its spellings),
    else checkpoint.read_config's ModelConfig. Both have the fields check_tokens, config_hash and
    golden_metadata read (vocab_size, max_position_embeddings, name, to_hf_dict)."""
    if is_v4_checkpoint(checkpoint):
        from dsref.reference.config_v4 import ModelConfigV4
        return ModelConfigV4.from_json(checkpoint)
    return read_config(checkpoint)


def v4_dump(logits, capture: dict[str, Any], float_dtype) -> dict[str, np.ndarray]:
    """Dump tensors from a V4 forward's logits and capture (numpy_v4 / model_v4 keys): the hidden
    streams flattened (V4_HIDDEN_LAYOUT), floats in ``float_dtype``, ids and tie masks as they are,
    then canonicalize (expert ids sorted per token, index_tied -> index_tie_keys)."""
    out: dict[str, np.ndarray] = {"logits": np.asarray(logits).astype(float_dtype)}
    for k, v in capture.items():
        if k == MTP_LOGITS:  # the MTP module's logits [B, T-1, V] (run_reference_v4)
            out[k] = np.asarray(v).astype(float_dtype)
            continue
        m = _LAYER_RE.match(k)
        if m is None or m.group(2) in _V4_NOT_DUMPED:
            continue
        v = np.asarray(v)
        if m.group(2) == "hidden":
            v = v.reshape(*v.shape[:2], -1)
        out[k] = v if v.dtype.kind in "iub" else v.astype(float_dtype)
    return canonicalize(out)


def run_reference_v4(checkpoint: Path, tokens: np.ndarray, dtype: str = "float32", mesh=None,
                     prefill_chunk: int | None = None, numerics: str = "exact") -> dict[str, np.ndarray]:
    """run_reference for a DeepSeek-V4 checkpoint: float64 is numpy_v4.forward, float32/bfloat16
    model_v4 under jit, both on read_tensors_v4's weights (FP8/FP4 dequantized, any name set). With
    ``mtp.0.logits`` [B, T-1, V] (row t predicts token t+2: numpy_v4.mtp / model_v4.mtp_v4 on the
    streams after the last layer) when the config has an MTP module, T >= 2 and the checkpoint
    stores module 0's weights (in either name set; many conversions drop them), as V3's wants_mtp."""
    from dsref.reference.checkpoint_v4 import read_tensors_v4
    if mesh is not None or prefill_chunk:
        raise OracleError(f"{checkpoint}: DeepSeek-V4 runs on one device in one prefill (no --mesh, no chunked "
                          "prefill for V4 yet)")
    if numerics != "exact":
        raise OracleError(f"{checkpoint}: numerics {numerics!r} is DeepSeek-V3.2's; V4 has only 'exact'")
    if dtype not in ("float64", "float32", "bfloat16", "bf16"):
        raise OracleError(f"dtype must be float64, float32 or bfloat16, got {dtype!r}")
    cfg = read_any_config(checkpoint)
    check_tokens(tokens, cfg)
    # mtp=None: read the MTP modules the checkpoint holds (checked like every tensor), none if absent
    maybe_mtp = cfg.num_nextn_predict_layers > 0 and np.shape(tokens)[1] >= 2
    weights = read_tensors_v4(checkpoint, cfg, mtp=None if maybe_mtp else False)
    mtp = maybe_mtp and V4_MTP_PROBE in weights
    last = f"layers.{cfg.num_hidden_layers - 1}.hidden"  # the streams hc_head collapses: MTP's input
    if dtype == "float64":
        from dsref.reference import numpy_v4
        w = {k: v if v.dtype.kind in "iu" else np.asarray(v, np.float64) for k, v in weights.items()}
        cap: dict[str, Any] = {}
        logits = numpy_v4.forward(tokens, w, cfg, capture=cap)
        if mtp:
            cap[MTP_LOGITS] = numpy_v4.mtp(tokens, cap[last], w, cfg)
        return v4_dump(logits, cap, np.float64)
    import jax.numpy as jnp

    from dsref.reference.model_v4 import cast_weights, jit_forward_v4, jit_mtp_v4
    jdt = jnp.float32 if dtype == "float32" else jnp.bfloat16
    jw = cast_weights(weights, cfg, jdt, mtp=mtp)
    logits, cap = jit_forward_v4(jw, cfg, tokens, dtype=jdt, capture=True)
    if mtp:
        cap[MTP_LOGITS] = jit_mtp_v4(jw, cfg, tokens, cap[last], dtype=jdt)
    return v4_dump(logits, {k: np.asarray(v) for k, v in cap.items()}, np.float32)


#: A tensor every V4 MTP module 0 has (our name for it, whichever name set the checkpoint uses).
V4_MTP_PROBE = "mtp.0.e_proj.weight"


# ------------------------------------------------------------------ dump files
def write_dump(outputs: dict[str, np.ndarray], path: str | Path, metadata: dict[str, Any]) -> Path:
    from safetensors.numpy import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: np.ascontiguousarray(v) for k, v in canonicalize(outputs).items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    # Atomic: written beside the target, then renamed into place (a killed write leaves the old file).
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=meta)
    return path


def tokens_hash(tokens: np.ndarray) -> str:
    """sha256 of the token ids as little-endian int64 with their shape (same ids -> same hash)."""
    a = np.ascontiguousarray(np.asarray(tokens, "<i8"))
    return hashlib.sha256(json.dumps(list(a.shape)).encode() + a.tobytes()).hexdigest()


def golden_metadata(cfg: ModelConfig, tokens: np.ndarray, dtype: str, **extra) -> dict[str, Any]:
    return {"format": "dsref-dump-1", "config_hash": config_hash(cfg), "dtype": dtype, "model": cfg.name,
            "tokens_shape": list(tokens.shape), "tokens_sha256": tokens_hash(tokens), "versions": versions(),
            "topk_order": "sorted by expert id per token", **extra}


def write_golden(checkpoint: str | Path, tokens: np.ndarray, out: str | Path, dtype: str = "float32",
                 mesh=None, numerics: str = "exact") -> Path:
    """Run the reference and write its dump (see module docstring) with metadata; mesh: see
    ``run_reference`` (in a multi-process run every process computes, process 0 writes); numerics
    other than 'exact' is recorded in the metadata."""
    if dtype not in ("float32", "float64"):
        raise OracleError(f"golden dtype must be float32 or float64, got {dtype!r}")
    cfg = read_any_config(checkpoint)
    outputs = run_reference(checkpoint, tokens, dtype, mesh, numerics=numerics)
    extra = {} if mesh is None else {"mesh": ",".join(f"{a}={n}" for a, n in mesh.shape.items())}
    if is_v4_checkpoint(checkpoint):
        extra["hidden_layout"] = V4_HIDDEN_LAYOUT
    if numerics != "exact":
        extra["numerics"] = numerics
    import jax
    if mesh is not None and jax.process_index() != 0:
        return Path(out)
    return write_dump(outputs, out, golden_metadata(cfg, tokens, dtype, checkpoint=str(Path(checkpoint).name),
                                                    **extra))


def read_metadata(path: str | Path) -> dict[str, str]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n).decode("utf-8"))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def read_dump(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a dump file; OracleError names the file for every bad input."""
    p = Path(path)
    if not p.exists():
        raise OracleError(f"{p}: no such file")
    if not p.is_file():
        raise OracleError(f"{p}: not a file")
    try:
        infos = read_safetensors_header(p)
        meta = read_metadata(p)
    except CheckpointError as e:
        raise OracleError(f"{e} (not a safetensors dump?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, struct.error) as e:  # pragma: no cover - caught above
        raise OracleError(f"{p}: not a safetensors file ({e})") from None
    from dsref.reference.checkpoint import _ST_DTYPES
    mm = np.memmap(p, dtype=np.uint8, mode="r") if infos else None
    out = {}
    for name, info in infos.items():
        a = np.array(mm[info.start:info.end].view(_ST_DTYPES[info.dtype]).reshape(info.shape))
        out[name] = a
    return out, meta

