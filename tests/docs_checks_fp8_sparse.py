"""Checks of the chapters docs/chapters/fp8.md and docs/chapters/sparse-attention.md (issue 20).

Run by tests/test_docs_site.py::test_chapter against the one site build of the suite (each
``check_*(site)`` below). Numbers are looked for in the pages' cell outputs (what the cells
printed), recomputed here with the project's own code and formatted as the cells format them.
The published figures the FP8 chapter's prose quotes, which the project holds nowhere else, are
the constants below, each with its source; ``check_fp8_published_figures`` checks that the prose
quotes them as they are written here.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from tests.docs_html import cell_outputs, page_images, page_text

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Published figures quoted in docs/chapters/fp8.md, with their sources (DeepSeek-V3 technical
# report, arXiv 2412.19437). Each string must appear in the page's prose as written here.
V3_REPORT_FP8 = {
    # sec. 3.3 (introduction): "Compared with the BF16 baseline, the relative loss error of our
    # FP8-training model remains consistently below 0.25%"; validated "on two model scales similar
    # to DeepSeek-V2-Lite and DeepSeek-V2, training for approximately 1 trillion tokens"
    "loss_bound": '"remains consistently below 0.25%"',
    "validation_tokens": "trained for about 1 trillion tokens",
    # sec. 3.3.2 "Increasing Accumulation Precision": "the accumulation precision of FP8 GEMM on
    # NVIDIA H800 GPUs is limited to retaining around 14 bits"; "two random matrices with
    # K = 4096 ... a maximum relative error of nearly 2%"; "setting N_C = 128 elements, equivalent
    # to 4 WGMMAs, represents the minimal accumulation interval"
    "acc_bits": '"around 14 bits"',
    "acc_error": 'relative error of nearly 2% in DeepSeek\'s test',
    "acc_k": "$K = 4096$",
    "n_c": "every $N_C = 128$ elements (four WGMMA instructions)",
    # sec. 3.3.2 "Fine-Grained Quantization": 1x128 activation tiles, 128x128 weight blocks
    "act_tile": "activations in tiles of $1 \\times 128$",
    "weight_block": "weights in blocks of $128 \\times 128$",
    # sec. 3.3.1: kept in original precision
    "kept": '"the embedding module, the output head, MoE gating modules, normalization operators, '
            'and attention operators"',
}

FP8_PAGE = "chapters/fp8.html"
SPARSE_PAGE = "chapters/sparse-attention.html"


def _out(site: Path, page: str) -> str:
    return cell_outputs(site / page)


def _images(site: Path, page: str, min_bytes: int = 5_000) -> list[str]:
    imgs = [str(p.relative_to(site)) for p in page_images(site / page, site)]
    assert imgs, f"{page}: no figure"
    small = [i for i in imgs if (site / i).stat().st_size < min_bytes]
    assert not small, f"{page}: figures below {min_bytes} bytes: {small}"
    return imgs


def _collapse(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


# =============================================================================== FP8 chapter
def check_fp8_formats_from_ml_dtypes(site: Path) -> None:
    import ml_dtypes
    import numpy as np

    out = _out(site, FP8_PAGE)
    formats = {"E4M3 (float8_e4m3fn)": ml_dtypes.float8_e4m3fn, "E5M2 (float8_e5m2)": ml_dtypes.float8_e5m2,
               "BF16 (bfloat16)": ml_dtypes.bfloat16, "FP32 (float32)": np.float32}
    for label, t in formats.items():
        fi = ml_dtypes.finfo(t)
        u = float(fi.eps) / 2
        row = f"{label} {fi.bits} {fi.nmant} 2^{int(np.log2(u))} = {u:.3g} {float(fi.max):.6g}"
        assert row in out, row
    # the prose's statements: E4M3 3 stored mantissa bits, max 448, u = 2^-4; bf16 7 bits, u = 2^-8
    e4, bf = ml_dtypes.finfo(ml_dtypes.float8_e4m3fn), ml_dtypes.finfo(ml_dtypes.bfloat16)
    assert (e4.nmant, float(e4.max), float(e4.eps) / 2, bf.nmant, float(bf.eps) / 2) == (3, 448.0, 2**-4, 7, 2**-8)
    prose = _collapse((DOCS / "chapters" / "fp8.md").read_text())
    assert "$p = 3$" in prose and "lifts its largest value to 448" in prose


def check_fp8_grid(site: Path) -> None:
    import ml_dtypes
    import numpy as np

    out = _out(site, FP8_PAGE)
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    pos = np.unique(grid[np.isfinite(grid) & (grid > 0)])
    assert f"{np.isnan(grid).sum()} NaN patterns, {pos.size} positive finite values, largest {pos[-1]:g}" in out
    assert "values in [1, 2]: " + ", ".join(f"{v:g}" for v in pos[(pos >= 1) & (pos <= 2)]) in out
    assert f"the four largest: {', '.join(f'{v:g}' for v in pos[-4:])} (spacing {pos[-1] - pos[-2]:g})" in out
    rng_ = pos[-1] / float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).smallest_normal)
    assert f"largest / smallest normal: {rng_:,.0f}" in out
    # prose: "Between 1 and 2 there are 2^3 = 8 values. Near 448 they are 32 apart."
    assert np.sum((pos >= 1) & (pos < 2)) == 8 and pos[-1] - pos[-2] == 32
    assert "H800 SXM5 80GB: dense peak FP8 / BF16" in out


def check_fp8_outlier_table(site: Path) -> None:
    import numpy as np

    from dsref.reference import fp8_train

    out = _out(site, FP8_PAGE)
    C, TILE = 1024, 128
    base = np.random.default_rng(3).normal(size=C).astype(np.float32)  # the cell's first draw
    others = np.arange(C) >= TILE

    def rel_err(xhat, x):
        return float(np.sqrt(np.mean((xhat - x)[others] ** 2) / np.mean(x[others] ** 2)))

    tile_errs, tensor_errs = [], []
    for A in (1e1, 1e2, 1e3, 1e4, 1e5):
        x = base.copy()
        x[5] = A
        per_tensor = np.asarray(fp8_train.quant_tiles(x, tile=C))
        per_tile = np.asarray(fp8_train.quant_tiles(x, tile=TILE))
        zeros = int(np.sum((per_tensor == 0) & others & (x != 0)))
        row = f"{A:.0e} {rel_err(per_tensor, x):.2%} {zeros} {rel_err(per_tile, x):.2%}"
        assert row in out, row
        tile_errs.append(rel_err(per_tile, x))
        tensor_errs.append(rel_err(per_tensor, x))
    # the prose: the tiles' error does not depend on A; the per-tensor error climbs at large A
    assert max(tile_errs) == min(tile_errs)
    assert tensor_errs[-1] > 3 * tile_errs[-1] and tensor_errs[0] < 1.5 * tile_errs[0]
    assert (site / FP8_PAGE).read_text().count("<table") >= 4


def check_fp8_accumulation_table(site: Path) -> None:
    out = _out(site, FP8_PAGE)
    m = re.search(r"promoted to FP32 every \\?\(?N_C = 128\\?\)? ((?:[\d,]+ [\d.]+% [\d.]+% )+)", out)
    assert m, "accumulation table not found in the cell outputs"
    rows = re.findall(r"([\d,]+) ([\d.]+)% ([\d.]+)%", m.group(1))
    ks = [int(k.replace(",", "")) for k, _, _ in rows]
    narrow = [float(a) for _, a, _ in rows]
    promoted = [float(b) for _, _, b in rows]
    assert ks == [128, 512, 1024, 2048, 4096], ks
    # what the prose says of the model: the long accumulation loses more as K grows, promotion
    # keeps the error at the level of one 128-term chunk
    assert narrow == sorted(narrow) and narrow[-1] > 10 * narrow[0]
    assert narrow[0] == promoted[0] and max(promoted) < 1.5 * promoted[0] and promoted[-1] < narrow[-1] / 10


def check_fp8_precision_split(site: Path) -> None:
    from dsref.reference.presets import get_preset
    from dsref.sim import costmodel

    out = _out(site, FP8_PAGE)
    by_prec, by_op = defaultdict(float), defaultdict(float)
    for op in costmodel.training_ops(get_preset("deepseek-v3"), "fp8", 1, 4096, include_optimizer=False):
        by_prec[op.precision] += op.flops * op.count
        if op.precision != "fp8":
            by_op[(op.name.removesuffix("_bwd"), op.precision)] += op.flops * op.count
    total = sum(by_prec.values())
    for p, f in by_prec.items():
        assert f"{p} {f / 1e12:,.1f} {f / total:.1%}" in out, p
    largest = sorted(by_op.items(), key=lambda kv: -kv[1])[:3]
    assert "largest outside FP8: " + ", ".join(f"{n} ({p}) {f / total:.1%}" for (n, p), f in largest) in out
    # the prose: most in FP8; attention the largest of the rest, then the output head
    assert by_prec["fp8"] / total > 0.5 and [n for (n, _), _ in largest[:2]] == ["attention", "lm_head"]


def check_fp8_partial_blocks(site: Path) -> None:
    import ml_dtypes
    import numpy as np

    from dsref.reference import checkpoint
    from dsref.reference.params import tensors
    from dsref.reference.presets import get_preset

    out = _out(site, FP8_PAGE)
    v3 = get_preset("deepseek-v3")
    linear = [t for t in tensors(v3) if checkpoint.stored_in_fp8(t.name)]
    assert f"{len(linear)} FP8-stored tensors in the deepseek-v3 preset" in out
    partial = Counter((t.name.split(".")[-2], t.shape[-2:]) for t in linear if any(d % 128 for d in t.shape[-2:]))
    assert [name for name, _ in partial] == ["kv_a_proj_with_mqa"]  # the prose names this one
    for (name, (r, c)), n in partial.items():
        line = (f"{name} [{r}, {c}] in {n} layers: scale grid ceil -> {-(-r // 128)} x {-(-c // 128)}, "
                f"floor would give {r // 128} x {c // 128}; last block row holds {r - 128 * (r // 128)} of 128 rows")
        assert line in out, line
        assert r == v3.kv_lora_rank + v3.qk_rope_head_dim and r - 128 * (r // 128) == 64  # "the last 64 rows"
    # the small matrix: the ceil grid, and the message of the refused floor grid
    _, s = checkpoint.quantize_fp8_blockwise(np.ones((200, 300), np.float32))
    assert f"W (200, 300): scale_inv {s.shape} (ceil); floor grid would be (1, 2)" in out
    try:
        checkpoint.dequantize_fp8_blockwise(np.zeros((200, 300), ml_dtypes.float8_e4m3fn), s[:1, :2])
    except ValueError as e:
        assert f"refuses a floor-sized grid: {e}" in out
    else:
        raise AssertionError("dequantize_fp8_blockwise accepted a floor-sized scale grid")
    m = re.search(r"whole matrix: max error / max \|W\| = ([\d.]+)%.*?full blocks \(rows < 128, cols < 256\): "
                  r"([\d.]+)%; partial last block row: ([\d.]+)%", out)
    assert m, "partial-block result line not found"
    whole, full, part = map(float, m.groups())
    assert whole < 6.25 and full < 6.25 and part > 50  # E4M3's rounding vs a wrong scale


def check_fp8_kit_cases(site: Path) -> None:
    from dsref.reference.oracle.kit_cases import CASES

    out = _out(site, FP8_PAGE)
    fp8_cases = [c for c in CASES if c.fp8_block is not None]
    assert len(fp8_cases) == 2  # "two cases built for this"
    for c in fp8_cases:
        assert (f"case {c.letter} '{c.name}' (blocks {c.fp8_block[0]}x{c.fp8_block[1]}): {c.factor} "
                f"must fail on: {', '.join(c.faults)}") in out, c.name
    assert any("fp8_floor_grid" in c.faults for c in fp8_cases)
    assert any("fp8_block_128_assumed" in c.faults and c.fp8_block == (20, 12) for c in fp8_cases)


def check_fp8_training_study(site: Path) -> None:
    from dsref.experiments.training_study import FULL, model_config
    from dsref.reference import checkpoint
    from dsref.reference.params import tensors
    from dsref.reference.presets import get_preset

    out = _out(site, FP8_PAGE)
    study = json.loads((DOCS / "training_study.json").read_text())
    st, fp8 = study["settings"], study["analysis"]["fp8"]
    tail, held = fp8["rel_gap_train_last_quarter"], fp8["rel_gap_held_final"]
    lo, hi = fp8["rel_gap_train_ci95"]
    assert (f"model {st['config']}: {st['params']:,} parameters, {st['steps']} steps of {st['batch']} x {st['seq']} "
            f"tokens, {st['seeds']} seeds") in out
    assert f"last quarter: {tail['mean']:+.3%} +- {tail['std']:.3%}" in out
    assert "per seed: " + ", ".join(f"{g:+.3%}" for g in fp8["rel_gap_train_per_seed"]) in out
    assert f"95% CI of the mean gap: [{lo:+.3%}, {hi:+.3%}]" in out
    assert f"final held-out loss: {held['mean']:+.3%} +- {held['std']:.3%}" in out
    # the prose's reading: the CI holds both 0 and the 0.25% bound; the mean gap is about the bound;
    # the seed spread is larger than the bound
    assert lo < 0 < 0.0025 < hi and 0.5 < tail["mean"] / 0.0025 < 2 and tail["std"] > 0.0025
    cfg = model_config(FULL)
    inner = [t.shape[-1] for t in tensors(cfg) if checkpoint.stored_in_fp8(t.name)]
    assert f"{sum(k < 128 for k in inner)} of its {len(inner)} linear weight matrices" in out
    assert sum(k < 128 for k in inner) > 0
    for name in ("deepseek-v2-lite", "deepseek-v2"):
        ratio = get_preset(name).param_counts()["total_params"] / st["params"]
        assert f"{name}: {ratio:,.0f} times as many parameters" in out
    assert "120 steps" in page_text(site / FP8_PAGE) and st["steps"] == 120
    gaps = [[100 * (a / b - 1) for a, b in zip(s8["train_main"], s16["train_main"])]
            for s8, s16 in zip(study["runs"]["fp8"]["seeds"], study["runs"]["bf16"]["seeds"])]
    largest = max(abs(g) for row in gaps for g in row)
    assert f"largest single-step gap: {largest:.1f}% (clipped to +-3% in the figure)" in out
    # the prose: close agreement over the first steps, excursions much larger than the mean gap
    assert max(abs(g) for row in gaps for g in row[:10]) < 0.5 and largest > 10 * abs(100 * tail["mean"])
    _images(site, FP8_PAGE)


def check_fp8_exercises(site: Path) -> None:
    from dsref.reference.presets import get_preset

    out = _out(site, FP8_PAGE)
    v3 = get_preset("deepseek-v3")
    r, c = v3.kv_lora_rank + v3.qk_rope_head_dim, v3.hidden_size
    nr, nc = -(-r // 128), -(-c // 128)
    assert "1. next below 448 is 416: a step of 32, 7.1% of 448" in out
    assert f"2. [{r}, {c}]: scale_inv {nr} x {nc} = {nr * nc} entries; last block row covers {r - 128 * (nr - 1)} rows" in out
    assert f"3. A / x > 448 / 2^-6 = {448 * 64:,}" in out
    text = page_text(site / FP8_PAGE)
    assert "$576 \\times 7168$" in (DOCS / "chapters" / "fp8.md").read_text() and (r, c) == (576, 7168)
    assert "Exercises" in text


def check_fp8_published_figures(site: Path) -> None:
    """The V3 report's figures the prose quotes are the constants above; the code agrees where it can."""
    from dsref.reference import checkpoint, fp8_train

    src = (DOCS / "chapters" / "fp8.md").read_text()
    flat = re.sub(r"\s+", " ", src)
    missing = [k for k, v in V3_REPORT_FP8.items() if re.sub(r"\s+", " ", v) not in flat]
    assert not missing, f"fp8.md no longer quotes: {missing}"
    r = fp8_train.Fp8Recipe()
    assert (r.fmt, r.act_tile, r.weight_block, r.fmax) == ("e4m3", 128, (128, 128), 448.0)
    assert checkpoint.E4M3_MAX == 448.0
    # the accumulation cell models the 14 bits and N_C = 128 the report gives
    assert "P_BITS, N_C, TRIALS = 14, 128, 256" in src
    for lit in ("../../reference/fp8_train.py", "../../reference/checkpoint.py"):
        assert lit in src
    text = page_text(site / FP8_PAGE)
    assert "def quant_tiles(" in text and "def quant_blocks(" in text and "def dequantize_fp8_blockwise(" in text


# ================================================================== sparse-attention chapter
def check_sparse_indexer_and_cache(site: Path) -> None:
    from dsref.reference.presets import get_preset

    out = _out(site, SPARSE_PAGE)
    v3, v32 = get_preset("deepseek-v3"), get_preset("deepseek-v3.2")
    assert (f"{v32.name}: indexer I = {v32.index_n_heads} heads of J = {v32.index_head_dim} dims, "
            f"top-k = {v32.index_topk:,}, rotary dims P = {v32.qk_rope_head_dim}") in out
    for c in (v3, v32):
        assert f"{c.name} {c.kv_cache_bytes_per_token():,.0f} {c.index_cache_bytes_per_token():,.0f}" in out
    assert v3.kv_cache_bytes_per_token() == 70_272
    assert f"DeepSeek's FP8 layout: {v32.index_cache_bytes_per_token(None):,.0f} B/token" in out
    # "halves their share"
    assert 0.45 < v32.index_cache_bytes_per_token(None) / v32.index_cache_bytes_per_token() < 0.55
    assert "def index_scores(" in page_text(site / SPARSE_PAGE) and "def select_topk(" in page_text(site / SPARSE_PAGE)


def check_sparse_topk_example(site: Path) -> None:
    import numpy as np

    from dsref.reference import dsa

    out = _out(site, SPARSE_PAGE)
    rng = np.random.default_rng(48)
    T_, I_, J_, K_ = 6, 2, 4, 3
    q = rng.normal(size=(1, T_, I_, J_))
    k = rng.normal(size=(1, T_, J_))
    hw = np.abs(rng.normal(size=(1, T_, I_)))
    pos = np.arange(T_)[None]
    sel = dsa.index_select(q, hw, k, pos, pos, K_)
    dropped = 0
    for t in range(T_):
        scores = "  ".join(f"{sel.scores[0, t, s]:6.2f}" if s <= t else "     -" for s in range(T_))
        ids = [int(i) for i in sel.ids[0, t] if i >= 0]
        line = _collapse(f"query {t}: scores {scores}   selected {ids}")
        assert line in out, line
        assert len(ids) == min(t + 1, K_)  # "Tokens 0 to 2 ... select all of them"
        dropped += t + 1 - len(ids)
    assert dropped > 0
    own = [t for t in range(T_) if t not in sel.ids[0, t]]
    assert f"queries that do not select their own token: {own}" in out and own  # the prose's "nothing forces"
    assert "$I = 2$" in (DOCS / "chapters" / "sparse-attention.md").read_text()


def _attention_work(cfg, L):
    from dsref.sim import costmodel
    ops = costmodel.decode_ops(cfg, "fp8", 1, L)
    mla = [o for o in ops if o.name in ("mla_attention", "softmax")]
    idx = [o for o in ops if o.name.startswith("index_")]
    return {"mla": sum(o.flops * o.count for o in mla), "index": sum(o.flops * o.count for o in idx),
            "mla_kv": sum(o.kv_bytes_read * o.count for o in mla),
            "index_kv": sum(o.kv_bytes_read * o.count for o in idx)}


def check_sparse_cost_table_and_figure(site: Path) -> None:
    from dsref.reference.presets import get_preset

    out = _out(site, SPARSE_PAGE)
    v3, v32 = get_preset("deepseek-v3"), get_preset("deepseek-v3.2")
    K = v32.index_topk
    for L in (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072):
        a, b = _attention_work(v3, L), _attention_work(v32, L)
        tot3, tot32 = a["mla"], b["mla"] + b["index"]
        row = (f"{L:,} {tot3 / 1e9:,.1f} {b['mla'] / 1e9:,.1f} {b['index'] / 1e9:,.1f} {tot32 / tot3:.2f} "
               f"{a['mla_kv'] / 1e6:,.0f} {(b['mla_kv'] + b['index_kv']) / 1e6:,.0f}")
        assert row in out, row
        # the prose: same MLA work up to L = k, V3.2's flat beyond; indexer keys dominate at long context
        if L < K:  # the new token sees L + 1 <= k keys: it selects them all
            assert a["mla"] == b["mla"]
        else:
            assert b["mla"] == _attention_work(v32, K)["mla"] < a["mla"]
        if L >= 16384:
            assert b["index_kv"] > b["mla_kv"]
    H, R, P = v3.num_attention_heads, v3.kv_lora_rank, v3.qk_rope_head_dim
    I, J = v32.index_n_heads, v32.index_head_dim
    assert f"V3 MLA 2H(2R+P) = {2 * H * (2 * R + P):,} FLOPs" in out and f"2IJ = {2 * I * J:,}" in out
    assert "MLA attention bf16, indexer scores fp8" in out
    assert len(_images(site, SPARSE_PAGE)) >= 2
    assert (site / SPARSE_PAGE).read_text().count("<table") >= 3


def check_sparse_v4_compressor(site: Path) -> None:
    import numpy as np

    from dsref.reference import numpy_v4_attention as nv4
    from dsref.reference.config_v4 import CSA, HCA
    from dsref.reference.presets import get_preset

    out = _out(site, SPARSE_PAGE)
    tiny = get_preset("tiny-v4")
    T4 = 19
    for kind in (CSA, HCA):
        m = tiny.compress_rate(kind)
        line = (f"{kind} (m = {m}): {T4} tokens -> entries ({T4 // m}, {tiny.head_dim}) (T // m = {T4 // m}); "
                f"entries visible to tokens 0..{T4 - 1}: {nv4.complete_blocks(np.arange(T4), m).tolist()}")
        assert line in out, line
    assert "def compress(" in page_text(site / SPARSE_PAGE)


def check_sparse_v4_cache(site: Path) -> None:
    from dsref.reference.config_v4 import CSA, HCA, SLIDING
    from dsref.reference.presets import get_preset
    from dsref.sim import costmodel_v4

    out = _out(site, SPARSE_PAGE)
    v3, v32 = get_preset("deepseek-v3"), get_preset("deepseek-v3.2")
    v4s = [get_preset("deepseek-v4-flash"), get_preset("deepseek-v4-pro")]
    for c in v4s:
        per, n = c.kv_bytes_per_token_by_type(2.0), c.layer_counts()
        assert (f"{c.name}: {c.num_hidden_layers} layers ({n[SLIDING]} sliding, {n[CSA]} CSA, {n[HCA]} HCA)") in out
        assert (f"B/token per layer: CSA {per[CSA]:g}, HCA {per[HCA]:g}; all layers {c.kv_cache_bytes_per_token():,.0f} "
                f"B/token + windows {c.kv_window_bytes() / 2**20:,.2f} MiB; {c.num_hash_layers} hash-routed MoE layers, "
                f"hc_mult = {c.hc_mult}") in out

    def seq_bytes(cfg, L):
        return costmodel_v4.kv_cache_bytes(cfg, 2.0, L) if hasattr(cfg, "layer_types") else cfg.kv_cache_bytes_per_token() * L

    Ls = (4096, 32768, 131072, 1048576)
    for c in (v3, v32, *v4s):
        row = (f"{c.name} " + " ".join(f"{seq_bytes(c, L) / 2**30:,.3f}" for L in Ls)
               + f" {v3.kv_cache_bytes_per_token() * Ls[-1] / seq_bytes(c, Ls[-1]):,.1f}")
        assert row in out, row
    # the prose: V4's bytes per token of context fall with L (fixed windows) towards the per-token figure
    for c in v4s:
        per_tok = [seq_bytes(c, L) / L for L in Ls]
        assert per_tok == sorted(per_tok, reverse=True) and per_tok[-1] < 1.2 * c.kv_cache_bytes_per_token()
        assert c.kv_cache_bytes_per_token() < v3.kv_cache_bytes_per_token() / 5


def check_sparse_exercises(site: Path) -> None:
    from dsref.reference.config_v4 import CSA, HCA
    from dsref.reference.presets import get_preset

    out = _out(site, SPARSE_PAGE)
    v3, v32, fl = get_preset("deepseek-v3"), get_preset("deepseek-v3.2"), get_preset("deepseek-v4-flash")
    J, L_, K = v32.index_head_dim, v32.num_hidden_layers, v32.index_topk
    assert f"1. bf16: {J} x 2 B x {L_} layers = {J * 2 * L_:,} B/token; FP8: ({J} + 4) x {L_} = {(J + 4) * L_:,} B/token" in out
    assert f"2. from context {K:,} (the new token then sees {K + 1:,} > {K:,} keys); at 128K: {K / 131073:.4f}" in out
    n = fl.layer_counts()
    by_hand = n[CSA] * (fl.head_dim + fl.index_head_dim) * 2 / fl.compress_rate_csa + n[HCA] * fl.head_dim * 2 / fl.compress_rate_hca
    assert by_hand == fl.kv_cache_bytes_per_token()
    assert (f"= {by_hand:,.0f} B/token (V3: {v3.kv_cache_bytes_per_token():,.0f}, "
            f"{v3.kv_cache_bytes_per_token() / by_hand:.1f}x more)") in out
