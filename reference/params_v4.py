"""DeepSeek-V4's tensor table: every weight's name, shape and kind, declared once.

``tensors(cfg, mtp=...)`` yields one row per tensor of transformers' DeepseekV4ForCausalLM
state_dict (transformers 5, models/deepseek_v4), in its order and with its names and shapes
(tests/test_config_v4.py builds the model on the meta device and compares), then, with mtp=True,
the MTP modules, which transformers does not build. Each row also carries the name(s) the tensor
has in DeepSeek's released checkpoint (deepseek-ai/DeepSeek-V4-Flash / -Pro safetensors, the
same names as DeepSeek's inference/model.py) and the format it is stored in there, so a loader
of the release (FP8 / FP4 with UE8M0 scales) and every count derive from this one table.

Where the two layouts differ (transformers' conversion_mapping.py "deepseek_v4" does the renaming
when it loads a release; the test replays it on these names):
  * the final hyper-connection head: ``hc_head_fn/_base/_scale`` -> ``model.hc_head.hc_fn/...``;
  * the compressors' KV norm ``compressor.norm`` -> ``compressor.kv_norm`` (the attention's own
    ``attn.kv_norm`` keeps its name), ``ape`` -> ``position_bias``;
  * the indexer moves under the compressor: ``attn.indexer.compressor.*`` ->
    ``self_attn.compressor.indexer.*``, ``attn.indexer.wq_b`` -> ``...indexer.q_b_proj``,
    ``attn.indexer.weights_proj`` -> ``...indexer.scorer.weights_proj``;
  * routed experts: one (w1, w2, w3) per expert -> stacked ``experts.gate_up_proj`` [E, 2F, D]
    (w1 then w3 along dim 1) and ``experts.down_proj`` [E, D, F];
  * ``gate.bias`` -> ``gate.e_score_correction_bias``; ``attn_sink`` -> ``sinks``;
    ``hc_attn_*`` / ``hc_ffn_*`` -> ``attn_hc.*`` / ``ffn_hc.*``; ``attn_norm`` / ``ffn_norm`` ->
    ``input_layernorm`` / ``post_attention_layernorm``; ``embed`` / ``head`` -> ``embed_tokens`` /
    ``lm_head``; ``wq_a wq_b wkv wo_a wo_b q_norm`` -> ``q_a_proj q_b_proj kv_proj o_a_proj o_b_proj
    q_a_norm``.
MTP modules: DeepSeek's ``mtp.{k}.*``; transformers ignores them (``_keys_to_ignore_on_load_unexpected``),
so their "HF" names here are ours: ``mtp.{k}.`` + the decoder-layer names above, plus ``e_proj``,
``h_proj``, ``enorm``, ``hnorm``, ``norm`` and ``hc_head.hc_fn/hc_base/hc_scale``. Checked against
DeepSeek's inference/model.py ``MTPBlock.__init__`` (a ``Block`` plus ``e_proj``/``h_proj``
``Linear(dim, dim)``, ``enorm``/``hnorm``/``norm`` ``RMSNorm(dim)``, float32 ``hc_head_fn`` [hc, hc*dim],
``hc_head_base`` [hc], ``hc_head_scale`` [1]; no embedding or head of its own: docs/v4-reference.md
"Multi-token prediction").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsref.reference.config_v4 import CSA, SLIDING, ModelConfigV4
from dsref.reference.params import (ATTENTION, GLOBAL, LAYER_NORM, MTP, ROUTED_EXPERT, ROUTER, SHARED_EXPERT,
                                    numel)

#: V4's new kind: the hyper-connection mixers of a layer (attn_hc / ffn_hc; float32 in both layouts).
HYPER_CONNECTION = "hyper_connection"
GROUPS = (GLOBAL, LAYER_NORM, ATTENTION, ROUTER, ROUTED_EXPERT, SHARED_EXPERT, HYPER_CONNECTION, MTP)

# How a tensor is stored in DeepSeek's release (the Pro dump cited in reference/presets.py; the Flash
# release uses the same placement, config.json quantization_config: fp8 e4m3, ue8m0 scales, 128x128
# blocks, expert_dtype fp4).
FP8 = "fp8_e4m3_block128"   # float8_e4m3fn + a float8_e8m0fnu scale per 128x128 block ('.scale')
FP4 = "fp4_e2m1_block32"    # two e2m1 values per int8 byte along `in` + an e8m0 scale per 1x32 block
BF16 = "bf16"
FP32 = "fp32"
INT64 = "int64"             # tid2eid: token id -> k expert ids (an index table, not a weight)

# How the DeepSeek tensor(s) become the transformers one.
SAME = "same"                      # one tensor, same shape
STACK = "stack_experts"            # experts.{e}.w2 [D, F] stacked on a new dim 0 -> [E, D, F]
STACK_CONCAT = "stack_concat"      # experts.{e}.w1 and .w3 [F, D], each stacked, then concatenated on dim 1


@dataclass(frozen=True)
class TensorV4:
    """One row of the V4 tensor table.

    name: transformers' state_dict name (MTP: ours, ``mtp.{k}.``...); rel: the name within its layer
    (globals: the full name); shape: transformers' shape; layer: decoder-layer index (None for
    globals; MTP module k at num_hidden_layers + k); group: one of GROUPS; mtp: part of an MTP module.
    deepseek: the released name(s), ``{e}`` standing for the expert index; combine: SAME, STACK or
    STACK_CONCAT; stored: FP8, FP4, BF16, FP32 or INT64 in the release.
    """

    name: str
    rel: str
    shape: tuple[int, ...]
    layer: int | None
    group: str
    mtp: bool
    deepseek: tuple[str, ...]
    combine: str
    stored: str

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def is_weight(self) -> bool:
        """A parameter (counted); tid2eid is a frozen int64 lookup table and is not."""
        return self.stored != INT64

    def deepseek_tensors(self, n_experts: int) -> list[tuple[str, tuple[int, ...]]]:
        """The released tensors behind this row (weights only, before quantization): name, shape."""
        if self.combine == SAME:
            return [(self.deepseek[0], self.shape)]
        E, a, b = self.shape
        one = (a // 2, b) if self.combine == STACK_CONCAT else (a, b)
        return [(p.format(e=e), one) for e in range(n_experts) for p in self.deepseek]


def _attention(c: ModelConfigV4, kind: str) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(hf rel, shape, deepseek rel, stored) of one layer's attention, transformers' order."""
    D, H, d, Q = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank
    g, dg = c.o_groups, c.o_lora_rank
    rows = [
        ("sinks", (H,), "attn_sink", FP32),
        ("q_a_proj.weight", (Q, D), "wq_a.weight", FP8),
        ("q_a_norm.weight", (Q,), "q_norm.weight", BF16),
        ("q_b_proj.weight", (H * d, Q), "wq_b.weight", FP8),
        ("kv_proj.weight", (d, D), "wkv.weight", FP8),
        ("kv_norm.weight", (d,), "kv_norm.weight", BF16),
        # grouped output projection: g blocks of [d_g, H*d/g] stored as one [g*d_g, H*d/g] matrix
        ("o_a_proj.weight", (g * dg, H * d // g), "wo_a.weight", FP8),
        ("o_b_proj.weight", (D, g * dg), "wo_b.weight", FP8),
    ]
    if kind == SLIDING:
        return rows
    m = c.compress_rate(kind)
    coff = 2 if kind == CSA else 1  # CSA's overlapping windows: two series (Ca, Cb) per token
    rows += [
        ("compressor.position_bias", (m, coff * d), "compressor.ape", FP32),
        ("compressor.kv_proj.weight", (coff * d, D), "compressor.wkv.weight", BF16),
        ("compressor.gate_proj.weight", (coff * d, D), "compressor.wgate.weight", BF16),
        ("compressor.kv_norm.weight", (d,), "compressor.norm.weight", BF16),
    ]
    if kind == CSA:
        I, J = c.index_n_heads, c.index_head_dim
        rows += [
            ("compressor.indexer.position_bias", (m, 2 * J), "indexer.compressor.ape", FP32),
            ("compressor.indexer.kv_proj.weight", (2 * J, D), "indexer.compressor.wkv.weight", BF16),
            ("compressor.indexer.gate_proj.weight", (2 * J, D), "indexer.compressor.wgate.weight", BF16),
            ("compressor.indexer.kv_norm.weight", (J,), "indexer.compressor.norm.weight", BF16),
            ("compressor.indexer.q_b_proj.weight", (I * J, Q), "indexer.wq_b.weight", FP8),
            ("compressor.indexer.scorer.weights_proj.weight", (I, D), "indexer.weights_proj.weight", BF16),
        ]
    return rows


def _layer(c: ModelConfigV4, i: int, hf: str, ds: str, mtp: bool) -> list[TensorV4]:
    """Rows of decoder layer (or MTP block) i; hf / ds: the name prefixes in the two layouts."""
    D, E, F, V, k, n = (c.hidden_size, c.n_routed_experts, c.moe_intermediate_size, c.vocab_size,
                        c.num_experts_per_tok, c.hc_mult)
    rows = []

    def add(rel, shape, group, dsrel, stored, combine=SAME, dsnames=None):
        rows.append(TensorV4(hf + rel, rel, shape, i, group, mtp, dsnames or (ds + dsrel,), combine, stored))

    for rel, shape, dsrel, stored in _attention(c, c.layer_type(i)):
        add("self_attn." + rel, shape, ATTENTION, "attn." + dsrel, stored)
    add("mlp.gate.weight", (E, D), ROUTER, "ffn.gate.weight", BF16)
    if c.is_hash_layer(i):
        add("mlp.gate.tid2eid", (V, k), ROUTER, "ffn.gate.tid2eid", INT64)
    else:
        add("mlp.gate.e_score_correction_bias", (E,), ROUTER, "ffn.gate.bias", FP32)
    add("mlp.experts.gate_up_proj", (E, 2 * F, D), ROUTED_EXPERT, "", FP4, STACK_CONCAT,
        (ds + "ffn.experts.{e}.w1.weight", ds + "ffn.experts.{e}.w3.weight"))
    add("mlp.experts.down_proj", (E, D, F), ROUTED_EXPERT, "", FP4, STACK, (ds + "ffn.experts.{e}.w2.weight",))
    for hfn, dsn, shape in (("gate_proj", "w1", (F, D)), ("up_proj", "w3", (F, D)), ("down_proj", "w2", (D, F))):
        add(f"mlp.shared_experts.{hfn}.weight", shape, SHARED_EXPERT, f"ffn.shared_experts.{dsn}.weight", FP8)
    add("input_layernorm.weight", (D,), LAYER_NORM, "attn_norm.weight", BF16)
    add("post_attention_layernorm.weight", (D,), LAYER_NORM, "ffn_norm.weight", BF16)
    # hyper-connections: one linear map of the n_hc*D flattened streams to pre (n), post (n) and
    # comb (n x n) mixing weights, a bias of the same width, and three scalar scales
    for hfm, dsm in (("attn_hc", "hc_attn"), ("ffn_hc", "hc_ffn")):
        add(f"{hfm}.fn", ((2 + n) * n, n * D), HYPER_CONNECTION, f"{dsm}_fn", FP32)
        add(f"{hfm}.base", ((2 + n) * n,), HYPER_CONNECTION, f"{dsm}_base", FP32)
        add(f"{hfm}.scale", (3,), HYPER_CONNECTION, f"{dsm}_scale", FP32)
    return rows


def _hc_head(c: ModelConfigV4, hf: str, ds: str, layer: int | None, group: str, mtp: bool) -> list[TensorV4]:
    """The final hyper-connection head: collapses the n_hc streams to one with sigmoid weights."""
    n, D = c.hc_mult, c.hidden_size
    return [TensorV4(hf + "hc_head." + h, ("hc_head." + h) if mtp else hf + "hc_head." + h, s, layer, group, mtp,
                     (ds + "hc_head_" + dn,), SAME, FP32)
            for h, dn, s in (("hc_fn", "fn", (n, n * D)), ("hc_base", "base", (n,)), ("hc_scale", "scale", (1,)))]


def layer_tensors(c: ModelConfigV4, i: int) -> list[TensorV4]:
    """Rows of decoder layer i, or of MTP module i - num_hidden_layers (its block, then its extras)."""
    L, D = c.num_hidden_layers, c.hidden_size
    if i < L:
        return _layer(c, i, f"model.layers.{i}.", f"layers.{i}.", False)
    k = i - L
    hf, ds = f"mtp.{k}.", f"mtp.{k}."
    rows = _layer(c, i, hf, ds, True)
    for rel, shape, stored in (("e_proj.weight", (D, D), FP8), ("h_proj.weight", (D, D), FP8),
                               ("enorm.weight", (D,), BF16), ("hnorm.weight", (D,), BF16),
                               ("norm.weight", (D,), BF16)):
        rows.append(TensorV4(hf + rel, rel, shape, i, MTP, True, (ds + rel,), SAME, stored))
    return rows + _hc_head(c, hf, ds, i, MTP, True)


EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"


def tensors(c: ModelConfigV4, mtp: bool = False) -> list[TensorV4]:
    """The table: embedding, the layers, final norm, hc_head, LM head (transformers' state_dict
    order); then, with mtp=True, each MTP module (which shares the embedding and LM head: the
    release stores no copies)."""
    V, D = c.vocab_size, c.hidden_size
    rows = [TensorV4(EMBED, EMBED, (V, D), None, GLOBAL, False, ("embed.weight",), SAME, BF16)]
    for i in range(c.num_hidden_layers):
        rows += layer_tensors(c, i)
    rows.append(TensorV4(FINAL_NORM, FINAL_NORM, (D,), None, GLOBAL, False, ("norm.weight",), SAME, BF16))
    rows += _hc_head(c, "model.", "", None, GLOBAL, False)
    rows.append(TensorV4(HEAD, HEAD, (V, D), None, GLOBAL, False, ("head.weight",), SAME, BF16))
    if mtp:
        for k in range(c.num_nextn_predict_layers):
            rows += layer_tensors(c, c.num_hidden_layers + k)
    return rows


def param_counts(c: ModelConfigV4) -> dict[str, int]:
    """Exact counts over the table (weights only; tid2eid is counted apart as index_table_entries).

    total_params: main model (embedding, all layers, final norm, hc_head, LM head), no MTP.
    activated_params: what one token computes with: all of it except the routed experts it does not
      use (k of E), and without the input embedding table (a token reads one row): the convention
      of reference/params.py, the one DeepSeek's V2/V3 "activated" numbers follow. Compressor and
      indexer weights count in full: every token is projected by them.
    mtp_params: the MTP module(s); checkpoint_params: total + MTP (the release stores no
      embedding/head copies for MTP).
    """
    total = active = mtp = tables = 0
    E, k = c.n_routed_experts, c.num_experts_per_tok
    for t in tensors(c, mtp=c.num_nextn_predict_layers > 0):
        if not t.is_weight:
            tables += t.numel
        elif t.mtp:
            mtp += t.numel
        else:
            total += t.numel
            if t.group == ROUTED_EXPERT:
                active += t.numel // E * k
            elif t.name != EMBED:
                active += t.numel
    return {"total_params": total, "activated_params": active, "embedding_params": 2 * c.vocab_size * c.hidden_size,
            "mtp_params": mtp, "checkpoint_params": total + mtp, "index_table_entries": tables}


def release_tensors(c: ModelConfigV4, mtp: bool = True) -> list[tuple[str, tuple[int, ...], str]]:
    """Every tensor of DeepSeek's release layout as stored: (name, shape, dtype), quantization
    scales included. FP8 weights keep their shape and add ``.scale`` [ceil(out/128), ceil(in/128)]
    (e8m0); FP4 expert weights are int8 [out, in/2] (two e2m1 per byte) with ``.scale`` [out, in/32]."""
    out = []
    for t in tensors(c, mtp=mtp):
        for name, shape in t.deepseek_tensors(c.n_routed_experts):
            if t.stored == FP8:
                o, i = shape
                out += [(name, shape, "float8_e4m3fn"),
                        (name.removesuffix(".weight") + ".scale", (-(-o // 128), -(-i // 128)), "float8_e8m0fnu")]
            elif t.stored == FP4:
                o, i = shape
                if i % 32:  # one UE8M0 scale per 32 inputs, two e2m1 per byte: no partial block exists
                    raise ValueError(f"{c.name}: FP4 expert weight {name} has {i} inputs, not a multiple of 32 "
                                     "(hidden_size and moe_intermediate_size must be, for the release layout)")
                out += [(name, (o, i // 2), "int8"),
                        (name.removesuffix(".weight") + ".scale", (o, i // 32), "float8_e8m0fnu")]
            else:
                out.append((name, shape, {BF16: "bfloat16", FP32: "float32", INT64: "int64"}[t.stored]))
    return out


def release_stored_values(c: ModelConfigV4, mtp: bool = True) -> tuple[int, int]:
    """(tensor count, stored elements) of the release layout: what a safetensors header lists."""
    rows = release_tensors(c, mtp)
    return len(rows), sum(math.prod(s) for _, s, _ in rows)


#: Bytes per stored element of each release dtype (FP4 weights are counted as their int8 carrier).
RELEASE_DTYPE_BYTES = {"float8_e4m3fn": 1, "float8_e8m0fnu": 1, "int8": 1, "bfloat16": 2, "float32": 4, "int64": 8}


def release_bytes(c: ModelConfigV4, mtp: bool = True) -> int:
    """Bytes of all tensors of the release layout (safetensors payload, headers excluded)."""
    return sum(math.prod(s) * RELEASE_DTYPE_BYTES[d] for _, s, d in release_tensors(c, mtp))
