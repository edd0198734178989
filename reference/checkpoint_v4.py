"""DeepSeek-V4 checkpoints: read and write exactly, in DeepSeek's released names or transformers'.

The tensor table is ``reference/params_v4.py`` (transformers' names and shapes, each row with its
released name(s), how per-expert tensors combine, and how the release stores it); this module only
moves bytes to and from it. Storage formats (the release: deepseek-ai/DeepSeek-V4-Flash / -Pro):

* FP8 (``params_v4.FP8``): W float8_e4m3fn [out, in] plus ``<base>.scale`` float8_e8m0fnu (UE8M0)
  [ceil(out/b0), ceil(in/b1)], b = quantization_config.weight_block_size (128 x 128 in the
  release); W = W_fp8 * scale[block], the last block row/column may be partial. Same shapes as
  DeepSeek's inference ``Linear`` for float8_e4m3fn (read in several public copies of V4's
  inference/model.py found with the code index's find_string, repositories not named by it:
  ``(out_features + block_size - 1) // block_size``, ``dtype=torch.float8_e8m0fnu``; for
  float4_e2m1fn_x2 ``[out, in // 2]`` and scale ``[out, in // fp4_block_size]``). transformers
  reads the same tensors under ``<base>.weight_scale_inv`` (quantizer_finegrained_fp8.py line 188 renames ``.scale``).
* FP4 (``params_v4.FP4``, routed experts): int8 [out, in/2], two e2m1 codes per byte, the LOW
  nibble holding element 2j and the HIGH nibble element 2j+1 (transformers 5.24
  integrations/finegrained_fp8.py lines 1119-1127, ``_unpack_fp4``: ``low = u8 & 0xF``,
  ``high = (u8 >> 4) & 0xF``, ``stack([lut[low], lut[high]], -1)``); code c = sign bit 3, exponent
  bits 2-1, mantissa bit 0: values 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives. Plus ``.scale``
  float8_e8m0fnu [out, in/32]: one scale per 32 consecutive inputs of a row (DeepSeek's Linear:
  ``in_features // fp4_block_size``, fp4_block_size = 32; transformers' FP8Experts for
  expert_dtype "fp4": ``sf_gran_n=1, sf_gran_k=32``, finegrained_fp8.py lines 749-760).
* UE8M0 byte b = 2^(b - 127); 255 is NaN (OCP MX spec; ml_dtypes.float8_e8m0fnu agrees).
* bf16 / float32 / int64 (tid2eid) as the table says.

Quantising (the writer's ``dtype="release"``): scale = 2^ceil(log2(amax / qmax)) per block with
qmax 448 (e4m3) or 6 (e2m1), i.e. the smallest power of two that keeps the block in range --
DeepSeek's kernel.py ``fast_round_scale(amax, 1/qmax)`` = fast_pow2(fast_log2_ceil(amax / qmax))
rounds UP to a power of two the same way (quoted in public write-ups of DeepSeek-V4's kernel.py;
we compute the ceil exactly in float64 where the kernel multiplies by 1/qmax in float32). An
all-zero block gets scale 1 (our choice; any scale gives zeros). Values round to nearest even.

Why our own safetensors header reader and not ``checkpoint.read_safetensors_header``: that one
does not know F8_E8M0 (the release's scale dtype). Ours is the same parser with that dtype added
(no pickle ever; a file's bytes are checked against its header before any data is read).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from dsref.reference.atomic import AtomicWriteError, atomic_dir
from dsref.reference.checkpoint import (INDEX_FILE, SINGLE_FILE, CheckpointError, TensorInfo, _find_files,
                                        read_safetensors_header, write_shards)
from dsref.reference.config_v4 import ModelConfigV4
from dsref.reference.params_v4 import FP4, FP8, FP32, INT64, SAME, STACK_CONCAT, TensorV4, tensors

NAME_SETS = ("deepseek", "transformers")
DTYPES = ("bf16", "release", "float32")
FP4_BLOCK = 32
E4M3_MAX = 448.0
E2M1_MAX = 6.0
#: e2m1 code -> value (bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa)
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
#: The release's quantization_config (DeepSeek-V4-Flash config.json) and its top-level expert_dtype.
RELEASE_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                 "weight_block_size": [128, 128]}

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
}
_FLOATS = ("F64", "F32", "F16", "BF16")
_SCALES = ("F8_E8M0", "F32")


# ------------------------------------------------------------------ number formats
def ue8m0_to_float(s) -> np.ndarray:
    """UE8M0 scales (float8_e8m0fnu or their raw uint8 bytes) -> float32 2^(b-127); b = 255 -> NaN."""
    s = np.asarray(s)
    if s.dtype == np.float32:
        return s
    b = s.view(np.uint8).astype(np.int32)
    out = np.ldexp(np.float32(1.0), np.minimum(b, 254) - 127).astype(np.float32)
    return np.where(b == 255, np.float32(np.nan), out)


def _pow2_exponent(amax: np.ndarray, qmax: float) -> np.ndarray:
    """ceil(log2(amax / qmax)) exactly (float64 frexp), clipped to UE8M0's [-127, 127]; 0 for amax 0."""
    x = np.asarray(amax, np.float64) / qmax
    m, e = np.frexp(x)  # x = m 2^e, m in [0.5, 1)
    e = np.where(m == 0.5, e - 1, e)
    return np.where(x > 0, np.clip(e, -127, 127), 0).astype(np.int32)


def _e8m0(exponent: np.ndarray) -> np.ndarray:
    return (exponent + 127).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


def _grid(shape, block) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def _expand(scale: np.ndarray, shape, block) -> np.ndarray:
    s = np.repeat(np.repeat(scale, block[0], axis=-2), block[1], axis=-1)
    return s[..., :shape[-2], :shape[-1]]


def quantize_fp8_ue8m0(w, block=(128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """W [..., rows, cols] -> (float8_e4m3fn W, float8_e8m0fnu scale [..., ceil(rows/b0), ceil(cols/b1)])."""
    w = np.asarray(w, np.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize_fp8_ue8m0: needs a matrix, got shape {w.shape}")
    rows, cols = w.shape[-2:]
    nr, nc = _grid(w.shape, block)[-2:]
    pad = [(0, 0)] * (w.ndim - 2) + [(0, nr * block[0] - rows), (0, nc * block[1] - cols)]
    amax = np.pad(np.abs(w), pad).reshape(*w.shape[:-2], nr, block[0], nc, block[1]).max(axis=(-3, -1))
    e = _pow2_exponent(amax, E4M3_MAX)
    q = w / _expand(np.ldexp(np.float32(1.0), e).astype(np.float32), w.shape, block)  # exact: power of 2
    return np.clip(q, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn), _e8m0(e)


def dequantize_fp8(w_fp8, scale, block=(128, 128)) -> np.ndarray:
    """W_fp8 [..., rows, cols] * scale (UE8M0 or float32) per block -> float32."""
    w_fp8, scale = np.asarray(w_fp8), np.asarray(scale)
    want = _grid(w_fp8.shape, block)
    if tuple(scale.shape) != want:
        raise ValueError(f"scale shape {tuple(scale.shape)} != {want} for weight {tuple(w_fp8.shape)}, blocks {block}")
    return w_fp8.astype(np.float32) * _expand(ue8m0_to_float(scale), w_fp8.shape, block)


def quantize_fp4(w) -> tuple[np.ndarray, np.ndarray]:
    """W [..., in] (in % 32 == 0) -> (int8 [..., in/2] packed e2m1, float8_e8m0fnu [..., in/32])."""
    w = np.asarray(w, np.float32)
    n = w.shape[-1]
    if n % FP4_BLOCK:
        raise ValueError(f"quantize_fp4: last dim {n} is not a multiple of {FP4_BLOCK}")
    blocks = w.reshape(*w.shape[:-1], n // FP4_BLOCK, FP4_BLOCK)
    e = _pow2_exponent(np.abs(blocks).max(axis=-1), E2M1_MAX)
    q = np.clip(blocks / np.ldexp(np.float32(1.0), e)[..., None].astype(np.float32), -E2M1_MAX, E2M1_MAX)
    codes = q.astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(*w.shape[:-1], n // 2, 2) & 0xF
    packed = (codes[..., 0] | (codes[..., 1] << 4)).astype(np.uint8)  # element 2j low, 2j+1 high
    return packed.view(np.int8), _e8m0(e)


def dequantize_fp4(packed, scale) -> np.ndarray:
    """int8/uint8 [..., in/2] packed e2m1 x UE8M0 scale [..., in/32] -> float32 [..., in]."""
    u8 = np.asarray(packed).view(np.uint8)
    n = 2 * u8.shape[-1]
    scale = np.asarray(scale)
    if n % FP4_BLOCK or tuple(scale.shape) != (*u8.shape[:-1], n // FP4_BLOCK):
        raise ValueError(f"scale shape {tuple(scale.shape)} != {(*u8.shape[:-1], n // FP4_BLOCK)} for packed "
                         f"FP4 {tuple(u8.shape)} (one scale per {FP4_BLOCK} values)")
    vals = np.stack([E2M1_VALUES[u8 & 0xF], E2M1_VALUES[u8 >> 4]], axis=-1).reshape(*u8.shape[:-1], n)
    return vals * np.repeat(ue8m0_to_float(scale), FP4_BLOCK, axis=-1)


# ------------------------------------------------------------------ safetensors headers
def read_header_v4(file: str | Path) -> dict[str, TensorInfo]:
    """``checkpoint.read_safetensors_header`` (parse, check offsets, read no data), limited to the
    dtypes a V4 checkpoint uses."""
    infos = read_safetensors_header(file)
    for name, info in infos.items():
        if info.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor '{name}': dtype {info.dtype!r} is not one a V4 checkpoint "
                                  f"uses ({sorted(_ST_DTYPES)})")
    return infos


class _Files:
    """Every tensor of a checkpoint directory by name; data read through read-only memory maps."""

    def __init__(self, path: Path):
        self.dir, files, wm, self.where = _find_files(path)  # refuses pickles, checks the index
        # open before reading headers: a rewrite swapping the folder (reference/atomic.py) meanwhile
        # cannot hand us the new file's bytes at the old header's offsets (the handles pin the inodes)
        self._fh = {f: open(f, "rb") for f in files}  # noqa: SIM115 - held for the reader's life
        self.infos: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header_v4(f).items():
                if wm is not None and wm.get(name) != f.name:
                    raise CheckpointError(f"{f}: tensor '{name}' is not listed for this shard in {self.where}")
                if name in self.infos:
                    raise CheckpointError(f"{f}: tensor '{name}' also stored in {self.infos[name].file}")
                self.infos[name] = info
        for name in wm or {}:
            if name not in self.infos:
                raise CheckpointError(f"{self.dir / wm[name]}: tensor '{name}' listed in {self.where} is not there")
        for f, fh in self._fh.items():
            if os.fstat(fh.fileno()).st_ino != os.stat(f).st_ino:
                raise CheckpointError(f"{f}: replaced while being read (a checkpoint write finished meanwhile); "
                                      "load again")
        self._maps: dict[Path, np.memmap] = {}

    def __del__(self):
        for fh in getattr(self, "_fh", {}).values():
            fh.close()

    def array(self, name: str) -> np.ndarray:
        i = self.infos[name]
        if i.file not in self._maps:
            self._maps[i.file] = np.memmap(self._fh[i.file], dtype=np.uint8, mode="r")
        return self._maps[i.file][i.start:i.end].view(_ST_DTYPES[i.dtype]).reshape(i.shape)


# ------------------------------------------------------------------ reading
@dataclass(frozen=True)
class _Src:
    """One stored tensor behind a table row: its name, logical shape, format and scale tensor."""
    name: str
    shape: tuple[int, ...]
    fmt: str          # "fp8", "fp4", "float" or "int"
    scale: str | None


class V4Tensors(dict):
    """{transformers name: array} (float32; tid2eid int64) with what the checkpoint held:
    ``names`` (one of READ_NAME_SETS), ``formats`` {name: "fp8"|"fp4"|"float"|"int"}, ``cfg``."""

    names: str
    formats: dict[str, str]
    cfg: ModelConfigV4


def _scale_names(name: str) -> tuple[str, str]:
    """Where a quantized tensor's scale may be: DeepSeek's ``<base>.scale`` or transformers'
    ``<name>_scale_inv`` (``X.weight_scale_inv``, ``experts.gate_up_proj_scale_inv``)."""
    return name.removesuffix(".weight") + ".scale", name + "_scale_inv"


#: Name sets the reader recognises. "transformers-saved": what transformers 5.24's save_pretrained
#: writes for DeepseekV4ForCausalLM (it runs conversion_mapping "deepseek_v4" backwards, which does
#: not invert exactly: see _saved_name); the writer produces only the first two.
READ_NAME_SETS = NAME_SETS + ("transformers-saved",)
_SAVED_GLOBALS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                  "hc_head_fn": "model.hc_head.hc_fn", "hc_head_base": "model.hc_head.hc_base",
                  "hc_head_scale": "model.hc_head.hc_scale"}


def _saved_name(ds: str) -> str:
    """DeepSeek's name -> transformers' save_pretrained name (observed on tiny-v4, transformers 5.24):
    the reversed renames leave the ``model.`` prefix, so ``^embed`` / ``^hc_head_*`` never fire
    and ``layers.*`` keep it, while ``head.weight`` loses ``lm_``; ``attn.kv_norm`` comes out as
    ``attn.norm`` (the reverse of the compressors' ``.norm.`` -> ``.kv_norm.``). No MTP is saved."""
    if ds in _SAVED_GLOBALS:
        return _SAVED_GLOBALS[ds]
    if ds.startswith("layers."):
        return "model." + re.sub(r"\.attn\.kv_norm\.", ".attn.norm.", ds)
    return ds


def _sources(row: TensorV4, names: str, E: int) -> list[tuple[str, tuple[int, ...]]]:
    if names == "transformers":
        return [(row.name, row.shape)]
    out = row.deepseek_tensors(E)
    return out if names == "deepseek" else [(_saved_name(n), s) for n, s in out]


def _fp8_block(cfg: ModelConfigV4, source: str) -> tuple[int, int]:
    q = cfg.extra.get("quantization_config")
    if q is None:
        return (128, 128)
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: field 'quantization_config' must be an object, got {q!r}")
    if q.get("quant_method", "fp8") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{source}: field 'quantization_config': only quant_method 'fp8' with fmt 'e4m3' "
                              f"(DeepSeek's block FP8) is supported, got {q.get('quant_method')!r} / {q.get('fmt')!r}")
    b = q.get("weight_block_size", [128, 128])
    if (not isinstance(b, list) or len(b) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in b)):
        raise CheckpointError(f"{source}: field 'quantization_config.weight_block_size' must be two positive "
                              f"integers, got {b!r}")
    return (b[0], b[1])


def _detect_names(infos: Mapping[str, TensorInfo], rows: list[TensorV4], E: int, where) -> str:
    """Which name set the checkpoint uses, from the names unique to one set (several names are the
    same in two sets: the MTP extras, ``head.weight``, ``model.norm.weight``, ...)."""
    sets = {n: set() for n in READ_NAME_SETS}
    for r in rows:
        for n in READ_NAME_SETS:
            for s, _ in _sources(r, n, E):
                sets[n].update((s, *_scale_names(s)))
    only = {n: sorted(k for k in infos if k in sets[n] and not any(k in sets[o] for o in sets if o != n))
            for n in READ_NAME_SETS}
    found = [n for n in READ_NAME_SETS if only[n]]
    if len(found) > 1:
        raise CheckpointError(f"{where}: mixes name sets: " + ", ".join(f"{n} ('{only[n][0]}')" for n in found))
    if not found:
        first = next(iter(infos), None)
        raise CheckpointError(f"{where}: no DeepSeek-V4 tensor names found (first tensor: {first!r})")
    return found[0]


def _classify(files: _Files, row: TensorV4, name: str, shape: tuple[int, ...], block) -> _Src:
    """Check one stored tensor against the table row (dtype, shape, scale) from the headers."""
    info = files.infos.get(name)
    if info is None:
        raise CheckpointError(f"{files.where}: tensor '{name}' (for {row.name} {list(row.shape)}) is missing")
    at = f"{info.file}: tensor '{name}'"
    scales = [s for s in _scale_names(name) if s in files.infos]
    if row.stored == INT64:
        if info.dtype not in ("I64", "I32") or info.shape != shape:
            raise CheckpointError(f"{at}: {info.dtype}{list(info.shape)}, expected an integer {list(shape)} table")
        return _Src(name, shape, "int", None)
    if info.dtype in _FLOATS:
        if info.shape != shape:
            raise CheckpointError(f"{at}: shape {list(info.shape)}, the config implies {list(shape)}")
        return _Src(name, shape, "float", None)
    if row.stored not in (FP8, FP4):
        raise CheckpointError(f"{at}: stored as {info.dtype}, but this tensor is {row.stored} in the release "
                              "(only FP8/FP4 rows of params_v4 may be quantized)")
    if len(scales) != 1:
        raise CheckpointError(f"{at}: {info.dtype} weight needs exactly one scale tensor "
                              f"('{_scale_names(name)[0]}' or '{_scale_names(name)[1]}'), found {len(scales)}")
    s = files.infos[scales[0]]
    if s.dtype not in _SCALES:
        raise CheckpointError(f"{s.file}: tensor '{s.name}': scale dtype {s.dtype}, expected F8_E8M0 (UE8M0) or F32")
    if info.dtype == "F8_E4M3":
        fmt, stored, want = "fp8", shape, _grid(shape, block)
    elif info.dtype in ("I8", "U8"):
        if shape[-1] % FP4_BLOCK:
            raise CheckpointError(f"{at}: packed FP4 needs a last dim divisible by {FP4_BLOCK}, {row.name} has "
                                  f"{list(shape)}")
        fmt, stored, want = "fp4", (*shape[:-1], shape[-1] // 2), (*shape[:-1], shape[-1] // FP4_BLOCK)
    else:
        raise CheckpointError(f"{at}: dtype {info.dtype} is not a V4 weight format (F8_E4M3, packed-FP4 I8, "
                              "or a float)")
    if info.shape != tuple(stored):
        raise CheckpointError(f"{at}: shape {list(info.shape)}, the config implies {list(stored)} ({fmt})")
    if s.shape != tuple(want):
        raise CheckpointError(f"{s.file}: tensor '{s.name}': shape {list(s.shape)}, expected {list(want)} "
                              f"for {fmt} {list(shape)}")
    return _Src(name, shape, fmt, s.name)


def _load(files: _Files, src: _Src, block) -> np.ndarray:
    a = files.array(src.name)
    if src.fmt == "int":
        return np.array(a, np.int64)
    if src.fmt == "float":
        return np.array(a, np.float32)
    s = files.array(src.scale)
    return dequantize_fp8(a, s, block) if src.fmt == "fp8" else dequantize_fp4(a, s)


def _plan(path: Path, cfg: ModelConfigV4 | None, mtp: bool | None):
    files = _Files(path)
    cfg = cfg if cfg is not None else ModelConfigV4.from_json(path)
    block = _fp8_block(cfg, str(path / "config.json"))
    E = cfg.n_routed_experts
    every = tensors(cfg, mtp=True)
    names = _detect_names(files.infos, every, E, files.where)
    owner = {}  # stored name -> row, to find which MTP modules the file holds
    for r in every:
        for s, _ in _sources(r, names, E):
            owner[s] = r
    present = {owner[n].layer for n in files.infos if n in owner and owner[n].mtp}
    L = cfg.num_hidden_layers
    want_mtp = (set(range(L, L + cfg.num_nextn_predict_layers)) if mtp else present if mtp is None else set())
    rows = [r for r in every if not r.mtp or r.layer in want_mtp]
    plan, used = [], set()
    for r in rows:
        srcs = [_classify(files, r, n, s, block) for n, s in _sources(r, names, E)]
        used.update(x for s in srcs for x in (s.name, s.scale) if x)
        plan.append((r, srcs))
    skipped = {n for n in files.infos if n in owner and owner[n].mtp and owner[n].layer not in want_mtp}
    skipped |= {sc for n in skipped for sc in _scale_names(n)}
    extra = sorted(set(files.infos) - used - skipped)
    if extra:
        i = files.infos[extra[0]]
        raise CheckpointError(f"{i.file}: unexpected tensor '{i.name}' (not in the V4 table for {cfg.name}, "
                              f"{names} names; {len(extra)} such)")
    return files, cfg, block, names, plan


class V4Stream:
    """The tensors of a checked checkpoint, read one at a time: iterate for (transformers name,
    array, stored format); ``names`` and ``cfg`` are known before the first read."""

    def __init__(self, path: Path, cfg: ModelConfigV4 | None, mtp: bool | None):
        self._files, self.cfg, self._block, self.names, self._plan = _plan(path, cfg, mtp)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, str]]:
        for row, srcs in self._plan:
            yield row.name, self._read(row, srcs), srcs[0].fmt

    def _read(self, row: TensorV4, srcs: list[_Src]) -> np.ndarray:
        """One table row's array: its stored tensor(s) dequantized, combined and checked."""
        files = self._files
        parts = [_load(files, s, self._block) for s in srcs]
        if self.names == "transformers" or row.combine == SAME:  # transformers' names: combined already
            a = parts[0]
        elif row.combine == STACK_CONCAT:  # sources alternate w1_e, w3_e
            a = np.concatenate([np.stack(parts[0::2]), np.stack(parts[1::2])], axis=1)
        else:
            a = np.stack(parts)
        return self._checked(a, srcs[0])

    def _checked(self, a: np.ndarray, src: _Src) -> np.ndarray:
        where = f"{self._files.infos[src.name].file}: tensor '{src.name}'"
        E = self.cfg.n_routed_experts
        if a.dtype == np.int64:
            if a.size and (a.min() < 0 or a.max() >= E):
                raise CheckpointError(f"{where}: expert ids must lie in [0, {E}), found {a.min()}..{a.max()}")
        elif not np.isfinite(a).all():
            raise CheckpointError(f"{where}: non-finite values after dequantisation (NaN/Inf, a UE8M0 "
                                  "scale byte of 255, or overflow)")
        return a


def iter_tensors_v4(path: str | Path, cfg: ModelConfigV4 | None = None, *, mtp: bool | None = None) -> V4Stream:
    """(transformers name, array, stored format) in the table's order, one tensor at a time.

    Every name, dtype and shape is checked from the headers before this returns. cfg: default the
    directory's config.json (any spelling config_v4 reads). mtp: None reads the MTP modules the
    checkpoint holds, True requires them, False skips them. Experts are combined as the table says
    (per expert w1 and w3 stacked, then concatenated into gate_up_proj; w2 stacked into down_proj).
    """
    return V4Stream(Path(path), cfg, mtp)


def read_tensors_v4(path: str | Path, cfg: ModelConfigV4 | None = None, *, mtp: bool | None = None) -> V4Tensors:
    """All tensors as {transformers name: float32 array (tid2eid int64)}; see iter_tensors_v4.
    The result's ``names`` says which name set the checkpoint used, ``formats`` how each was stored."""
    stream = iter_tensors_v4(path, cfg, mtp=mtp)
    out = V4Tensors()
    out.names, out.formats, out.cfg = stream.names, {}, stream.cfg
    for name, a, fmt in stream:
        out[name] = a
        out.formats[name] = fmt
    return out


# ------------------------------------------------------------------ reading one layer at a time
def _load_expert(files: _Files, src: _Src, block, e: int) -> np.ndarray:
    """Expert e of a stacked [E, ...] stored tensor (transformers' names) and of its scale: the
    values ``_load`` gives for row e of the whole (dequantisation is elementwise per block)."""
    a = files.array(src.name)[e]
    if src.fmt == "float":
        return np.array(a, np.float32)
    s = files.array(src.scale)[e]
    return dequantize_fp8(a, s, block) if src.fmt == "fp8" else dequantize_fp4(a, s)


class V4ExpertStack:
    """A routed-expert row [E, ...] of one layer left on disk: ``[e]`` reads expert e, float32, the
    values of row e of read_tensors_v4's stacked array (numpy_v4.moe indexes per used expert, so
    the experts no token chose are never read). ``shape`` is the whole row's."""

    def __init__(self, reader: "V4LayerReader", row: TensorV4, srcs: list[_Src]):
        self._reader, self._row, self._srcs, self.shape = reader, row, srcs, row.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, e) -> np.ndarray:
        e = int(e)  # numpy integers from np.unique
        if not 0 <= e < len(self):
            raise IndexError(f"{self._row.name}: expert {e} out of range [0, {len(self)})")
        return self._reader._expert(self._row, self._srcs, e)


class V4LayerReader(V4Stream):
    """The checked checkpoint read by decoder layer, for runs that cannot hold every weight
    (oracle/stream.py): ``layer(i)`` (MTP module k is layer num_hidden_layers + k), ``tensor(name)``,
    ``rows(name, ids)``, each array the value read_tensors_v4 gives (float32; tid2eid int64) and
    checked the same way when it is read. ``release()`` drops the memory maps (call it once a
    layer's arrays are let go: their file pages then leave the resident set)."""

    def __init__(self, path: str | Path, cfg: ModelConfigV4 | None = None, *, mtp: bool | None = None):
        super().__init__(Path(path), cfg, mtp)
        self._by_name = {row.name: (row, srcs) for row, srcs in self._plan}

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def layer(self, i: int) -> Iterator[tuple[str, Any]]:
        """(transformers name, array) of layer i in the table's order, each read when reached;
        routed experts as V4ExpertStack (read per expert when indexed)."""
        for row, srcs in self._plan:
            if row.layer == i:
                yield row.name, V4ExpertStack(self, row, srcs) if row.combine != SAME else self._read(row, srcs)

    def tensor(self, name: str) -> np.ndarray:
        return self._read(*self._by_name[name])

    def rows(self, name: str, ids) -> np.ndarray:
        """Rows ``ids`` of a [rows, ...] tensor (the embedding: the ids a batch uses, not the table)."""
        row, srcs = self._by_name[name]
        if row.combine != SAME or srcs[0].fmt != "float":  # quantized: blocks span rows; read it whole
            return self.tensor(name)[np.asarray(ids)]
        return self._checked(np.array(self._files.array(srcs[0].name)[np.asarray(ids)], np.float32), srcs[0])

    def release(self) -> None:
        self._files._maps.clear()

    def _expert(self, row: TensorV4, srcs: list[_Src], e: int) -> np.ndarray:
        files, block = self._files, self._block
        if self.names == "transformers":  # stored stacked already
            return self._checked(_load_expert(files, srcs[0], block, e), srcs[0])
        if row.combine == STACK_CONCAT:  # sources alternate w1_e, w3_e: gate rows then up rows
            return np.concatenate([self._checked(_load(files, s, block), s) for s in srcs[2 * e:2 * e + 2]])
        return self._checked(_load(files, srcs[e], block), srcs[e])


# ------------------------------------------------------------------ writing
def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor (bf16 has no numpy dtype: go through float32)
        t = a.detach().cpu()
        return t.numpy() if not t.is_floating_point() else t.float().numpy()
    return np.asarray(a)


def _encode(name: str, a: np.ndarray, stored: str, dtype: str, block, names: str) -> dict[str, np.ndarray]:
    """One tensor in the form ``dtype`` asks for: {name: data(, scale name: scale)}."""
    if stored == INT64:
        return {name: np.ascontiguousarray(a, np.int64)}
    if stored == FP32 or dtype == "float32":
        return {name: np.ascontiguousarray(a, np.float32)}
    if dtype == "release" and stored == FP8:
        q, s = quantize_fp8_ue8m0(a, block)
    elif dtype == "release" and stored == FP4:
        if a.shape[-1] % FP4_BLOCK:
            raise CheckpointError(f"tensor '{name}' {list(a.shape)}: FP4 needs an input dim divisible by "
                                  f"{FP4_BLOCK} (field 'moe_intermediate_size' / 'hidden_size'); use dtype='bf16'")
        q, s = quantize_fp4(a)
    else:
        return {name: np.ascontiguousarray(a.astype(ml_dtypes.bfloat16))}
    return {name: np.ascontiguousarray(q), _scale_names(name)[0 if names == "deepseek" else 1]: s}


def _units(src: Mapping[str, Any], rows: list[TensorV4], cfg: ModelConfigV4, names: str, dtype: str, block):
    """(approximate bytes, produce) per stored tensor group, in the table's order."""
    E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
    per = {"release": 1, "bf16": 2, "float32": 4}[dtype]
    last: dict[str, np.ndarray] = {}

    def get(r: TensorV4) -> np.ndarray:  # one source array converted at a time (experts slice it)
        if r.name not in last:
            last.clear()
            last[r.name] = np.asarray(_as_numpy(src[r.name]), np.int64 if r.stored == INT64 else np.float32)
        return last[r.name]

    out: list[tuple[int, Callable[[], dict[str, np.ndarray]]]] = []
    for r in rows:
        size = r.numel * (8 if r.stored == INT64 else 4 if r.stored == FP32 else per)
        if names == "transformers" or r.combine == SAME:
            n = r.name if names == "transformers" else r.deepseek[0]
            out.append((size, lambda r=r, n=n: _encode(n, get(r), r.stored, dtype, block, names)))
            continue
        for e in range(E):  # per expert: w1 = gate rows [0, F), w3 = up rows [F, 2F); w2 = down_proj[e]
            pieces = (((r.deepseek[0].format(e=e), slice(0, F)), (r.deepseek[1].format(e=e), slice(F, 2 * F)))
                      if r.combine == STACK_CONCAT else ((r.deepseek[0].format(e=e), slice(None)),))
            for n, sl in pieces:
                out.append((size // E // len(pieces),
                            lambda r=r, n=n, e=e, sl=sl: _encode(n, get(r)[e][sl], r.stored, dtype, block, names)))
    return out


def save_checkpoint_v4(weights: Mapping[str, Any], cfg: ModelConfigV4, out_dir: str | Path, *,
                       names: str = "deepseek", dtype: str = "bf16", max_shard_bytes: int | None = None) -> Path:
    """Write {transformers name: array} (a state_dict; MTP modules under ``mtp.{k}.`` when given) as a
    checkpoint directory, atomically (reference/atomic.py: the old or the new folder, never a mix).

    names: "deepseek" (the release's names, one tensor per expert) or "transformers" (state_dict names,
    stacked experts). dtype: "bf16" (bf16 weights, the table's float32 rows float32, tid2eid int64),
    "release" (as DeepSeek's release stores them: FP8 e4m3 + UE8M0 128x128 scales, FP4 e2m1 + UE8M0
    1x32 scales, bf16 / float32 / int64 elsewhere; scales named ``.scale`` with DeepSeek's names and
    ``_scale_inv`` with transformers') or "float32" (lossless). max_shard_bytes: shard into
    model-0000k-of-0000N.safetensors + model.safetensors.index.json.
    """
    if names not in NAME_SETS:
        raise ValueError(f"names must be one of {NAME_SETS}, got {names!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    out = Path(out_dir)
    given = set(weights)
    every = tensors(cfg, mtp=True)
    mods = {r.layer for r in every if r.mtp and r.name in given}
    rows = [r for r in every if not r.mtp or r.layer in mods]
    for r in rows:
        if r.name not in given:
            raise CheckpointError(f"{out}: cannot write: tensor '{r.name}' missing from the weights given")
        shape = tuple(getattr(weights[r.name], "shape", np.shape(weights[r.name])))
        if shape != r.shape:
            raise CheckpointError(f"{out}: cannot write: tensor '{r.name}' has shape {list(shape)}, config "
                                  f"{cfg.name} implies {list(r.shape)}")
    extra = sorted(given - {r.name for r in rows})
    if extra:
        raise CheckpointError(f"{out}: cannot write: unexpected tensor '{extra[0]}' (not in the V4 table for "
                              f"{cfg.name}; {len(extra)} such)")
    block = tuple(RELEASE_QUANT["weight_block_size"])
    units = _units(weights, rows, cfg, names, dtype, block)
    shards: list[list] = [[]]
    for u in units:
        if max_shard_bytes and shards[-1] and sum(b for b, _ in shards[-1]) + u[0] > max_shard_bytes:
            shards.append([])
        shards[-1].append(u)
    try:
        with atomic_dir(out, carry=_carried) as stage:
            _write(stage, shards, cfg, dtype)
    except AtomicWriteError as e:
        raise CheckpointError(f"{out}: cannot write the checkpoint here: {e.strerror}") from None
    return out


_SHARD_RE = re.compile(r"^model-\d+-of-\d+\.safetensors$")


def _carried(name: str) -> bool:
    """Files of an existing output folder a rewrite keeps (tokenizer, ...): all but checkpoint files."""
    return not (name in (SINGLE_FILE, INDEX_FILE, "config.json") or _SHARD_RE.match(name))


def _write(out: Path, shards, cfg: ModelConfigV4, dtype: str) -> None:
    write_shards(out, shards)
    # transformers' spelling for both name sets: config_v4 and transformers both read it (transformers
    # then renames DeepSeek's tensor names itself: conversion_mapping.py "deepseek_v4")
    d = cfg.to_hf_dict()
    for k in ("quantization_config", "expert_dtype", "torch_dtype", "dtype"):
        d.pop(k, None)
    d["dtype"] = "float32" if dtype == "float32" else "bfloat16"
    if dtype == "release":
        d["quantization_config"] = dict(RELEASE_QUANT)
        d["expert_dtype"] = "fp4"
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
