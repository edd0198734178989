"""`dsref info MODEL`: parameters, KV cache, architecture and a self-check forward pass.

The command line's root, which assembles every package's subcommands, is
``dsref.experiments.cli`` (the top layer: it imports the others, nothing imports it).
"""

from __future__ import annotations

import json

MODEL_HELP = ("a preset name (deepseek-v3, deepseek-r1, deepseek-v2-lite, qwen2.5-72b, tiny-v3, ...; all: "
              "`dsref info nonexistent`) or a checkpoint directory with config.json")


def load_model(name: str, option: str = "MODEL"):
    """The ModelConfig of a preset name, a checkpoint directory or a config.json file. Anything else
    (empty, a binary file, a directory without config.json, an unknown name) raises ConfigError in
    one line naming ``option`` and the value, and saying what it may be."""
    from pathlib import Path

    from dsref.reference.config import ConfigError
    from dsref.reference.presets import get_preset, load_config, preset_names
    if not str(name).strip():
        raise ConfigError(f"{option}: empty; {option} is {MODEL_HELP}")
    p = Path(name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{option} {name}: a directory without config.json; {option} is {MODEL_HELP}")
    elif p.is_file():
        try:
            return load_config(name)
        except UnicodeDecodeError:
            raise ConfigError(f"{option} {name}: a binary file, not a config.json; {option} is {MODEL_HELP}") from None
        except ConfigError as e:
            raise ConfigError(f"{option} {name}: not a model config.json ({e}); {option} is {MODEL_HELP}") from None
    elif p.exists():
        raise ConfigError(f"{option} {name}: not a file or directory; {option} is {MODEL_HELP}")
    else:
        try:
            return get_preset(name)
        except ConfigError:
            raise ConfigError(f"{option} {name!r}: no such preset, file or directory; {option} is a preset name "
                              f"(known: {', '.join(preset_names())}) or a checkpoint directory with "
                              "config.json") from None
    try:
        return load_config(name)
    except UnicodeDecodeError:
        raise ConfigError(f"{option} {name}: config.json is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{option} {name}: cannot read ({e.strerror or e})") from None


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:,.0f}"


def scaled_down(cfg):
    """A few-MB model with the same structure as cfg (q_lora on/off, groups, gate, YaRN, MTP)."""
    from dsref.reference.config import RopeScaling
    if cfg.arch != "deepseek":
        return None
    E = cfg.n_routed_experts
    G = cfg.n_group if cfg.n_group > 1 else 1
    per = max(2, min(4, E // max(G, 1)))
    n_exp = G * per
    k = min(cfg.num_experts_per_tok, cfg.topk_group * per if cfg.topk_method != "greedy" else n_exp, 4)
    rs = cfg.rope_scaling
    if rs is not None:
        rs = RopeScaling(**{**rs.__dict__, "original_max_position_embeddings": 16})
    return cfg.replace(
        name=f"{cfg.name}-scaled-down", vocab_size=128, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=min(cfg.num_hidden_layers, cfg.first_k_dense_replace + 2, 4),
        first_k_dense_replace=min(cfg.first_k_dense_replace, 1), num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None if cfg.q_lora_rank is None else 48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=n_exp,
        n_shared_experts=min(cfg.n_shared_experts, 2), num_experts_per_tok=k, n_group=G,
        topk_group=min(cfg.topk_group, G), rope_scaling=rs, max_position_embeddings=64)


def self_check(cfg, seed: int = 0) -> dict:
    """Forward pass of the scaled-down model: JAX (absorbed + naive MLA) vs NumPy float64."""
    import numpy as np
    from flax import nnx

    from dsref.reference import numpy_ref
    from dsref.reference.model import DeepseekModel, jit_forward
    small = scaled_down(cfg)
    model = DeepseekModel(small, rngs=nnx.Rngs(seed), std=0.1)
    sd = model.state_dict()
    rng = np.random.default_rng(seed)
    for name in sd:
        if name.endswith("e_score_correction_bias"):
            sd[name] = rng.normal(0, 0.2, sd[name].shape).astype(np.float32)
    model.load_hf(sd)
    tokens = rng.integers(0, small.vocab_size, (2, 12))
    ref = numpy_ref.forward(tokens, {k: v.astype(np.float64) for k, v in sd.items()}, small)
    out = {}
    for form in ("absorbed", "naive"):
        got = np.asarray(jit_forward(model, tokens, form))
        out[form] = float(np.abs(got - ref).max() / np.abs(ref).max())
    return {"model": small.name, "params": small.param_counts()["total_params"],
            "tokens": list(tokens.shape), "rel_err_absorbed_vs_float64": out["absorbed"],
            "rel_err_naive_vs_float64": out["naive"]}


def info_dict(cfg) -> dict:
    pc = cfg.param_counts()
    d = {"name": cfg.name, "arch": cfg.arch, **pc, "num_layers": cfg.num_hidden_layers,
         "kv_cache_bytes_per_token": int(cfg.kv_cache_bytes_per_token(2.0)),
         "kv_cache_bytes_per_token_naive": int(cfg.kv_cache_bytes_per_token(2.0, absorbed=False)),
         "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
         "num_attention_heads": cfg.num_attention_heads}
    if cfg.arch == "deepseek":
        d.update(num_moe_layers=cfg.num_moe_layers, num_dense_layers=cfg.num_hidden_layers - cfg.num_moe_layers,
                 n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
                 num_experts_per_tok=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
                 topk_method=cfg.topk_method, scoring_func=cfg.scoring_func, q_lora_rank=cfg.q_lora_rank,
                 kv_lora_rank=cfg.kv_lora_rank, softmax_scale=cfg.softmax_scale,
                 yarn_factor=None if cfg.rope_scaling is None else cfg.rope_scaling.factor)
        if cfg.has_indexer:  # V3.2's lightning indexer (its key cache is inside kv_cache_bytes_per_token)
            d.update(index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
                     index_cache_bytes_per_token=int(cfg.index_cache_bytes_per_token(2.0)),
                     index_cache_bytes_per_token_official_fp8=int(cfg.index_cache_bytes_per_token(None)))
    else:
        d.update(num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.dense_head_dim)
    return d


def cmd_info(args) -> int:
    cfg = load_model(args.model)
    d = info_dict(cfg)
    from pathlib import Path
    if Path(args.model).is_dir():
        from dsref.reference.checkpoint import describe_checkpoint
        d["checkpoint"] = describe_checkpoint(args.model)
    if args.check and cfg.arch == "deepseek":
        d["self_check"] = self_check(cfg)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    kind = "MLA + DeepSeekMoE" if cfg.arch == "deepseek" else ("GQA + MoE" if cfg.is_moe else "dense GQA")
    print(f"{cfg.name}  ({kind})")
    print(f"  parameters        {_fmt_count(d['total_params'])} total, {_fmt_count(d['activated_params'])} "
          f"activated per token (LM head in, input embedding out)")
    if d["mtp_params"]:
        print(f"  MTP module        {_fmt_count(d['mtp_params'])} (+ embedding/head copies: "
              f"{_fmt_count(d['checkpoint_params'])} in the published checkpoint)")
    print(f"  layers            {cfg.num_hidden_layers}" + (
        f" ({d['num_dense_layers']} dense + {d['num_moe_layers']} MoE)" if cfg.arch == "deepseek" else ""))
    kv = d["kv_cache_bytes_per_token"]
    if cfg.arch == "deepseek":
        print(f"  attention         MLA, {cfg.num_attention_heads} heads, latent R={cfg.kv_lora_rank}, "
              f"rope P={cfg.qk_rope_head_dim}, q_lora={cfg.q_lora_rank}")
        print(f"  KV cache (bf16)   {kv:,.0f} B/token latent  vs  {d['kv_cache_bytes_per_token_naive']:,.0f} "
              f"B/token expanded ({d['kv_cache_bytes_per_token_naive'] / kv:.0f}x)")
        if cfg.has_indexer:
            print(f"  sparse attention  lightning indexer: {cfg.index_n_heads} heads x {cfg.index_head_dim}, MLA "
                  f"attends the top {cfg.index_topk:,} keys; its key cache {d['index_cache_bytes_per_token']:,} "
                  f"B/token of the above (DeepSeek's FP8 layout: {d['index_cache_bytes_per_token_official_fp8']:,})")
        print(f"  MoE               {cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared, top-"
              f"{cfg.num_experts_per_tok}, {cfg.scoring_func} gate, {cfg.topk_method}, groups "
              f"{cfg.topk_group}/{cfg.n_group}, scale {cfg.routed_scaling_factor}")
        rs = cfg.rope_scaling
        print(f"  rope              theta {cfg.rope_theta:g}" + (
            f", YaRN x{rs.factor:g} from {rs.original_max_position_embeddings}, softmax scale "
            f"{cfg.softmax_scale:.5f}" if rs else ""))
    else:
        print(f"  attention         GQA {cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv heads, "
              f"head_dim {cfg.dense_head_dim}" + (", q/k RMSNorm" if getattr(cfg, "qk_norm", False) else "")
              + f"; KV cache (bf16) {kv:,.0f} B/token")
        if cfg.is_moe:
            print(f"  MoE               {cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared, top-"
                  f"{cfg.num_experts_per_tok}, {cfg.scoring_func} router, norm_topk_prob {cfg.norm_topk_prob}, "
                  f"{cfg.num_moe_layers} of {cfg.num_hidden_layers} layers")
    if "checkpoint" in d:
        ck = d["checkpoint"]
        print(f"  checkpoint        {json.dumps({k: v for k, v in ck.items() if not isinstance(v, (list, dict))})}")
    if "self_check" in d:
        sc = d["self_check"]
        print(f"  self-check        forward pass of {sc['model']} ({sc['params']:,} params, tokens "
              f"{sc['tokens']}): JAX float32 vs NumPy float64 rel. err absorbed "
              f"{sc['rel_err_absorbed_vs_float64']:.1e}, naive {sc['rel_err_naive_vs_float64']:.1e}")
    return 0


def register(subparsers) -> None:
    """Add `dsref info`."""
    from dsref.reference.cli_common import HelpFormatter
    pi = subparsers.add_parser(
        "info", help="parameter counts, KV-cache bytes and architecture of a model",
        description="""\
Describe a model: parameter counts, layers, attention and KV-cache size per token, MoE routing,
RoPE scaling, then a quick self-check (a scaled-down model of the same structure run in JAX and
in float64 NumPy, which must agree).

MODEL is a preset name (deepseek-v3, deepseek-r1, deepseek-v2, deepseek-v2-lite,
moonlight-16b-a3b, kimi-k2, qwen2.5-72b, llama-3.1-405b, tiny-v3, ...) or a checkpoint directory
with config.json. Activated parameters count what one token computes with (k of E routed
experts and the LM head, not the input embedding table). The KV cache of MLA models is the
compressed latent (bf16).""",
        epilog="example:\n  dsref info deepseek-v3", formatter_class=HelpFormatter)
    pi.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    pi.add_argument("--json", action="store_true", help="print one JSON object")
    pi.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the self-check forward pass of a scaled-down model of the same structure")
    pi.set_defaults(func=cmd_info)
