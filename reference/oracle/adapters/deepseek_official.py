"""DeepSeek's own inference code (github.com/deepseek-ai/DeepSeek-V3, ``inference/``) as a conformance engine.

The official ``model.py`` and ``kernel.py`` are imported from ``--engine-path`` (never copied
here); this module only translates a Hugging Face checkpoint into the official ``ModelArgs``
and parameter names, runs the official ``Transformer`` in float32 on CPU (world_size 1) and
takes the dump with forward hooks:

    layers.{i}.attn_out       output of ``layers[i].attn`` (MLA, after wo, before the residual add)
    layers.{i}.hidden         output of ``layers[i]`` (Block: x + attn + ffn)
    layers.{i}.router_logits  x W_g recomputed from ``layers[i].ffn.gate``'s input with the
                              official ``linear`` (Gate.forward keeps them internal)
    layers.{i}.topk_weights / topk_ids   what ``Gate.forward`` returns (route_scale applied)
    logits                    ``head`` applied to the hooked output of the final ``norm``
                              (Transformer.forward returns only the last position)

What the official code cannot express at all raises ``EngineUnsupported`` (exit 3). Settings
it has no field for but computes with a fixed value (rms_norm_eps, norm_topk_prob, the YaRN
cos/sin factor, hidden_act, ...) are *not* refused: the engine runs and the kit grades it.

    python -m dsref.reference.oracle.adapters.deepseek_official --engine-path DeepSeek-V3/inference \\
        --checkpoint DIR --tokens T.npy --out D.safetensors [--attn-impl absorb|naive] [--gate-bias attach|official]

FP8 checkpoints need ``triton`` (``pip install triton``): the official ``weight_dequant`` triton
kernel then runs on CPU tensors in triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

from dsref.reference.oracle.adapters.common import AdapterInputError, EngineUnsupported, adapter_main

PROG = "dsref.reference.oracle.adapters.deepseek_official"
NAME = PROG.rsplit(".", 1)[-1]
REPO = "github.com/deepseek-ai/DeepSeek-V3"

# HF name component -> official name component. Same facts as the official convert.py's table
# (mp=1, so no sharding), applied per dot-separated component rather than by substring.
_PART = {"embed_tokens": "embed", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn": "attn", "mlp": "ffn", "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm",
         "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b",
         "o_proj": "wo", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "head",
         "weight_scale_inv": "scale", "e_score_correction_bias": "bias"}


# ------------------------------------------------------------------ importing the engine
def engine_path_problem(path: Path) -> str | None:
    """Why --engine-path is not the official inference/ folder (None when it looks right)."""
    if not path.is_dir():
        return "no such directory"
    missing = [f for f in ("model.py", "kernel.py") if not (path / f).is_file()]
    if missing:
        return f"no {' or '.join(missing)} here; give the inference/ folder of a checkout of {REPO}"
    return None


def _load_module(name: str, file: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def import_official(path: Path) -> tuple[types.ModuleType, str | None]:
    """(official model module, reason FP8 cannot run or None).

    model.py does ``from kernel import ...``, so kernel.py is registered as ``kernel``. Without
    triton a stand-in ``kernel`` takes its place so that unquantized checkpoints still run (the
    official ``linear`` calls the kernels only for 1-byte weights)."""
    # Our tensors live on the CPU, where compiled triton kernels cannot run; the interpreter
    # executes the official kernels as written. Must be set before triton.jit decorates them.
    os.environ["TRITON_INTERPRET"] = "1"
    fp8_reason = None
    try:
        _load_module("kernel", path / "kernel.py")
    except ImportError as e:
        fp8_reason = (f"the official kernel.py cannot be imported ({e}); its triton kernels (weight_dequant) are "
                      "how the official code dequantizes FP8 weights: pip install triton (runs on CPU under "
                      "TRITON_INTERPRET=1)")
        stub = types.ModuleType("kernel")

        def unavailable(*a, **k):
            raise EngineUnsupported(fp8_reason)
        stub.act_quant = stub.weight_dequant = stub.fp8_gemm = unavailable
        sys.modules["kernel"] = stub
    return _load_module("_deepseek_v3_official_model", path / "model.py"), fp8_reason


def engine_name(path: Path) -> str:
    try:
        sha = subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty", "--abbrev=7"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"deepseek-v3-official-{sha or 'unknown'}"


# ------------------------------------------------------------------ config -> ModelArgs
def model_args(M: types.ModuleType, cfg, batch: int, seq: int, fp8_block) -> object:
    """The official ModelArgs for a HF config (EngineUnsupported where it has no way to say it)."""
    if cfg.arch != "deepseek":
        raise EngineUnsupported(f"arch {cfg.arch!r}: the official code is DeepSeek MLA+MoE only")
    if cfg.tie_word_embeddings:
        raise EngineUnsupported("tie_word_embeddings: the official Transformer always has its own head")
    moe = cfg.n_routed_experts > 0
    if moe and cfg.moe_layer_freq != 1:
        raise EngineUnsupported(f"moe_layer_freq {cfg.moe_layer_freq}: the official Block makes every layer "
                                "from n_dense_layers on an MoE layer (model.py Block.__init__)")
    # Not refused, because the official code runs them with a fixed value of its own (the kit must
    # catch these): norm_topk_prob (Gate.forward normalises iff score_func == "sigmoid"),
    # rms_norm_eps (every RMSNorm keeps its default 1e-6), hidden_act (F.silu), rope_interleave
    # (apply_rotary_emb always pairs adjacent dims). Expressed as HF does: n_shared_experts > 1 is
    # one MLP of n * moe_inter_dim (MoE.__init__), 0 an empty one.
    q = cfg.extra.get("quantization_config") or {}
    # greedy top-k (V2-Lite) is expressed in the official configs by n_expert_groups = 1 (config_16B.json);
    # the group scoring (max, or top-2 sum when the gate has a bias) is chosen inside Gate.forward.
    grouped = cfg.topk_method != "greedy"
    kw = dict(
        max_batch_size=batch, dtype="fp8" if fp8_block is not None else "bf16", scale_fmt=q.get("scale_fmt"),
        vocab_size=cfg.vocab_size, dim=cfg.hidden_size, inter_dim=cfg.intermediate_size,
        moe_inter_dim=cfg.moe_intermediate_size, n_layers=cfg.num_hidden_layers,
        n_dense_layers=cfg.first_k_dense_replace if moe else cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads, n_routed_experts=max(cfg.n_routed_experts, 1),
        n_shared_experts=cfg.n_shared_experts or 0, n_activated_experts=cfg.num_experts_per_tok,
        n_expert_groups=cfg.n_group if grouped else 1, n_limited_groups=cfg.topk_group if grouped else 1,
        score_func=cfg.scoring_func, route_scale=cfg.routed_scaling_factor,
        q_lora_rank=cfg.q_lora_rank or 0,  # the official "no q_lora" is 0 (wq instead of wq_a/wq_b)
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, rope_theta=cfg.rope_theta)
    rs = cfg.rope_scaling
    if rs is None:
        # YaRN is on iff max_seq_len > original_seq_len (precompute_freqs_cis, MLA.__init__): keep it off.
        kw.update(max_seq_len=seq, original_seq_len=seq, rope_factor=1.0)
    else:
        # The smallest max_seq_len that switches the official YaRN on (HF and our reference apply it
        # whenever rope_scaling says yarn); it also sizes the caches, so no larger. The official
        # code has one `mscale`, used as (0.1*mscale*ln(factor)+1)^2 on the whole softmax scale --
        # the role of mscale_all_dim (config_16B.json's 0.707 is V2-Lite's mscale_all_dim). The
        # cos/sin factor mscale/mscale_all_dim, an explicit attention_factor and truncate=False have
        # no counterpart: the official rotary is unscaled with floor/ceil bounds.
        kw.update(max_seq_len=max(seq, rs.original_max_position_embeddings + 1),
                  original_seq_len=rs.original_max_position_embeddings, rope_factor=rs.factor,
                  beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, mscale=rs.mscale_all_dim)
    known = {f.name for f in dataclasses.fields(M.ModelArgs)}
    extra = {k: v for k, v in kw.items() if k not in known and v is not None}
    if extra:
        raise EngineUnsupported(f"this version of the official ModelArgs has no field for {sorted(extra)}")
    return M.ModelArgs(**{k: v for k, v in kw.items() if k in known})


# ------------------------------------------------------------------ weights
def official_weights(checkpoint: Path, n_layers: int) -> dict:
    """{official name: torch tensor} from every *.safetensors file of the checkpoint."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            parts = name.removeprefix("model.").split(".")
            # MTP modules sit at layer indices >= num_hidden_layers; the official model has none
            # (convert.py drops "model.layers.61", V3's MTP layer), and nothing we dump uses them.
            if parts[0] == "layers" and int(parts[1]) >= n_layers:
                continue
            out[".".join(_PART.get(p, p) for p in parts)] = t
    return out


def load_into(M, model, weights: dict, gate_bias: str) -> None:
    """Load like the official generate.py (strict: every name and shape must match), in float32."""
    import torch
    for i, layer in enumerate(model.layers):
        gate = getattr(layer.ffn, "gate", None)
        if not isinstance(gate, M.Gate):
            continue
        has = f"layers.{i}.ffn.gate.bias" in weights
        if has == (gate.bias is not None) or gate_bias == "official":
            continue
        # Gate.__init__ gives the gate its float32 correction bias only when dim == 7168 (V3's own
        # hidden size), not from any config field. --gate-bias attach (the default) follows the
        # checkpoint instead, creating the parameter exactly as that constructor does, so that
        # Gate.forward's routing arithmetic (which uses self.bias whenever it is set) gets graded.
        gate.bias = torch.nn.Parameter(torch.empty(gate.weight.shape[0], dtype=torch.float32)) if has else None
    want = model.state_dict()
    missing = [k for k, v in want.items() if k not in weights and v.numel() > 0]  # n_shared_experts 0: empty
    unexpected = [k for k in weights if k not in want]
    if missing or unexpected:
        why = (" (the official Gate has a bias only when dim == 7168; --gate-bias attach follows the checkpoint)"
               if any(k.endswith("gate.bias") for k in missing + unexpected) else "")
        parts = [f"{what} {names[:4]}{' ...' if len(names) > 4 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise EngineUnsupported(f"the official model's parameters do not match the checkpoint{why}: "
                                + "; ".join(parts))
    fp8 = torch.float8_e4m3fn
    state = {}
    for k, p in want.items():
        t = weights.get(k, p)
        if t.shape != p.shape:
            raise EngineUnsupported(f"{k}: checkpoint shape {tuple(t.shape)}, official model {tuple(p.shape)}")
        if (t.dtype == fp8) != (p.dtype == fp8):
            raise EngineUnsupported(f"{k}: checkpoint dtype {t.dtype}, official model {p.dtype} (with dtype "
                                    "'fp8' every official Linear but the head is FP8, everything else is not)")
        state[k] = t if t.dtype == fp8 else t.float()
    # Transformer.__init__ sets Linear.dtype to bfloat16 (or fp8); float32 here instead, so the
    # run is float32 throughout. FP8 weights stay FP8: linear() dequantizes them the official way.
    for p in model.parameters():
        if p.dtype == torch.bfloat16:
            p.data = p.data.float()
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------ the run
def run(args: argparse.Namespace, checkpoint: Path, tokens: np.ndarray, cfg) -> tuple[dict, str]:
    import torch
    from dsref.reference.checkpoint import fp8_block
    from dsref.reference.oracle.golden import canonicalize

    torch.set_num_threads(min(torch.get_num_threads(), 4))
    torch.set_default_dtype(torch.float32)  # the official head and weight_dequant use the default dtype
    path = Path(args.engine_path)
    block = fp8_block(cfg)
    if block is not None and tuple(block) != (128, 128):  # first: triton or not, this cannot run
        raise EngineUnsupported(f"FP8 weight_block_size {list(block)}: the official code has one square "
                                "block size, model.py's module constant block_size = 128, and linear() calls "
                                "weight_dequant(weight, weight.scale) with kernel.py's default 128")
    M, fp8_reason = import_official(path)
    if block is not None and fp8_reason:
        raise EngineUnsupported(fp8_reason)
    B, T = tokens.shape
    margs = model_args(M, cfg, B, T, block)
    M.attn_impl = args.attn_impl  # read by MLA.__init__ (which caches) and MLA.forward
    with torch.device("cpu"):
        model = M.Transformer(margs).eval()  # sets M.world_size/rank from torch.distributed: 1/0 here
    load_into(M, model, official_weights(checkpoint, cfg.num_hidden_layers), args.gate_bias)

    got: dict[str, np.ndarray] = {}
    hooks = []

    def put(name, t, shape=None):
        a = t.detach().cpu()
        a = a.float().numpy() if a.is_floating_point() else a.numpy()
        got[name] = a.reshape(shape) if shape is not None else a

    def on_block(m, a, out, i):
        # This version's Block.forward returns x + attn + ffn. A version returning (x, residual)
        # (fused add+norm) leaves the sum to the next layer: the residual stream is their sum.
        put(f"layers.{i}.hidden", out[0] + out[1] if isinstance(out, tuple) else out)

    def on_gate(m, a, out, i):
        weights, ids = out
        # Gate.forward computes linear(x, self.weight) and returns only (weights, indices):
        # recompute the pre-activation logits from its input with the same official call.
        put(f"layers.{i}.router_logits", M.linear(a[0], m.weight).float(), (B, T, -1))
        put(f"layers.{i}.topk_weights", weights, (B, T, -1))
        put(f"layers.{i}.topk_ids", ids, (B, T, -1))

    final = {}
    for i, layer in enumerate(model.layers):
        hooks.append(layer.attn.register_forward_hook(lambda m, a, o, i=i: put(f"layers.{i}.attn_out", o)))
        hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: on_block(m, a, o, i)))
        if isinstance(layer.ffn, M.MoE):
            hooks.append(layer.ffn.gate.register_forward_hook(lambda m, a, o, i=i: on_gate(m, a, o, i)))
    # Transformer.forward slices norm(h)[:, -1] before the head; the norm's full output gives
    # every position's logits through the same official head.
    hooks.append(model.norm.register_forward_hook(lambda m, a, o: final.__setitem__("h", o)))
    try:
        last = model(torch.as_tensor(np.asarray(tokens, np.int64)), 0)  # prefill from position 0
        with torch.inference_mode():
            logits = model.head(final["h"])
    finally:
        for h in hooks:
            h.remove()
    # Same weights, same input row; only the GEMM's shape (hence summation order) differs.
    if not torch.allclose(logits[:, -1], last, rtol=1e-5, atol=1e-5 * float(last.abs().max())):
        raise RuntimeError("head(norm output) at the last position differs from Transformer.forward's logits")
    put("logits", logits)
    return canonicalize(got), engine_name(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine-path", required=True,
                   help=f"the inference/ folder of a checkout of {REPO} (model.py, kernel.py)")
    p.add_argument("--attn-impl", choices=("absorb", "naive"), default="absorb",
                   help="the official MLA implementation (module global attn_impl; default absorb, as shipped)")
    p.add_argument("--gate-bias", choices=("attach", "official"), default="attach",
                   help="attach (default): the gate has a correction bias iff the checkpoint has one; official: "
                        "only when dim == 7168, as Gate.__init__ decides (other checkpoints are then unsupported)")


def check_args(args: argparse.Namespace) -> None:
    problem = engine_path_problem(Path(args.engine_path))
    if problem:
        raise AdapterInputError(f"--engine-path {args.engine_path}: {problem}")


def main(argv=None) -> int:
    return adapter_main(
        argv, prog=PROG, run=run, add_arguments=add_arguments, check_args=check_args,
        description="Run DeepSeek's official inference code (float32, CPU) on token ids and write a dump "
                    "that `dsref compare` and the conformance kit grade.",
        example=(f'dsref conformance run KIT --engine-cmd "python -m {PROG} --engine-path DeepSeek-V3/inference '
                 '--checkpoint {checkpoint} --tokens {tokens} --out {out}"'))


if __name__ == "__main__":
    sys.exit(main())
