"""torchtitan (PyTorch's training framework, ``torchtitan.models.deepseek_v3``) as a conformance engine.

Install (CPU torch stays as it is; ``--no-deps`` because torchtitan's full requirement list pulls
wandb, datasets, tensorboard, pandas, pyarrow and *downgrades* huggingface_hub/fsspec)::

    pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 && pip install tyro

Run::

    python -m dsref.reference.oracle.adapters.torchtitan --checkpoint DIR --tokens T.npy --out D.safetensors

What is torchtitan's and what is ours. torchtitan has no config.json reader, so this adapter maps
the HF config onto torchtitan's own builder ``deepseek_v3.build_mla_moe_layers`` (the function its
16B/236B/671B flavors use) and ``DeepSeekV3Model.Config``; the weights go through torchtitan's own
load path (``DeepSeekV3StateDictAdapter.to_hf`` -> ``dcp.load`` with the adapter's
``get_hf_storage_reader`` -> ``from_hf`` -> ``load_state_dict``, as ``components/checkpointer/dcp.py``
does), FP8 included. Forward: torchtitan's modules (MLA, ComplexRoPE with its YaRN, the
TokenChoiceTopKRouter, LocalTokenDispatcher, GroupedExperts, shared experts, RMSNorm) in float32
on CPU, with three substitutions:

* attention kernel: torchtitan's own ``ScaledDotProductAttention`` (causal, no mask) instead of
  ``FlexAttention`` (torch.compile'd, CUDA-tuned); same q, k, v and ``softmax_scale``;
* ``torchtitan.distributed.minimal_async_ep`` (a GPU expert-parallel backend that imports triton
  at module level) is replaced by a stub when triton is not installed; EP is never used here;
* ``GroupedExperts.forward`` casts activations and expert weights to bfloat16 for
  ``torch._grouped_mm`` (a CUDA kernel constraint). By default we run the same three
  ``_grouped_mm`` calls in float32 (graded with float32 tolerances); ``--as-shipped`` keeps
  torchtitan's bf16 experts *and* its default RMSNorm eps (1e-5, which ``build_mla_moe_layers``
  never overrides), i.e. torchtitan's DeepSeek-V3 exactly as its model registry builds it.

Config mapping (HF -> torchtitan). Values torchtitan has a field for are set from config.json.
Values it has no field for are *not* refused: the model runs as torchtitan would run it and a
``note:`` line on stderr names what it cannot hold, so the kit grades the consequence:

* the YaRN cos/sin factor ``mscale(f, mscale)/mscale(f, mscale_all_dim)`` (or
  ``attention_factor``): torchtitan's rope is "a pure rotation" (common/rope.py:_yarn_inv_freq)
  and ``Attention.__init__`` folds only ``(0.1*mscale*ln f + 1)^2`` into the softmax scale;
  ``Attention.Config.mscale`` <- ``mscale_all_dim``;
* ``topk_method: group_limited_greedy`` (group score = max): the router always scores a group
  by the sum of its top-2 (moe.py:_get_node_limited_routing_scores);
* V2 softmax routers with ``norm_topk_prob``: torchtitan always multiplies by ``route_scale``
  after normalising (DeepSeek-V2 does one or the other).

Unsupported (exit 3): ``rope_interleave: false`` (torchtitan's ``from_hf`` itself rejects a
non-ComplexRoPE model), ``moe_layer_freq != 1`` (the builder makes layers < n_dense_layers dense,
all others MoE), ``hidden_act`` other than silu, a scoring function other than sigmoid/softmax,
non-MoE (dense GQA) configs.

Captures (hooks on torchtitan's modules, nothing recomputed): ``layers.{i}.attn_out`` = output of
``layers[i].attention`` (after ``wo``), ``layers.{i}.hidden`` = output of ``layers[i]``,
``router_logits`` = output of ``layers[i].moe.router.gate`` (the router's own Linear, pre-sigmoid),
``topk_weights``/``topk_ids`` = the router's ``(topk_scores, topk_expert_ids)`` (after route_norm and
route_scale, what the dispatcher multiplies in), ``logits`` = the model's output; with MTP layers
(``num_nextn_predict_layers``) ``MTPDecoder.forward`` returns one more logits tensor per depth,
dumped as ``mtp.{d}.logits`` [B, T-d-1, V] (the positions whose input token t+d+1 exists; torchtitan
zero-fills the rest). torchtitan feeds the MTP module the main model's hidden state *before* the
final norm (mtp.py:MTPDecoder.forward, ``prev_depth_hidden = h``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

from dsref.reference.oracle.adapters.common import EngineUnsupported, adapter_main
from dsref.reference.oracle.golden import canonicalize

PROG = "dsref.reference.oracle.adapters.torchtitan"
MLA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: DeepSeek's and HF's fixed eps, not rms_norm_eps


def _import_torchtitan():
    """Import torchtitan's DeepSeek-V3 model; stub the triton-only EP backend if triton is absent."""
    try:
        import triton  # noqa: F401
    except ImportError:
        name = "torchtitan.distributed.minimal_async_ep"
        if name not in sys.modules:
            stub = types.ModuleType(name)

            def _unavailable(*a, **k):
                raise RuntimeError("MinimalAsyncEP needs triton and GPUs (stubbed by the dsref adapter)")
            for fn in ("combine_op", "dispatch_op", "init_buffer", "maybe_update_minimal_async_ep_config"):
                setattr(stub, fn, _unavailable)
            stub.MinimalAsyncEPDispatchMetadata = type("MinimalAsyncEPDispatchMetadata", (), {})
            sys.modules[name] = stub
    import torchtitan.models.deepseek_v3 as dsv3
    return dsv3


def engine_name() -> str:
    from importlib.metadata import version
    return f"torchtitan-{version('torchtitan')}"


def _yarn_mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * m * math.log(factor) + 1.0


def build_config(cfg, seq_len: int, as_shipped: bool = False, notes: list | None = None):
    """torchtitan ``DeepSeekV3Model.Config`` for a dsref ModelConfig (see the module docstring)."""
    notes = [] if notes is None else notes
    dsv3 = _import_torchtitan()
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.rope import CosSinRoPE

    if not cfg.is_moe:
        raise EngineUnsupported(f"{cfg.arch} (non-MoE) configs: torchtitan's deepseek_v3 is MLA+MoE only")
    if cfg.moe_layer_freq != 1:
        raise EngineUnsupported(f"moe_layer_freq {cfg.moe_layer_freq}: build_mla_moe_layers makes every "
                                "layer >= n_dense_layers MoE")
    if cfg.hidden_act != "silu":
        raise EngineUnsupported(f"hidden_act {cfg.hidden_act!r}: torchtitan's FeedForward/GroupedExperts are SwiGLU")
    if cfg.scoring_func not in ("sigmoid", "softmax"):
        raise EngineUnsupported(f"scoring_func {cfg.scoring_func!r}: TokenChoiceTopKRouter has sigmoid|softmax")

    rs = cfg.rope_scaling
    rope_cls = ComplexRoPE if cfg.rope_interleave else CosSinRoPE  # from_hf rejects CosSinRoPE (exit 3)
    rope_kw = dict(dim=cfg.qk_rope_head_dim, max_seq_len=max(cfg.max_position_embeddings, seq_len),
                   theta=cfg.rope_theta)
    mscale = 1.0
    if rs is not None and rs.factor > 1.0:
        rope_kw.update(scaling="yarn", rope_factor=rs.factor, beta_fast=rs.beta_fast, beta_slow=rs.beta_slow,
                       original_seq_len=rs.original_max_position_embeddings, truncate=rs.truncate)
        mscale = rs.mscale_all_dim or 0.0
        if rs.attention_factor is not None:
            att = rs.attention_factor
        elif rs.mscale and rs.mscale_all_dim:
            att = _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(rs.factor, rs.mscale_all_dim)
        else:
            att = _yarn_mscale(rs.factor, 1.0)
        if abs(att - 1.0) > 1e-12:
            notes.append(f"YaRN cos/sin factor {att:.6g} (mscale {rs.mscale}, mscale_all_dim {rs.mscale_all_dim}) "
                         "has no torchtitan field: its RoPE is a pure rotation")

    grouped = cfg.topk_method in ("noaux_tc", "group_limited_greedy") and cfg.n_group > 1
    if grouped and cfg.topk_method == "group_limited_greedy":
        notes.append("topk_method group_limited_greedy: torchtitan scores groups by top-2 sum, not max")
    if cfg.scoring_func == "softmax" and cfg.norm_topk_prob and cfg.routed_scaling_factor != 1.0:
        notes.append("softmax router with norm_topk_prob: torchtitan also multiplies route_scale")

    init = {"weight": lambda t: None, "bias": lambda t: None}  # weights are loaded, never initialised
    layers = dsv3.build_mla_moe_layers(
        n_layers=cfg.num_hidden_layers, n_dense_layers=cfg.first_k_dense_replace, dim=cfg.hidden_size,
        n_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, mscale=mscale, dense_hidden_dim=cfg.intermediate_size,
        moe_hidden_dim=cfg.moe_intermediate_size, num_experts=cfg.n_routed_experts,
        num_shared_experts=cfg.n_shared_experts, router_top_k=cfg.num_experts_per_tok,
        router_score_func=cfg.scoring_func,
        router_num_expert_groups=cfg.n_group if grouped else None,
        router_num_limited_groups=cfg.topk_group if grouped else None,
        router_route_scale=cfg.routed_scaling_factor, router_route_norm=cfg.norm_topk_prob,
        attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None,
        linear_init=init, norm_init=init, depth_init=lambda i: init,
        depth_experts_init=lambda i: {"w1_EFD": None, "w2_EDF": None, "w3_EFD": None},
        rope=rope_cls.Config(**rope_kw))

    def norm(c, eps):
        return c if as_shipped else dataclasses.replace(c, eps=eps)

    for lc in layers:
        a = lc.attention
        a.inner_attention = ScaledDotProductAttention.Config()
        a.q_norm, a.kv_norm = norm(a.q_norm, MLA_NORM_EPS), norm(a.kv_norm, MLA_NORM_EPS)
        lc.attention_norm, lc.ffn_norm = norm(lc.attention_norm, cfg.rms_norm_eps), norm(lc.ffn_norm, cfg.rms_norm_eps)
        if lc.moe is not None:
            if cfg.n_shared_experts == 0:
                lc.moe.shared_experts = None
            if cfg.topk_method != "noaux_tc":
                lc.moe.load_balance_coeff = None  # no e_score_correction_bias: no expert_bias_E buffer
    mtp = []
    if cfg.num_nextn_predict_layers:
        mtp = dsv3._build_mtp_layers(layers[-1], dim=cfg.hidden_size, num_mtp_layers=cfg.num_nextn_predict_layers)
        for m in mtp:
            for f in ("enorm", "hnorm", "mtp_norm"):
                setattr(m, f, norm(getattr(m, f), cfg.rms_norm_eps))
    D, V = cfg.hidden_size, cfg.vocab_size
    return dsv3.DeepSeekV3Model.Config(
        vocab_size=V, dim=D, tok_embeddings=Embedding.Config(num_embeddings=V, embedding_dim=D),
        norm=norm(RMSNorm.Config(normalized_shape=D), cfg.rms_norm_eps),
        lm_head=Linear.Config(in_features=D, out_features=V), layers=layers, mtp_layers=mtp,
        enable_weight_tying=cfg.tie_word_embeddings)


def _float32_experts(experts) -> None:
    """GroupedExperts.forward without its bfloat16 casts: the same three ``_grouped_mm`` calls in float32."""
    import torch
    import torch.nn.functional as F

    def forward(self, x_RD, num_tokens_per_expert_E):
        offs = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        h = F.silu(self._grouped_mm(A=x_RD, B_t=self.w1_EFD.transpose(-2, -1), offs=offs))
        h = h * self._grouped_mm(A=x_RD, B_t=self.w3_EFD.transpose(-2, -1), offs=offs)
        return self._grouped_mm(A=h, B_t=self.w2_EDF.transpose(-2, -1), offs=offs).type_as(x_RD)
    experts.forward = types.MethodType(forward, experts)


def load_model(checkpoint: Path, cfg, seq_len: int, as_shipped: bool = False, notes: list | None = None):
    """torchtitan DeepSeekV3Model with the checkpoint loaded through torchtitan's own HF path."""
    import torch
    import torch.distributed.checkpoint as dcp
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    mcfg = build_config(cfg, seq_len, as_shipped, notes)
    from torchtitan.models.deepseek_v3 import DeepSeekV3StateDictAdapter
    with torch.device("cpu"):
        model = mcfg.build().float().eval()
    sd_adapter = DeepSeekV3StateDictAdapter(mcfg, None)
    raw = json.loads((Path(checkpoint) / "config.json").read_text())
    quantized = bool(raw.get("quantization_config"))
    with tempfile.TemporaryDirectory() as td:
        # torch's (Quantized)HuggingFaceStorageReader reads the shard list from
        # model.safetensors.index.json; a single-file checkpoint gets one, nothing else changes
        ck = Path(checkpoint)
        if not (ck / "model.safetensors.index.json").exists():
            from safetensors import safe_open
            files = sorted(p.name for p in ck.glob("*.safetensors"))
            wmap = {}
            for fn in files:
                with safe_open(str(ck / fn), framework="pt") as f:
                    wmap.update({k: fn for k in f.keys()})
                (Path(td) / fn).symlink_to((ck / fn).resolve())
            (Path(td) / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
            ck = Path(td)
        try:
            state = model.state_dict()
            if mcfg.enable_weight_tying:
                state.pop("lm_head.weight", None)
            hf_sd = sd_adapter.to_hf(state)
            reader = sd_adapter.get_hf_storage_reader(str(ck), from_quantized=quantized)
            dcp.load(hf_sd, storage_reader=reader)
            native = sd_adapter.from_hf(hf_sd)
        except ValueError as e:
            if "HF checkpoint conversion assumes" in str(e):
                raise EngineUnsupported(f"torchtitan from_hf: {e} (rope_interleave {cfg.rope_interleave})") from None
            raise
    if mcfg.enable_weight_tying:
        native["lm_head.weight"] = native["tok_embeddings.weight"]
    model.load_state_dict(native, strict=True)
    if not as_shipped:
        for layer in model.layers.values():
            if layer.moe_enabled:
                _float32_experts(layer.moe.routed_experts.inner_experts)
        for layer in (model.mtp_layers or []):
            if layer.moe_enabled:
                _float32_experts(layer.moe.routed_experts.inner_experts)
    return model


def dump(model, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Logits and per-layer captures (hooks on torchtitan's modules) for tokens [B, T]."""
    import torch
    B, T = tokens.shape
    got: dict[str, np.ndarray] = {}

    def arr(t):
        t = t.detach()
        return t.float().numpy() if t.is_floating_point() else t.numpy()

    def put(name, fn=lambda o: o):
        return lambda m, a, out: got.__setitem__(name, fn(out))

    hooks = []
    for key, layer in model.layers.items():
        i = int(key)
        hooks.append(layer.attention.register_forward_hook(put(f"layers.{i}.attn_out", arr)))
        hooks.append(layer.register_forward_hook(put(f"layers.{i}.hidden", arr)))
        if layer.moe_enabled:
            router = layer.moe.router
            hooks.append(router.gate.register_forward_hook(
                put(f"layers.{i}.router_logits", lambda o: arr(o).reshape(B, T, -1).astype(np.float32))))

            def on_router(m, a, out, i=i):
                scores, ids, _ = out
                got[f"layers.{i}.topk_weights"] = arr(scores).reshape(B, T, -1)
                got[f"layers.{i}.topk_ids"] = arr(ids).reshape(B, T, -1).astype(np.int32)
            hooks.append(router.register_forward_hook(on_router))
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(np.asarray(tokens, np.int64)))
    finally:
        for h in hooks:
            h.remove()
    outs = out if isinstance(out, list) else [out]
    got["logits"] = arr(outs[0])
    for d, o in enumerate(outs[1:]):  # depth d reads token t+d+1: positions t < T-d-1 are defined (the
        got[f"mtp.{d}.logits"] = arr(o)[:, : T - d - 1]  # rest torchtitan fills with token 0)
    return canonicalize(got)


def _quiet() -> None:
    import warnings
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")  # dcp.load, one process
    warnings.filterwarnings("ignore", message=r"In CPU autocast")  # the router's float32 autocast: a no-op


class TorchtitanEngine:
    """In-process conformance engine (``conformance.grade_kit(DIR, TorchtitanEngine())``)."""

    def __init__(self, as_shipped: bool = False):
        self.as_shipped, self.dtype = as_shipped, ("bf16" if as_shipped else "float32")
        self.name = engine_name() + ("-as-shipped" if as_shipped else "")
        self.notes: list[str] = []

    def __call__(self, checkpoint: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
        from dsref.reference.checkpoint import read_config
        from dsref.reference.oracle import conformance
        from dsref.reference.oracle.golden import is_v4_checkpoint
        if is_v4_checkpoint(checkpoint):
            raise conformance.EngineUnsupported("DeepSeek-V4 checkpoints: torchtitan 0.3.0 has no deepseek_v4 model")
        _quiet()
        try:
            model = load_model(Path(checkpoint), read_config(checkpoint), tokens.shape[1], self.as_shipped,
                               self.notes)
        except EngineUnsupported as e:  # the grader's class (common's may be a different one)
            raise conformance.EngineUnsupported(str(e)) from None
        return dump(model, tokens)


def run(args, checkpoint: Path, tokens: np.ndarray, cfg):
    try:
        import torch  # noqa: F401
        import torchtitan  # noqa: F401
    except ImportError as e:  # a setup problem (exit 1, ERROR), not a checkpoint torchtitan cannot run
        raise RuntimeError(f"needs torch and torchtitan ({e}): pip install --no-deps torchtitan==0.3.0 "
                           "spmd_types==0.2.3 && pip install tyro") from None
    _quiet()
    notes: list[str] = []
    model = load_model(checkpoint, cfg, tokens.shape[1], args.as_shipped, notes)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    return (dump(model, tokens), engine_name() + ("-as-shipped" if args.as_shipped else ""),
            "bf16" if args.as_shipped else "float32")  # bf16 experts as shipped: graded bf16


def _options(p) -> None:
    p.add_argument("--as-shipped", action="store_true",
                   help="torchtitan's DeepSeek-V3 as its registry builds it: bf16 routed experts (grade with "
                        "bf16 tolerances) and RMSNorm eps 1e-5 everywhere")


def main(argv=None) -> int:
    return adapter_main(argv, prog=PROG, run=run, add_arguments=_options,
                        description="Run torchtitan's DeepSeek-V3 (float32, CPU) on token ids and write a dump "
                                    "that `dsref compare` and the conformance kit grade.",
                        example=f'dsref conformance run KIT --engine-cmd "python -m {PROG} '
                                '--checkpoint {checkpoint} --tokens {tokens} --out {out}"')


if __name__ == "__main__":
    sys.exit(main())
