"""Hugging Face safetensors checkpoints: read (layer by layer, memory-mapped), write, FP8.

Layout on disk (what ``transformers`` 5.x ``save_pretrained`` writes for
DeepseekV3/V2, and what DeepSeek released): one ``model.safetensors`` or shards
named in ``model.safetensors.index.json`` (``weight_map``); routed experts one
tensor per expert, ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` [F, D].
Our layout (``reference.params``) stacks them: ``...mlp.experts.gate_proj.weight``
[E, F, D]. The fused layout transformers 5 holds in memory
(``mlp.experts.gate_up_proj`` [E, 2F, D], gate rows first, then up;
``mlp.experts.down_proj`` [E, D, F]) is read too, and written on request.

FP8 (DeepSeek-V3 release format): ``config.json`` carries ``quantization_config``
{quant_method "fp8", fmt "e4m3", weight_block_size [br, bc]}; each Linear weight
W [rows, cols] is stored as float8_e4m3fn next to ``<name>_scale_inv`` (float32)
of shape [ceil(rows/br), ceil(cols/bc)]; W = W_fp8 * scale_inv[block] (the last
block row/column may be partial). Embeddings, LM head, norms, the router
(gate.weight) and e_score_correction_bias stay in bf16/f32.

Why our own safetensors *reader*: the ``safetensors`` numpy backend (0.8) cannot
return BF16 or F8_E4M3 tensors (numpy has no such dtypes), and the torch backend
would make torch a dependency. The format is an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}} and raw little-endian
data, so we parse the header, check every offset against the file size (a
truncated file is reported before any data is touched) and view the data through
``np.memmap`` with ml_dtypes dtypes. Nothing is ever unpickled. Writing uses
``safetensors.numpy.save_file`` (it accepts ml_dtypes arrays), one shard at a time, into a
folder beside the target that then replaces it by rename (``reference.atomic``): a killed
write leaves the complete old or the complete new checkpoint, never a mix.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from dsref.reference.atomic import AtomicWriteError, atomic_dir, recover_dir
from dsref.reference.config import ModelConfig
from dsref.reference.params import EMBED, ROUTED_EXPERT, Tensor, head_name, tensors


class CheckpointError(ValueError):
    """A checkpoint we will not load: names the tensor (or field) and the file."""


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_ST_DTYPES: dict[str, Any] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),  # DeepSeek-V4's UE8M0 scales (reference/checkpoint_v4.py)
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_FLOAT = ("F64", "F32", "F16", "BF16")  # weights we accept unquantized
_FP8 = "F8_E4M3"
_NP_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
# Old transformers checkpoints stored RoPE caches; they carry no information.
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# Linear weights (quantized in FP8 checkpoints); everything else stays bf16/f32. The V3.2 indexer's
# wq_b and wk are FP8 in the release (with _scale_inv), its weights_proj bf16 (transformers keeps it
# in float32: _keep_in_fp32_modules), hence the lookbehind.
_LINEAR = re.compile(r"((?<!weights)_proj|_proj_with_mqa|indexer\.wq_b|indexer\.wk)(\.weight)?$")


def stored_in_fp8(name: str) -> bool:
    """Whether an FP8 (block-scaled) checkpoint stores the tensor ``name`` as E4M3 with a
    ``weight_scale_inv`` grid: the linear weights; norms, embeddings, the head... stay in bf16/f32."""
    return bool(_LINEAR.search(name))


# ------------------------------------------------------------------ FP8 blocks
def _grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def _expand(scale: np.ndarray, shape: tuple[int, ...], block: tuple[int, int]) -> np.ndarray:
    """Scale grid [..., nr, nc] -> one factor per element [..., rows, cols] (repeat, then crop)."""
    s = np.repeat(np.repeat(scale, block[0], axis=-2), block[1], axis=-1)
    return s[..., :shape[-2], :shape[-1]]


def quantize_fp8_blockwise(w, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """W [..., rows, cols] -> (W_fp8 float8_e4m3fn, scale_inv float32 [..., ceil(rows/br), ceil(cols/bc)]).

    Per block: scale_inv = amax(|W|) / 448 (1 for an all-zero block), W_fp8 =
    round(W / scale_inv) to e4m3 (nearest even), clipped to +-448.
    """
    w = np.asarray(w, np.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize_fp8_blockwise: needs a matrix, got shape {w.shape}")
    br, bc = _check_block(block)
    rows, cols = w.shape[-2:]
    nr, nc = -(-rows // br), -(-cols // bc)
    pad = [(0, 0)] * (w.ndim - 2) + [(0, nr * br - rows), (0, nc * bc - cols)]
    blocks = np.pad(np.abs(w), pad).reshape(*w.shape[:-2], nr, br, nc, bc)
    amax = blocks.max(axis=(-3, -1))
    scale_inv = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
    q = np.clip(w / _expand(scale_inv, w.shape, (br, bc)), -E4M3_MAX, E4M3_MAX)
    return q.astype(ml_dtypes.float8_e4m3fn), scale_inv


def dequantize_fp8_blockwise(w_fp8, scale_inv, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """W_fp8 [..., rows, cols] * scale_inv expanded block-wise -> float32 (one multiply per element)."""
    w_fp8, scale_inv = np.asarray(w_fp8), np.asarray(scale_inv)
    block = _check_block(block)
    want = _grid(w_fp8.shape, block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} != {want} for weight {tuple(w_fp8.shape)} "
                         f"with blocks {block}")
    return w_fp8.astype(np.float32) * _expand(scale_inv.astype(np.float32), w_fp8.shape, block)


def _check_block(block) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"weight_block_size must be two positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def fp8_block(cfg: ModelConfig, source: str = "config.json") -> tuple[int, int] | None:
    """The FP8 block size from ``quantization_config``, or None for an unquantized checkpoint."""
    q = cfg.extra.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: field 'quantization_config' must be an object, got {q!r}")
    if q.get("quant_method") != "fp8":
        raise CheckpointError(f"{source}: field 'quantization_config.quant_method' = {q.get('quant_method')!r}: "
                              "only 'fp8' (DeepSeek block-wise e4m3) is supported")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{source}: field 'quantization_config.fmt' = {q.get('fmt')!r}: only 'e4m3'")
    try:
        return _check_block(q.get("weight_block_size", [128, 128]))
    except ValueError as e:
        raise CheckpointError(f"{source}: field 'quantization_config.weight_block_size': {e}") from None


# --------------------------------------------------------- safetensors headers
@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(file: str | Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header (no data read): every tensor's bytes lie in the file."""
    file = Path(file)
    size = file.stat().st_size
    if size < 8:
        raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes; no header)")
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > size - 8:
            raise CheckpointError(f"{file}: truncated safetensors file (header claims {n} bytes, file has {size})")
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{file}: safetensors header of {n} bytes is implausible (corrupt file?)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    base, out = 8 + n, {}
    for name, e in header.items():
        def bad(msg, name=name):
            return CheckpointError(f"{file}: tensor '{name}': {msg}")
        if not isinstance(e, dict):
            raise bad("header entry is not an object")
        dt, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dt not in _ST_DTYPES:
            raise bad(f"unknown dtype {dt!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(f"bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise bad(f"bad data_offsets {offs!r}")
        nbytes = math.prod(shape) * _ST_DTYPES[dt].itemsize
        if offs[1] - offs[0] != nbytes:
            raise bad(f"data_offsets {offs} hold {offs[1] - offs[0]} bytes, but {dt}{shape} needs {nbytes}")
        if base + offs[1] > size:
            raise bad(f"truncated file: data ends at byte {base + offs[1]}, file has {size} bytes")
        out[name] = TensorInfo(name, file, dt, tuple(shape), base + offs[0], base + offs[1])
    return out


def _refuse_pickle(p: Path) -> CheckpointError:
    return CheckpointError(
        f"{p}: pickle-based PyTorch checkpoint; we never unpickle (loading a pickle can run arbitrary "
        "code). Convert it to safetensors in a trusted environment, e.g. "
        "transformers' model.save_pretrained(dir, safe_serialization=True) or "
        "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors').")


def _find_files(path: str | Path) -> tuple[Path, list[Path], dict[str, str] | None, Path]:
    """(dir, safetensors files, weight_map or None, the file to name in errors)."""
    d = Path(path)
    if not d.exists():
        # A write killed between its two renames leaves the complete new checkpoint beside the
        # missing folder; recover_dir finishes that rename (unambiguous, see its docstring) or
        # says what lies there and what to do.
        why = recover_dir(d)
        if why is not None:
            raise CheckpointError(f"{d}: no such checkpoint directory" + (f"; {why}" if why else ""))
    if d.is_file():
        if d.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(d)
        raise CheckpointError(f"{d}: expected a checkpoint directory (config.json + *.safetensors)")
    idx, single = d / INDEX_FILE, d / SINGLE_FILE
    st = sorted(d.glob("*.safetensors"))
    if idx.exists():
        try:
            j = json.loads(idx.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{idx}: not valid JSON ({e})") from None
        wm = j.get("weight_map") if isinstance(j, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{idx}: field 'weight_map' must be an object {{tensor: shard file}}")
        files = []
        for name, shard in wm.items():
            f = d / shard
            if Path(shard).name != shard:
                raise CheckpointError(f"{idx}: tensor '{name}' points to {shard!r}, not a file in {d}")
            if not f.is_file():
                raise CheckpointError(f"{idx}: tensor '{name}' points to missing shard {shard!r}")
            if f not in files:
                files.append(f)
        return d, files, wm, idx
    if single.exists():
        return d, [single], None, single
    if len(st) == 1:
        return d, st, None, st[0]
    if len(st) > 1:
        raise CheckpointError(f"{d}: {len(st)} safetensors files but no {INDEX_FILE} to say which tensor is where")
    pickles = sorted(p for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _refuse_pickle(pickles[0])
    raise CheckpointError(f"{d}: no {SINGLE_FILE} or {INDEX_FILE} found")


class _Reader:
    """All tensors of a checkpoint directory by name; data through read-only memory maps."""

    def __init__(self, path: str | Path):
        self.dir, self.files, wm, self.where = _find_files(path)
        # Every shard opened first: a rewrite swapping the folder (reference/atomic.py) mid-load
        # cannot then hand us the new file's bytes at the old file's offsets -- the open files
        # pin this checkpoint's inodes -- and a swap between opening and reading a header is
        # caught below (same inode, or an error).
        self._files = {f: open(f, "rb") for f in self.files}  # noqa: SIM115 - held for the reader's life
        self.infos: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in read_safetensors_header(f).items():
                if wm is not None and wm.get(name) != f.name:
                    raise CheckpointError(f"{f}: tensor '{name}' is not listed for this shard in {self.where}")
                if name in self.infos:
                    raise CheckpointError(f"{f}: tensor '{name}' also stored in {self.infos[name].file}")
                self.infos[name] = info
        for name in (wm or {}):
            if name not in self.infos:
                raise CheckpointError(f"{self.dir / wm[name]}: tensor '{name}' listed in {self.where} "
                                      "is not in that shard")
        self._maps: dict[Path, np.memmap] = {}
        for f, fh in self._files.items():
            if os.fstat(fh.fileno()).st_ino != os.stat(f).st_ino:
                raise CheckpointError(f"{f}: replaced while being read (a checkpoint write finished "
                                      "meanwhile); load again")

    def __del__(self):
        for fh in getattr(self, "_files", {}).values():
            fh.close()

    def array(self, name: str) -> np.ndarray:
        """Read-only view (memory-mapped) of one tensor in its stored dtype."""
        info = self.infos[name]
        mm = self._maps.get(info.file)
        if mm is None:
            mm = self._maps[info.file] = np.memmap(self._files[info.file], dtype=np.uint8, mode="r")
        return mm[info.start:info.end].view(_ST_DTYPES[info.dtype]).reshape(info.shape)

    def release(self) -> None:
        """Drop the maps: once the consumer has let go of a layer's views, its pages leave
        this process's resident set (else every touched page of every shard stays counted)."""
        self._maps.clear()


def tokenizer_path(path: str | Path) -> Path | None:
    """tokenizer.json in a checkpoint directory, or None."""
    p = Path(path) / "tokenizer.json"
    return p if p.is_file() else None


def read_config(path: str | Path) -> ModelConfig:
    """config.json of a checkpoint directory (ConfigError names the file), with its FP8 settings checked."""
    cfg = ModelConfig.from_json(path)
    fp8_block(cfg, str(Path(path) / "config.json"))
    return cfg


# ------------------------------------------------------------------ reading
@dataclass
class _Entry:
    name: str  # our name (reference.params layout)
    how: str  # "plain" | "stack" | "gate" | "up" (halves of a fused gate_up_proj)
    srcs: list[str]  # checkpoint names it is built from


class _Plan:
    """Every tensor we need, mapped to checkpoint names and checked against config.json (headers only)."""

    def __init__(self, reader: _Reader, cfg: ModelConfig, with_mtp: bool, block, config_file: Path):
        self.r, self.cfg, self.block, self.config_file = reader, cfg, block, config_file
        self.used: set[str] = set()
        by_layer: dict[int | None, list[Tensor]] = {}
        for t in tensors(cfg, mtp=with_mtp):
            by_layer.setdefault(t.layer, []).append(t)
        self.groups: list[list[_Entry]] = [self._group(rows) for rows in by_layer.values()]
        self.keys: list[int | None] = list(by_layer)  # the layer of each group (None: the globals)
        L, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
        for j in range(n_mtp):
            pre = f"model.layers.{L + j}."
            if not with_mtp:  # skipped wholesale, never read
                self.used.update(n for n in reader.infos if n.startswith(pre))
                continue
            copies = {"embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
                      "shared_head.head.weight": (cfg.vocab_size, cfg.hidden_size)}
            for k, shape in copies.items():  # shared with the main model: shape checked, never read
                if pre + k in reader.infos:
                    self._check(pre + k, shape)
        extra = [n for n in reader.infos if n not in self.used and not _IGNORABLE.search(n)]
        if extra:
            more = f" (and {len(extra) - 1} more: {', '.join(extra[1:4])}{', ...' if len(extra) > 4 else ''})" \
                if len(extra) > 1 else ""
            raise CheckpointError(f"{reader.infos[extra[0]].file}: unexpected tensor '{extra[0]}'{more}; "
                                  f"{config_file} (model_type {cfg.extra.get('model_type', '?')}, "
                                  f"{L} layers, {n_mtp} MTP) does not declare it")

    def _check(self, hf: str, shape: tuple[int, ...]) -> None:
        infos = self.r.infos
        info = infos.get(hf)
        if info is None:
            raise CheckpointError(f"{self.r.where}: tensor '{hf}' is missing (required by {self.config_file})")
        if info.dtype == _FP8:
            if self.block is None:
                raise CheckpointError(f"{info.file}: tensor '{hf}' is float8 but {self.config_file} has no "
                                      "quantization_config (block size unknown)")
            s = infos.get(hf + "_scale_inv")
            if s is None:
                raise CheckpointError(f"{info.file}: tensor '{hf}' is float8 without its scale "
                                      f"'{hf}_scale_inv'")
            if s.dtype not in _FLOAT:
                raise CheckpointError(f"{s.file}: tensor '{s.name}' has dtype {s.dtype}; scales must be float")
            want = _grid(shape, self.block) if len(shape) >= 2 else None
            if s.shape != want:
                raise CheckpointError(f"{s.file}: tensor '{s.name}' has shape {s.shape}, expected {want} "
                                      f"({shape} in blocks of {self.block})")
            self.used.add(s.name)
        elif info.dtype not in _FLOAT:
            raise CheckpointError(f"{info.file}: tensor '{hf}' has dtype {info.dtype}; a floating-point "
                                  f"weight ({', '.join(_FLOAT)}, or {_FP8} with a scale) belongs here")
        if info.shape != tuple(shape):
            raise CheckpointError(f"{info.file}: tensor '{hf}' has shape {info.shape}, but "
                                  f"{self.config_file} implies {tuple(shape)}")
        self.used.add(hf)

    def _group(self, rows: list[Tensor]) -> list[_Entry]:
        """Entries of one layer's rows (routed experts mapped to whichever layout the file has)."""
        out, infos = [], self.r.infos
        for t in rows:
            name, shape = t.name, t.shape
            if t.group != ROUTED_EXPERT or name in infos:  # plain (also our own stacked layout)
                self._check(name, shape)
                out.append(_Entry(name, "plain", [name]))
                continue
            kind = _expert_kind(t)
            E, base = shape[0], name.removesuffix(t.rel) + "mlp.experts."
            if f"{base}0.{kind}_proj.weight" in infos or base + "gate_up_proj" not in infos:
                srcs = [f"{base}{e}.{kind}_proj.weight" for e in range(E)]
                for s in srcs:
                    self._check(s, shape[1:])
                out.append(_Entry(name, "stack", srcs))
            elif kind == "down":
                self._check(base + "down_proj", shape)
                out.append(_Entry(name, "plain", [base + "down_proj"]))
            else:
                self._check(base + "gate_up_proj", (E, 2 * shape[1], shape[2]))
                out.append(_Entry(name, kind, [base + "gate_up_proj"]))
        return out

    def _load(self, hf: str, index=None) -> np.ndarray:
        """One tensor (index: only a[index] of it, e.g. one expert of a stacked [E, ...] tensor or
        rows of a matrix; block-wise dequantization is elementwise, so the values are the same)."""
        info = self.r.infos[hf]
        a = self.r.array(hf)
        if index is not None:
            a = a[index]
        if info.dtype == _FP8:
            s = self.r.array(hf + "_scale_inv")
            if isinstance(index, np.ndarray):  # rows of a matrix: each row with its block row's scales
                rs = np.repeat(s[index // self.block[0]].astype(np.float32), self.block[1], axis=-1)
                a = a.astype(np.float32) * rs[:, :info.shape[-1]]
            else:
                a = dequantize_fp8_blockwise(a, s if index is None else s[index], self.block)
        if not np.isfinite(a).all():
            what = " after dequantization" if info.dtype == _FP8 else ""
            raise CheckpointError(f"{info.file}: tensor '{hf}' contains NaN or Inf{what}")
        return a

    def run(self) -> Iterator[tuple[str, np.ndarray]]:
        for group in self.groups:
            a = None
            cache: dict[str, np.ndarray] = {}  # fused gate_up read once per layer, then dropped
            for e in group:
                if e.how == "stack":
                    yield e.name, np.stack([self._load(s) for s in e.srcs])
                    continue
                src = e.srcs[0]
                if src not in cache:
                    cache[src] = self._load(src)
                a = cache[src]
                if e.how == "gate":
                    a = a[:, : a.shape[1] // 2]
                elif e.how == "up":
                    a = a[:, a.shape[1] // 2:]
                yield e.name, a
            cache.clear()
            a = None  # noqa: F841 - drop the last view before unmapping
            self.r.release()


_STACKED = tuple(f"mlp.experts.{k}_proj.weight" for k in ("gate", "up", "down"))


class LayerReader:
    """Random access to a checkpoint, one decoder layer at a time (reference/oracle/stream.py).

    The same checks as ``read_tensors`` (all headers against config.json, before any data),
    but nothing is read until asked: ``layer(i)`` yields layer i's tensors (None: the
    globals) one at a time, in our layout with routed experts *not* stacked: each is an
    ``ExpertStack`` whose ``[e]`` reads that one expert, so a layer never holds its E experts;
    ``rows(name, ids)`` reads some rows of a matrix (the embedding rows of the tokens).
    Values are those ``read_tensors`` gives (FP8 dequantized to float32). Call
    ``release()`` once a layer's arrays are dropped, to unmap the pages they touched.
    """

    def __init__(self, path: str | Path, cfg: ModelConfig | None = None, *, with_mtp: bool = False):
        path = Path(path)
        reader = _Reader(path)
        self.cfg = cfg if cfg is not None else read_config(path)
        block = fp8_block(self.cfg, str(path / "config.json"))
        self._plan = _Plan(reader, self.cfg, with_mtp, block, path / "config.json")
        self._groups = dict(zip(self._plan.keys, self._plan.groups))
        self._entries = {e.name: e for g in self._plan.groups for e in g}

    def layer(self, i: int | None) -> Iterator[tuple[str, Any]]:
        """(our name, array or ExpertStack) of layer i, read one tensor at a time as iterated."""
        for e in self._groups[i]:
            if e.how != "plain" or e.name.endswith(_STACKED):  # routed experts, whatever the layout
                yield e.name, ExpertStack(self._plan, e)
            else:
                yield e.name, self._plan._load(e.srcs[0])

    def tensor(self, name: str) -> np.ndarray:
        """One plain tensor by our name (a global such as the final norm)."""
        return self._plan._load(self._entries[name].srcs[0])

    def rows(self, name: str, ids) -> np.ndarray:
        """Rows ``ids`` (int array) of the plain matrix ``name`` (our name), as read_tensors' values."""
        return self._plan._load(self._entries[name].srcs[0], np.asarray(ids, np.int64))

    def release(self) -> None:
        self._plan.r.release()


class ExpertStack:
    """A stacked routed-expert tensor [E, ...] of one layer, read one expert at a time."""

    def __init__(self, plan: _Plan, entry: _Entry):
        self._plan, self._e = plan, entry
        info = plan.r.infos[entry.srcs[0]]
        self.shape = ((len(entry.srcs), *info.shape) if entry.how == "stack" else
                      (info.shape[0], info.shape[1] // 2, info.shape[2]) if entry.how in ("gate", "up") else
                      info.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, e) -> np.ndarray:
        e = int(e)
        if not 0 <= e < self.shape[0]:
            raise IndexError(f"{self._e.name}: expert {e} of {self.shape[0]}")
        if self._e.how == "stack":
            return self._plan._load(self._e.srcs[e])
        a = self._plan._load(self._e.srcs[0], e)
        half = a.shape[0] // 2
        return a[:half] if self._e.how == "gate" else a[half:] if self._e.how == "up" else a


def read_tensors(path: str | Path, cfg: ModelConfig | None = None, *, with_mtp: bool = False,
                 dequant: str = "load") -> Iterator[tuple[str, np.ndarray]]:
    """(our_name, array) for every weight, layer by layer, in our layout (stacked experts).

    Everything is checked against config.json from the headers before the first
    tensor is returned (missing/extra tensors, shapes, dtypes, FP8 scales); NaN/Inf
    are checked per tensor as it is read. Arrays keep their stored dtype (bf16 as
    ml_dtypes.bfloat16) and may be read-only memory-mapped views, except FP8
    weights, which come dequantized to float32. ``dict(read_tensors(...))`` gives
    all of them. dequant: "load" (dequantize FP8) or "refuse" (error on FP8).
    """
    if dequant not in ("load", "refuse"):
        raise ValueError(f"dequant must be 'load' or 'refuse', got {dequant!r}")
    path = Path(path)
    reader = _Reader(path)  # pickle / missing-file / header errors first
    cfg = cfg if cfg is not None else read_config(path)
    config_file = path / "config.json"
    block = fp8_block(cfg, str(config_file))
    if dequant == "refuse":
        fp8 = next((i for i in reader.infos.values() if i.dtype == _FP8), None)
        if fp8 is not None:
            raise CheckpointError(f"{fp8.file}: tensor '{fp8.name}' is float8 and dequant='refuse'")
    return _Plan(reader, cfg, with_mtp, block, config_file).run()


def load_checkpoint(path: str | Path, *, dtype=None, with_mtp: bool = False, dequant: str = "load"):
    """(ModelConfig, DeepseekModel) from a Hugging Face checkpoint directory.

    The model is created abstractly (no random init) and each tensor is converted
    and assigned as it is read, so host memory holds the model plus one layer.
    dtype: the model's compute/storage dtype (default float32).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsref.reference.model import DeepseekModel
    from dsref.reference.weights import LayerSlice

    dtype = jnp.float32 if dtype is None else dtype
    path = Path(path)
    _find_files(path)  # refuse pickles before complaining about config.json
    cfg = read_config(path)
    model = nnx.eval_shape(lambda: DeepseekModel(cfg, dtype=dtype, with_mtp=with_mtp))
    params = dict(model.hf_items())
    for name, a in read_tensors(path, cfg, with_mtp=with_mtp, dequant=dequant):
        p = params.pop(name)
        # a layer tensor goes into its stack in place (LayerSlice); a global is converted whole
        p.set_value(a if isinstance(p, LayerSlice) else jax.device_put(jnp.asarray(a, p.dtype)))
        del a
    if params:  # pragma: no cover - the plan and the model share reference.params
        raise CheckpointError(f"{path}: internal error, weights not loaded: {sorted(params)[:5]}")
    return cfg, model


# ------------------------------------------------------------------ writing
_OUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "fp8": np.dtype(ml_dtypes.bfloat16)}  # fp8: non-Linear tensors stay bf16


def _expert_kind(t: Tensor) -> str:
    """'gate', 'up' or 'down' for a routed-expert row."""
    return t.rel.removeprefix("mlp.experts.").removesuffix("_proj.weight")


def _expected(cfg: ModelConfig, names: Iterable[str]) -> dict[str, Tensor]:
    """Rows of the main model, plus each MTP layer of which any tensor is given."""
    given = {t.layer for t in tensors(cfg, mtp=True) if t.mtp and t.name in set(names)}
    return {t.name: t for t in tensors(cfg, mtp=True) if not t.mtp or t.layer in given}


def save_checkpoint(tensors_or_model, cfg: ModelConfig, out_dir: str | Path, *, dtype: str = "bfloat16",
                    max_shard_bytes: int | None = None, expert_layout: str = "per_expert",
                    fp8_block_size: tuple[int, int] | None = None, atomic: bool = True) -> Path:
    """Write a Hugging Face checkpoint directory that transformers' from_pretrained reads.

    tensors_or_model: a DeepseekModel or {our_name: array} (stacked experts, as
    ``reference.params`` declares; MTP layers are written when given, with the
    embed_tokens/shared_head.head copies DeepSeek's checkpoints carry).
    dtype: "float32", "bfloat16" or "fp8" (Linear weights block-quantized to e4m3
    with float32 ``*_scale_inv``, everything else bf16; block size from
    fp8_block_size, else config's quantization_config, else 128x128).
    e_score_correction_bias is always float32. expert_layout: "per_expert" (the
    on-disk layout of DeepSeek and transformers) or "fused" (gate_up_proj/down_proj).
    max_shard_bytes: shard into model-0000k-of-0000N.safetensors + index.json.
    atomic=False: write straight into ``out_dir``, an existing folder that the caller is
    assembling and publishes atomically itself (a training checkpoint: weights, optimizer
    state and tokenizer swapped in together).
    """
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_OUT_DTYPES)}, got {dtype!r}")
    if expert_layout not in ("per_expert", "fused"):
        raise ValueError(f"expert_layout must be 'per_expert' or 'fused', got {expert_layout!r}")
    out = Path(out_dir)
    block = None
    if dtype == "fp8":
        block = _check_block(tuple(fp8_block_size or fp8_block(cfg) or (128, 128)))
    if hasattr(tensors_or_model, "hf_items"):
        src = {n: p for n, p in tensors_or_model.hf_items()}
        get: Callable[[str], np.ndarray] = lambda n: np.asarray(src[n].get_value())  # noqa: E731
    else:
        src = dict(tensors_or_model)
        get = lambda n: np.asarray(src[n])  # noqa: E731
    expected = _expected(cfg, src)
    for n, shape in ((n, t.shape) for n, t in expected.items()):
        if n not in src:
            raise CheckpointError(f"{out}: cannot write: tensor '{n}' missing from the tensors given")
        if tuple(np.shape(src[n])) != shape:
            raise CheckpointError(f"{out}: cannot write: tensor '{n}' has shape {tuple(np.shape(src[n]))}, "
                                  f"config {cfg.name} implies {shape}")
    for n in src:
        if n not in expected:
            raise CheckpointError(f"{out}: cannot write: unexpected tensor '{n}' (not declared for {cfg.name})")

    last: dict[str, np.ndarray] = {}

    def cached(n: str) -> np.ndarray:  # one source array at a time (experts are sliced from it)
        if n not in last:
            last.clear()
            last[n] = get(n)
        return last[n]

    def conv(hf: str, a: np.ndarray) -> dict[str, np.ndarray]:
        if hf.endswith("e_score_correction_bias"):
            return {hf: np.ascontiguousarray(a, np.float32)}
        if block is not None and stored_in_fp8(hf):
            q, s = quantize_fp8_blockwise(a, block)
            return {hf: q, hf + "_scale_inv": s}
        return {hf: np.ascontiguousarray(a.astype(_OUT_DTYPES[dtype]))}

    def sizes(hf: str, shape: tuple[int, ...]) -> int:
        if hf.endswith("e_score_correction_bias"):
            return 4 * math.prod(shape)
        if block is not None and stored_in_fp8(hf):
            return math.prod(shape) + 4 * math.prod(_grid(shape, block))
        return _OUT_DTYPES[dtype].itemsize * math.prod(shape)

    units: list[tuple[int, Callable[[], dict[str, np.ndarray]]]] = []  # (bytes, produce)
    for n, t in expected.items():
        shape = t.shape
        if t.group != ROUTED_EXPERT:
            units.append((sizes(n, shape), lambda n=n: conv(n, cached(n))))
            continue
        base, kind = n.removesuffix(t.rel) + "mlp.experts.", _expert_kind(t)
        if expert_layout == "per_expert":
            for e in range(shape[0]):
                hf = f"{base}{e}.{kind}_proj.weight"
                units.append((sizes(hf, shape[1:]), lambda n=n, e=e, hf=hf: conv(hf, cached(n)[e])))
        elif kind == "down":
            units.append((sizes(base + "down_proj", shape), lambda n=n, b=base: conv(b + "down_proj", cached(n))))
        elif kind == "gate":
            fused = (shape[0], 2 * shape[1], shape[2])
            units.append((sizes(base + "gate_up_proj", fused), lambda n=n, b=base: conv(
                b + "gate_up_proj", np.concatenate([get(n), get(n.replace(".gate_proj.", ".up_proj."))], axis=1))))
    L = cfg.num_hidden_layers
    for j in range(cfg.num_nextn_predict_layers):
        pre = f"model.layers.{L + j}."
        if pre + "eh_proj.weight" in expected:  # the copies DeepSeek's MTP layers carry
            head = head_name(cfg)
            shape = (cfg.vocab_size, cfg.hidden_size)
            for hf, n in ((pre + "embed_tokens.weight", EMBED),
                          (pre + "shared_head.head.weight", head)):
                units.append((sizes(hf, shape), lambda n=n, hf=hf: {hf: np.ascontiguousarray(
                    cached(n).astype(_OUT_DTYPES[dtype]))}))

    shards: list[list[tuple[int, Callable]]] = [[]]
    for u in units:
        if max_shard_bytes and shards[-1] and sum(b for b, _ in shards[-1]) + u[0] > max_shard_bytes:
            shards.append([])
        shards[-1].append(u)
    # Atomic as seen by a reader: everything is written into a folder beside ``out``, which then
    # replaces ``out`` by rename (reference/atomic.py), so ``out`` holds the complete old or the
    # complete new checkpoint at every instant, also when the process is killed. Files of the old
    # folder that this writer does not produce (tokenizer.json, generation_config.json, ...) are
    # carried over; old weights, index and config are not (stale shards would be ambiguous).
    if not atomic:
        _write_staged(out, shards, last, cfg, dtype, block)
        return out
    try:
        with atomic_dir(out, carry=_carried) as stage:
            _write_staged(stage, shards, last, cfg, dtype, block)
    except AtomicWriteError as e:
        raise CheckpointError(f"{out}: cannot write the checkpoint here: {e.strerror}") from None
    return out


def _carried(name: str) -> bool:
    """Entries of an existing output folder kept by a rewrite: anything but checkpoint files
    (and the staging folders an older version of this writer made inside it)."""
    return not (name in (SINGLE_FILE, INDEX_FILE, "config.json") or _SHARD_RE.match(name)
                or name.startswith(".writing-"))


_SHARD_RE = re.compile(r"^model-\d+-of-\d+\.safetensors$")


def write_shards(out: Path, shards) -> None:
    """Each shard (a list of (name, produce) whose produce() returns {tensor name: array}) into one
    safetensors file in ``out`` (model.safetensors, or model-0000k-of-n with the index), one shard's
    arrays in memory at a time. Shared by save_checkpoint and checkpoint_v4.save_checkpoint_v4."""
    from safetensors.numpy import save_file

    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        data: dict[str, np.ndarray] = {}
        for _, produce in shard:
            data.update(produce())
        save_file(data, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in data})
        total += sum(a.nbytes for a in data.values())
        del data
    if len(shards) > 1:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


def _write_staged(out: Path, shards, last: dict, cfg: ModelConfig, dtype: str, block) -> None:
    """The shards, the index (when sharded) and config.json of save_checkpoint, into ``out``."""
    write_shards(out, shards)
    last.clear()
    d = cfg.to_hf_dict()
    for k in ("quantization_config", "torch_dtype"):
        d.pop(k, None)
    d["dtype"] = "float32" if dtype == "float32" else "bfloat16"
    if block is not None:
        d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")


# ------------------------------------------------------------------ describe
def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """Cheap summary from the headers only: files, tensor count, dtypes, bytes, quantization."""
    d, files, _, where = _find_files(path)
    infos: list[TensorInfo] = []
    per_file = []
    for f in files:
        h = read_safetensors_header(f)
        infos.extend(h.values())
        per_file.append({"file": f.name, "bytes": f.stat().st_size, "tensors": len(h)})
    hist: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for i in infos:
        hist[i.dtype] = hist.get(i.dtype, 0) + 1
        nbytes[i.dtype] = nbytes.get(i.dtype, 0) + (i.end - i.start)
    qcfg = None
    cfg_file = d / "config.json"
    if cfg_file.is_file():
        try:
            qcfg = json.loads(cfg_file.read_text()).get("quantization_config")
        except (json.JSONDecodeError, AttributeError):
            qcfg = None
    names = {i.name for i in infos}
    layout = ("per_expert" if any(re.search(r"\.experts\.\d+\.", n) for n in names) else
              "fused" if any(n.endswith("experts.gate_up_proj") for n in names) else
              "stacked" if any(n.endswith("experts.gate_proj.weight") for n in names) else "none")
    layers = [int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    tok = tokenizer_path(d)
    return {
        "path": str(d), "index": str(where) if where.name == INDEX_FILE else None, "files": per_file,
        "num_files": len(files), "num_tensors": len(infos), "dtypes": dict(sorted(hist.items())),
        "dtype_bytes": dict(sorted(nbytes.items())), "tensor_bytes": sum(nbytes.values()),
        "file_bytes": sum(p["bytes"] for p in per_file), "quantized": _FP8 in hist or qcfg is not None,
        "quantization_config": qcfg, "expert_layout": layout,
        "num_layers_stored": (max(layers) + 1) if layers else 0,
        "has_config": cfg_file.is_file(), "tokenizer": str(tok) if tok else None,
    }
