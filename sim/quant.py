"""Quantisations (``Quant``): bits per stored weight, activation / KV-cache bytes, compute precision.

A quantisation answers, for one weight tensor (Hugging Face name, layer index), how many
bits each element occupies in memory *including* its quantisation scales, and
which peak rate (``Device.peak(precision)``) the matmul runs at. Every mix below is the
per-tensor rule of the tool or recipe that produced the published files, not an average.

Sources for the formats:
  * DeepSeek FP8 (DeepSeek-V3 technical report, sec. 3.3, and the published
    checkpoint): GEMM weights in FP8 E4M3 with one FP32 scale per 128x128 block
    -> 8 + 32/(128*128) bits; embedding, LM head, router (gate), norms stay BF16.
  * NVFP4 (NVIDIA Blackwell; E2M1 values, one FP8 E4M3 scale per 16 elements, one FP32
    per-tensor scale ``weight_scale_2`` and one FP32 ``input_scale`` per matrix:
    4 + 8/16 bits + 64 bits per matrix). Mix of nvidia/DeepSeek-R1-FP4 (model card: quantised
    with nvidia-modelopt v0.23.0), produced by NVIDIA/TensorRT-Model-Optimizer
    examples/deepseek: ptq.py disables ``*head*`` and, without ``--mla_quant``, every
    ``*attn*`` quantiser; quantize_to_nvfp4.py first dequantises DeepSeek's FP8 weights to
    BF16 and writes every layer without an amax as that BF16 tensor. So: dense MLP, shared
    and routed experts NVFP4; MLA projections, router (a bare parameter, not a Linear),
    embedding and LM head BF16. ``nvfp4_v2`` is nvidia/DeepSeek-R1-FP4-v2 (model card:
    "additionally quantizes the wo module": o_proj NVFP4 too; ptq.py --enable_wo_quant).
    Dense GQA models (nvidia/Llama-3.1-*-FP4): modelopt's NVFP4 recipe quantises every
    Linear in the blocks, attention included; embedding and lm_head stay BF16.
  * MXFP4 (OCP Microscaling v1.0: E2M1 values, one E8M0 scale per 32 -> 4 + 8/32 bits).
    Mix of amd/DeepSeek-R1-0528-MXFP4 (model card, AMD-Quark quantize_quark.py
    ``--exclude_layers "*self_attn* *mlp.gate.* *lm_head model.layers.61.*"``): MLPs and
    experts MXFP4; attention, router, embedding, head BF16. Dense models
    (amd/Llama-3.1-405B-Instruct-MXFP4-Preview) exclude only lm_head.
  * llama.cpp (GGUF) block formats: bytes per block from the block structs of
    ggml/src/ggml-common.h (Q8_0 34 B/32 = 8.5 bpw, Q2_K 84 B/256 = 2.625, Q3_K 110/256 =
    3.4375, Q4_K 144/256 = 4.5, Q5_K 176/256 = 5.5, Q6_K 210/256 = 6.5625, IQ1_S 50/256 =
    1.5625, IQ2_XXS 66/256 = 2.0625, IQ3_S 110/256 = 3.4375, IQ4_NL 18/32 = 4.5, ...).
  * llama.cpp file types (Q2_K, Q3_K_S/M, Q4_K_S/M, Q5_K_M, Q6_K, Q8_0, IQ1_S) are the real
    per-tensor mix of ``llama_tensor_get_type_impl`` in src/llama-quant.cpp (ggml-org/llama.cpp,
    read at commit 007dbbf), ported in ``gguf_tensor_type`` below for the tensors our models
    have: categories by GGUF name (output, token_embd, attn_v / attn_kv_b, attn_k, attn_q,
    attn_output, ffn_down*, ffn_gate*, ffn_up*), ``use_more_bits``, the i_layer < n/8 and
    n/16 rules, the GQA >= 4 / 8-expert / 70B bumps, IQ1_S's Q2_K embedding, Q5_K output,
    IQ2_XXS attn_output and Q2_K first-eighth ffn_down, and ``tensor_type_fallback`` for rows
    not a multiple of the block (Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0,
    IQ*->IQ4_NL). Not quantised (``tensor_allows_quantization``): 1-D tensors (norms, biases,
    DeepSeek's exp_probs_b) and the MoE router ``ffn_gate_inp``, all stored F32 by the
    converter. A DeepSeek GGUF has ``attn_kv_b`` as one tensor and head_count_kv = n_head
    (the layout of the January-2025 DeepSeek-R1 GGUFs; e.g. Ollama deepseek-r1:671b-q8_0
    metadata: deepseek2.attention.head_count_kv 128).
    Checked against published files (tests/test_quant.py): Qwen2.5-14B Q2_K / Q3_K_S /
    Q3_K_M / Q4_K_S / Q4_K_M / Q8_0 (mradermacher/Qwen2.5-14B-GGUF), DeepSeek-R1 Q2_K,
    Q3_K_M, Q4_K_M (unsloth/DeepSeek-R1-GGUF) and Q8_0 (Ollama deepseek-r1:671b-q8_0).
  * int8 (W8A8, SmoothQuant-style): int8 weights with one 16-bit scale per
    output channel (8 + 16/in_features bits); embedding and LM head kept 16-bit.

KV cache: every quantisation has a default KV element size; ``get_quant(name, kv_dtype)``
or the string ``"<name>+kv-<dtype>"`` gives the same weights with another cache type.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from dsref.reference.params import EMBED, GLOBAL, HEAD, Tensor, tensors

BITS_PER_BYTE = 8

# ggml tensor types: (bytes per block, weights per block), ggml/src/ggml-common.h block structs.
_GGML_BLOCK = {
    "f32": (4, 1), "f16": (2, 1), "bf16": (2, 1),
    "q4_0": (18, 32), "q4_1": (20, 32), "q5_0": (22, 32), "q5_1": (24, 32), "q8_0": (34, 32),
    "q2_k": (84, 256), "q3_k": (110, 256), "q4_k": (144, 256), "q5_k": (176, 256), "q6_k": (210, 256),
    "iq1_s": (50, 256), "iq1_m": (56, 256), "iq2_xxs": (66, 256), "iq2_xs": (74, 256), "iq2_s": (82, 256),
    "iq3_xxs": (98, 256), "iq3_s": (110, 256), "iq4_nl": (18, 32), "iq4_xs": (136, 256), "mxfp4": (17, 32),
}
# tensor_type_fallback(): the type used when a row is not a multiple of the type's block.
_GGML_FALLBACK = {
    "iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
    "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl", "iq4_xs": "iq4_nl",
    "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
}

FP8_BLOCK = 128  # DeepSeek-V3 FP8 weight block edge (128x128 tiles), tech report sec. 3.3
FP32_SCALE_BITS = 32
INT8_SCALE_BITS = 16  # one fp16/bf16 scale per output channel
FP4_BITS = 4          # E2M1
NVFP4_GROUP = 16      # elements per FP8 E4M3 scale (NVFP4)
MXFP4_GROUP = 32      # elements per E8M0 scale (OCP MX v1.0)
FP8_SCALE_BITS = 8
NVFP4_TENSOR_SCALARS = 2  # FP32 weight_scale_2 and input_scale per matrix (modelopt export)


def ggml_bits(fmt: str) -> float:
    """Bits per weight of a llama.cpp tensor type (block bytes * 8 / block weights)."""
    nbytes, nweights = _GGML_BLOCK[fmt]
    return nbytes * BITS_PER_BYTE / nweights


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp use_more_bits(): first/last eighth of the layers, and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# ------------------------------------------------------------------ llama.cpp file types
# llama.cpp file type -> the ggml type of every tensor no rule overrides
# (llama_ftype_get_default_type in src/llama-quant.cpp).
GGUF_FTYPES = {"q2_k": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q4_k_s": "q4_k", "q4_k_m": "q4_k",
               "q5_k_m": "q5_k", "q6_k": "q6_k", "q8_0": "q8_0", "iq1_s": "iq1_s"}
# file types whose output/embedding/attn_v/ffn_down follow the low-bit i-quant branch
_IQ_LOW = {"iq2_xxs", "iq2_xs", "iq1_s", "iq2_s", "iq2_m", "iq1_m"}
# llama.cpp tensor categories (tensor_get_category), from the Hugging Face module name
_HF_TO_CATEGORY = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "kv_b_proj": "attn_kv_b",
                   "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                   "down_proj": "ffn_down"}
_ATTN_V_LIKE = {"attn_v", "attn_kv_b"}  # category_is_attn_v (attn_qkv: no model of ours fuses QKV)


@dataclass(frozen=True)
class GgufModel:
    """The hparams ``llama_tensor_get_type_impl`` reads, from a ModelConfig.

    n_gqa: n_head / n_head_kv as the GGUF stores them (DeepSeek: head_count_kv = n_head, so 1);
    n_expert: routed experts (0 for dense); is_70b: llama.cpp's LLM_TYPE_70B (llama-model.cpp:
    an 80-layer LLaMA with GQA or an 80-layer Qwen2); down_per_layer: ffn_down* tensors of
    each layer (the file-order counter i_ffn_down of the i-quant rule counts tensors, not layers).
    """

    n_layers: int
    n_gqa: int
    n_expert: int
    is_70b: bool
    down_per_layer: tuple[int, ...]

    @classmethod
    def of(cls, cfg) -> "GgufModel":
        n = cfg.num_hidden_layers
        gqa = cfg.num_attention_heads // cfg.num_key_value_heads
        moe_downs = 1 + (1 if cfg.n_shared_experts else 0)  # ffn_down_exps (+ ffn_down_shexp)
        downs = tuple(moe_downs if cfg.is_moe_layer(i) else 1 for i in range(n))
        return cls(n, gqa, cfg.n_routed_experts if cfg.is_moe else 0,
                   not cfg.is_moe and n == 80 and gqa > 1, downs)

    def ffn_down_ordinal(self, name: str, layer: int) -> int:
        """Index of this ffn_down tensor in file order: llama-model-loader sorts by layer, then
        by name, so in a MoE layer ffn_down_exps comes before ffn_down_shexp."""
        return sum(self.down_per_layer[:layer]) + (1 if name.startswith("mlp.shared_experts.") else 0)


def gguf_category(name: str) -> str:
    """llama.cpp tensor category of a Hugging Face tensor name (globals: the full name)."""
    if name == HEAD:
        return "output"
    if name == EMBED:
        return "token_embd"
    parts = name.split(".")
    return _HF_TO_CATEGORY.get(parts[-2], "other") if len(parts) >= 2 else "other"


def _is_router(name: str) -> bool:
    return name.endswith("mlp.gate.weight")


def _is_index_weights(name: str) -> bool:
    """DeepSeek-V3.2's indexer head-weight projection: bf16 in the FP8 release (only wq_b and wk
    carry _scale_inv; reference/checkpoint.py _LINEAR), so FP8 leaves it 16-bit."""
    return name.endswith("indexer.weights_proj.weight")


def _gguf_rule(ft: str, t: str, cat: str, name: str, ncols: int, layer: int | None, m: GgufModel) -> str:
    """llama_tensor_get_type_impl() for file type ``ft`` whose default ggml type is ``t``."""
    n = m.n_layers
    if cat == "output":  # the tied embedding arrives here too (weight_role)
        if ncols % _GGML_BLOCK[t][1]:
            return "q8_0"
        if ft in _IQ_LOW or ft == "iq3_xxs":
            return "q5_k"
        return t if t == "q8_0" else "q6_k"
    if cat == "token_embd":
        if ft in ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"):
            return "q2_k"
        if ft in ("iq2_s", "iq2_m", "iq3_xxs"):
            return "iq3_s"
        return t
    if ft in _IQ_LOW:
        if cat in _ATTN_V_LIKE:
            if m.n_gqa >= 4 or m.n_expert >= 4:
                return "q4_k"
            return "iq3_s" if ft in ("iq2_s", "iq2_m") else "q2_k"
        if m.n_expert == 8 and cat == "attn_k":
            return "q4_k"
        if cat == "ffn_down":
            if m.ffn_down_ordinal(name, layer) < n // 8:
                return "iq3_s" if ft in ("iq2_s", "iq2_m") else "q2_k"
            return t
        if cat == "attn_output":
            if m.n_expert == 8:
                return "q5_k"
            if ft in ("iq1_s", "iq1_m"):
                return "iq2_xxs"
            return "iq3_s" if ft in ("iq2_s", "iq2_m") else t
        return t
    if cat in _ATTN_V_LIKE:
        # one attn_v-like tensor per layer, so the counter i_attention_wv is the layer index
        if ft == "q2_k":
            t = "q4_k" if m.n_gqa >= 4 else "q3_k"
        elif ft == "q3_k_m":
            t = "q5_k" if layer < 2 else "q4_k"
        elif ft in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n):
            t = "q6_k"
        elif ft == "q4_k_s" and layer < 4:
            t = "q5_k"
        if m.is_70b and t in ("q3_k", "q4_k"):
            t = "q5_k"  # 8x smaller attn_v in the 70B GQA models: more bits for ~nothing
        return "q8_0" if m.n_expert == 8 else t
    if cat == "attn_k":
        return "q8_0" if m.n_expert == 8 else t
    if cat == "ffn_down":
        # i_layer: the layer in the name (MoE) or the tensor counter (dense): both the layer index
        if ft == "q2_k":
            return "q3_k"
        if ft == "q3_k_m":
            return "q5_k" if layer < n // 16 else "q4_k"
        if ft in ("q4_k_m", "q5_k_m"):
            return "q6_k" if use_more_bits(layer, n) else t
        if ft == "q4_k_s" and layer < n // 8:
            return "q5_k"
        return t
    if cat == "attn_output":
        if m.n_expert == 8:
            return "q5_k" if ft in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m") else t
        return {"q2_k": "q3_k", "q3_k_m": "q4_k"}.get(ft, t)
    return t


def gguf_tensor_type(ftype: str, name: str, shape: tuple[int, ...], layer: int | None, model: GgufModel) -> str:
    """The ggml type llama.cpp's ``llama-quantize <ftype>`` stores this tensor in."""
    if len(shape) < 2 or _is_router(name):
        return "f32"  # tensor_allows_quantization: 1-D tensors and ffn_gate_inp keep the converter's F32
    ncols = shape[-1]  # ggml ne[0] = in_features
    t = _gguf_rule(ftype, GGUF_FTYPES[ftype], gguf_category(name), name, ncols, layer, model)
    if ncols % _GGML_BLOCK[t][1]:
        if t not in _GGML_FALLBACK:
            raise ValueError(f"{name}: {ncols} columns is no multiple of the {t} block; llama.cpp cannot store it")
        t = _GGML_FALLBACK[t]
        if ncols % _GGML_BLOCK[t][1]:
            t = "f16"
    return t


@functools.lru_cache(maxsize=64)
def _gguf_model_of(cfg) -> GgufModel:
    return GgufModel.of(cfg)  # once per model, not once per tensor (the layer scan is O(layers))


def _gguf_model(cfg, n_layers: int, ftype: str) -> GgufModel:
    if cfg is None:
        raise ValueError(f"quantisation {ftype}: llama.cpp's per-tensor rules read the model's GQA ratio, "
                         "expert count and layer kinds; pass cfg=")
    m = _gguf_model_of(cfg)
    if m.n_layers != n_layers:
        raise ValueError(f"n_layers {n_layers} disagrees with the model config ({m.n_layers})")
    return m


# ------------------------------------------------------------------ the Quant record
KV_DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp32": 4.0, "q8_0": 34 / 32}
# llama.cpp's --cache-type-k/v offers f32, f16, bf16 and block types (q8_0 ...) but no fp8;
# the frameworks (vLLM, SGLang, TensorRT-LLM) offer fp8 (E4M3) but no ggml block types.
_KV_BY_RUNTIME = {"llama.cpp": ("bf16", "fp16", "fp32", "q8_0"), "framework": ("bf16", "fp16", "fp8", "fp32")}
KV_SUFFIX = "+kv-"


@dataclass(frozen=True)
class Quant:
    """How a model is stored and computed.

    name: quantisation id (with ``+kv-<dtype>`` when the KV cache type was chosen);
    gemm_precision: key for Device.peak() of weight matmuls;
    attn_precision: of attention score/value products; head_precision: of the LM
    head (DeepSeek-V3 FP8 keeps the output head in BF16, tech report sec. 3.3.1);
    act_bytes: activation element size; kv_bytes: KV-cache element size; runtime:
    'llama.cpp' for the GGUF formats (CPU/consumer GPU runtimes), else 'framework';
    weights: the weight-format key (defaults to name; a KV variant keeps its base's).
    """

    name: str
    gemm_precision: str
    attn_precision: str
    act_bytes: float
    kv_bytes: float
    runtime: str = "framework"
    description: str = ""
    head_precision: str = ""  # LM-head matmul precision ("" = gemm_precision)
    weights: str = ""         # key of _WEIGHT_BITS ("" = name)

    @property
    def weight_format(self) -> str:
        return self.weights or self.name

    def weight_bits(self, name: str, shape: tuple[int, ...], layer: int | None, n_layers: int,
                    cfg=None) -> float:
        """Bits per element of one weight tensor (scales included).

        name: HF name relative to its layer ('self_attn.o_proj.weight',
        'mlp.experts.down_proj.weight') or global ('lm_head.weight'). cfg: the ModelConfig;
        the llama.cpp mixes and the FP4 recipes' attention rule need it (tensor_bytes passes it).
        """
        return _WEIGHT_BITS[self.weight_format](name, shape, layer, n_layers, cfg)

    def tensor_precision(self, name: str, shape: tuple[int, ...], cfg=None) -> str:
        """Peak-rate key of the matmul that reads this weight: a tensor a recipe keeps in BF16
        (the FP4 checkpoints' MLA projections) multiplies at bf16, not at gemm_precision."""
        if name == HEAD:
            return self.head_precision or self.gemm_precision
        if self.weight_format in _FP4 and not _fp4_quantised(self.weight_format, name, shape, cfg):
            return "bf16"
        if self.weight_format == "fp8" and _is_index_weights(name):
            return "bf16"
        return self.gemm_precision


def _is_matrix(shape) -> bool:
    return len(shape) >= 2


def _is_embed_or_head(name: str) -> bool:
    return name in (EMBED, HEAD)


def _bits_fp32(name, shape, layer, n, cfg):
    return 32.0


def _bits_bf16(name, shape, layer, n, cfg):
    return 32.0 if name.endswith("e_score_correction_bias") else 16.0


def _bits_fp8(name, shape, layer, n, cfg):
    if not _is_matrix(shape) or _is_embed_or_head(name) or _is_router(name) or _is_index_weights(name):
        return _bits_bf16(name, shape, layer, n, cfg)
    return 8.0 + FP32_SCALE_BITS / (FP8_BLOCK * FP8_BLOCK)


def _bits_int8(name, shape, layer, n, cfg):
    if not _is_matrix(shape) or _is_embed_or_head(name) or _is_router(name):
        return _bits_bf16(name, shape, layer, n, cfg)
    return 8.0 + INT8_SCALE_BITS / shape[-1]


def _fp4_quantised(fmt: str, name: str, shape, cfg) -> bool:
    """Whether the FP4 recipe of ``fmt`` stores this tensor in FP4 (else BF16)."""
    if not _is_matrix(shape) or _is_embed_or_head(name) or _is_router(name):
        return False
    if not name.startswith("self_attn."):
        return True  # dense MLP, shared and routed experts
    if cfg is None:
        raise ValueError(f"quantisation {fmt}: whether {name} is FP4 depends on the attention kind (MLA or "
                         "GQA); pass cfg=")
    if cfg.arch != "deepseek":
        return True  # dense GQA recipes quantise every Linear in the blocks
    return fmt == "nvfp4_v2" and name == "self_attn.o_proj.weight"


def _fp4_bits(fmt: str, name, shape, layer, n, cfg) -> float:
    if not _fp4_quantised(fmt, name, shape, cfg):
        return _bits_bf16(name, shape, layer, n, cfg)
    if fmt == "mxfp4":
        return FP4_BITS + FP8_SCALE_BITS / MXFP4_GROUP
    matrix = shape[-2] * shape[-1]  # stacked experts: each expert matrix has its own scalars
    return FP4_BITS + FP8_SCALE_BITS / NVFP4_GROUP + NVFP4_TENSOR_SCALARS * FP32_SCALE_BITS / matrix


def _gguf_bits(ftype: str):
    def bits(name, shape, layer, n, cfg):
        return ggml_bits(gguf_tensor_type(ftype, name, shape, layer, _gguf_model(cfg, n, ftype)))
    return bits


_FP4 = ("nvfp4", "nvfp4_v2", "mxfp4")
_WEIGHT_BITS = {"fp32": _bits_fp32, "bf16": _bits_bf16, "fp8": _bits_fp8, "int8": _bits_int8,
                **{f: functools.partial(_fp4_bits, f) for f in _FP4},
                **{f: _gguf_bits(f) for f in GGUF_FTYPES}}

# llama.cpp quantises activations to Q8 blocks and runs integer dot products
# (ggml vec_dot_q4_K_q8_K / q8_0_q8_0: ARM SDOT, x86 VNNI/AVX2 maddubs; CUDA/HIP MMQ
# kernels use dp4a / int8 MMA), so the int8 peak is the matmul ceiling. Its CPU
# attention (flash-attn path) runs in f16/f32 with f32 accumulation: the fp32 peak is
# the conservative choice. Activations are f32 between ops; the KV cache is f16 by
# default (llama.cpp --cache-type-k/v f16).
_GGUF_DESCRIPTIONS = {
    "q2_k": "Q2_K (2.625 bpw) + Q3_K ffn_down/attn_output, Q3_K or Q4_K (GQA>=4) attn_v, Q6_K output",
    "q3_k_s": "Q3_K (3.4375 bpw) everywhere but the Q6_K output",
    "q3_k_m": "Q3_K + Q4_K attn_output/ffn_down (Q5_K in the first 1/16), Q5_K/Q4_K attn_v, Q6_K output",
    "q4_k_s": "Q4_K + Q5_K attn_v in layers 0-3 and ffn_down in the first eighth, Q6_K output",
    "q4_k_m": "Q4_K + Q6_K output, attn_v/attn_kv_b/ffn_down in use_more_bits layers",
    "q5_k_m": "Q5_K + Q6_K output, attn_v/attn_kv_b/ffn_down in use_more_bits layers",
    "q6_k": "Q6_K (6.5625 bpw) everywhere",
    "q8_0": "Q8_0 (8.5 bpw) everywhere",
    "iq1_s": "IQ1_S (1.5625 bpw) + IQ2_XXS attn_output, Q2_K token_embd and first-eighth ffn_down, "
             "Q4_K (GQA>=4 or MoE) / Q2_K attn_v, Q5_K output; needs an importance matrix",
}
QUANTS: dict[str, Quant] = {
    "fp32": Quant("fp32", "fp32", "fp32", 4, 4, description="IEEE fp32 weights and activations"),
    "bf16": Quant("bf16", "bf16", "bf16", 2, 2, description="bf16 weights, activations and KV cache"),
    "fp8": Quant("fp8", "fp8", "bf16", 2, 2,
                 description="DeepSeek-V3 FP8: E4M3 GEMM weights + fp32 128x128 block scales; "
                             "bf16 attention, activations, KV cache, embedding/head/router",
                 head_precision="bf16"),
    "int8": Quant("int8", "int8", "bf16", 2, 2,
                  description="W8A8: int8 weights with per-output-channel 16-bit scales",
                  head_precision="bf16"),
    # W4A4 on Blackwell's FP4 tensor cores; devices without an fp4 peak fall back (Device.peak).
    "nvfp4": Quant("nvfp4", "fp4", "bf16", 2, 2,
                   description="NVFP4 (nvidia/DeepSeek-R1-FP4): E2M1 + E4M3 scale per 16 + fp32 per tensor "
                               "for MLPs/experts; MLA projections, router, embedding, head bf16; bf16 KV cache",
                   head_precision="bf16"),
    "nvfp4_v2": Quant("nvfp4_v2", "fp4", "bf16", 2, 2,
                      description="NVFP4 as nvidia/DeepSeek-R1-FP4-v2: nvfp4 plus o_proj in NVFP4",
                      head_precision="bf16"),
    "mxfp4": Quant("mxfp4", "fp4", "bf16", 2, 2,
                   description="OCP MXFP4 (amd/DeepSeek-R1-0528-MXFP4): E2M1 + E8M0 scale per 32 for "
                               "MLPs/experts; attention, router, embedding, head bf16; bf16 KV cache",
                   head_precision="bf16"),
    **{f: Quant(f, "int8", "fp32", 4, 2, runtime="llama.cpp",
                description=f"llama.cpp {f.upper()}: {d}, f16 KV cache")
       for f, d in _GGUF_DESCRIPTIONS.items()},
}


def _kv_choices(runtime: str) -> str:
    return ", ".join(_KV_BY_RUNTIME[runtime])


def get_quant(name: str, kv_dtype: str | None = None) -> Quant:
    """The quantisation ``name``; ``kv_dtype`` (or a ``+kv-<dtype>`` suffix of the name) sets the
    KV-cache element type: None keeps the quantisation's default, else one of bf16, fp16, fp8,
    fp32 (frameworks) or bf16, fp16, fp32, q8_0 (llama.cpp). The result is named
    ``<base>+kv-<dtype>``, e.g. get_quant("nvfp4", kv_dtype="fp8").name == "nvfp4+kv-fp8"."""
    base, sep, suffix = name.strip().lower().partition("+")
    key = base.replace("-", "_")
    if key not in QUANTS:
        raise ValueError(f"unknown quantisation {name!r}; known: {', '.join(QUANTS)} "
                         f"(optionally with {KV_SUFFIX}<dtype>)")
    q = QUANTS[key]
    if sep:
        if not suffix.startswith(KV_SUFFIX[1:]) or not suffix[len(KV_SUFFIX) - 1:]:
            raise ValueError(f"quantisation {name!r}: the part after '+' must be kv-<dtype> with dtype one of "
                             f"{_kv_choices(q.runtime)}")
        from_name = suffix[len(KV_SUFFIX) - 1:]
        if kv_dtype is not None and kv_dtype.lower() != from_name:
            raise ValueError(f"kv_dtype {kv_dtype!r} contradicts the quantisation name {name!r}")
        kv_dtype = from_name
    if kv_dtype is None:
        return q
    kv = kv_dtype.lower()
    if kv not in _KV_BY_RUNTIME[q.runtime]:
        raise ValueError(f"kv_dtype {kv_dtype!r} is not a KV-cache type of {q.name} ({q.runtime}); "
                         f"choices: {_kv_choices(q.runtime)}")
    return dataclasses.replace(q, name=f"{q.name}{KV_SUFFIX}{kv}", kv_bytes=KV_DTYPE_BYTES[kv],
                               weights=q.weight_format,
                               description=f"{q.description}; KV cache {kv} ({KV_DTYPE_BYTES[kv]:g} B/element)")


def weight_role(cfg, name: str) -> str:
    """The tensor name whose storage rule applies to global weight ``name``.

    A tied input embedding is also the output layer, and llama.cpp quantises it as one
    (llama-quant.cpp ``llama_tensor_get_type``: ``token_embd`` takes the output type when
    the model has no separate ``output.weight``; Q4_K_M -> Q6_K). Every other quantisation
    stores embedding and head alike, so the mapping changes nothing for them.
    """
    return HEAD if name == EMBED and cfg.tie_word_embeddings else name


def tensor_bytes(cfg, quant: Quant, t: Tensor) -> float:
    """Stored bytes of one row of the tensor table (reference.params.tensors) under ``quant``:
    elements x bits per element (quantisation scales included) / 8. Every byte count of the
    simulator is a sum of this over rows; a global is stored by the rule of its role (``weight_role``)."""
    name = weight_role(cfg, t.rel) if t.group == GLOBAL else t.rel
    return t.numel * quant.weight_bits(name, t.shape, t.layer, cfg.num_hidden_layers, cfg) / BITS_PER_BYTE


def model_weight_bytes(cfg, quant: Quant) -> dict[str, float]:
    """Stored weight bytes of the main model under ``quant`` (the tensor table, no MTP module).

    Returns total, per-layer list, globals and the average bits per weight.
    """
    glob = 0.0
    layers = [0.0] * cfg.num_hidden_layers
    for t in tensors(cfg):
        b = tensor_bytes(cfg, quant, t)
        if t.layer is None:
            glob += b
        else:
            layers[t.layer] += b
    total = glob + sum(layers)
    params = cfg.param_counts()["total_params"]
    return {"total": total, "globals": glob, "layers": layers, "bits_per_weight": total * BITS_PER_BYTE / params}
