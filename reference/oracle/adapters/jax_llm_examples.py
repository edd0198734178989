"""jax-ml/jax-llm-examples ``deepseek_r1_jax`` as a conformance engine (imported from --engine-path, never vendored).

    python -m dsref.reference.oracle.adapters.jax_llm_examples --engine-path DIR \\
        --checkpoint CKPT --tokens T.npy --out D.safetensors

DIR is the ``deepseek_r1_jax`` project folder of a jax-llm-examples checkout (the one holding
the ``deepseek_r1_jax/`` package), or that package folder itself.

What runs is the engine's own code, end to end:

* weights: its HF loading path, ``chkpt_utils.load_param_list`` (safetensors.torch) ->
  ``_dequant_params`` (its own FP8 ``*_scale_inv`` dequantization: it infers the block from the
  two shapes, it does not read ``weight_block_size``) -> ``convert_model`` (its layout, its shape
  checks). Layers >= num_hidden_layers (MTP) are left out, as its ``convert_hf_checkpoint`` does:
  the engine has no MTP head, so the optional ``mtp.0.logits`` is not dumped;
* config: its ``Config`` built from config.json here, every field it has (its own
  ``convert_config`` hard-codes R1's YaRN values instead of reading ``rope_scaling``). Float32
  (``dtype``), no int8 (``quantize_*`` False), no Pallas/TPU kernels (``use_*_kernel`` False:
  ``decode_ragged_dot`` and splash attention do not run on CPU), one CPU device on a 1x1x1 mesh;
* logits: its ``prefill`` entry (cache None), which pads to a power of two with ``PAD_ID``.

The engine has no hooks, so the per-layer captures are recomputed with its own functions on
the same inputs ``prefill`` builds (``prepare_chunk``, ``segment_ids_to_positions``,
``generate_pos_embeddings``): ``rms_norm`` + ``mla_attention_block`` -> attn_out,
``forward_layer`` -> hidden, ``rms_norm`` + ``_route_tokens_to_moe_experts`` -> top-k. The one
line not taken from the engine is the router's pre-activation ``x @ w_router`` (its router
returns only weights and ids), written with the same einsum and dtype. A final check recomputes
the logits from the captured chain and requires them to match ``prefill``'s.

Settings the engine's Config has no field for are run as the engine hard-codes them (the kit's
job is to catch that): rms_norm eps 1e-6, norm_topk_prob always true, silu, YaRN floor/ceil
correction range. Unsupported (exit 3): q_lora_rank null, a non-sigmoid router, a rope type
other than YaRN/none, moe_layer_freq != 1 (its Weights put MoE at every layer >= first_k_dense).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

from dsref.reference.oracle.adapters.common import AdapterInputError, EngineUnsupported, adapter_main

PROG = "dsref.reference.oracle.adapters.jax_llm_examples"
PKG = "deepseek_r1_jax"


# ------------------------------------------------------------------ finding and importing the engine
def engine_root(path: str | Path) -> Path | None:
    """The folder to put on sys.path (it holds deepseek_r1_jax/model.py), or None."""
    p = Path(path).expanduser()
    if (p / PKG / "model.py").is_file():
        return p.resolve()
    if p.name == PKG and (p / "model.py").is_file() and (p / "chkpt_utils.py").is_file():
        return p.resolve().parent
    return None


def engine_revision(root: Path) -> str:
    """Short git sha of the checkout holding the engine (+dirty if edited), else 'unknown'.

    Only when the engine's model.py is tracked by that repository: an extracted copy that
    happens to sit inside another repository must not report that repository's sha."""
    def git(*a):
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=20)
    try:
        if git("ls-files", "--error-unmatch", f"{PKG}/model.py").returncode != 0:
            return "unknown"
        sha = git("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--", ".").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def import_engine(root: Path):
    """(model, chkpt_utils) modules of the engine under ``root``.

    chkpt_utils imports its vendored torch reference (third_party/modeling_deepseek) only for type
    annotations of the converters; that file needs transformers 4.x internals
    (``transformers.modeling_attn_mask_utils``). If it cannot be imported, a stand-in module
    whose attributes are placeholder classes lets the annotations evaluate; none of the code
    paths used here touch it."""
    sys.path.insert(0, str(root))
    model = importlib.import_module(f"{PKG}.model")
    ref_name = f"{PKG}.third_party.modeling_deepseek"
    try:
        importlib.import_module(ref_name)
    except Exception as e:  # noqa: BLE001 - any failure of the torch reference, not ours to fix
        stub = types.ModuleType(ref_name, f"stand-in: the real module failed to import ({e!r})")
        stub.__getattr__ = lambda name: type(name, (), {})  # PEP 562: every name is a placeholder class
        sys.modules[ref_name] = stub
        setattr(importlib.import_module(f"{PKG}.third_party"), "modeling_deepseek", stub)
    return model, importlib.import_module(f"{PKG}.chkpt_utils")


# ------------------------------------------------------------------ config
def check_expressible(hf: dict, cfg) -> None:
    """EngineUnsupported for checkpoints the engine's structures cannot represent at all."""
    if cfg.q_lora_rank is None:
        raise EngineUnsupported(
            "q_lora_rank null: deepseek_r1_jax's AttentionLayer always has q_a/q_gamma/q_b and "
            "mla_attention_block always RMS-normalises the q latent (no direct q projection)")
    if cfg.is_moe and cfg.scoring_func != "sigmoid":
        raise EngineUnsupported(
            f"scoring_func {cfg.scoring_func!r}: deepseek_r1_jax's _route_tokens_to_moe_experts only "
            "has the V3 sigmoid + e_score_correction_bias router")
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    kind = (rs or {}).get("type", (rs or {}).get("rope_type")) if isinstance(rs, dict) else None
    if kind not in (None, "yarn", "default"):
        raise EngineUnsupported(f"rope type {kind!r}: deepseek_r1_jax's generate_pos_embeddings is YaRN only")
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    if cfg.is_moe and moe_layers != list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers)):
        raise EngineUnsupported(
            f"moe_layer_freq {cfg.moe_layer_freq}: deepseek_r1_jax's Weights.abstract makes every layer "
            ">= first_k_dense an MoE layer")


def engine_config(model, cfg, seq_len: int):
    """The engine's Config for this checkpoint: every field it has, from config.json (via dsref's
    parsed ModelConfig, whose YaRN defaults are DeepSeek's), run settings for float32 CPU."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType
    rs = cfg.rope_scaling
    # no rope_scaling: factor 1, which is plain RoPE in its formulas (its Config default is R1's 40)
    yarn = dict(rope_scaling_factor=1.0) if rs is None else dict(
        rope_scaling_factor=float(rs.factor), rope_beta_fast=float(rs.beta_fast), rope_beta_slow=float(rs.beta_slow),
        rope_mscale=float(rs.mscale), rope_mscale_all_dim=float(rs.mscale_all_dim),
        rope_original_max_position_embeddings=int(rs.original_max_position_embeddings))
    moe = cfg.is_moe
    mesh = jax.make_mesh((1, 1, 1), ("x", "y", "z"), devices=jax.devices("cpu")[:1],
                         axis_types=(AxisType.Auto,) * 3)
    return model.Config(
        embed=cfg.hidden_size, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        num_heads=cfg.num_attention_heads, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, vocab_size=cfg.vocab_size,
        num_layers=cfg.num_hidden_layers, max_seq_len=max(seq_len, cfg.max_position_embeddings),
        causal=True, rope_theta=float(cfg.rope_theta), **yarn,
        ffw_size=cfg.intermediate_size,
        first_k_dense=cfg.first_k_dense_replace if moe else cfg.num_hidden_layers,
        moe_ffw_size=cfg.moe_intermediate_size, n_routed_experts=cfg.n_routed_experts if moe else 1,
        num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group or 1, topk_group=cfg.topk_group or 1,
        routed_scaling_factor=float(cfg.routed_scaling_factor), n_shared_experts=cfg.n_shared_experts or 0,
        # run settings: float32, no int8, reference (non-Pallas) code paths, one CPU device
        dtype=jnp.float32, moe_gate_dtype=jnp.float32, quantize_moe=False, quantize_mlp=False,
        quantize_attn=False, quantize_cache=False, use_prefill_attn_kernel=False, use_decode_attn_kernel=False,
        use_decode_ragged_dot_kernel=False, mesh=mesh, rules=model.ShardingRules())


# ------------------------------------------------------------------ weights
def load_weights(chk, ecfg, checkpoint: Path, num_layers: int):
    """The engine's own HF path: load_param_list -> _dequant_params -> convert_model."""
    from safetensors import safe_open
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        files = json.loads(index.read_text())["weight_map"]
    else:
        files = {}
        for f in sorted(checkpoint.glob("*.safetensors")):
            with safe_open(str(f), "np") as st:
                files.update({k: f.name for k in st.keys()})
    params_map = {k: {"file": v} for k, v in files.items()}

    def layer_of(name):  # MTP layers (index >= num_hidden_layers) are not the engine's
        parts = name.split(".")
        return int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else -1
    names = [k for k in params_map if layer_of(k) < num_layers]
    params = chk._dequant_params(chk.load_param_list(params_map, checkpoint, names))
    return chk.convert_model(params, ecfg)


# ------------------------------------------------------------------ running
def run_engine(model, ecfg, weights, tokens: np.ndarray) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp
    B, T = tokens.shape
    # logits: the engine's prefill entry, exactly as a user calls it
    _, logits, _ = model.prefill(jnp.asarray(tokens, jnp.int32), weights, None, ecfg)
    logits = np.asarray(logits, np.float32)

    # captures: the same inputs prefill builds (pad to a power of two with PAD_ID; every token
    # equal to PAD_ID gets segment id 0, as in prefill), then the engine's layer functions
    pad_to = logits.shape[1]
    prompt, seg = model.prepare_chunk(jnp.asarray(tokens, jnp.int32), pad_to, model.PAD_ID)
    positions = model.segment_ids_to_positions(seg)
    sin, cos = model.generate_pos_embeddings(positions, ecfg.qk_rope_head_dim, ecfg)
    sin, cos = sin.astype(ecfg.dtype), cos.astype(ecfg.dtype)

    @jax.jit
    def step(x, layer):
        idx = 0  # only used to index a KV cache, and there is none
        attn_in = model.rms_norm(x.astype(ecfg.dtype), layer.gamma_pre_attn)
        attn_out, _ = model.mla_attention_block(attn_in, seg, layer.attn, sin, cos, ecfg, None, idx)
        hidden, _ = model.forward_layer(x, seg, layer, sin, cos, idx, ecfg, None)
        out = {"attn_out": attn_out, "hidden": hidden}
        if model.is_type(layer.mlp, model.MoELayer):
            ff_in = model.rms_norm(x.astype(ecfg.dtype) + attn_out.astype(ecfg.dtype), layer.gamma_post_attn)
            w, ids = model._route_tokens_to_moe_experts(ff_in, layer.mlp.w_router, layer.mlp.b_router, False, ecfg)
            # not exposed by the engine's router: the same einsum and cast as its first line
            out["router_logits"] = jnp.einsum("btk,kj->btj", ff_in, layer.mlp.w_router).astype(ecfg.moe_gate_dtype)
            out["topk_weights"], out["topk_ids"] = w, ids
        return out

    got: dict[str, np.ndarray] = {}
    x = weights.embedding[prompt, :]
    for i, layer in enumerate(weights.layers):
        out = step(x, layer)
        x = out["hidden"]
        for k, v in out.items():
            got[f"layers.{i}.{k}"] = np.asarray(v)[:, :T].astype(np.int32 if k == "topk_ids" else np.float32)

    # The captured chain must be the computation prefill ran. Not bit-identical: its rms_norm rounds
    # to bfloat16 whatever cfg.dtype is, so ulp-level float32 differences between two XLA programs
    # flip some roundings (~1e-3 relative on the logits); wrong inputs, positions or masks are O(1).
    again = np.asarray(jnp.einsum("btd,dv->btv", model.rms_norm(x, weights.gamma_final), weights.lm_head))
    scale = float(np.max(np.abs(logits))) or 1.0
    if float(np.max(np.abs(again - logits))) > 2e-2 * scale:
        raise RuntimeError("captured layers do not reproduce the engine's prefill logits "
                           f"(max diff {float(np.max(np.abs(again - logits))):.3g}, max |logit| {scale:.3g})")
    got["logits"] = logits[:, :T]
    return got


def run(args, checkpoint: Path, tokens: np.ndarray, cfg) -> tuple[dict, str]:
    import jax
    jax.config.update("jax_platforms", "cpu")  # before any backend starts: one CPU device
    from dsref.reference.oracle.golden import canonicalize
    root = engine_root(args.engine_path)
    hf = json.loads((checkpoint / "config.json").read_text())
    check_expressible(hf, cfg)
    model, chk = import_engine(root)
    T = tokens.shape[1]
    ecfg = engine_config(model, cfg, 2 ** max(0, (T - 1).bit_length()))
    weights = load_weights(chk, ecfg, checkpoint, cfg.num_hidden_layers)
    return canonicalize(run_engine(model, ecfg, weights, tokens)), f"jax-llm-examples-{PKG}-{engine_revision(root)}"


def _add_arguments(p) -> None:
    p.add_argument("--engine-path", required=True, metavar="DIR",
                   help=f"jax-llm-examples' {PKG} folder (holding the {PKG}/ package), or the package itself")


def check_args(args) -> None:
    if engine_root(args.engine_path) is None:
        raise AdapterInputError(f"--engine-path {args.engine_path}: no {PKG}/model.py there "
                                f"(give jax-llm-examples' {PKG} folder)")


def main(argv=None) -> int:
    return adapter_main(argv, prog=PROG, run=run, add_arguments=_add_arguments, check_args=check_args,
                        description="Run jax-llm-examples' deepseek_r1_jax (float32, CPU, no int8) on token ids "
                                    "and write a dump the conformance kit grades.",
                        example=f"dsref conformance run KIT --engine-cmd \"python -m {PROG} --engine-path "
                                "/tmp/jle/deepseek_r1_jax --checkpoint {checkpoint} --tokens {tokens} --out {out}\"")


if __name__ == "__main__":
    sys.exit(main())
