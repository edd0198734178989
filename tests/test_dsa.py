"""DeepSeek-V3.2: config fields, tensor table and the lightning indexer (reference/dsa.py).

The indexer runs on adversarial tiny inputs (tiny-v32: 2 indexer heads, so relu zeroes whole
rows of terms and exact score ties happen; index_topk 5 below the sequence lengths, so the top-k
drops keys). Checked: float64 NumPy vs float32 JAX, both vs transformers' DeepseekV32Indexer
with the same weights, the interleaved-RoPE bug changes selections, chunks and decode steps
past position 0 select what the full sequence selects, short sequences are dense causal.
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsref.reference import dsa
from dsref.reference.config import ConfigError, ModelConfig
from dsref.reference.params import ROUTED_EXPERT, tensors
from dsref.reference.presets import get_preset

CFG = get_preset("tiny-v32")
PRE = "model.layers.1.self_attn."
V32_JSON = {  # deepseek-ai/DeepSeek-V3.2 config.json (the dump cited in reference/presets.py)
    "architectures": ["DeepseekV32ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "index_head_dim": 128, "index_n_heads": 64, "index_topk": 2048,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v32", "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.44.2",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}


# ------------------------------------------------------------------ config and tensor table
def test_published_v32_config_is_the_preset_and_round_trips(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(V32_JSON))
    cfg = ModelConfig.from_json(p)
    assert cfg == get_preset("deepseek-v3.2") == get_preset("deepseek-v3.2-exp").replace(name="x")
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 2048) and cfg.has_indexer
    cfg.save(tmp_path / "out.json")
    back = json.loads((tmp_path / "out.json").read_text())
    assert back["model_type"] == "deepseek_v32" and ModelConfig.from_json(tmp_path / "out.json") == cfg
    # a V3 file gains no indexer field
    assert not {"index_n_heads", "index_head_dim", "index_topk"} & set(get_preset("deepseek-v3").to_hf_dict())


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("index_topk"), "index_topk"),
    (lambda d: d.update(model_type="deepseek_v3", index_n_heads=None), "index_n_heads"),
    (lambda d: d.update(index_head_dim=32), "index_head_dim"),          # < qk_rope_head_dim
    (lambda d: d.update(index_n_heads=0), "index_n_heads"),
    (lambda d: d.update(index_topk=1.5), "index_topk"),
    (lambda d: d.update(q_lora_rank=None), "q_lora_rank"),
    (lambda d: d.update(mlp_layer_types=["dense"] * 61), "mlp_layer_types"),
    (lambda d: d.update(layer_types=["full_attention"] * 61), "layer_types"),
    (lambda d: d.update(model_type="qwen3"), "index_n_heads"),
])
def test_bad_v32_fields_are_named_with_the_file(tmp_path, mutate, field):
    d = json.loads(json.dumps(V32_JSON))
    mutate(d)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(p)
    msg = str(e.value)
    assert str(p) in msg and f"'{field}'" in msg and "\n" not in msg


def test_checkpoint_values_and_kv_bytes_match_the_release():
    """Our table plus the FP8 block scales of every FP8 matrix (all but embedding, head, router,
    weights_proj and eh_proj, which the release keeps in bf16) is exactly the 685,396,921,376
    values the published V3.2 checkpoint's dump counts."""
    cfg = get_preset("deepseek-v3.2")
    rows = tensors(cfg, mtp=True)
    bf16 = ("gate.weight", "weights_proj.weight", "eh_proj.weight")
    scales = sum(math.ceil(t.shape[-2] / 128) * math.ceil(t.shape[-1] / 128)
                 * (t.shape[0] if t.group == ROUTED_EXPERT else 1)
                 for t in rows if len(t.shape) >= 2 and t.layer is not None and not t.rel.endswith(bf16))
    pc = cfg.param_counts()
    assert pc["checkpoint_params"] + scales == 685_396_921_376
    ix = [t for t in rows if ".indexer." in t.name]
    assert len(ix) == 5 * 62 and all(set(t.spec) == {None} for t in ix)
    assert sum(t.numel for t in ix) == 62 * (8192 * 1536 + 128 * 7168 + 2 * 128 + 64 * 7168)
    assert pc["total_params"] - get_preset("deepseek-v3").param_counts()["total_params"] == 61 * 13_959_424
    assert cfg.kv_cache_bytes_per_token(2.0) == (512 + 64 + 128) * 2 * 61 == 85_888
    assert cfg.index_cache_bytes_per_token(None) == (128 + 4) * 61
    assert get_preset("deepseek-v3").kv_cache_bytes_per_token(2.0) == 70_272
    assert not any(".indexer." in t.name for t in tensors(get_preset("deepseek-v3"), mtp=True))


# ------------------------------------------------------------------ inputs
def _weights(seed: int, cfg=CFG) -> dict[str, np.ndarray]:
    """Layer 1's attention weights (float32 values), large and of both signs; norms around 1."""
    rng = np.random.default_rng(seed)
    w = {}
    for t in tensors(cfg):
        if t.layer == 1 and t.rel.startswith("self_attn."):
            norm = t.rel.endswith("norm.weight")
            a = 1 + 0.3 * rng.normal(size=t.shape) if norm else 0.3 * rng.normal(size=t.shape)
            w[t.name] = a.astype(np.float32)
    return w


def _inputs(seed: int, B=2, T=13, start=0, cfg=CFG):
    rng = np.random.default_rng(100 + seed)
    x = rng.normal(size=(B, T, cfg.hidden_size)).astype(np.float32)
    return x, np.broadcast_to(np.arange(start, start + T), (B, T))


def _f64(w):
    return {k: v.astype(np.float64) for k, v in w.items()}


def _jax_w(w):
    return {k.removeprefix(PRE): jnp.asarray(v) for k, v in w.items() if k.startswith(PRE)}


_indexer_jax = jax.jit(dsa.indexer_jax, static_argnums=(1,), static_argnames=("interleaved",))


def _rows_equal(a: dsa.Selection, b: dsa.Selection, rows):
    return all(np.array_equal(np.asarray(a.ids)[i], np.asarray(b.ids)[i]) for i in zip(*np.nonzero(rows)))


# ------------------------------------------------------------------ float64 vs float32 JAX
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_numpy_float64_and_jax_float32_agree(seed):
    w, (x, pos) = _weights(seed), _inputs(seed)
    ref = dsa.indexer(x.astype(np.float64), _f64(w), CFG, pos, PRE)
    got = _indexer_jax(_jax_w(w), CFG, jnp.asarray(x), jnp.asarray(pos))
    vis = dsa.visible(pos, pos)
    rel = np.abs(np.asarray(got.scores) - ref.scores)[vis].max() / np.abs(ref.scores[vis]).max()
    assert rel <= 1e-5, rel
    clear = dsa.boundary_gap(ref, vis, CFG.index_topk) > 1e-4  # no near-tie at the k-th boundary
    assert clear.mean() > 0.5 and _rows_equal(ref, got, clear)
    assert np.array_equal(np.asarray(got.tie), ref.tie)
    assert np.array_equal(np.asarray(got.mask), ref.mask) or not clear.all()
    assert (ref.mask <= vis).all() and (ref.mask.sum(-1) == np.minimum(vis.sum(-1), CFG.index_topk)).all()


def test_few_heads_make_exact_ties_and_the_flag_says_so():
    """With 2 heads relu zeroes every term of many (query, key) pairs: rows whose k-th best visible
    score is exactly 0 next to another 0 are flagged, and only those."""
    ties = 0
    for seed in range(3):
        w, (x, pos) = _weights(seed), _inputs(seed)
        sel = dsa.indexer(x.astype(np.float64), _f64(w), CFG, pos, PRE)
        vis = dsa.visible(pos, pos)
        s = -np.sort(-np.where(vis, sel.scores, -np.inf), -1)
        k = CFG.index_topk
        want = (vis.sum(-1) > k) & (s[..., k - 1] == s[..., k])
        assert np.array_equal(sel.tie, want)
        ties += int(sel.tie.sum())
        assert (s[..., k - 1][sel.tie] == 0).all()  # the ties are the relu zeros
    assert ties > 0


# ------------------------------------------------------------------ transformers
def _hf_indexer(cfg, w, x, pos, qr, monkeypatch):
    """transformers' DeepseekV32Indexer (float32, eager) with our weights copied by name; returns
    (index scores with the causal mask applied, top-k ids), the scores captured at its topk call."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as m
    hc = transformers.DeepseekV32Config(**cfg.to_hf_dict())
    idx = m.DeepseekV32Indexer(hc, 1).eval()
    names = {n for n, _ in idx.named_parameters()}
    assert names == {k.removeprefix(PRE + "indexer.") for k in w if ".indexer." in k}
    with torch.no_grad():
        for n, p in idx.named_parameters():
            p.copy_(torch.as_tensor(w[PRE + "indexer." + n]))
    xt, pt = torch.as_tensor(x), torch.as_tensor(np.ascontiguousarray(pos))
    cos_sin = m.DeepseekV32RotaryEmbedding(hc)(xt, pt)
    mask = torch.as_tensor(dsa.visible(pos, pos))
    seen = {}
    orig = torch.Tensor.topk

    def topk(self, *a, **k):
        seen["scores"] = self.detach().clone()
        return orig(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "topk", topk)
    with torch.no_grad():
        ids = idx(xt, torch.as_tensor(qr), cos_sin, mask, pt)
    monkeypatch.undo()
    return seen["scores"].numpy(), ids.numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_and_selection_match_transformers(seed, monkeypatch):
    w, (x, pos) = _weights(seed), _inputs(seed)
    qr = dsa.compressed_query(x.astype(np.float64), _f64(w), PRE).astype(np.float32)
    theirs, hf_ids = _hf_indexer(CFG, w, x, pos, qr, monkeypatch)
    ours = dsa.indexer(x.astype(np.float64), _f64(w), CFG, pos, PRE)
    vis = dsa.visible(pos, pos)
    rel = np.abs(theirs - ours.scores)[vis].max() / np.abs(ours.scores[vis]).max()
    assert rel <= 1e-5, rel
    assert np.isneginf(theirs[~vis]).all()
    clear = (dsa.boundary_gap(ours, vis, CFG.index_topk) > 1e-4) & ~ours.tie
    assert clear.mean() > 0.5
    for b, t in zip(*np.nonzero(clear)):  # theirs may include masked keys where < k are visible
        assert set(hf_ids[b, t][vis[b, t, hf_ids[b, t]]]) == set(ours.ids[b, t][ours.ids[b, t] >= 0]), (b, t)
    # the JAX path agrees with transformers too
    got = _indexer_jax(_jax_w(w), CFG, jnp.asarray(x), jnp.asarray(pos))
    assert np.abs(np.asarray(got.scores) - theirs)[vis].max() / np.abs(theirs[vis]).max() <= 1e-5


def test_interleaved_rope_in_the_indexer_selects_differently():
    """The pre-2025-11-17 bug (DeepSeek's first V3.2 code): the same weights with the indexer's
    rope dims rotated as interleaved pairs pick other keys on clear (untied) rows."""
    changed = 0
    for seed in range(3):
        w, (x, pos) = _weights(seed), _inputs(seed, T=16)
        right = dsa.indexer(x.astype(np.float64), _f64(w), CFG, pos, PRE)
        wrong = dsa.indexer(x.astype(np.float64), _f64(w), CFG, pos, PRE, interleaved=True)
        vis = dsa.visible(pos, pos)
        clear = (dsa.boundary_gap(right, vis, CFG.index_topk) > 1e-6) & ~right.tie & ~wrong.tie
        changed += int((clear & (right.ids != wrong.ids).any(-1)).sum())
        bug = _indexer_jax(_jax_w(w), CFG, jnp.asarray(x), jnp.asarray(pos), interleaved=True)
        assert np.allclose(np.asarray(bug.scores)[vis], wrong.scores[vis], rtol=1e-4, atol=1e-5)
    assert changed >= 3


# ------------------------------------------------------------------ chunks, decode, short sequences
@jax.jit
def _jax_parts(jw, x, pos):
    """The JAX indexer's queries, head weights and keys (the key cache) of a whole sequence."""
    cos, sin = dsa.rope_tables_jax(CFG, pos)
    q = dsa.index_queries_jax(jw, CFG, dsa.compressed_query_jax(jw, CFG, x), cos, sin)
    return q, dsa.index_head_weights_jax(jw, CFG, x), dsa.index_keys_jax(jw, CFG, x, cos, sin)


_select_jax = jax.jit(dsa.index_select_jax, static_argnums=(5,))


@pytest.mark.parametrize("seed", [0, 1])
def test_chunks_and_decode_steps_past_zero_select_what_the_full_sequence_selects(seed):
    """Keys of the whole sequence in a cache (slots past the chunk's end not yet filled); queries
    of a chunk at positions 7..12, then of single decode steps: the rows of the full selection."""
    w, (x, pos) = _weights(seed), _inputs(seed, T=13)
    w64, x64 = _f64(w), x.astype(np.float64)
    full = dsa.indexer(x64, w64, CFG, pos, PRE)
    cos, sin = dsa.rope_cos_sin(CFG, pos)
    k_cache = dsa.index_keys(x64, w64, CFG, cos, sin, PRE)
    hw = dsa.index_head_weights(x64, w64, CFG, PRE)
    q = dsa.index_queries(dsa.compressed_query(x64, w64, PRE), w64, CFG, cos, sin, PRE)
    jw = _jax_w(w)
    full_j = _indexer_jax(jw, CFG, jnp.asarray(x), jnp.asarray(pos))
    qj, hwj, kj = _jax_parts(jw, jnp.asarray(x), jnp.asarray(pos))
    for a, b in ((7, 13), (9, 10), (12, 13)):  # a chunk, two decode steps
        filled = np.broadcast_to(np.arange(13) < b, pos.shape)
        part = dsa.index_select(q[:, a:b], hw[:, a:b], k_cache, pos[:, a:b], pos, CFG.index_topk, filled)
        assert np.array_equal(part.ids, full.ids[:, a:b]) and np.array_equal(part.mask, full.mask[:, a:b])
        assert np.array_equal(part.tie, full.tie[:, a:b])
        pj = _select_jax(qj[:, a:b], hwj[:, a:b], kj, jnp.asarray(pos[:, a:b]), jnp.asarray(pos),
                         CFG.index_topk, jnp.asarray(filled))
        assert np.array_equal(np.asarray(pj.ids), np.asarray(full_j.ids)[:, a:b])
    # the bug class: a top-k mask built as if the chunk started at position 0 is not the same
    wrong = dsa.index_select(q[:, 7:], hw[:, 7:], k_cache[:, :6], pos[:, :6], pos[:, :6], CFG.index_topk)
    assert not np.array_equal(wrong.ids, full.ids[:, 7:])


@pytest.mark.parametrize("T", [1, 5])
def test_sequences_up_to_topk_are_dense_causal(T):
    w, (x, pos) = _weights(3), _inputs(3, T=T, start=20)  # past position 0 too
    for sel in (dsa.indexer(x.astype(np.float64), _f64(w), CFG, pos, PRE),
                _indexer_jax(_jax_w(w), CFG, jnp.asarray(x), jnp.asarray(pos))):
        assert np.array_equal(np.asarray(sel.mask), np.tril(np.ones((T, T), bool))[None].repeat(2, 0))
        ids = np.asarray(sel.ids)
        assert ids.shape == (2, T, T) and not np.asarray(sel.tie).any()
        assert all((ids[:, t, : t + 1] == np.arange(t + 1)).all() and (ids[:, t, t + 1:] == -1).all()
                   for t in range(T))


def test_one_past_topk_drops_exactly_one_key_per_full_row():
    k = CFG.index_topk
    w, (x, pos) = _weights(4), _inputs(4, T=k + 1)
    sel = dsa.indexer(x.astype(np.float64), _f64(w), CFG, pos, PRE)
    n = sel.mask.sum(-1)
    assert (n[:, :k] == np.arange(1, k + 1)).all() and (n[:, k] == k).all()
    dropped = ~sel.mask[:, k] & dsa.visible(pos, pos)[:, k]
    s = np.where(dsa.visible(pos, pos)[:, k], sel.scores[:, k], np.inf)
    assert (sel.scores[:, k][dropped] == s.min(-1)).all()  # the lowest visible score is the one dropped


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8"])
def test_v32_checkpoint_round_trips_through_the_loader_and_writer(tmp_path, dtype):
    """The indexer's rows go through the same writer and reader as every other weight, by the
    names the release uses. FP8 as the release stores it: wq_b and wk as e4m3 with block scales,
    weights_proj and the key norm not quantized."""
    from dsref.reference.checkpoint import read_safetensors_header, read_tensors, save_checkpoint
    rng = np.random.default_rng(5)
    sd = {t.name: rng.normal(0, 0.2, t.shape).astype(np.float32) for t in tensors(CFG)}
    save_checkpoint(sd, CFG, tmp_path, dtype=dtype, **({"fp8_block_size": (16, 24)} if dtype == "fp8" else {}))
    assert json.loads((tmp_path / "config.json").read_text())["index_topk"] == CFG.index_topk
    header = {}
    for f in tmp_path.glob("*.safetensors"):
        header.update(read_safetensors_header(f))
    ix = {n: PRE + "indexer." + n for n in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias",
                                            "weights_proj.weight")}
    assert set(ix.values()) <= set(header)
    if dtype == "fp8":
        def kind(n):
            return header[n].dtype
        assert {kind(ix[n]) for n in ("wq_b.weight", "wk.weight")} == {"F8_E4M3"}
        assert {ix[n] + "_scale_inv" for n in ("wq_b.weight", "wk.weight")} <= set(header)
        assert all(kind(ix[n]) == "BF16" and ix[n] + "_scale_inv" not in header
                   for n in ("weights_proj.weight", "k_norm.weight", "k_norm.bias"))
    back = dict(read_tensors(tmp_path))
    assert set(back) == set(sd)
    tol = dict(rtol=7e-2, atol=2e-2) if dtype == "fp8" else dict(rtol=1e-2, atol=1e-3)  # e4m3: 3 mantissa bits
    for n in sd:
        assert np.allclose(np.asarray(back[n], np.float32), sd[n], **tol), n


def test_inside_the_transformers_model_every_layer_selects_the_same():
    """A whole DeepseekV32ForCausalLM (tiny-v32, adversarial weights, prompts longer than
    index_topk): each layer's indexer input captured by a hook; our compressed query equals the
    q_resid it was given, and our selection equals its top-k on every clear row."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.conftest import hf_state_to_ours, randomize_hf
    torch.manual_seed(0)
    hc = transformers.DeepseekV32Config(**CFG.to_hf_dict())
    hc._attn_implementation = "eager"
    hf = randomize_hf(transformers.DeepseekV32ForCausalLM(hc).eval(), 0)
    sd = {k: v.astype(np.float64) for k, v in hf_state_to_ours(hf.state_dict(), CFG).items()}
    got, hooks = {}, []
    for i, layer in enumerate(hf.model.layers):
        hooks.append(layer.self_attn.indexer.register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(i, (a[0].numpy(), a[1].numpy(), out.numpy()))))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 11))
    with torch.no_grad():
        hf(torch.as_tensor(tokens))
    for h in hooks:
        h.remove()
    assert sorted(got) == list(range(CFG.num_hidden_layers))
    pos = np.broadcast_to(np.arange(11), (2, 11))
    vis = dsa.visible(pos, pos)
    clear_rows = 0
    for i, (x, q_resid, hf_ids) in got.items():
        pre = f"model.layers.{i}.self_attn."
        x = x.astype(np.float64)
        qr = dsa.compressed_query(x, sd, pre)
        assert np.abs(qr - q_resid).max() <= 1e-5 * np.abs(qr).max()
        ours = dsa.indexer(x, sd, CFG, pos, pre)
        clear = (dsa.boundary_gap(ours, vis, CFG.index_topk) > 1e-4) & ~ours.tie
        for b, t in zip(*np.nonzero(clear)):
            assert set(hf_ids[b, t][vis[b, t, hf_ids[b, t]]]) == set(ours.ids[b, t][ours.ids[b, t] >= 0]), (i, b, t)
        clear_rows += int((clear & (vis.sum(-1) > CFG.index_topk)).sum())
    assert clear_rows >= 10  # sparse rows really compared, not only dense ones


def test_info_reports_the_indexer_and_its_cache_only_for_v32():
    """`dsref info`: V3.2's indexer (heads, dims, top-k) and its key cache, which is part of the
    KV bytes per token (bf16: (512 + 64 + 128) x 2 x 61 = 85,888; the indexer's share 128 x 2 x 61,
    or DeepSeek's FP8 layout (128 + 4) x 61); V3's report has none of it."""
    from dsref.reference.cli import info_dict
    d = info_dict(get_preset("deepseek-v3.2"))
    assert (d["index_n_heads"], d["index_head_dim"], d["index_topk"]) == (64, 128, 2048)
    assert d["kv_cache_bytes_per_token"] == 85_888 and d["index_cache_bytes_per_token"] == 128 * 2 * 61
    assert d["index_cache_bytes_per_token_official_fp8"] == (128 + 4) * 61
    assert not any(k.startswith("index_") for k in info_dict(get_preset("deepseek-v3")))


def test_deepseek_fp8_numerics_are_an_option_of_the_golden_not_the_oracle(tmp_path, capsys):
    """`dsref golden --numerics deepseek-fp8` (float64): DeepSeek's FP8 + Hadamard indexer and FP8
    latent cache (reference/dsa_official.py) instead of the exact oracle: recorded in the metadata, and
    it changes the dump (selections and values); refused for other dtypes and for models without
    an indexer, with the option named."""
    from dsref.experiments.cli import main
    from dsref.reference import numpy_ref
    from dsref.reference.checkpoint import save_checkpoint
    from dsref.reference.oracle import golden
    rng = np.random.default_rng(6)
    sd = {t.name: rng.normal(0, 0.2, t.shape).astype(np.float32) for t in tensors(CFG)}
    sd.update({n: 1 + 0 * v for n, v in sd.items() if n.endswith("norm.weight")})
    save_checkpoint(sd, CFG, tmp_path / "ck", dtype="float32")
    tok = tmp_path / "tok.npy"
    np.save(tok, rng.integers(0, CFG.vocab_size, (2, 24)).astype(np.int32))
    outs = {}
    for num in ("exact", "deepseek-fp8"):
        out = tmp_path / f"{num}.safetensors"
        assert main(["golden", "--checkpoint", str(tmp_path / "ck"), "--tokens", str(tok), "--out", str(out),
                     "--dtype", "float64", "--numerics", num]) == 0
        outs[num] = golden.read_dump(out)
    (ex, _), (fp, meta) = outs["exact"], outs["deepseek-fp8"]
    assert meta["numerics"] == "deepseek-fp8" and "numerics" not in outs["exact"][1]
    rel = np.abs(fp["logits"] - ex["logits"]).max() / np.abs(ex["logits"]).max()
    assert rel > 1e-4 and np.isfinite(fp["logits"]).all()  # other selections: O(1) on random tiny weights
    assert any(not np.array_equal(fp[f"layers.{i}.index_ids"], ex[f"layers.{i}.index_ids"]) for i in range(3))
    capsys.readouterr()
    assert main(["golden", "--checkpoint", str(tmp_path / "ck"), "--tokens", str(tok), "--out",
                 str(tmp_path / "x.safetensors"), "--numerics", "deepseek-fp8"]) == 2
    assert "--numerics deepseek-fp8" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no indexer"):
        numpy_ref.forward(np.zeros((1, 2), int), {}, get_preset("tiny-v3"), numerics="deepseek-fp8")
    with pytest.raises(ValueError, match="numerics must be one of"):
        numpy_ref.forward(np.zeros((1, 2), int), {}, CFG, numerics="fp8")


def test_signed_zero_scores_are_one_tie_in_both_top_ks():
    """A key whose every head term relu zeroes scores sum_h w_h * 0: -0.0 when the weights are
    negative. NumPy (and torch) call -0.0 and +0.0 equal; lax.top_k alone would rank -0.0 lower.
    Both top-ks must see one tie and keep the lower positions."""
    scores = np.array([[[0.5, -0.0, 0.0, -0.0, 0.25, 0.0]]])
    vis = np.ones_like(scores, bool)
    a = dsa.select_topk(scores, vis, 3)
    b = dsa.select_topk_jax(jnp.asarray(scores, jnp.float32), jnp.asarray(vis), 3)
    assert a.ids.tolist() == [[[0, 1, 4]]] and np.asarray(b.ids).tolist() == a.ids.tolist()
    assert a.tie.all() and np.asarray(b.tie).all()
    assert np.array_equal(np.asarray(b.tied), a.tied) and a.tied.sum() == 4  # the four zeros
