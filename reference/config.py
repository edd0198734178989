"""ModelConfig: one description of a DeepSeek-V3/V2-family (or dense GQA) model.

Reads and writes Hugging Face ``config.json`` field names, so the same object
drives the JAX model, the float64 NumPy reference, the checkpoint loader and the
simulator's cost model (one source of truth).

Dimension letters used across the project (code, formulas, docs):
    B batch, T tokens (query length), S key length, D hidden_size,
    H attention heads, K kv heads (GQA), L layers, V vocab,
    E routed experts, k experts per token, F expert / MLP intermediate,
    R kv_lora_rank (latent), Q q_lora_rank, N qk_nope_head_dim,
    P qk_rope_head_dim, A v_head_dim.
DeepSeek-V3.2's lightning indexer (reference/dsa.py): I index_n_heads, J index_head_dim.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that the model cannot run: names the field and the file."""


def read_config_json(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(the JSON object, its file) of config.json: a file, or a checkpoint directory holding one;
    ConfigError naming the file when it is missing, not JSON, or not an object. A file that is not
    UTF-8 raises UnicodeDecodeError, which the CLI reports as a binary file (reference/cli.py)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"{p}: no config.json found")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: top level must be a JSON object")
    return d, p


_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
_SCORING = ("sigmoid", "softmax")
_ARCH = ("deepseek", "dense")


#: RMSNorm eps of MLA's q_a_layernorm and kv_a_layernorm. DeepSeek's inference code and
#: transformers both build these two norms with the RMSNorm default, 1e-6, whatever the
#: config's rms_norm_eps says. rms_norm_eps applies to the decoder layers' input and
#: post-attention norms, the final norm and the MTP norms. Every released checkpoint has
#: rms_norm_eps = 1e-6, so only other configs tell the two apart.
MLA_NORM_EPS = 1e-6

#: LayerNorm eps of the V3.2 indexer's key norm (k_norm): transformers builds it as
#: nn.LayerNorm(index_head_dim, eps=1e-6), DeepSeek's inference code as its LayerNorm default
#: (1e-6); neither reads the config.
INDEX_NORM_EPS = 1e-6

#: The indexer fields of a DeepSeek-V3.2 config.json (DeepSeek Sparse Attention). All three or
#: none: a model has an indexer in every layer iff they are set (transformers DeepseekV32Config:
#: layer_types = "indexed_attention" for every layer).
INDEX_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (rope_scaling / rope_parameters in config.json)."""

    type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # explicit cos/sin factor (else derived)
    truncate: bool = True  # floor/ceil the YaRN correction range (HF default)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V3/V2-family MoE+MLA model, or a GQA model.

    Field names follow Hugging Face config.json. ``arch`` names the attention family:
      * "deepseek": MLA (latent KV cache) + DeepSeekMoE (shared experts, grouped routing);
      * "dense": ordinary (non-latent) GQA/MHA attention, the Qwen/LLaMA models. Its FFN is
        a SwiGLU MLP, or, when n_routed_experts > 0, a Qwen3-MoE block (softmax router,
        top-k, optional renormalisation, no shared expert). ``qk_norm`` adds Qwen3's
        per-head RMSNorm on q and k. "dense" is the attention's name, not the FFN's: a
        Qwen3-MoE config is arch "dense" with ``is_moe`` True, so every consumer that
        branches on the attention (KV-cache layout, TP sharding of KV heads) stays right.
    The JAX model implements "deepseek" only; "dense" models run in the float64 NumPy
    reference and the simulator.
    """

    name: str = field(default="custom", compare=False)
    arch: str = "deepseek"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    head_dim: int | None = None  # GQA models only (Qwen3: 128, not hidden/heads)
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # dense (Qwen2) q/k/v bias
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each q and k head, before RoPE
    # Qwen3-MoE layer placement (HF Qwen3MoeDecoderLayer): layer i is MoE iff i is not in
    # mlp_only_layers and (i + 1) % decoder_sparse_step == 0. DeepSeek uses
    # first_k_dense_replace / moe_layer_freq instead.
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    hidden_act: str = "silu"
    # DeepSeek-V3.2 lightning indexer (DeepSeek Sparse Attention, reference/dsa.py); None: no
    # indexer (V3, V2, GQA models). Released V3.2 / V3.2-Exp: 64 heads of 128, top-2048.
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def is_mla(self) -> bool:
        """Latent attention (DeepSeek MLA); else GQA/MHA with a K/V cache per kv head."""
        return self.arch == "deepseek"

    @property
    def has_indexer(self) -> bool:
        """DeepSeek-V3.2: every layer's MLA attends only to its indexer's top-k keys."""
        return self.index_topk is not None

    @property
    def index_softmax_scale(self) -> float:
        """The indexer's q.k scale: index_head_dim^-1/2, no YaRN mscale (transformers
        DeepseekV32Indexer.softmax_scale; DeepSeek inference/model.py Indexer.softmax_scale)."""
        return self.index_head_dim ** -0.5

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        """Layer i uses the MoE block (else a dense MLP of intermediate_size)."""
        if not self.is_moe:
            return False
        if self.arch == "dense":  # Qwen3-MoE rule (transformers Qwen3MoeDecoderLayer)
            return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale^2 under YaRN (mscale on the whole logit)."""
        if self.arch == "dense":
            return self.dense_head_dim ** -0.5
        s = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            s = s * m * m
        return s

    @property
    def dense_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------ sizes/counts
    def kv_cache_bytes_per_token(self, bytes_per_elem: float = 2.0, absorbed: bool = True) -> float:
        """KV-cache bytes per token over all layers.

        MLA absorbed: latent R + rotary key P per layer (V3: (512+64)*2*61 = 70,272 B).
        MLA naive: full keys H*(N+P) and values H*A per layer.
        Dense GQA: 2*K*head_dim per layer.
        V3.2 adds the indexer's key cache, one index_head_dim key per token and layer, in either
        form, counted here in the same element type as the rest (transformers keeps it in the
        model dtype: V3.2 bf16 = (512+64+128)*2*61 = 85,888 B). DeepSeek's inference code stores it
        as FP8 e4m3 plus one float32 scale per 128 values instead: ``index_cache_bytes_per_token``.
        """
        if self.arch == "dense":
            per_layer = 2 * self.num_key_value_heads * self.dense_head_dim
        elif absorbed:
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)
        if self.has_indexer:
            per_layer += self.index_head_dim
        return per_layer * self.num_hidden_layers * bytes_per_elem

    def index_cache_bytes_per_token(self, bytes_per_elem: float | None = 2.0) -> float:
        """The indexer key cache alone, bytes per token over all layers (0 without an indexer).

        bytes_per_elem=None: DeepSeek's official layout (inference/model.py Indexer: ``k_cache``
        float8_e4m3fn [.., index_head_dim] + ``k_scale_cache`` float32 [.., index_head_dim/128]),
        J + 4*ceil(J/128) bytes per layer: V3.2 (128 + 4) * 61 = 8,052 B.
        """
        if not self.has_indexer:
            return 0.0
        J = self.index_head_dim
        per_layer = J + 4 * -(-J // 128) if bytes_per_elem is None else J * bytes_per_elem
        return per_layer * self.num_hidden_layers

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts (see reference/params.py)."""
        from dsref.reference.params import param_counts
        return param_counts(self)

    # ------------------------------------------------------------------ I/O
    def replace(self, **kw) -> "ModelConfig":
        out = dataclasses.replace(self, **kw)
        out.validate()
        return out

    def to_hf_dict(self) -> dict[str, Any]:
        """Hugging Face config.json fields (DeepseekV3 / V2 / Qwen2 / Llama names)."""
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "name", "arch"):
                continue
            v = getattr(self, f.name)
            if f.name == "rope_scaling" and v is not None:
                v = {k: val for k, val in dataclasses.asdict(v).items() if val is not None}
                v["rope_type"] = v["type"]
            if f.name == "head_dim" and v is None:
                continue
            if f.name in _GQA_ONLY_FIELDS and self.arch == "deepseek":
                continue  # meaningless for MLA: keep DeepSeek config.json files as they were
            if f.name in INDEX_FIELDS and v is None:
                continue  # no indexer: V3/V2 config.json files stay as they were
            if f.name == "mlp_only_layers":
                v = list(v)
            d[f.name] = v
        if self.arch == "deepseek" and self.has_indexer:
            d.setdefault("model_type", "deepseek_v32")
            d.setdefault("architectures", ["DeepseekV32ForCausalLM"])
        elif self.arch == "deepseek":
            v2 = self.scoring_func == "softmax"
            d.setdefault("model_type", "deepseek_v2" if v2 else "deepseek_v3")
            d.setdefault("architectures", ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"])
        else:
            if self.is_moe:  # Qwen3-MoE names its expert count num_experts
                d["num_experts"] = self.n_routed_experts
                d.setdefault("model_type", "qwen3_moe")
                d.setdefault("architectures", ["Qwen3MoeForCausalLM"])
            elif self.qk_norm:
                d.setdefault("model_type", "qwen3")
            d.setdefault("model_type", "qwen2" if self.attention_bias else "llama")
            d["_dsref_arch"] = "dense"
        d["_dsref_name"] = self.name
        return d

    def save(self, path: str | Path) -> None:
        from dsref.reference.atomic import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "<dict>", name: str | None = None) -> "ModelConfig":
        return _from_hf_dict(d, source, name)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """Read config.json (a file, or a checkpoint directory holding one)."""
        d, p = read_config_json(path)
        return _from_hf_dict(d, str(p), name=d.get("_dsref_name") or p.parent.name)

    def validate(self, source: str = "<config>") -> None:
        _validate(self, source)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1*mscale*ln(scale)+1 (1 when scale <= 1)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# --------------------------------------------------------------------- parsing
_INT_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "first_k_dense_replace", "moe_layer_freq", "num_attention_heads",
    "num_key_value_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
    "topk_group", "max_position_embeddings", "num_nextn_predict_layers", "decoder_sparse_step",
}
_OPT_INT_FIELDS = {"q_lora_rank", "head_dim", *INDEX_FIELDS}
_FLOAT_FIELDS = {"routed_scaling_factor", "rope_theta", "rms_norm_eps"}
_BOOL_FIELDS = {"norm_topk_prob", "tie_word_embeddings", "attention_bias", "rope_interleave", "qk_norm"}
_STR_FIELDS = {"topk_method", "scoring_func", "hidden_act"}
# Fields without which a DeepSeek model is ambiguous (defaults would silently guess).
_REQUIRED_DEEPSEEK = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                      "intermediate_size")
_REQUIRED_DENSE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size")
_REQUIRED_QWEN3_MOE = _REQUIRED_DENSE + ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
# model_type -> the GQA family. qwen3 / qwen3_moe add per-head q/k RMSNorm.
_GQA_TYPES = ("qwen2", "llama", "mistral", "qwen3", "qwen3_moe")
_QK_NORM_TYPES = ("qwen3", "qwen3_moe")
_GQA_ONLY_FIELDS = ("qk_norm", "decoder_sparse_step", "mlp_only_layers")


def _typed(name: str, v: Any, source: str):
    def bad(kind):
        return ConfigError(f"{source}: field '{name}' must be {kind}, got {v!r} ({type(v).__name__})")
    if name in _INT_FIELDS or name in _OPT_INT_FIELDS:
        if v is None and name in _OPT_INT_FIELDS:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise bad("an integer" + (" or null" if name in _OPT_INT_FIELDS else ""))
        return int(v)
    if name in _FLOAT_FIELDS:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad("a finite number")
        return float(v)
    if name in _BOOL_FIELDS:
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if name in _STR_FIELDS:
        if not isinstance(v, str):
            raise bad("a string")
        return v
    if name == "mlp_only_layers":
        if v is None:
            return ()
        if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise bad("a list of layer indices")
        return tuple(v)
    return v


def _parse_rope(d: dict[str, Any], source: str) -> tuple[RopeScaling | None, float | None]:
    """rope_scaling (transformers 4) or rope_parameters (transformers 5) -> (RopeScaling, theta)."""
    rs = d.get("rope_scaling")
    rp = d.get("rope_parameters")
    theta = None
    key = "rope_scaling"
    if rs is None and isinstance(rp, dict):
        rs, key = rp, "rope_parameters"
        theta = rp.get("rope_theta")
    if rs is None:
        return None, theta
    if not isinstance(rs, dict):
        raise ConfigError(f"{source}: field '{key}' must be an object or null, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in ("default", None):
        return None, theta
    if kind not in ("yarn", "deepseek_yarn"):
        raise ConfigError(f"{source}: field '{key}.type' = {kind!r} is not supported (only yarn)")
    out = {}
    for f in dataclasses.fields(RopeScaling):
        if f.name == "type" or f.name not in rs or rs[f.name] is None:
            continue
        v = rs[f.name]
        if f.name == "truncate":
            if not isinstance(v, bool):
                raise ConfigError(f"{source}: field '{key}.truncate' must be true or false, got {v!r}")
            out[f.name] = v
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{source}: field '{key}.{f.name}' must be a number, got {v!r}")
        out[f.name] = int(v) if f.name == "original_max_position_embeddings" else float(v)
    if "factor" not in out:
        raise ConfigError(f"{source}: field '{key}.factor' is required for YaRN")
    if "original_max_position_embeddings" not in out:
        raise ConfigError(f"{source}: field '{key}.original_max_position_embeddings' is required for YaRN")
    if out["factor"] <= 0:
        raise ConfigError(f"{source}: field '{key}.factor' must be > 0, got {out['factor']}")
    return RopeScaling(type="yarn", **out), theta


def _from_hf_dict(d: dict[str, Any], source: str, name: str | None) -> ModelConfig:
    mt = str(d.get("model_type", ""))
    dense = mt in _GQA_TYPES or d.get("_dsref_arch") == "dense"
    # A GQA MoE (Qwen3-MoE) names its experts num_experts; our own files carry both names.
    gqa_moe = dense and (mt == "qwen3_moe" or bool(d.get("num_experts")))
    required = (_REQUIRED_QWEN3_MOE if gqa_moe else _REQUIRED_DENSE) if dense else _REQUIRED_DEEPSEEK
    for r in required:
        if r not in d:
            raise ConfigError(f"{source}: required field '{r}' is missing")
    kw: dict[str, Any] = {"arch": "dense" if dense else "deepseek", "name": name or mt or "custom"}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for k, v in d.items():
        if k in known and k not in ("rope_scaling", "extra", "name", "arch"):
            kw[k] = _typed(k, v, source)
    rope, theta = _parse_rope(d, source)
    kw["rope_scaling"] = rope
    if theta is not None and "rope_theta" not in d:
        kw["rope_theta"] = _typed("rope_theta", theta, source)
    if dense:
        kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
        kw.update(q_lora_rank=None, first_k_dense_replace=kw["num_hidden_layers"])
        if "qk_norm" not in d:
            kw["qk_norm"] = mt in _QK_NORM_TYPES
        if gqa_moe:
            # Qwen3-MoE routing (transformers Qwen3MoeTopKRouter): softmax over all experts,
            # plain top-k, renormalised iff norm_topk_prob; no groups, no shared expert, no scale.
            # Defaults only: a field that says otherwise (a shared expert, a sigmoid gate) is
            # rejected by validation instead of silently replaced.
            kw.update(n_routed_experts=_typed("n_routed_experts", d["num_experts"], source),
                      first_k_dense_replace=0)
            for k, v in dict(n_shared_experts=0, scoring_func="softmax", topk_method="greedy", n_group=1,
                             topk_group=1, routed_scaling_factor=1.0,
                             norm_topk_prob=False).items():  # transformers Qwen3MoeConfig default
                kw.setdefault(k, v)
        else:
            kw.update(n_routed_experts=0, n_shared_experts=0)
        if "attention_bias" not in d:
            kw["attention_bias"] = mt == "qwen2"
    else:
        # V2 checkpoints have no scoring_func field: softmax; their topk_method names it.
        if "scoring_func" not in d and mt == "deepseek_v2":
            kw["scoring_func"] = "softmax"
        if "topk_method" not in d and kw.get("scoring_func") == "softmax":
            kw["topk_method"] = "greedy"
        if "n_group" in d and d["n_group"] is None:
            kw["n_group"] = 1
        if "topk_group" in d and d["topk_group"] is None:
            kw["topk_group"] = 1
        for k in ("n_routed_experts", "n_shared_experts"):
            if k in d and d[k] is None:
                kw[k] = 0
        _check_v32_fields(d, kw, mt, source)
    consumed = ("rope_parameters", "_dsref_name", "_dsref_arch") + (("num_experts",) if gqa_moe else ())
    kw["extra"] = {k: v for k, v in d.items() if k not in known and k not in consumed}
    try:
        cfg = ModelConfig(**kw)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{source}: {e}") from None
    cfg.validate(source)
    return cfg


def _check_v32_fields(d: dict[str, Any], kw: dict[str, Any], mt: str, source: str) -> None:
    """DeepSeek-V3.2 (model_type deepseek_v32): the three indexer fields, all or none.

    transformers' DeepseekV32Config would fill a missing one with its default (64 heads of 128,
    top-2048); we refuse instead, as for every other field a DeepSeek model needs. Files that
    transformers 5 writes also carry ``mlp_layer_types`` and ``layer_types``: they must say what
    first_k_dense_replace / moe_layer_freq and the indexer say, or the file is contradictory.
    """
    given = [f for f in INDEX_FIELDS if d.get(f) is not None]
    if mt == "deepseek_v32" or given:
        for f in INDEX_FIELDS:
            if f not in given:
                raise ConfigError(f"{source}: required field '{f}' is missing (a DeepSeek-V3.2 indexer "
                                  f"needs {', '.join(INDEX_FIELDS)})")
    mlt = d.get("mlp_layer_types")
    if mlt is not None:
        n, k0 = kw["num_hidden_layers"], kw.get("first_k_dense_replace", 3)
        freq, moe = kw.get("moe_layer_freq", 1), kw.get("n_routed_experts", 256) > 0
        want = ["sparse" if moe and i >= k0 and i % freq == 0 else "dense" for i in range(n)]
        if list(mlt) != want:
            raise ConfigError(f"{source}: field 'mlp_layer_types' = {mlt!r} contradicts first_k_dense_replace="
                              f"{k0}, moe_layer_freq={freq} (expected {want})")
    lt = d.get("layer_types")
    if lt is not None and given and any(t != "indexed_attention" for t in lt):
        raise ConfigError(f"{source}: field 'layer_types' has {sorted(set(lt) - {'indexed_attention'})}: "
                          f"only 'indexed_attention' (an indexer in every layer) is implemented")


def _validate(c: ModelConfig, source: str) -> None:
    def err(fld, msg):
        raise ConfigError(f"{source}: field '{fld}' {msg}")
    if c.arch not in _ARCH:
        err("arch", f"must be one of {_ARCH}")
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if getattr(c, f) <= 0:
            err(f, f"must be > 0, got {getattr(c, f)}")
    if c.rms_norm_eps <= 0:
        err("rms_norm_eps", f"must be > 0, got {c.rms_norm_eps}")
    if c.rope_theta <= 0:
        err("rope_theta", f"must be > 0, got {c.rope_theta}")
    if c.hidden_act != "silu":
        err("hidden_act", f"= {c.hidden_act!r}: only 'silu' is implemented")
    if c.arch == "dense" and any(getattr(c, f) is not None for f in INDEX_FIELDS):
        err(next(f for f in INDEX_FIELDS if getattr(c, f) is not None),
            "is a DeepSeek-V3.2 (MLA) field: the indexer reads MLA's compressed query")
    if c.arch == "dense":
        if c.num_key_value_heads <= 0 or c.num_attention_heads % c.num_key_value_heads:
            err("num_key_value_heads", f"({c.num_key_value_heads}) must divide num_attention_heads ({c.num_attention_heads})")
        if c.head_dim is not None and (c.head_dim <= 0 or c.head_dim % 2):
            err("head_dim", f"must be a positive even number (rotary halves), got {c.head_dim}")
        if c.is_moe:
            _validate_gqa_moe(c, err)
        return
    if c.qk_norm:
        err("qk_norm", "is a GQA (Qwen3) feature; MLA normalises its latents instead")
    for f in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
        if getattr(c, f) <= 0:
            err(f, f"must be > 0, got {getattr(c, f)}")
    if c.qk_nope_head_dim < 0:
        err("qk_nope_head_dim", "must be >= 0")
    if c.qk_rope_head_dim % 2:
        err("qk_rope_head_dim", f"must be even (rotary pairs), got {c.qk_rope_head_dim}")
    if c.q_lora_rank is not None and c.q_lora_rank <= 0:
        err("q_lora_rank", f"must be > 0 or null, got {c.q_lora_rank}")
    if not 0 <= c.first_k_dense_replace <= c.num_hidden_layers:
        err("first_k_dense_replace", f"must be in [0, num_hidden_layers={c.num_hidden_layers}]")
    if c.moe_layer_freq < 1:
        err("moe_layer_freq", "must be >= 1")
    if c.topk_method not in _TOPK_METHODS:
        err("topk_method", f"= {c.topk_method!r}, expected one of {_TOPK_METHODS}")
    if c.scoring_func not in _SCORING:
        err("scoring_func", f"= {c.scoring_func!r}, expected one of {_SCORING}")
    if c.topk_method == "noaux_tc" and c.scoring_func != "sigmoid":
        err("topk_method", "noaux_tc requires scoring_func 'sigmoid'")
    if c.n_routed_experts < 0 or c.n_shared_experts < 0:
        err("n_routed_experts", "expert counts must be >= 0")
    if c.n_routed_experts > 0:
        if c.moe_intermediate_size <= 0:
            err("moe_intermediate_size", "must be > 0")
        if not 1 <= c.num_experts_per_tok <= c.n_routed_experts:
            err("num_experts_per_tok", f"= {c.num_experts_per_tok} must be in [1, n_routed_experts={c.n_routed_experts}]")
        if c.n_group < 1 or c.n_routed_experts % c.n_group:
            err("n_group", f"= {c.n_group} must divide n_routed_experts = {c.n_routed_experts}")
        if not 1 <= c.topk_group <= c.n_group:
            err("topk_group", f"= {c.topk_group} must be in [1, n_group={c.n_group}]")
        per_group = c.n_routed_experts // c.n_group
        if c.topk_method == "noaux_tc" and c.n_group > 1 and per_group < 2:
            err("n_group", "noaux_tc scores a group by its top-2 experts: needs >= 2 experts per group")
        if c.topk_method != "greedy" and c.topk_group * per_group < c.num_experts_per_tok:
            err("topk_group", f"= {c.topk_group} groups x {per_group} experts < num_experts_per_tok = {c.num_experts_per_tok}")
    if c.routed_scaling_factor <= 0:
        err("routed_scaling_factor", "must be > 0")
    _validate_indexer(c, err)
    rs = c.rope_scaling
    if rs is not None:
        if rs.factor <= 0:
            err("rope_scaling.factor", "must be > 0")
        if rs.original_max_position_embeddings <= 0:
            err("rope_scaling.original_max_position_embeddings", "must be > 0")
        if rs.beta_fast <= 0 or rs.beta_slow <= 0:
            err("rope_scaling.beta_fast", "beta_fast and beta_slow must be > 0")


def _validate_indexer(c: ModelConfig, err) -> None:
    """The V3.2 indexer: all three fields or none; its queries come from MLA's compressed query
    (q_lora_rank); its first qk_rope_head_dim dims are rotated (half-split, so an even count)."""
    set_ = [f for f in INDEX_FIELDS if getattr(c, f) is not None]
    if not set_:
        return
    if len(set_) < len(INDEX_FIELDS):
        err(next(f for f in INDEX_FIELDS if f not in set_), f"is required with {', '.join(set_)}")
    for f in INDEX_FIELDS:
        if getattr(c, f) < 1:
            err(f, f"must be >= 1, got {getattr(c, f)}")
    if c.index_head_dim < c.qk_rope_head_dim:
        err("index_head_dim", f"= {c.index_head_dim} must be >= qk_rope_head_dim = {c.qk_rope_head_dim} "
            "(the indexer rotates its first qk_rope_head_dim dims)")
    if c.q_lora_rank is None:
        err("q_lora_rank", "must be set with an indexer (its queries come from q_a_layernorm(q_a_proj(x)))")


def _validate_gqa_moe(c: ModelConfig, err) -> None:
    """A GQA MoE is Qwen3-MoE: what its router and layer placement can express."""
    if c.moe_intermediate_size <= 0:
        err("moe_intermediate_size", "must be > 0")
    if not 1 <= c.num_experts_per_tok <= c.n_routed_experts:
        err("num_experts_per_tok", f"= {c.num_experts_per_tok} must be in [1, num_experts={c.n_routed_experts}]")
    if c.n_shared_experts:
        err("n_shared_experts", "must be 0 for a GQA MoE (Qwen3-MoE has no shared expert)")
    if c.scoring_func != "softmax" or c.topk_method != "greedy" or c.n_group != 1:
        err("scoring_func", "a GQA MoE routes by softmax + plain top-k (scoring_func 'softmax', "
            "topk_method 'greedy', n_group 1)")
    if c.routed_scaling_factor != 1.0:
        err("routed_scaling_factor", "must be 1.0 for a GQA MoE (Qwen3-MoE does not scale its weights)")
    if c.decoder_sparse_step < 1:
        err("decoder_sparse_step", f"must be >= 1, got {c.decoder_sparse_step}")
    bad = [i for i in c.mlp_only_layers if not 0 <= i < c.num_hidden_layers]
    if bad:
        err("mlp_only_layers", f"{bad} outside [0, num_hidden_layers={c.num_hidden_layers})")
