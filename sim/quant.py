"""Quantisations (``Quant``): bits per stored weight, activation / KV-cache bytes, compute precision.

A quantisation answers, for one weight tensor (Hugging Face name, layer index), how many
bits each element occupies in memory *including* its quantisation scales, and
which peak rate (``Device.peak(precision)``) the matmul runs at.

Sources for the formats:
  * DeepSeek FP8 (DeepSeek-V3 technical report, sec. 3.3, and the published
    checkpoint): GEMM weights in FP8 E4M3 with one FP32 scale per 128x128 block
    -> 8 + 32/(128*128) bits; embedding, LM head, router (gate), norms stay BF16.
  * llama.cpp block formats (ggml-common.h block structs; the table printed by
    ``llama-quantize --help``):
        Q8_0: 32 int8 + one fp16 scale = 34 B / 32 weights = 8.5 bpw
        Q5_0: 32 x 5 bit + fp16 scale = 22 B / 32 = 5.5 bpw
        Q4_K: 256-weight super-block, 144 B = 4.5 bpw
        Q5_K: 176 B / 256 = 5.5 bpw
        Q6_K: 210 B / 256 = 6.5625 bpw
  * Q4_K_M is the real per-tensor mix of llama.cpp's ``llama_tensor_get_type``
    (src/llama-quant.cpp), not an average: Q4_K by default; ``output.weight``
    (LM head, or a tied embedding) Q6_K; ``attn_v`` and ``ffn_down`` (dense, shared and routed
    experts) Q6_K in the layers picked by ``use_more_bits`` (the first and last
    eighth of the layers and every third layer in between); rows whose length is
    not a multiple of the 256-weight super-block fall back to Q5_0 / Q8_0; 1-D
    tensors (norms, biases) stay F32. For LLaMA-class models llama.cpp reports
    ~4.8-4.9 bpw on average for Q4_K_M; the mix computed here gives 4.87 bpw (8.98 GB) for
    Qwen2.5-14B (published Q4_K_M file: 8.99 GB for 14.77 B weights, 4.87 bpw).
  * int8 (W8A8, SmoothQuant-style): int8 weights with one 16-bit scale per
    output channel (8 + 16/in_features bits); embedding and LM head kept 16-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsref.reference.params import EMBED, GLOBAL, HEAD, Tensor, tensors

BITS_PER_BYTE = 8

# llama.cpp block formats: bytes per block / weights per block (ggml-common.h).
_GGML_BLOCK = {
    "f32": (4, 1), "f16": (2, 1), "q8_0": (34, 32), "q5_0": (22, 32),
    "q4_k": (144, 256), "q5_k": (176, 256), "q6_k": (210, 256),
}
QK_K = 256  # super-block length of the k-quants (ggml-common.h)
# k-quant -> legacy format used when a row is not a multiple of QK_K (llama-quant.cpp).
_KQUANT_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_0", "q6_k": "q8_0"}

FP8_BLOCK = 128  # DeepSeek-V3 FP8 weight block edge (128x128 tiles), tech report sec. 3.3
FP32_SCALE_BITS = 32
INT8_SCALE_BITS = 16  # one fp16/bf16 scale per output channel


def ggml_bits(fmt: str) -> float:
    """Bits per weight of a llama.cpp tensor type (block bytes * 8 / block weights)."""
    nbytes, nweights = _GGML_BLOCK[fmt]
    return nbytes * BITS_PER_BYTE / nweights


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp use_more_bits(): first/last eighth of the layers, and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class Quant:
    """How a model is stored and computed.

    name: quantisation id. gemm_precision: key for Device.peak() of weight matmuls;
    attn_precision: of attention score/value products; head_precision: of the LM
    head (DeepSeek-V3 FP8 keeps the output head in BF16, tech report sec. 3.3.1);
    act_bytes: activation
    element size; kv_bytes: KV-cache element size; runtime: 'llama.cpp' for the
    GGUF formats (CPU/consumer GPU runtimes), else 'framework'.
    """

    name: str
    gemm_precision: str
    attn_precision: str
    act_bytes: float
    kv_bytes: float
    runtime: str = "framework"
    description: str = ""
    head_precision: str = ""  # LM-head matmul precision ("" = gemm_precision)

    def weight_bits(self, name: str, shape: tuple[int, ...], layer: int | None, n_layers: int) -> float:
        """Bits per element of one weight tensor (scales included).

        name: HF name relative to its layer ('self_attn.o_proj.weight',
        'mlp.experts.down_proj.weight') or global ('lm_head.weight').
        """
        return _WEIGHT_BITS[self.name](name, shape, layer, n_layers)


def _is_matrix(shape) -> bool:
    return len(shape) >= 2


def _is_embed_or_head(name: str) -> bool:
    return name in (EMBED, HEAD)


def _bits_fp32(name, shape, layer, n):
    return 32.0


def _bits_bf16(name, shape, layer, n):
    return 32.0 if name.endswith("e_score_correction_bias") else 16.0


def _bits_fp8(name, shape, layer, n):
    if not _is_matrix(shape) or _is_embed_or_head(name) or name.endswith("gate.weight"):
        return _bits_bf16(name, shape, layer, n)
    return 8.0 + FP32_SCALE_BITS / (FP8_BLOCK * FP8_BLOCK)


def _bits_int8(name, shape, layer, n):
    if not _is_matrix(shape) or _is_embed_or_head(name) or name.endswith("gate.weight"):
        return _bits_bf16(name, shape, layer, n)
    return 8.0 + INT8_SCALE_BITS / shape[-1]


def _bits_q8_0(name, shape, layer, n):
    return ggml_bits("q8_0") if _is_matrix(shape) else ggml_bits("f32")


def _q4_k_m_type(name: str, layer: int | None, n: int) -> str:
    """llama_tensor_get_type() for LLAMA_FTYPE_MOSTLY_Q4_K_M (the cases our models reach)."""
    if name == HEAD:
        return "q6_k"
    if layer is not None and (name.endswith("v_proj.weight") or name.endswith("down_proj.weight")):
        return "q6_k" if use_more_bits(layer, n) else "q4_k"
    return "q4_k"


def q4_k_m_format(name: str, shape: tuple[int, ...], layer: int | None, n_layers: int) -> str:
    """The ggml type llama.cpp stores this tensor in under Q4_K_M."""
    if not _is_matrix(shape):
        return "f32"
    t = _q4_k_m_type(name, layer, n_layers)
    if shape[-1] % QK_K:
        t = _KQUANT_FALLBACK[t]
    return t


def _bits_q4_k_m(name, shape, layer, n):
    return ggml_bits(q4_k_m_format(name, shape, layer, n))


_WEIGHT_BITS = {"fp32": _bits_fp32, "bf16": _bits_bf16, "fp8": _bits_fp8, "int8": _bits_int8,
                "q8_0": _bits_q8_0, "q4_k_m": _bits_q4_k_m}

# llama.cpp quantises activations to Q8 blocks and runs integer dot products
# (ggml vec_dot_q4_K_q8_K / q8_0_q8_0: ARM SDOT, x86 VNNI/AVX2 maddubs; CUDA/HIP MMQ
# kernels use dp4a / int8 MMA), so the int8 peak is the matmul ceiling. Its CPU
# attention (flash-attn path) runs in f16/f32 with f32 accumulation: the fp32 peak is
# the conservative choice. Activations are f32 between ops; the KV cache is f16 by
# default (llama.cpp --cache-type-k/v f16).
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
    "q8_0": Quant("q8_0", "int8", "fp32", 4, 2, runtime="llama.cpp",
                      description="llama.cpp Q8_0 (8.5 bpw), f16 KV cache"),
    "q4_k_m": Quant("q4_k_m", "int8", "fp32", 4, 2, runtime="llama.cpp",
                        description="llama.cpp Q4_K_M mix (Q4_K + Q6_K for LM head, attn_v/ffn_down "
                                    "in use_more_bits layers), f16 KV cache"),
}


def get_quant(name: str) -> Quant:
    key = name.lower().replace("-", "_")
    if key not in QUANTS:
        raise ValueError(f"unknown quantisation {name!r}; known: {', '.join(QUANTS)}")
    return QUANTS[key]


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
    return t.numel * quant.weight_bits(name, t.shape, t.layer, cfg.num_hidden_layers) / BITS_PER_BYTE


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
