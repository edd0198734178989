"""Conformance kit: small adversarial checkpoints, each aimed at one mistake engines have made.

``write_kit(DIR)`` writes, per case, ``DIR/<case>/checkpoint/`` (config.json +
model.safetensors, deterministic seed, a few KB), ``tokens.npy``,
``golden.safetensors`` (float64 NumPy reference, see oracle.golden) and
``case.json`` (what it targets, dtype tolerances). ``grade_kit(DIR, engine)`` runs
an engine on every case and compares its dump with the golden one.

Every case keeps the features it does not target *neutral*, so that one mistake
fails one case only: rotary dim P=2 (interleaved and half-split pairs coincide),
no YaRN, float32 weights, first_k_dense_replace=0, q_lora on, a single expert
group, zero or bf16-exact correction biases, routed_scaling_factor 1, and the
family's usual top-k normalisation (V3 normalised, V2 not). Each case names the
mistake (``Case.fault``) that must fail it; the tests prove it with the float64
reference with that mistake injected (tests/broken_reference.py).

Engines: any callable ``engine(checkpoint_dir: Path, tokens: np.ndarray) ->
{name: array}`` (the dump names of oracle.golden), with optional attributes
``name`` and ``dtype`` (the tolerance set, default float32). An engine raises
``EngineUnsupported`` for a checkpoint it cannot run (reported, not failed).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from dsref.reference.checkpoint import read_config, read_tensors, save_checkpoint
from dsref.reference.config import ModelConfig, RopeScaling
from dsref.reference.oracle.compare import TOLERANCES, compare_dumps, normalize_dtype
from dsref.reference.oracle.golden import (OracleError, config_hash, golden_metadata, load_tokens, read_dump,
                                          run_reference, tokens_hash, versions, write_dump)
from dsref.reference.params import tensors


class EngineUnsupported(RuntimeError):
    """An engine cannot run a checkpoint at all (reported as 'unsupported', with the reason)."""


# ------------------------------------------------------------------ cases
_BASE = dict(name="kit", vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=2, num_key_value_heads=2,
             q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=2, v_head_dim=8,
             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
             topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=1.0,
             rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64, num_nextn_predict_layers=0)
_V2 = dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False)


@dataclass(frozen=True)
class Case:
    name: str
    letter: str
    targets: str  # the mistake it catches
    overrides: dict
    fault: str  # the mistake that must fail it (injected in tests/broken_reference.py)
    seed: int
    tokens: tuple[int, int] = (2, 12)
    bias: str = "zero"  # zero | exact_pos | exact_neg | bf16_tie
    gate_std: float = 0.3
    fp8_block: tuple[int, int] | None = None

    def config(self) -> ModelConfig:
        return ModelConfig(**{**_BASE, "name": f"kit-{self.name}", **self.overrides})


CASES: tuple[Case, ...] = (
    Case("rope-pair-layout", "a", "RoPE on interleaved pairs (x0,x1),(x2,x3).. (DeepSeek) vs rotate-half "
         "pairs (x_i, x_i+P/2); with a YaRN frequency blend (ramp over dims 0..3 of P/2=4) and its cos/sin "
         "factor (mscale_all_dim 0: no softmax temperature, that is case b)",
         dict(qk_rope_head_dim=8, rope_theta=100.0, max_position_embeddings=256, rope_scaling=RopeScaling(
             factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
             mscale_all_dim=0.0)), "rope_half", 1, tokens=(2, 16)),
    Case("yarn-mscale", "b", "YaRN temperature: cos/sin factor mscale/mscale_all_dim, and "
         "mscale(all_dim)^2 on the whole softmax scale (not only the rope part, not missing)",
         dict(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=8, beta_fast=32.0,
                                       beta_slow=1.0, mscale=0.8, mscale_all_dim=1.2),
              max_position_embeddings=32), "mscale_rope_only", 2,
         tokens=(2, 16)),
    Case("group-mask-neg-bias", "c", "group-limited routing masks dropped groups with -inf, not 0 "
         "(biased scores here are all < 0)", dict(n_group=4, topk_group=2, num_experts_per_tok=1),
         "group_mask_zero", 3, bias="exact_neg"),
    Case("weights-unbiased", "d", "gate weights come from the unbiased sigmoid scores, the bias only selects",
         dict(num_experts_per_tok=3), "weights_from_biased", 4, bias="exact_pos"),
    Case("topk-norm-flag", "e", "norm_topk_prob honoured (here a V2 softmax router with norm_topk_prob=true: "
         "the top-k weights must be renormalised)", {**_V2, "norm_topk_prob": True, "num_experts_per_tok": 3,
                                                           "n_shared_experts": 2}, "norm_flag_ignored", 5),
    Case("routed-scaling", "f", "routed_scaling_factor applied to the routed experts' weights",
         dict(routed_scaling_factor=2.5), "no_routed_scaling", 6),
    Case("fp8-partial-blocks", "g", "FP8 block-wise dequantization with a scale grid whose last block row/"
         "column is partial (block 20x12 does not divide the dims)", {}, "fp8_floor_grid", 7,
         fp8_block=(20, 12)),
    Case("bias-float32", "h", "the e_score_correction_bias kept in float32: its differences here (< 1e-3 "
         "around 0.5) vanish in bf16 and routing changes", dict(num_experts_per_tok=1), "bias_bf16", 8,
         bias="bf16_tie", gate_std=2e-4),
    Case("dense-first-k", "i", "first_k_dense_replace: layer 0 is a dense MLP, layer 1 MoE",
         dict(num_hidden_layers=2, first_k_dense_replace=1), "dense_first_k_ignored", 9),
    Case("no-q-lora", "j", "q_lora_rank null (V2-Lite style): q = x W_q, no low-rank path, no q norm",
         dict(**_V2, q_lora_rank=None, n_shared_experts=2), "q_lora_assumed", 10),
)
CASE_BY_NAME = {c.name: c for c in CASES}


def _weights(case: Case, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Deterministic adversarial weights: large random matrices, norms around 1, case-specific router/bias."""
    rng = np.random.default_rng(1000 + case.seed)
    shapes = {t.name: t.shape for t in tensors(cfg)}
    w = {}
    for n, s in shapes.items():
        if n.endswith("norm.weight"):
            a = 1.0 + 0.2 * rng.standard_normal(s)
        elif n.endswith("e_score_correction_bias"):
            E = s[0]
            if case.bias == "exact_pos":  # multiples of 1/8 in [0, 0.875]: bf16-exact, biased scores > 0
                a = rng.permutation(np.arange(E) % 8) / 8.0
            elif case.bias == "exact_neg":  # multiples of -1/4 in [-2.75, -1]: every biased score < 0
                a = -1.0 - rng.permutation(np.arange(E) % 8) / 4.0
            elif case.bias == "bf16_tie":  # 0.5 + distinct deltas < 1e-3: all round to 0.5 in bf16
                a = 0.5 + (rng.permutation(E) - (E - 1) / 2) * 2.2e-4
            else:
                a = np.zeros(s)
        elif n.endswith("mlp.gate.weight"):
            a = case.gate_std * rng.standard_normal(s)
        elif n.endswith("embed_tokens.weight"):
            a = rng.standard_normal(s)
        else:
            a = 0.15 * rng.standard_normal(s)
        w[n] = np.asarray(a, np.float32)
    return w


def build_case(case: Case, out: str | Path) -> Path:
    """Write one case directory (checkpoint, tokens, golden, case.json)."""
    out = Path(out)
    cfg = case.config()
    w = _weights(case, cfg)
    if case.bias == "bf16_tie":
        b = w["model.layers.0.mlp.gate.e_score_correction_bias"]
        assert (b.astype(ml_dtypes.bfloat16).astype(np.float32) == 0.5).all() and len(set(b.tolist())) == len(b)
    ck = out / "checkpoint"
    save_checkpoint(w, cfg, ck, dtype="fp8" if case.fp8_block else "float32", fp8_block_size=case.fp8_block)
    tokens = np.random.default_rng(case.seed).integers(0, cfg.vocab_size, case.tokens).astype(np.int32)
    np.save(out / "tokens.npy", tokens)
    stored = read_config(ck)
    golden = run_reference(ck, tokens, "float64")  # from the weights as stored (fp8 dequantized)
    write_dump(golden, out / "golden.safetensors", golden_metadata(stored, tokens, "float64", case=case.name))
    margins = routing_margins(golden, stored, dict(read_tensors(ck, stored)))
    meta = {"name": case.name, "letter": case.letter, "targets": case.targets, "fault": case.fault,
            "seed": case.seed, "config_hash": config_hash(stored), "tokens_shape": list(tokens.shape),
            "checkpoint_dtype": "fp8" if case.fp8_block else "float32",
            "fp8_block": list(case.fp8_block) if case.fp8_block else None,
            "tolerances": TOLERANCES,
            "routing_margin": margins,
            "grading": "compare.compare_dumps(golden, candidate, engine dtype): every tensor within the "
                       "engine dtype's tolerance"}
    (out / "case.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def routing_margins(golden: dict[str, np.ndarray], cfg: ModelConfig, w: dict[str, np.ndarray]) -> dict[str, float]:
    """Per MoE layer, the smallest gap (over tokens) deciding the routing in float64: between the
    topk_group-th and next group score, and between the k-th and next selection score. A float32
    engine's rounding (~1e-7 relative) must stay well below it for routing to be reproducible."""
    out = {}
    E, k, G, kg = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        logits = golden[f"layers.{i}.router_logits"].reshape(-1, E).astype(np.float64)
        if cfg.scoring_func == "sigmoid":
            choice = 1.0 / (1.0 + np.exp(-logits))
        else:
            choice = np.exp(logits - logits.max(-1, keepdims=True))
            choice /= choice.sum(-1, keepdims=True)
        if cfg.topk_method == "noaux_tc":
            choice = choice + np.asarray(w[f"model.layers.{i}.mlp.gate.e_score_correction_bias"], np.float64)
        gaps = []
        if cfg.topk_method != "greedy" and G > 1:
            grouped = choice.reshape(-1, G, E // G)
            gs = (-np.sort(-grouped, -1)[..., :2].sum(-1) if cfg.topk_method == "noaux_tc" else grouped.max(-1))
            if kg < G:
                srt_g = -np.sort(-gs, -1)
                gaps.append(srt_g[:, kg - 1] - srt_g[:, kg])
            mask = np.ones_like(gs, bool)
            np.put_along_axis(mask, np.argsort(-gs, -1, kind="stable")[:, :kg], False, -1)
            choice = np.where(np.repeat(mask, E // G, -1), -np.inf, choice)
        srt = -np.sort(-choice, -1)
        if k < E and np.isfinite(srt[:, k]).all():
            gaps.append(srt[:, k - 1] - srt[:, k])
        out[f"layers.{i}"] = float(min(g.min() for g in gaps)) if gaps else float("inf")
    return out


def write_kit(out_dir: str | Path, cases: list[str] | None = None) -> Path:
    """Write the kit (all cases, or the named ones) into out_dir, with kit.json listing them."""
    out = Path(out_dir)
    chosen = _select(cases)
    out.mkdir(parents=True, exist_ok=True)
    for c in chosen:
        build_case(c, out / c.name)
    (out / "kit.json").write_text(json.dumps({"format": "dsref-conformance-1", "cases": [c.name for c in chosen],
                                              "versions": versions()}, indent=2) + "\n")
    return out


def _select(names: list[str] | None) -> list[Case]:
    if not names:
        return list(CASES)
    out = []
    for n in names:
        c = CASE_BY_NAME.get(n) or next((c for c in CASES if c.letter == n), None)
        if c is None:
            raise OracleError(f"unknown conformance case {n!r}; known: "
                              f"{', '.join(c.name for c in CASES)}")
        out.append(c)
    return out


def kit_cases(kit_dir: str | Path) -> list[str]:
    p = Path(kit_dir) / "kit.json"
    if not p.is_file():
        raise OracleError(f"{p}: not a conformance kit (write one with `dsref conformance write DIR`)")
    try:
        return list(json.loads(p.read_text())["cases"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OracleError(f"{p}: corrupt kit.json ({e})") from None


# ------------------------------------------------------------------ engines
class ReferenceEngine:
    """Our own model as an engine: float32/bfloat16 JAX, or float64 NumPy."""

    def __init__(self, dtype: str = "float32"):
        self.dtype = {"bfloat16": "bf16"}.get(dtype, dtype)
        self._run_dtype = {"bf16": "bfloat16"}.get(self.dtype, self.dtype)
        self.name = f"dsref-{self._run_dtype}"

    def __call__(self, checkpoint: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return run_reference(checkpoint, tokens, self._run_dtype)


# An engine command that exits with this status and writes a line starting "unsupported:" to stderr
# cannot run the checkpoint at all: the case is UNSUPPORTED (reported with that line), not ERROR.
# Both are required, so a command that merely crashes with status 3 is still an ERROR.
UNSUPPORTED_EXIT = 3


class CommandEngine:
    """An external engine run as a command; the template names {checkpoint}, {tokens} and {out}
    (a .safetensors dump to write). Exit 0: the dump is graded; exit UNSUPPORTED_EXIT with an
    ``unsupported: <reason>`` line on stderr: UNSUPPORTED; any other non-zero exit: ERROR."""

    def __init__(self, template: str, dtype: str = "float32", timeout: float = 600.0):
        for key in ("{checkpoint}", "{tokens}", "{out}"):
            if key not in template:
                raise OracleError(f"--engine-cmd must contain {key}: {template!r}")
        self.template, self.dtype, self.timeout, self.name = template, dtype, timeout, template.split()[0]
        self.out_dir: Path | None = None

    def __call__(self, checkpoint: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
        import tempfile
        with tempfile.TemporaryDirectory() as td:
            tok, out = Path(td) / "tokens.npy", Path(td) / "out.safetensors"
            np.save(tok, tokens)
            cmd = self.template.format(checkpoint=shlex.quote(str(checkpoint)), tokens=shlex.quote(str(tok)),
                                       out=shlex.quote(str(out)))
            p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=self.timeout)
            if p.returncode == UNSUPPORTED_EXIT:
                why = [ln for ln in p.stderr.splitlines() if ln.startswith("unsupported:")]
                if why:
                    raise EngineUnsupported(why[-1][len("unsupported:"):].strip())
            if p.returncode != 0:
                raise RuntimeError(f"engine command exited {p.returncode}: {cmd}\n{p.stderr[-2000:]}")
            tensors, _ = read_dump(out)
            return tensors


# ------------------------------------------------------------------ grading
@dataclass
class CaseResult:
    case: str
    letter: str
    targets: str
    status: str  # pass | fail | error | unsupported
    detail: str = ""
    first_failure: str | None = None
    first_failing_layer: int | None = None
    seconds: float = 0.0
    report: dict | None = field(default=None, repr=False)


def grade_case(kit_dir: Path, name: str, engine: Callable, dtype: str | None = None,
               overrides: dict | None = None, save_dir: Path | None = None) -> CaseResult:
    d = Path(kit_dir) / name
    meta = json.loads((d / "case.json").read_text())
    dtype = dtype or getattr(engine, "dtype", "float32")
    res = CaseResult(name, meta["letter"], meta["targets"], "pass")
    t0 = time.perf_counter()
    tokens = load_tokens(d / "tokens.npy")
    try:
        out = engine(d / "checkpoint", tokens)
    except EngineUnsupported as e:
        res.status, res.detail = "unsupported", str(e)
    except Exception as e:  # an engine that crashes fails the case; the message says why
        res.status, res.detail = "error", f"{type(e).__name__}: {e}"
    res.seconds = time.perf_counter() - t0
    if res.status != "pass":
        return res
    golden, _ = read_dump(d / "golden.safetensors")
    if save_dir is not None:
        write_dump(out, Path(save_dir) / f"{name}.safetensors",
                   {"dtype": normalize_dtype(dtype), "engine": getattr(engine, "name", "engine"),
                    "config_hash": meta["config_hash"], "tokens_sha256": tokens_hash(tokens)})
    try:
        rep = compare_dumps(golden, out, dtype, overrides, ref_name=f"{name}/golden", cand_name=name)
    except OracleError as e:
        res.status, res.detail = "error", str(e)
        return res
    res.report = rep.to_json()
    missing = rep.only_in_reference
    if not rep.ok:
        res.status = "fail"
        bad = next(r for r in rep.tensors if not r.ok)
        res.first_failure, res.first_failing_layer = rep.first_failure, rep.first_failing_layer
        res.detail = f"{bad.name}: {bad.why}"
    elif missing:
        res.status = "fail"
        res.detail = f"tensors missing from the engine's dump: {', '.join(missing[:4])}"
    else:
        worst = max((r.max_rel or 0.0) for r in rep.tensors)
        res.detail = f"{len(rep.tensors)} tensors, worst rel {worst:.1e}"
    return res


def grade_kit(kit_dir: str | Path, engine: Callable, cases: list[str] | None = None, dtype: str | None = None,
              overrides: dict | None = None, save_dir: str | Path | None = None) -> list[CaseResult]:
    in_kit = kit_cases(kit_dir)
    names = [c.name for c in _select(cases)] if cases else in_kit
    for n in names:
        if n not in in_kit:
            raise OracleError(f"{Path(kit_dir) / 'kit.json'}: case {n!r} is not in this kit")
    return [grade_case(Path(kit_dir), n, engine, dtype, overrides, None if save_dir is None else Path(save_dir))
            for n in names]


def grade_outputs(kit_dir: str | Path, candidate_dir: str | Path, dtype: str = "float32",
                  overrides: dict | None = None) -> list[CaseResult]:
    """Grade dumps an engine already wrote: candidate_dir/<case>.safetensors (missing -> error)."""
    cdir = Path(candidate_dir)

    def from_files(checkpoint: Path, tokens: np.ndarray):
        p = cdir / f"{checkpoint.parent.name}.safetensors"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no dump for this case")
        return read_dump(p)[0]
    from_files.dtype = dtype  # type: ignore[attr-defined]
    return grade_kit(kit_dir, from_files, dtype=dtype, overrides=overrides)


def format_results(results: list[CaseResult], engine_name: str = "engine") -> str:
    lines = [f"conformance: {engine_name}",
             f"{'':2}{'case':<22} {'status':<12} {'s':>5}  detail"]
    for r in results:
        lines.append(f"{r.letter:>1} {r.case:<22} {r.status.upper():<12} {r.seconds:5.1f}  {r.detail}")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "unsupported")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("pass", "fail")))
    return "\n".join(lines)


def results_json(results: list[CaseResult], engine_name: str = "engine") -> dict[str, Any]:
    return {"engine": engine_name, "ok": not any(r.status in ("fail", "error") for r in results),
            "cases": [{k: v for k, v in r.__dict__.items()} for r in results]}
