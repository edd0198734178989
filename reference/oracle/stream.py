"""Golden dumps of checkpoints larger than memory: the reference run one decoder layer at a time.

``dsref golden --stream`` (docs/oracle.md, "Streaming golden dumps"). The in-memory golden
(golden.run_reference) reads every weight first; here the checkpoint stays memory-mapped
(checkpoint.LayerReader) and, for each decoder layer, only that layer's tensors are read
(FP8 dequantized for that layer only), the layer runs on the hidden states of the whole
token batch, its outputs are captured and its weights dropped before the next layer.

* Embedding: only the rows of the token ids present are read.
* LM head: float32 applies it in vocabulary chunks; float64 in one piece (the V3 head is
  129280 x 7168, 7.4 GB in float64), since chunking changes the last bit (see _run64).
* float64: reference.numpy_ref's own functions, on the same values in the same order as
  the in-memory float64 golden, so the dump is bit-identical to it (tests/test_stream_golden.py).
  Routed experts are read one expert at a time, and only the experts the router chose
  (numpy_ref.moe indexes the stack per used expert): a V3 MoE layer then needs 1.9 GB of
  float64 plus 0.35 GB per expert in use, not 93 GB (the largest layer is the dense layer 0,
  4.7 GB; the head, 7.4 GB, is the largest step: docs/oracle.md has the formula).
* float32: the JAX model's ``decoder_layer`` jitted on one layer's weights (a dict; routed
  experts stacked [E, ...] in float32, as the model wants them: one V3 MoE layer is 46 GB).
  It matches the in-memory float32 golden to float32 rounding (XLA compiles one layer at a
  time instead of the whole model); bit for bit is not guaranteed (it was on the benchmark).
* DeepSeek-V4 (float64 only): checkpoint_v4.V4LayerReader reads by layer, numpy_v4's own functions
  run on the n hyper-connection streams, routed experts read only when numpy_v4.moe indexes one;
  bit-identical to golden.run_reference_v4's float64 dump (tests/test_stream_golden_v4.py). Not
  float32 yet: a per-layer path (model_v4.decoder_layer jitted per layer, as _run32) is not written.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dsref.reference.checkpoint import ExpertStack, LayerReader, read_config
from dsref.reference.config import ModelConfig
from dsref.reference.oracle import golden
from dsref.reference.params import EMBED, FINAL_NORM, head_name

HEAD_CHUNK_BYTES = 256 * 2**20  # one vocabulary chunk of the float32 LM head


class _Experts64:
    """An ExpertStack seen as float64: ``[e]`` reads expert e and widens it (what numpy_ref.moe indexes)."""

    def __init__(self, stack: ExpertStack, reader: LayerReader):
        self.stack, self.shape, self.reader = stack, stack.shape, reader

    def __getitem__(self, e) -> np.ndarray:
        a = np.asarray(self.stack[e], np.float64)
        # unmap the pages just read: else every used expert's file pages stay in this process's
        # resident set until the layer ends (11.5 GB of FP8 for a V3 layer when all are used)
        self.reader.release()
        return a


def _weights64(reader: LayerReader, i: int) -> dict[str, Any]:
    """Layer i's weights in float64, each widened as it is read (the stored copy is dropped before
    the next is read); routed experts stay on disk until numpy_ref.moe asks for one."""
    return {k: _Experts64(v, reader) if isinstance(v, ExpertStack) else np.asarray(v, np.float64)
            for k, v in reader.layer(i)}


def _embedding_rows(reader: LayerReader, tokens: np.ndarray):
    """(rows of the embedding for the distinct ids, tokens renumbered into those rows)."""
    ids, inverse = np.unique(tokens, return_inverse=True)
    return reader.rows(EMBED, ids), inverse.reshape(tokens.shape)


def _head_chunks(cfg: ModelConfig, itemsize: int):
    """(first, last) vocabulary rows of each LM-head chunk."""
    step = max(1, HEAD_CHUNK_BYTES // (itemsize * cfg.hidden_size))
    return [(v, min(v + step, cfg.vocab_size)) for v in range(0, cfg.vocab_size, step)]


class _Progress:
    """One tqdm bar over the model's steps on stderr (tqdm is what `dsref validate` uses)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.times: list[tuple[str, float]] = []
        self.t0 = time.perf_counter()
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="layer", file=sys.stderr, desc="golden --stream")

    def step(self, what: str) -> None:
        t = time.perf_counter()
        self.times.append((what, t - self.t0))
        self.t0 = t
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run64(reader: LayerReader, cfg: ModelConfig, tokens: np.ndarray, mtp: bool, prog: _Progress):
    """numpy_ref.forward (+ mtp_forward), layer by layer; same operations on the same values."""
    from dsref.reference import numpy_ref as nr
    f64 = np.float64
    B, T = tokens.shape
    positions = np.broadcast_to(np.arange(T), (B, T))
    table, local = _embedding_rows(reader, tokens)
    table = np.asarray(table, f64)  # widening is elementwise: rows of the widened table
    h = table[local]
    cap: dict[str, Any] = {}
    for i in range(cfg.num_hidden_layers):
        w = _weights64(reader, i)
        h = nr.decoder_layer(h, w, cfg, i, positions, cap)
        del w
        reader.release()
        prog.step(f"layer {i}")
    hn = nr.rms_norm(h, np.asarray(reader.tensor(FINAL_NORM), f64), cfg.rms_norm_eps)
    final = {"logits": hn}  # what the head is applied to (once read, for both)
    if mtp:
        w = _weights64(reader, cfg.num_hidden_layers)
        w[EMBED] = table  # mtp_hidden gathers Emb(t+1) from it with the renumbered ids
        final[golden.MTP_LOGITS] = nr.mtp_hidden(local, hn, w, cfg)
        del w
        reader.release()
        prog.step("mtp")
    # The LM head in one matmul, not in vocabulary chunks: BLAS rounds a chunked product
    # differently in the last bit (measured: logits differ for 7-, 100- and 333-row chunks) and
    # float64 must be bit-identical to the in-memory golden. So the head, vocab x hidden x 8
    # bytes (7.4 GB for V3), is the float64 stream's largest single allocation.
    head = np.asarray(reader.tensor(head_name(cfg)), f64)
    reader.release()  # its stored pages, before the matmul
    out = {k: nr.linear(x, head) for k, x in final.items()}
    del head
    prog.step("lm head")
    return {**out, **cap}


# ------------------------------------------------------------------ float32 (JAX)
def _jax_layer(cfg: ModelConfig, i: int):
    """decoder_layer under jit for the kind of layer i (the index only picks dense vs MoE,
    as in model.run_stack, which passes a stack's first index for all of its layers)."""
    import jax

    from dsref.reference import model as m
    from dsref.reference.weights import F32

    def run(w, h, positions):
        cap: dict[str, Any] = {}
        h, _ = m.decoder_layer(w, cfg, i, h, positions, prec=m._mm(F32), capture=cap)
        return h, cap
    return jax.jit(run)


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """float32 array whose data starts on a 64-byte boundary: jax.device_put on CPU then uses the
    buffer in place instead of copying it (measured with jax 0.10: a 16-byte aligned array is
    copied), so a layer's expert stacks are held once, not twice, while they are handed over."""
    n = int(np.prod(shape))
    buf = np.empty(n + 16, np.float32)
    off = (-buf.ctypes.data % 64) // 4
    return buf[off:off + n].reshape(shape)


def _weights32(reader: LayerReader, i: int) -> dict[str, Any]:
    """Layer i's weights relative to 'model.layers.{i}.', float32, routed experts stacked."""
    import jax
    pre = f"model.layers.{i}."
    out = {}
    for k, v in reader.layer(i):
        if isinstance(v, ExpertStack):  # one expert at a time into the stack (never two copies)
            a = _aligned_empty(v.shape)
            for e in range(len(v)):
                a[e] = v[e]
                reader.release()  # one expert's file pages mapped at a time (see _Experts64)
        else:
            a = np.array(v, np.float32)  # a copy: never a device array aliasing a memory map
        out[k.removeprefix(pre)] = jax.device_put(a)
        del a, v
    return out


def _run32(reader: LayerReader, cfg: ModelConfig, tokens: np.ndarray, mtp: bool, prog: _Progress):
    import jax
    import jax.numpy as jnp

    from dsref.reference import model as m
    from dsref.reference.weights import F32
    prec = m._mm(F32)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    table, local = _embedding_rows(reader, tokens)
    table = jnp.asarray(np.asarray(table, np.float32))
    h = table[jnp.asarray(local)]
    cap: dict[str, Any] = {}
    fns: dict[bool, Any] = {}
    for i in range(cfg.num_hidden_layers):
        moe = cfg.is_moe_layer(i)
        fn = fns.get(moe) or fns.setdefault(moe, _jax_layer(cfg, i))
        w = _weights32(reader, i)
        reader.release()  # the layer is copied out: unmap the pages its reads touched
        h, c = fn(w, h, positions)
        cap.update({f"layers.{i}.{k}": np.asarray(v) for k, v in c.items()})
        del w
        prog.step(f"layer {i}")
    hn = m.rms_norm(h, jnp.asarray(np.asarray(reader.tensor(FINAL_NORM), np.float32)), cfg.rms_norm_eps)
    final = {"logits": hn}
    if mtp:
        L = cfg.num_hidden_layers
        w = _weights32(reader, L)
        reader.release()

        @jax.jit
        def front(w, emb, hm):
            # model.mtp_logits up to its shared_head norm (it takes a whole DeepseekModel; here
            # the weights of one module are a dict): same functions, same order.
            x = jnp.concatenate([m.rms_norm(emb, w["enorm.weight"], cfg.rms_norm_eps),
                                 m.rms_norm(hm, w["hnorm.weight"], cfg.rms_norm_eps)], axis=-1)
            x = m.linear(x, w["eh_proj.weight"], prec)
            pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            x, _ = m.decoder_layer(w, cfg, L, x, pos, prec=prec)
            return m.rms_norm(x, w["shared_head.norm.weight"], cfg.rms_norm_eps)
        final[golden.MTP_LOGITS] = front(w, table[jnp.asarray(local[:, 1:])], hn[:, :-1])
        del w
        prog.step("mtp")
    out = _head32(reader, cfg, final)
    prog.step("lm head")
    return {**out, **cap}


def _head32(reader: LayerReader, cfg: ModelConfig, final: dict[str, Any]) -> dict[str, np.ndarray]:
    """The LM head on each of ``final``'s hidden states, one vocabulary chunk of it read at a time."""
    import jax
    import jax.numpy as jnp

    from dsref.reference import model as m
    from dsref.reference.weights import F32
    head = jax.jit(lambda x, w: m.linear(x, w, m._mm(F32)).astype(F32))
    out = {k: np.empty((*x.shape[:-1], cfg.vocab_size), np.float32) for k, x in final.items()}
    for a, b in _head_chunks(cfg, 4):
        w = jnp.asarray(np.asarray(reader.rows(head_name(cfg), np.arange(a, b)), np.float32))
        for k, x in final.items():
            out[k][..., a:b] = np.asarray(head(x, w))
        reader.release()
    return out


# ------------------------------------------------------------------ DeepSeek-V4 (float64)
def _weights64_v4(reader, i: int) -> dict[str, Any]:
    """Layer i (or MTP module i - L) of a V4 checkpoint as golden.run_reference_v4 holds it: floats
    widened to float64 as each is read, tid2eid int64; routed experts stay on disk (_Experts64V4)."""
    from dsref.reference.checkpoint_v4 import V4ExpertStack
    return {k: _Experts64V4(v, reader) if isinstance(v, V4ExpertStack)
            else v if v.dtype.kind in "iu" else np.asarray(v, np.float64) for k, v in reader.layer(i)}


class _Experts64V4:
    """A V4ExpertStack seen as float64: ``[e]`` reads expert e and widens it (numpy_v4.moe indexes
    gate_up_proj[e] and down_proj[e] for each expert some token chose, one at a time)."""

    def __init__(self, stack, reader):
        self.stack, self.shape, self.reader = stack, stack.shape, reader

    def __getitem__(self, e) -> np.ndarray:
        a = np.asarray(self.stack[e], np.float64)
        self.reader.release()  # as _Experts64: one expert's file pages mapped at a time
        return a


def _run64_v4(reader, cfg, tokens: np.ndarray, mtp: bool, prog: _Progress) -> dict[str, np.ndarray]:
    """golden.run_reference_v4's float64 dump (numpy_v4.forward + numpy_v4.mtp), layer by layer:
    numpy_v4's own functions on the same float64 values in the same order, so bit-identical."""
    from dsref.reference import numpy_v4 as nv
    from dsref.reference.params_v4 import EMBED as EMBED_V4
    from dsref.reference.params_v4 import FINAL_NORM as NORM_V4
    from dsref.reference.params_v4 import HEAD as HEAD_V4
    f64, L = np.float64, cfg.num_hidden_layers
    B, T = tokens.shape
    positions = np.broadcast_to(np.arange(T), (B, T))
    ids, inverse = np.unique(tokens, return_inverse=True)
    table = np.asarray(reader.rows(EMBED_V4, ids), f64)  # widening is elementwise: rows of the widened table
    local = inverse.reshape(tokens.shape)
    h = np.repeat(table[local][:, :, None, :], cfg.hc_mult, axis=2)  # numpy_v4.forward's n streams
    cap: dict[str, Any] = {}
    for i in range(L):
        w = _weights64_v4(reader, i)
        h = nv.decoder_layer(h, w, cfg, i, tokens, positions, cap)  # the real ids: hash layers route by them
        del w
        reader.release()
        prog.step(f"layer {i}")
    glob = {k: np.asarray(reader.tensor(k), f64) for k in
            (NORM_V4, "model.hc_head.hc_fn", "model.hc_head.hc_base", "model.hc_head.hc_scale")}
    final = {"logits": nv.rms_norm(nv.hc_head(h, glob, cfg), glob[NORM_V4], cfg.rms_norm_eps)}
    if mtp:
        w = _weights64_v4(reader, L)
        # numpy_v4.mtp gathers Emb(t+1) from w[EMBED] with the ids it is given: the renumbered ids
        # into the rows read (they reach the block's router too, which never hashes in an MTP
        # module: config_v4.is_hash_layer). Its LM head here has no rows: the module's output
        # streams come back and the head is applied below, once read, as for the main logits
        # (so the head and an MTP block are never held together).
        w[EMBED_V4], w[HEAD_V4] = table, np.zeros((0, cfg.hidden_size), f64)
        _, x = nv.mtp(local, cap[f"layers.{L - 1}.hidden"], w, cfg, return_streams=True)
        p = "mtp.0."  # numpy_v4.mtp's last line, up to the head
        final[golden.MTP_LOGITS] = nv.rms_norm(nv.hc_head(x, w, cfg, p + "hc_head."), w[p + "norm.weight"],
                                               cfg.rms_norm_eps)
        del w, x
        reader.release()
        prog.step("mtp")
    # the head in one matmul, as numpy_v4.forward applies it (see _run64: chunks change the last bit)
    head = np.asarray(reader.tensor(HEAD_V4), f64)
    reader.release()
    out = {k: nv.linear(x, head) for k, x in final.items()}
    del head
    prog.step("lm head")
    logits = out.pop("logits")
    return golden.v4_dump(logits, {**cap, **out}, f64)


def _run_stream_v4(checkpoint: Path, tokens: np.ndarray, dtype: str, progress: bool):
    from dsref.reference.checkpoint_v4 import V4LayerReader
    if dtype != "float64":
        raise golden.OracleError(f"--stream on a DeepSeek-V4 checkpoint ({checkpoint}) runs the float64 NumPy "
                                 "reference only: use --dtype float64, or drop --stream")
    cfg = golden.read_any_config(checkpoint)
    golden.check_tokens(tokens, cfg)
    # as run_reference_v4: MTP modules read when the config has one and T >= 2, used if module 0 is stored
    maybe_mtp = cfg.num_nextn_predict_layers > 0 and np.shape(tokens)[1] >= 2
    reader = V4LayerReader(checkpoint, cfg, mtp=None if maybe_mtp else False)  # every header checked first
    mtp = maybe_mtp and golden.V4_MTP_PROBE in reader
    prog = _Progress(cfg.num_hidden_layers + 1 + int(mtp), progress)
    try:
        out = _run64_v4(reader, cfg, tokens, mtp, prog)
    finally:
        prog.close()
        reader.release()
    return out, prog.times


# ------------------------------------------------------------------ entry points
def run_stream(checkpoint: str | Path, tokens: np.ndarray, dtype: str = "float64", *,
               progress: bool = False) -> tuple[dict[str, np.ndarray], list[tuple[str, float]]]:
    """(dump tensors, [(step, seconds)]) of the reference on a checkpoint dir, layer by layer."""
    if dtype not in ("float32", "float64"):
        raise golden.OracleError(f"golden dtype must be float32 or float64, got {dtype!r}")
    checkpoint = Path(checkpoint)
    if golden.is_v4_checkpoint(checkpoint):
        return _run_stream_v4(checkpoint, tokens, dtype, progress)
    cfg = read_config(checkpoint)
    if cfg.arch != "deepseek" and dtype == "float32":
        raise golden.OracleError(f"{checkpoint}: {cfg.name} is not a DeepSeek MLA model; the float32 (JAX) "
                                 "reference runs DeepSeek only: use --dtype float64")
    golden.check_tokens(tokens, cfg)
    mtp = golden.wants_mtp(checkpoint, cfg, tokens)
    reader = LayerReader(checkpoint, cfg, with_mtp=mtp)  # every header checked before any data
    prog = _Progress(cfg.num_hidden_layers + 1 + int(mtp), progress)
    try:
        out = (_run64 if dtype == "float64" else _run32)(reader, cfg, tokens, mtp, prog)
    finally:
        prog.close()
        reader.release()
    if dtype == "float32":
        out = {k: v if v.dtype.kind in "iub" else v.astype(np.float32) for k, v in
               ((k, np.asarray(v)) for k, v in out.items())}
    return golden.canonicalize(out), prog.times


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM of /proc/self/status where there is one (ru_maxrss
    keeps the high-water mark of the process image before exec: a child of a 2 GB parent starts
    at 2 GB), else ru_maxrss (KiB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_stream_golden(checkpoint: str | Path, tokens: np.ndarray, out: str | Path, dtype: str = "float64", *,
                        progress: bool = False) -> Path:
    """write_golden's dump, computed layer by layer; metadata adds stream, peak RSS and step times."""
    cfg = golden.read_any_config(checkpoint)
    outputs, times = run_stream(checkpoint, tokens, dtype, progress=progress)
    extra = {"hidden_layout": golden.V4_HIDDEN_LAYOUT} if golden.is_v4_checkpoint(checkpoint) else {}
    meta = golden.golden_metadata(cfg, tokens, dtype, checkpoint=str(Path(checkpoint).name), **extra, stream=True,
                                  peak_rss_bytes=peak_rss_bytes(),
                                  step_seconds={k: round(v, 3) for k, v in times})
    return golden.write_dump(outputs, out, meta)
