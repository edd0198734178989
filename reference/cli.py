"""`dsref info MODEL`: parameters, KV cache, architecture and a self-check forward pass.

The command line's root, which assembles every package's subcommands, is
``dsref.experiments.cli`` (the top layer: it imports the others, nothing imports it).
"""

from __future__ import annotations

import json

MODEL_HELP = ("a preset name (deepseek-v3, deepseek-r1, deepseek-v2-lite, qwen2.5-72b, tiny-v3, deepseek-v4-flash, "
              "...; all: `dsref info nonexistent`) or a checkpoint directory with config.json")


def load_model(name: str, option: str = "MODEL", v4: bool = False):
    """The ModelConfig of a preset name, a checkpoint directory or a config.json file; with v4=True
    also a DeepSeek-V4 one (ModelConfigV4). Without it a V4 model is refused in one line naming the
    commands that take V4 (the others expect a ModelConfig)."""
    from dsref.reference.config import ConfigError
    cfg = _load_any(name, option)
    if cfg.arch == "deepseek_v4" and not v4:
        raise ConfigError(f"{option} {name}: a DeepSeek-V4 model; this command does not take DeepSeek-V4 yet "
                          "(these do: dsref info, golden, compare, generate, conformance, sim local, sim serve)")
    return cfg


def _load_any(name: str, option: str):
    """The config (ModelConfig or ModelConfigV4) of a preset name, a checkpoint directory or a
    config.json file. Anything else
    (empty, a binary file, a directory without config.json, an unknown name) raises ConfigError in
    one line naming ``option`` and the value, and saying what it may be."""
    from pathlib import Path

    from dsref.reference.config import ConfigError
    from dsref.reference.presets import all_preset_names, get_preset, load_config
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
                              f"(known: {', '.join(all_preset_names())}) or a checkpoint directory with "
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
    if cfg.arch == "deepseek_v4":
        return info_dict_v4(cfg)
    pc = dict(cfg.param_counts())
    # Our activated count leaves the input embedding out (a token reads one row of it); DeepSeek's
    # README_WEIGHTS.md counts it in ("36.7B, including 0.9B for Embedding and 0.9B for the output
    # Head"), so both conventions are reported (docs/architecture.md, "Parameters").
    pc["activated_params_with_input_embedding"] = pc["activated_params"] + (
        0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
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


def info_dict_v4(cfg) -> dict:
    """DeepSeek-V4: parameters from reference/params_v4.py; KV cache per layer type (bf16)."""
    from dsref.reference.config_v4 import CSA, HCA, SLIDING
    pc = cfg.param_counts()
    counts = cfg.layer_counts()
    per = cfg.kv_bytes_per_token_by_type(2.0)
    return {
        "name": cfg.name, "arch": cfg.arch, "config_spelling": cfg.spelling, **pc,
        "num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "num_attention_heads": cfg.num_attention_heads, "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "q_lora_rank": cfg.q_lora_rank, "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank, "sliding_window": cfg.sliding_window,
        "num_layers_by_type": counts, "mtp_layer_types": list(cfg.mtp_layer_types),
        "compress_rate_csa": cfg.compress_rate_csa, "compress_rate_hca": cfg.compress_rate_hca,
        "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
        # one layer of each type: what one more token of context adds to its cache
        "kv_cache_bytes_per_token_by_layer_type": {t: per[t] for t in (SLIDING, CSA, HCA)},
        "index_cache_bytes_per_token_per_csa_layer": cfg.index_head_dim * 2.0 / cfg.compress_rate_csa,
        "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(2.0),
        "index_cache_bytes_per_token": cfg.index_cache_bytes_per_token(2.0),
        "kv_window_bytes_per_sequence": int(cfg.kv_window_bytes(2.0)),
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "num_hash_layers": cfg.num_hash_layers,
        "scoring_func": cfg.scoring_func, "routed_scaling_factor": cfg.routed_scaling_factor,
        "swiglu_limit": cfg.swiglu_limit, "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "rope_theta": cfg.rope_theta, "compress_rope_theta": cfg.compress_rope_theta,
        "yarn_factor": None if cfg.rope_scaling is None else cfg.rope_scaling.factor,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
    }


def _print_info_v4(cfg, d: dict) -> None:
    from dsref.reference.config_v4 import CSA, HCA, SLIDING
    n = d["num_layers_by_type"]
    per = d["kv_cache_bytes_per_token_by_layer_type"]
    print(f"{cfg.name}  (DeepSeek-V4: sliding/CSA/HCA attention + hash/top-k MoE + hyper-connections; "
          f"config spelling: {cfg.spelling})")
    print(f"  parameters        {_fmt_count(d['total_params'])} total, {_fmt_count(d['activated_params'])} "
          f"activated per token (LM head in, input embedding out)")
    if d["mtp_params"]:
        print(f"  MTP module        {_fmt_count(d['mtp_params'])} ({', '.join(cfg.mtp_layer_types)}; "
              f"{_fmt_count(d['checkpoint_params'])} with it, no embedding/head copies)")
    print(f"  layers            {cfg.num_hidden_layers} ({n[SLIDING]} sliding-only + {n[CSA]} CSA + {n[HCA]} HCA; "
          f"{cfg.num_hash_layers} hash-routed)")
    print(f"  attention         {cfg.num_attention_heads} heads x {cfg.head_dim}, one shared K=V head, RoPE on the "
          f"last {cfg.qk_rope_head_dim} dims, q_lora={cfg.q_lora_rank}, output {cfg.o_groups} groups x "
          f"{cfg.o_lora_rank}")
    print(f"  compression       window {cfg.sliding_window} in every layer; CSA 1/{cfg.compress_rate_csa} + indexer "
          f"{cfg.index_n_heads} heads x {cfg.index_head_dim} keeping top {cfg.index_topk:,}; HCA 1/"
          f"{cfg.compress_rate_hca}")
    print(f"  KV cache (bf16)   per token and layer: sliding 0, CSA {per[CSA]:,.0f} (of it indexer "
          f"{d['index_cache_bytes_per_token_per_csa_layer']:,.0f}), HCA {per[HCA]:,.0f}; all layers "
          f"{d['kv_cache_bytes_per_token']:,.0f} B/token + windows {d['kv_window_bytes_per_sequence']:,} B/sequence")
    print(f"  MoE               {cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared, top-"
          f"{cfg.num_experts_per_tok}, {cfg.scoring_func} router, scale {cfg.routed_scaling_factor}, SwiGLU clamp "
          f"{cfg.swiglu_limit:g}")
    print(f"  hyper-connections {cfg.hc_mult} streams, {cfg.hc_sinkhorn_iters} Sinkhorn iterations")
    rs = cfg.rope_scaling
    print(f"  rope              theta {cfg.rope_theta:g} (sliding), {cfg.compress_rope_theta:g} (compressed" + (
        f", YaRN x{rs.factor:g} from {rs.original_max_position_embeddings})" if rs else ")"))


def cmd_info(args) -> int:
    cfg = load_model(args.model, v4=True)
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
    if cfg.arch == "deepseek_v4":  # no self-check: the V4 forward pass is not implemented yet
        _print_info_v4(cfg, d)
        if "checkpoint" in d:
            ck = d["checkpoint"]
            print(f"  checkpoint        {json.dumps({k: v for k, v in ck.items() if not isinstance(v, (list, dict))})}")
        return 0
    kind = "MLA + DeepSeekMoE" if cfg.arch == "deepseek" else ("GQA + MoE" if cfg.is_moe else "dense GQA")
    print(f"{cfg.name}  ({kind})")
    print(f"  parameters        {_fmt_count(d['total_params'])} total, {_fmt_count(d['activated_params'])} "
          f"activated per token (LM head in, input embedding out; "
          f"{_fmt_count(d['activated_params_with_input_embedding'])} with it)")
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
moonlight-16b-a3b, kimi-k2, qwen2.5-72b, llama-3.1-405b, tiny-v3, deepseek-v4-flash,
deepseek-v4-pro, ...) or a checkpoint directory with config.json. Activated parameters count what
one token computes with (k of E routed experts and the LM head, not the input embedding table).
The KV cache of MLA models is the compressed latent (bf16). DeepSeek-V4 models list their cache
per layer type (sliding window, CSA and HCA compressed entries, the indexer's keys) and which
config.json spelling was read; they have no self-check yet.""",
        epilog="example:\n  dsref info deepseek-v3", formatter_class=HelpFormatter)
    pi.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    pi.add_argument("--json", action="store_true", help="print one JSON object")
    pi.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the self-check forward pass of a scaled-down model of the same structure")
    pi.set_defaults(func=cmd_info)
