"""ModelConfigV4: one description of a DeepSeek-V4 model (V4-Flash, V4-Pro, tiny test models).

A sibling of ModelConfig (reference/config.py), not a mode of it: V4 replaces MLA by shared-KV
attention with sliding-window, compressed-sparse (CSA) and heavily-compressed (HCA) layers, adds
manifold-constrained hyper-connections (hc_mult residual streams) and hash-routed MoE layers, so
almost no V3 field keeps its meaning. Field names follow transformers' DeepseekV4Config
(transformers 5, models/deepseek_v4/configuration_deepseek_v4.py); ``to_hf_dict`` writes that
spelling.

Three spellings of the same model are read (``spelling`` records which one a file used):
  * "transformers": layer_types / mlp_layer_types / compress_rates / rope_parameters {main,
    compress} / partial_rotary_factor (what transformers 5 writes).
  * "deepseek-hf": the config.json DeepSeek ships on Hugging Face (deepseek-ai/DeepSeek-V4-Flash,
    -Pro): hidden_size ..., but compress_ratios (one int per layer, then the MTP layers),
    num_hash_layers, qk_rope_head_dim and a flat rope_scaling (YaRN of the compressed layers).
  * "deepseek-inference": the ModelArgs / inference/config.json of DeepSeek's own inference code:
    dim, n_layers, n_heads, moe_inter_dim, n_activated_experts, n_hash_layers, n_mtp_layers,
    score_func, route_scale, norm_eps, rope_head_dim, window_size, rope_factor, original_seq_len.
Every spelling gives the same ModelConfigV4 (tests/test_config_v4.py); a file whose two spellings
of one field disagree is refused, naming both keys.

Dimension letters (V4 only; docs/models.md "DeepSeek-V4"):
    D hidden_size, H heads, d head_dim (one shared K=V head), r qk_rope_head_dim (rotated tail of
    each head), Q q_lora_rank, g o_groups, d_g o_lora_rank, W sliding_window, m CSA rate (4),
    m' HCA rate (128), I index_n_heads, J index_head_dim, E experts, k experts per token,
    F moe_intermediate_size, n_hc hc_mult, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsref.reference.config import ConfigError, RopeScaling, read_config_json

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"
MLP_TYPES = (HASH_MOE, MOE)
# The router activations both implementations agree on. softmax is left out on purpose: DeepSeek's
# Gate renormalises the k weights only when score_func != "softmax", transformers'
# DeepseekV4TopKRouter always renormalises, so a softmax V4 model has two meanings.
SCORING = ("sqrtsoftplus", "sigmoid")
SPELLINGS = ("transformers", "deepseek-hf", "deepseek-inference")

#: DeepSeek's inference code builds the overlapping compressor and the lightning indexer exactly
#: for compress_ratio == 4 (inference/model.py Attention/Compressor: ``overlap = ratio == 4``);
#: every other non-zero ratio is a non-overlapping (HCA) compressor of that rate.
DEEPSEEK_CSA_RATIO = 4

# The released V4-Flash schedule (deepseek-ai/DeepSeek-V4-Flash config.json compress_ratios: 2
# sliding layers, then CSA/HCA alternating, last main layer CSA; its 44th entry, 0, is the MTP
# layer). The dataclass defaults are V4-Flash, so ModelConfigV4() is that model.
_FLASH_LAYERS = (SLIDING, SLIDING) + (CSA, HCA) * 20 + (CSA,)
_FLASH_MLP = (HASH_MOE,) * 3 + (MOE,) * 40
_FLASH_YARN = RopeScaling(factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0, attention_factor=1.0)


@dataclass(frozen=True)
class ModelConfigV4:
    """Architecture of a DeepSeek-V4 model (transformers' field names; see the module docstring).

    ``layer_types[i]``: layer i's attention (SLIDING, CSA or HCA; every layer also attends its last
    ``sliding_window`` tokens). ``mlp_layer_types[i]``: HASH_MOE (experts chosen by the frozen
    tid2eid[token id] table) or MOE (top-k of the biased router scores); every V4 layer is MoE.
    ``mtp_layer_types``: the attention of each MTP module's block (DeepSeek's compress_ratios
    entries after the main layers; transformers does not build MTP and has no such field).
    ``rope_scaling``: YaRN of the compressed layers (and of every compressor and indexer); sliding
    layers use plain RoPE with ``rope_theta``. attention_factor is 1: neither DeepSeek's code nor
    transformers (which forces attention_factor=1.0) scales cos/sin.
    """

    name: str = field(default="deepseek-v4-flash", compare=False)
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    q_lora_rank: int = 1024
    qk_rope_head_dim: int = 64
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    layer_types: tuple[str, ...] = _FLASH_LAYERS
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    mlp_layer_types: tuple[str, ...] = _FLASH_MLP
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hidden_act: str = "silu"
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: RopeScaling | None = _FLASH_YARN
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    mtp_layer_types: tuple[str, ...] = (SLIDING,)
    tie_word_embeddings: bool = False
    spelling: str = field(default="preset", compare=False)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ derived
    @property
    def arch(self) -> str:
        """Not "deepseek": code that branches on ModelConfig.arch must not take V4 for MLA."""
        return "deepseek_v4"

    @property
    def is_moe(self) -> bool:
        return True

    def compress_rate(self, layer_type: str) -> int:
        """Source tokens per compressed entry: 0 (sliding only), m (CSA) or m' (HCA)."""
        return {SLIDING: 0, CSA: self.compress_rate_csa, HCA: self.compress_rate_hca}[layer_type]

    def layer_type(self, i: int) -> str:
        """Attention of decoder layer i; i >= num_hidden_layers: MTP module i - L."""
        L = self.num_hidden_layers
        return self.layer_types[i] if i < L else self.mtp_layer_types[i - L]

    def is_hash_layer(self, i: int) -> bool:
        """Layer i routes by tid2eid. MTP modules never do (the released MTP layer has a
        correction bias and no tid2eid; DeepSeek's Gate hashes iff layer_id < n_hash_layers)."""
        return i < self.num_hidden_layers and self.mlp_layer_types[i] == HASH_MOE

    @property
    def num_hash_layers(self) -> int:
        return sum(t == HASH_MOE for t in self.mlp_layer_types)

    def layer_counts(self) -> dict[str, int]:
        """Main layers per attention type."""
        return {t: sum(x == t for x in self.layer_types) for t in LAYER_TYPES}

    @property
    def softmax_scale(self) -> float:
        """head_dim^-1/2 (transformers DeepseekV4Attention.scaling)."""
        return self.head_dim ** -0.5

    # ------------------------------------------------------------ KV cache
    def kv_bytes_per_token_by_type(self, bytes_per_elem: float = 2.0) -> dict[str, float]:
        """Cache bytes one more token adds to ONE layer of each type, once the sequence is longer
        than the window: sliding layers add nothing (their cache is the last W tokens), a CSA layer
        one d-wide compressed entry per m tokens plus the indexer's J-wide compressed key per m
        tokens, an HCA layer one d-wide entry per m' tokens. Keys and values are one tensor (K=V)."""
        b, d = bytes_per_elem, self.head_dim
        return {SLIDING: 0.0, CSA: (d + self.index_head_dim) * b / self.compress_rate_csa,
                HCA: d * b / self.compress_rate_hca}

    def index_cache_bytes_per_token(self, bytes_per_elem: float = 2.0) -> float:
        """The indexer's compressed keys alone, per token over all main layers (part of
        ``kv_cache_bytes_per_token``)."""
        return self.layer_counts()[CSA] * self.index_head_dim * bytes_per_elem / self.compress_rate_csa

    def kv_cache_bytes_per_token(self, bytes_per_elem: float = 2.0) -> float:
        """Bytes per token of context over all main layers, beyond the fixed sliding windows."""
        per = self.kv_bytes_per_token_by_type(bytes_per_elem)
        return sum(per[t] * n for t, n in self.layer_counts().items())

    def kv_window_bytes(self, bytes_per_elem: float = 2.0) -> float:
        """The sliding-window caches of all main layers (W entries of d each), per sequence."""
        return self.num_hidden_layers * self.sliding_window * self.head_dim * bytes_per_elem

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts (reference/params_v4.py)."""
        from dsref.reference.params_v4 import param_counts
        return param_counts(self)

    # ------------------------------------------------------------------ I/O
    def replace(self, **kw) -> "ModelConfigV4":
        out = dataclasses.replace(self, **kw)
        out.validate()
        return out

    def validate(self, source: str = "<config>", names: dict[str, str] | None = None) -> None:
        _validate(self, source, names or {})

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "<dict>", name: str | None = None) -> "ModelConfigV4":
        return _parse(d, source, name)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfigV4":
        """Read config.json (a file, or a checkpoint directory holding one), any spelling."""
        d, p = read_config_json(path)
        return cls.from_hf_dict(d, str(p), name=d.get("_dsref_name") or p.parent.name)

    def save(self, path: str | Path) -> None:
        from dsref.reference.atomic import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers' DeepseekV4Config spelling (what DeepseekV4Config(**d) reads unchanged).

        mtp_layer_types is ours (transformers builds no MTP); transformers keeps it as an attribute.
        """
        d = dict(self.extra)
        prf = self.qk_rope_head_dim / self.head_dim
        for f in dataclasses.fields(self):
            if f.name in ("name", "spelling", "extra", "rope_scaling", "compress_rate_csa", "compress_rate_hca"):
                continue
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        del d["qk_rope_head_dim"]  # transformers derives it: int(head_dim * partial_rotary_factor)
        d["partial_rotary_factor"] = prf
        d["compress_rates"] = {CSA: self.compress_rate_csa, HCA: self.compress_rate_hca}
        main = {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": prf}
        comp: dict[str, Any] = {"rope_type": "default"}
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            comp = {"rope_type": "yarn", "factor": rs.factor,
                    "original_max_position_embeddings": rs.original_max_position_embeddings,
                    "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow, "attention_factor": 1.0}
        comp.update(rope_theta=self.compress_rope_theta, partial_rotary_factor=prf)
        d["rope_parameters"] = {"main": main, "compress": comp}
        d["model_type"] = "deepseek_v4"
        d.setdefault("architectures", ["DeepseekV4ForCausalLM"])
        d["_dsref_name"] = self.name
        return d

    def to_deepseek_dict(self) -> dict[str, Any]:
        """DeepSeek's inference ModelArgs spelling (inference/config.json): only the keys ModelArgs
        has, since it is built as ModelArgs(**json). Fields it cannot carry (max_position_embeddings,
        tie_word_embeddings, ...) are left out; a schedule it cannot express raises ConfigError."""
        src = f"model {self.name}"
        if self.compress_rate_csa != DEEPSEEK_CSA_RATIO and CSA in self.layer_types + self.mtp_layer_types:
            raise ConfigError(f"{src}: field 'compress_rates' CSA rate {self.compress_rate_csa}: DeepSeek's "
                              f"inference code builds CSA (overlap + indexer) only for ratio {DEEPSEEK_CSA_RATIO}")
        if self.compress_rate_hca == DEEPSEEK_CSA_RATIO and HCA in self.layer_types + self.mtp_layer_types:
            raise ConfigError(f"{src}: field 'compress_rates' HCA rate 4 would read as CSA in DeepSeek's spelling")
        nh = self.num_hash_layers
        if any(t != (HASH_MOE if i < nh else MOE) for i, t in enumerate(self.mlp_layer_types)):
            raise ConfigError(f"{src}: field 'mlp_layer_types' is not n hash_moe layers then moe: DeepSeek's "
                              "n_hash_layers cannot express it")
        rs = self.rope_scaling
        return {
            "vocab_size": self.vocab_size, "dim": self.hidden_size, "moe_inter_dim": self.moe_intermediate_size,
            "n_layers": self.num_hidden_layers, "n_hash_layers": nh, "n_mtp_layers": self.num_nextn_predict_layers,
            "n_heads": self.num_attention_heads, "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts, "n_activated_experts": self.num_experts_per_tok,
            "score_func": self.scoring_func, "route_scale": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit, "q_lora_rank": self.q_lora_rank, "head_dim": self.head_dim,
            "rope_head_dim": self.qk_rope_head_dim, "norm_eps": self.rms_norm_eps, "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank, "window_size": self.sliding_window,
            "compress_ratios": [self.compress_rate(t) for t in self.layer_types + self.mtp_layer_types],
            "compress_rope_theta": self.compress_rope_theta,
            "original_seq_len": 0 if rs is None else rs.original_max_position_embeddings,
            "rope_theta": self.rope_theta, "rope_factor": 1.0 if rs is None else rs.factor,
            "beta_fast": 32 if rs is None else rs.beta_fast, "beta_slow": 1 if rs is None else rs.beta_slow,
            "index_n_heads": self.index_n_heads, "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk, "hc_mult": self.hc_mult, "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
        }


def is_v4_dict(d: Any) -> bool:
    """A config.json that describes a DeepSeek-V4 model, in any of the three spellings."""
    if not isinstance(d, dict):
        return False
    if d.get("model_type") == "deepseek_v4" or "DeepseekV4ForCausalLM" in (d.get("architectures") or ()):
        return True
    # DeepSeek's inference config.json has no model_type; hc_mult / compress_ratios exist only in V4.
    return "hc_mult" in d or "compress_ratios" in d


def is_v4_json(path: str | Path) -> bool:
    """``path`` (a config.json or a directory holding one) is a V4 config. Unreadable or invalid
    files answer False, so the caller's own reader reports them as before."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        return is_v4_dict(json.loads(p.read_text()))
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------ validation
def _validate(c: ModelConfigV4, source: str, names: dict[str, str]) -> None:
    def err(fld, msg):
        raise ConfigError(f"{source}: field '{names.get(fld, fld)}' {msg}")

    for f in ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
              "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "compress_rate_csa",
              "compress_rate_hca", "n_routed_experts", "hc_mult", "hc_sinkhorn_iters", "max_position_embeddings"):
        if getattr(c, f) < 1:
            err(f, f"must be >= 1, got {getattr(c, f)}")
    if c.num_key_value_heads != 1:
        err("num_key_value_heads", f"must be 1 (V4 attention has one shared K=V head), got {c.num_key_value_heads}")
    r = c.qk_rope_head_dim
    if r < 2 or r % 2 or r > c.head_dim:
        err("qk_rope_head_dim", f"= {r} must be even (rotary pairs) and in [2, head_dim={c.head_dim}]")
    if int(c.head_dim * (r / c.head_dim)) != r:  # transformers recomputes r from partial_rotary_factor
        err("qk_rope_head_dim", f"= {r}: head_dim * ({r}/{c.head_dim}) does not round back to {r} in floating point")
    if (c.num_attention_heads * c.head_dim) % c.o_groups:
        err("o_groups", f"= {c.o_groups} must divide num_attention_heads * head_dim = "
            f"{c.num_attention_heads * c.head_dim} (the grouped output projection splits it evenly)")
    L = c.num_hidden_layers
    for fld, types, allowed, n in (("layer_types", c.layer_types, LAYER_TYPES, L),
                                   ("mlp_layer_types", c.mlp_layer_types, MLP_TYPES, L),
                                   ("mtp_layer_types", c.mtp_layer_types, LAYER_TYPES, c.num_nextn_predict_layers)):
        if len(types) != n:
            err(fld, f"has {len(types)} entries, expected {n}")
        bad = sorted({t for t in types if t not in allowed})
        if bad:
            err(fld, f"has {bad}; allowed: {list(allowed)}")
    if c.num_nextn_predict_layers < 0:
        err("num_nextn_predict_layers", "must be >= 0")
    if CSA in c.layer_types + c.mtp_layer_types:
        for f in ("index_n_heads", "index_head_dim", "index_topk"):
            if getattr(c, f) < 1:
                err(f, f"must be >= 1 (CSA layers have an indexer), got {getattr(c, f)}")
        if c.index_head_dim < r or c.index_head_dim % 2:
            err("index_head_dim", f"= {c.index_head_dim} must be even and >= qk_rope_head_dim = {r} "
                "(the indexer rotates its last qk_rope_head_dim dims)")
    if c.n_shared_experts != 1:
        err("n_shared_experts", f"must be 1, got {c.n_shared_experts} (transformers builds one shared expert of "
            "moe_intermediate_size whatever this field says; every release has 1)")
    if not 1 <= c.num_experts_per_tok <= c.n_routed_experts:
        err("num_experts_per_tok", f"= {c.num_experts_per_tok} must be in [1, n_routed_experts={c.n_routed_experts}]")
    if c.scoring_func not in SCORING:
        err("scoring_func", f"= {c.scoring_func!r}, expected one of {SCORING} (with softmax DeepSeek's code and "
            "transformers disagree on renormalising the top-k weights)")
    if not c.norm_topk_prob:
        err("norm_topk_prob", "must be true: both implementations renormalise the k routing weights")
    if not (math.isfinite(c.routed_scaling_factor) and c.routed_scaling_factor > 0):
        err("routed_scaling_factor", f"must be > 0, got {c.routed_scaling_factor}")
    if not (math.isfinite(c.swiglu_limit) and c.swiglu_limit > 0):
        err("swiglu_limit", f"must be > 0, got {c.swiglu_limit} (DeepSeek's code reads 0 as 'no clamp', "
            "transformers clamps to [-0, 0]: the two disagree)")
    if c.hidden_act != "silu":
        err("hidden_act", f"= {c.hidden_act!r}: only 'silu' is implemented")
    for f in ("hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta"):
        v = getattr(c, f)
        if not (math.isfinite(v) and v > 0):
            err(f, f"must be > 0, got {v}")
    if c.tie_word_embeddings:
        err("tie_word_embeddings", "must be false: V4 has a separate LM head (and an hc_head before it)")
    rs = c.rope_scaling
    if rs is not None:
        if not rs.factor > 0:
            err("rope_scaling.factor", f"must be > 0, got {rs.factor}")
        if rs.original_max_position_embeddings < 1:
            err("rope_scaling.original_max_position_embeddings", "must be >= 1")
        if rs.attention_factor != 1.0:
            err("rope_scaling.attention_factor", f"must be 1 for V4 (cos/sin are not scaled), got {rs.attention_factor}")


# --------------------------------------------------------------------- parsing
#: transformers' (= DeepSeek's HF config.json) name -> DeepSeek inference ModelArgs name.
_ALIASES = {
    "hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
    "moe_intermediate_size": "moe_inter_dim", "num_experts_per_tok": "n_activated_experts",
    "routed_scaling_factor": "route_scale", "scoring_func": "score_func", "rms_norm_eps": "norm_eps",
    "sliding_window": "window_size", "num_nextn_predict_layers": "n_mtp_layers", "qk_rope_head_dim": "rope_head_dim",
}
_INTS = {"vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "q_lora_rank", "qk_rope_head_dim", "o_groups", "o_lora_rank",
         "sliding_window", "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts", "n_shared_experts",
         "num_experts_per_tok", "hc_mult", "hc_sinkhorn_iters", "max_position_embeddings",
         "num_nextn_predict_layers"}
_FLOATS = {"routed_scaling_factor", "swiglu_limit", "hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta"}
_BOOLS = {"norm_topk_prob", "tie_word_embeddings"}
_STRS = {"scoring_func", "hidden_act"}
# Without these a V4 file is ambiguous: where the two codes' defaults differ (swiglu_limit 0 vs 10,
# route_scale 1 vs 1.5, compress_rope_theta 40000 vs 160000, n_hash_layers 0 vs 3) a default would
# silently pick one implementation's meaning.
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
             "o_groups", "o_lora_rank", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok",
             "sliding_window", "swiglu_limit", "routed_scaling_factor", "hc_mult")
_TF_MARKERS = ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters")
_DS_INFERENCE_MARKERS = tuple(_ALIASES.values()) + ("n_hash_layers", "rope_factor", "original_seq_len")
_DS_HF_MARKERS = ("compress_ratios", "num_hash_layers", "rope_scaling")
_SCHEDULE_KEYS = ("layer_types", "mlp_layer_types", "mtp_layer_types", "compress_rates", "compress_rate_csa",
                  "compress_rate_hca", "compress_ratios", "num_hash_layers", "n_hash_layers", "rope_parameters",
                  "rope_scaling", "partial_rotary_factor", "rope_factor", "original_seq_len", "beta_fast",
                  "beta_slow", "model_type", "_dsref_name")


def _typed(key: str, canon: str, v: Any, source: str):
    def bad(kind):
        return ConfigError(f"{source}: field '{key}' must be {kind}, got {v!r} ({type(v).__name__})")
    if canon in _INTS:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise bad("an integer")
        return int(v)
    if canon in _FLOATS:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad("a finite number")
        return float(v)
    if canon in _BOOLS:
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if canon in _STRS and not isinstance(v, str):
        raise bad("a string")
    return v


def _count(key: str, v: Any, source: str) -> int:
    """An integer >= 0 that is not a ModelConfigV4 field itself (a schedule or rope key)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{source}: field '{key}' must be an integer >= 0, got {v!r}")
    return v


def _one(found: dict[str, tuple[str, Any]], canon: str, key: str, v: Any, source: str) -> None:
    """Record canon = v read from ``key``; a second spelling of the same field must agree."""
    if canon in found and found[canon][1] != v:
        k0, v0 = found[canon]
        raise ConfigError(f"{source}: field '{key}' = {v!r} contradicts field '{k0}' = {v0!r} (two spellings of "
                          f"{canon})")
    found.setdefault(canon, (key, v))


def _int_list(key: str, v: Any, source: str) -> list[int]:
    if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
        raise ConfigError(f"{source}: field '{key}' must be a list of integers >= 0, got {v!r}")
    return list(v)


def _str_list(key: str, v: Any, source: str) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or any(not isinstance(x, str) for x in v):
        raise ConfigError(f"{source}: field '{key}' must be a list of strings, got {v!r}")
    return tuple(v)


def _yarn(key: str, rs: Any, source: str) -> RopeScaling | None:
    """A YaRN dict (rope_scaling, or rope_parameters['compress']) -> RopeScaling; None if default."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"{source}: field '{key}' must be an object or null, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind not in ("yarn", "deepseek_yarn"):
        raise ConfigError(f"{source}: field '{key}.rope_type' = {kind!r} is not supported (only yarn)")
    out: dict[str, Any] = {}
    for f in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"):
        v = rs.get(f)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{source}: field '{key}.{f}' must be a number, got {v!r}")
        out[f] = int(v) if f == "original_max_position_embeddings" else float(v)
    for f in ("factor", "original_max_position_embeddings"):
        if f not in out:
            raise ConfigError(f"{source}: field '{key}.{f}' is required for YaRN")
    if out.get("attention_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: field '{key}.attention_factor' must be 1 for V4 (cos/sin are not scaled), "
                          f"got {out['attention_factor']}")
    # mscale / mscale_all_dim only feed an attention_factor that V4 fixes to 1: not read.
    return RopeScaling(type="yarn", factor=out["factor"],
                       original_max_position_embeddings=out["original_max_position_embeddings"],
                       beta_fast=out.get("beta_fast", 32.0), beta_slow=out.get("beta_slow", 1.0), mscale=1.0,
                       mscale_all_dim=0.0, attention_factor=1.0)


def _ratio_types(key: str, ratios: list[int], source: str, rates: dict[str, tuple[str, int]]) -> tuple[str, ...]:
    """DeepSeek compress_ratios -> layer types; records the HCA rate it implies in ``rates``."""
    out = []
    for r in ratios:
        if r == 0:
            out.append(SLIDING)
        elif r == DEEPSEEK_CSA_RATIO:
            out.append(CSA)
        else:
            _one(rates, HCA, key, r, source)
            out.append(HCA)
    return tuple(out)


def _parse(d: dict[str, Any], source: str, name: str | None) -> ModelConfigV4:
    found: dict[str, tuple[str, Any]] = {}  # canonical field -> (key read, value)
    for canon in _INTS | _FLOATS | _BOOLS | _STRS:
        for key in (canon, _ALIASES.get(canon)):
            if key is not None and key in d and d[key] is not None:
                _one(found, canon, key, _typed(key, canon, d[key], source), source)
    rp = d.get("rope_parameters")
    if rp is not None and not isinstance(rp, dict):
        raise ConfigError(f"{source}: field 'rope_parameters' must be an object or null, got {rp!r}")
    nested = isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)
    main, comp = (rp["main"], rp["compress"]) if nested else ({}, rp or {})
    if nested and main.get("rope_type", "default") != "default":
        raise ConfigError(f"{source}: field 'rope_parameters.main.rope_type' = {main.get('rope_type')!r}: V4's "
                          "sliding layers use plain RoPE")
    for canon, key, sub in (("rope_theta", "rope_parameters.main.rope_theta", main),
                            ("compress_rope_theta", "rope_parameters.compress.rope_theta", comp if nested else {})):
        if sub.get("rope_theta") is not None:
            _one(found, canon, key, _typed(key, canon, sub["rope_theta"], source), source)
    for req in _REQUIRED + ("compress_rope_theta",):
        if req not in found:
            alias = f" (or '{_ALIASES[req]}')" if req in _ALIASES else ""
            raise ConfigError(f"{source}: required field '{req}'{alias} is missing")
    kw = {canon: v for canon, (_, v) in found.items()}
    names = {canon: key for canon, (key, _) in found.items()}
    L, hd = kw["num_hidden_layers"], kw["head_dim"]
    n_mtp = kw.get("num_nextn_predict_layers", 1)

    # partial rotary: qk_rope_head_dim / rope_head_dim, or partial_rotary_factor (transformers)
    for key, sub in (("partial_rotary_factor", d), ("rope_parameters.main.partial_rotary_factor", main),
                     ("rope_parameters.compress.partial_rotary_factor", comp)):
        prf = sub.get("partial_rotary_factor")
        if prf is not None:
            if isinstance(prf, bool) or not isinstance(prf, (int, float)) or not 0 < prf <= 1:
                raise ConfigError(f"{source}: field '{key}' must be a number in (0, 1], got {prf!r}")
            _one(found, "qk_rope_head_dim", key, int(hd * prf), source)
    if "qk_rope_head_dim" not in found:
        raise ConfigError(f"{source}: required field 'qk_rope_head_dim' (or 'rope_head_dim', "
                          "'partial_rotary_factor') is missing")
    kw["qk_rope_head_dim"] = found["qk_rope_head_dim"][1]
    names["qk_rope_head_dim"] = found["qk_rope_head_dim"][0]

    # attention schedule: layer_types (+ compress_rates) and/or compress_ratios
    rates: dict[str, tuple[str, int]] = {}
    sched: dict[str, tuple[str, Any]] = {}
    mtp: dict[str, tuple[str, Any]] = {}
    if d.get("layer_types") is not None:
        _one(sched, "layer_types", "layer_types", _str_list("layer_types", d["layer_types"], source), source)
    if d.get("compress_ratios") is not None:
        ratios = _int_list("compress_ratios", d["compress_ratios"], source)
        if len(ratios) < L:
            raise ConfigError(f"{source}: field 'compress_ratios' has {len(ratios)} entries, fewer than the "
                              f"{L} layers")
        # Entries after the main layers are the MTP layers'; a missing one is sliding (DeepSeek's
        # ModelArgs default ends in 0 for its MTP layer). Entries after those (DSpark stages of later
        # releases) describe no module of this model and are not read.
        _one(sched, "layer_types", "compress_ratios", _ratio_types("compress_ratios", ratios[:L], source, rates),
             source)
        tail = _ratio_types("compress_ratios", ratios[L:L + n_mtp], source, rates)
        _one(mtp, "mtp", "compress_ratios", tail + (SLIDING,) * (n_mtp - len(tail)), source)
    if "layer_types" not in sched:
        raise ConfigError(f"{source}: required field 'layer_types' (or 'compress_ratios') is missing")
    if d.get("mtp_layer_types") is not None:
        _one(mtp, "mtp", "mtp_layer_types", _str_list("mtp_layer_types", d["mtp_layer_types"], source), source)
    cr = d.get("compress_rates")
    if cr is not None:
        if not isinstance(cr, dict) or set(cr) - {CSA, HCA}:
            raise ConfigError(f"{source}: field 'compress_rates' must map {CSA!r} / {HCA!r} to integers, got {cr!r}")
        for t, v in cr.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{source}: field 'compress_rates.{t}' must be an integer, got {v!r}")
            _one(rates, t, "compress_rates", v, source)
    for t, key in ((CSA, "compress_rate_csa"), (HCA, "compress_rate_hca")):
        if d.get(key) is not None:
            _one(rates, t, key, _count(key, d[key], source), source)
    if CSA in rates and "compress_ratios" in d and rates[CSA][1] != DEEPSEEK_CSA_RATIO:
        raise ConfigError(f"{source}: field '{rates[CSA][0]}' CSA rate {rates[CSA][1]} contradicts "
                          f"'compress_ratios' (ratio {DEEPSEEK_CSA_RATIO} is CSA in DeepSeek's spelling)")

    # MoE schedule: mlp_layer_types, or the first num_hash_layers / n_hash_layers layers hashed
    mlp: dict[str, tuple[str, Any]] = {}
    if d.get("mlp_layer_types") is not None:
        _one(mlp, "mlp", "mlp_layer_types", _str_list("mlp_layer_types", d["mlp_layer_types"], source), source)
    for key in ("num_hash_layers", "n_hash_layers"):
        if d.get(key) is not None:
            h = _count(key, d[key], source)
            _one(mlp, "mlp", key, (HASH_MOE,) * min(h, L) + (MOE,) * max(0, L - h), source)
    if "mlp" not in mlp:
        raise ConfigError(f"{source}: required field 'mlp_layer_types' (or 'num_hash_layers', 'n_hash_layers') "
                          "is missing")

    # YaRN of the compressed layers: rope_scaling, rope_parameters, or rope_factor + original_seq_len
    yarn: dict[str, tuple[str, Any]] = {}
    if d.get("rope_scaling") is not None:
        _one(yarn, "y", "rope_scaling", _yarn("rope_scaling", d["rope_scaling"], source), source)
    if rp is not None:
        key = "rope_parameters.compress" if nested else "rope_parameters"
        _one(yarn, "y", key, _yarn(key, comp, source), source)
    if d.get("original_seq_len") is not None:
        osl = _count("original_seq_len", d["original_seq_len"], source)
        ds = None if osl == 0 else _yarn("rope_factor", {"type": "yarn", "factor": d.get("rope_factor", 40),
                                                         "original_max_position_embeddings": osl,
                                                         "beta_fast": d.get("beta_fast", 32),
                                                         "beta_slow": d.get("beta_slow", 1)}, source)
        _one(yarn, "y", "original_seq_len", ds, source)

    kw.update(layer_types=sched["layer_types"][1], mlp_layer_types=mlp["mlp"][1],
              mtp_layer_types=mtp["mtp"][1] if "mtp" in mtp else (SLIDING,) * n_mtp,
              rope_scaling=yarn["y"][1] if "y" in yarn else None,
              compress_rate_csa=rates[CSA][1] if CSA in rates else DEEPSEEK_CSA_RATIO,
              compress_rate_hca=rates[HCA][1] if HCA in rates else 128)
    names.update(layer_types=sched["layer_types"][0], mlp_layer_types=mlp["mlp"][0],
                 mtp_layer_types=mtp["mtp"][0] if "mtp" in mtp else "num_nextn_predict_layers",
                 compress_rate_csa=rates[CSA][0] if CSA in rates else "compress_rates",
                 compress_rate_hca=rates[HCA][0] if HCA in rates else "compress_rates")
    if CSA in kw["layer_types"] + kw["mtp_layer_types"]:
        for f in ("index_n_heads", "index_head_dim", "index_topk"):
            if f not in kw:
                raise ConfigError(f"{source}: required field '{f}' is missing (CSA layers have a lightning indexer)")
    for key in ("attention_bias", "mlp_bias"):  # transformers would add bias tensors no release has
        if d.get(key) not in (None, False):
            raise ConfigError(f"{source}: field '{key}' must be false (V4 has no biases), got {d[key]!r}")
    kw["spelling"] = _spelling(d, nested)
    kw["name"] = name or d.get("_dsref_name") or "custom"
    consumed = set(_INTS | _FLOATS | _BOOLS | _STRS) | set(_ALIASES.values()) | set(_SCHEDULE_KEYS)
    kw["extra"] = {k: v for k, v in d.items() if k not in consumed}
    cfg = ModelConfigV4(**kw)
    cfg.validate(source, names)
    return cfg


def _spelling(d: dict[str, Any], nested: bool) -> str:
    """Which spelling(s) the file used: 'transformers', 'deepseek-hf', 'deepseek-inference', or
    several joined by '+' when a file mixes them (read only if they agree)."""
    got = []
    if any(k in d for k in _TF_MARKERS if k != "rope_parameters") or nested:
        got.append("transformers")
    if any(k in d for k in _DS_INFERENCE_MARKERS):
        got.append("deepseek-inference")
    elif any(k in d for k in _DS_HF_MARKERS):
        got.append("deepseek-hf")
    return "+".join(got) or "transformers"
