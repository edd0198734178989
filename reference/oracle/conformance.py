"""Conformance kit: a baseline and one-factor variants of it, each aimed at mistakes engines have made.

``write_kit(DIR)`` writes, per case (oracle.kit_cases), ``DIR/<case>/checkpoint/``
(config.json + model.safetensors, deterministic seed), ``tokens.npy``,
``golden.safetensors`` (float64 NumPy reference, see oracle.golden) and ``case.json``
(its factor, what it requires, the mistakes that fail it, tolerances, routing margins).
``grade_kit(DIR, engine)`` runs an engine on every case, compares its dump with the
golden one, and ``attribute``s each failure: to the case's own factor when the
baseline and every case it requires passed, otherwise to the earlier failure that
explains it.

Engines: any callable ``engine(checkpoint_dir: Path, tokens: np.ndarray)`` returning
``{name: array}`` (the dump names of oracle.golden) or ``({name: array}, metadata)``,
with optional attributes ``name`` and ``dtype`` (the tolerance set; a dump's own
``dtype`` metadata wins over it, an explicit ``dtype=`` over both). An engine raises
``EngineUnsupported`` for a checkpoint it cannot run (reported, not failed); a dump
without a tensor that only the case's factor adds (e.g. ``mtp.0.logits``) is
UNSUPPORTED too.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dsref.reference.atomic import atomic_dir, atomic_path, atomic_write_text
from dsref.reference.checkpoint import read_tensors, save_checkpoint
from dsref.reference.checkpoint_v4 import read_tensors_v4, save_checkpoint_v4
from dsref.reference.config import ModelConfig
from dsref.reference.oracle.adapters.common import UNSUPPORTED_EXIT, EngineUnsupported
from dsref.reference.oracle.compare import _DTYPE_ALIASES, TOLERANCES, compare_dumps, normalize_dtype
from dsref.reference.oracle.golden import (OracleError, config_hash, golden_metadata, read_any_config, read_dump,
                                          run_reference, tokens_hash, versions, write_dump)
from dsref.reference.oracle.kit_cases import CASE_BY_NAME, CASES, Case, case_tokens, case_weights, closure
from dsref.reference.oracle.kit_cases_v4 import index_margins_v4, routing_margins_v4

__all__ = ["CASES", "CASE_BY_NAME", "Case", "EngineUnsupported", "UNSUPPORTED_EXIT", "write_kit", "grade_kit",
           "grade_outputs", "attribute", "format_results", "results_json", "ReferenceEngine", "CommandEngine"]
KIT_FORMAT = "dsref-conformance-2"


def build_case(case: Case, out: str | Path) -> Path:
    """Write one case directory (checkpoint, tokens, golden, case.json)."""
    out = Path(out)
    cfg = case.config()
    w = case_weights(case, cfg)
    ck = out / "checkpoint"
    if case.family == "v4":  # DeepSeek's release names and layout (what its checkpoints ship)
        save_checkpoint_v4(w, cfg, ck, names="deepseek", dtype=case.v4_storage)
        ck_dtype = case.v4_storage
    else:
        save_checkpoint(w, cfg, ck, dtype="fp8" if case.fp8_block else "float32", fp8_block_size=case.fp8_block)
        ck_dtype = "fp8" if case.fp8_block else "float32"
    tokens = case_tokens(case, cfg)
    with atomic_path(out / "tokens.npy") as tmp:
        np.save(tmp, tokens)
    stored = read_any_config(ck)
    golden = run_reference(ck, tokens, "float64")  # from the weights as stored (fp8 / fp4 dequantized)
    missing = [n for n in case.dump_tensors if n not in golden]
    assert not missing, f"{case.name}: the reference dump lacks {missing}"
    write_dump(golden, out / "golden.safetensors", golden_metadata(stored, tokens, "float64", case=case.name))
    if case.family == "v4":
        stored_w = dict(read_tensors_v4(ck, stored, mtp=False))
        margins = routing_margins_v4(golden, stored, stored_w)
        imargins = index_margins_v4(golden, stored, stored_w, tokens)
    else:
        stored_w = dict(read_tensors(ck, stored))
        margins = routing_margins(golden, stored, stored_w)
        imargins = index_margins(golden, stored, stored_w, tokens)
    meta = {"name": case.name, "letter": case.letter, "factor": case.factor, "targets": case.targets,
            "requires": list(case.all_requires), "faults": list(case.faults), "seed": case.seed,
            "config_hash": config_hash(stored), "tokens_shape": list(tokens.shape),
            "checkpoint_dtype": ck_dtype,
            "fp8_block": list(case.fp8_block) if case.fp8_block else None,
            "dump_tensors": list(case.dump_tensors), "tolerances": TOLERANCES, "routing_margin": margins,
            "index_margin": imargins, "prefill_chunk": case.prefill_chunk,
            "grading": "compare.compare_dumps(golden, candidate, engine dtype): every tensor within the "
                       "engine dtype's tolerance"}
    atomic_write_text(out / "case.json", json.dumps(meta, indent=2) + "\n")
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


def index_margins(golden: dict[str, np.ndarray], cfg: ModelConfig, w: dict[str, np.ndarray],
                  tokens: np.ndarray) -> dict[str, float]:
    """V3.2: per layer, the smallest relative gap (float64) between the index_topk-th and next best
    visible index score over the rows that are neither dense (<= index_topk keys) nor exact ties
    (dsa.boundary_gap). A float32 engine's rounding must stay well below it to select the same keys.
    Layer i's input is the golden's layers.{i-1}.hidden (the embedding for layer 0)."""
    if not cfg.has_indexer:
        return {}
    from dsref.reference import dsa
    from dsref.reference.numpy_ref import rms_norm
    from dsref.reference.params import EMBED
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    B, T = tokens.shape
    pos = np.broadcast_to(np.arange(T), (B, T))
    out = {}
    for i in range(cfg.num_hidden_layers):
        h = f64(w[EMBED])[tokens] if i == 0 else f64(golden[f"layers.{i - 1}.hidden"])
        pre = f"model.layers.{i}."
        lw = {k: f64(v) for k, v in w.items() if k.startswith(pre)}
        x = rms_norm(h, lw[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
        sel = dsa.indexer(x, lw, cfg, pos, pre + "self_attn.")
        gap = dsa.boundary_gap(sel, dsa.visible(pos, pos), cfg.index_topk)[~sel.tie]
        out[f"layers.{i}"] = float(gap.min()) if gap.size else float("inf")
    return out


def write_kit(out_dir: str | Path, cases: list[str] | None = None) -> Path:
    """Write the kit (all cases, or the named ones plus the cases they require) with kit.json listing them."""
    out = Path(out_dir)
    chosen = _select(cases)
    # The kit is one folder swapped in whole (reference.atomic.atomic_dir): a killed write leaves the
    # previous kit, never a kit.json naming a half-built case. Entries of an earlier kit that this
    # write does not rebuild (other cases, files of the user's) are carried over.
    with atomic_dir(out, carry=lambda name: True) as stage:
        for c in chosen:
            build_case(c, stage / c.name)
        atomic_write_text(stage / "kit.json", json.dumps({"format": KIT_FORMAT, "cases": [c.name for c in chosen],
                                                         "versions": versions()}, indent=2) + "\n")
    return out


def _select(names: list[str] | None) -> list[Case]:
    """Cases by name or letter, with everything they require (kit order); all when names is empty."""
    if not names:
        return list(CASES)
    picked = []
    for n in names:
        c = CASE_BY_NAME.get(n) or next((c for c in CASES if c.letter == n), None)
        if c is None:
            raise OracleError(f"unknown conformance case {n!r}; known: "
                              f"{', '.join(c.name for c in CASES)}")
        picked.append(c.name)
    return closure(picked)


def kit_cases(kit_dir: str | Path) -> list[str]:
    p = Path(kit_dir) / "kit.json"
    if not p.is_file():
        raise OracleError(f"{p}: not a conformance kit (write one with `dsref conformance write DIR`)")
    try:
        meta = json.loads(p.read_text())
        names = list(meta["cases"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OracleError(f"{p}: corrupt kit.json ({e})") from None
    if meta.get("format") != KIT_FORMAT or any(n not in CASE_BY_NAME for n in names):
        raise OracleError(f"{p}: kit format {meta.get('format')!r} is not this version's {KIT_FORMAT!r}; "
                          "write the kit again with `dsref conformance write DIR`")
    return names


# ------------------------------------------------------------------ engines
class ReferenceEngine:
    """Our own model as an engine: float32/bfloat16 JAX, or float64 NumPy."""

    def __init__(self, dtype: str = "float32"):
        self.dtype = {"bfloat16": "bf16"}.get(dtype, dtype)
        self._run_dtype = {"bf16": "bfloat16"}.get(self.dtype, self.dtype)
        self.name = f"dsref-{self._run_dtype}"
        # the JAX model prefills chunk by chunk into its caches; the NumPy one has no cache
        self.chunked_prefill = self.dtype != "float64"

    def __call__(self, checkpoint: Path, tokens: np.ndarray, prefill_chunk: int | None = None) -> dict[str, np.ndarray]:
        return run_reference(checkpoint, tokens, self._run_dtype, prefill_chunk=prefill_chunk)


# An engine command that exits with UNSUPPORTED_EXIT and writes a line starting "unsupported:" to
# stderr cannot run the checkpoint at all: the case is UNSUPPORTED (reported with that line), not
# ERROR. Both are required, so a command that merely crashes with status 3 is still an ERROR.


def _command_name(template: str) -> str:
    """A readable engine name from a command: the module after -m, else the program's file name."""
    words = shlex.split(template)
    if "-m" in words[:-1]:
        return words[words.index("-m") + 1].rsplit(".", 1)[-1]
    return Path(words[0]).name if words else "engine"


class CommandEngine:
    """An external engine run as a command; the template names {checkpoint}, {tokens} and {out}
    (a .safetensors dump to write), and {prefill_chunk} if the engine can prefill in chunks of that
    many tokens (0: all at once; without it the chunked-prefill case is UNSUPPORTED). Exit 0: the dump is graded (its ``dtype`` and ``engine``
    metadata are used); exit UNSUPPORTED_EXIT with an ``unsupported: <reason>`` line on stderr:
    UNSUPPORTED; any other non-zero exit: ERROR, with the last line of stderr (an adapter's summary)."""

    def __init__(self, template: str, dtype: str | None = None, timeout: float = 600.0, name: str | None = None):
        for key in ("{checkpoint}", "{tokens}", "{out}"):
            if key not in template:
                raise OracleError(f"--engine-cmd must contain {key}: {template!r}")
        try:  # an unknown {name} or a lone brace would fail every case at run time: refuse it now
            template.format(checkpoint="", tokens="", out="", prefill_chunk=0)
        except (KeyError, IndexError, ValueError) as e:
            what = (f"{{{e.args[0]}}} is not a placeholder" if isinstance(e, KeyError) else
                    "a positional {} is not a placeholder" if isinstance(e, IndexError) else f"bad braces ({e})")
            raise OracleError(f"--engine-cmd: {what}; the placeholders are {{checkpoint}}, {{tokens}}, {{out}}, "
                              f"{{prefill_chunk}} (a literal brace is {{{{ or }}}}): {template!r}") from None
        try:
            derived = _command_name(template)
        except ValueError as e:
            raise OracleError(f"--engine-cmd: cannot split {template!r} ({e})") from None
        self.template, self.dtype, self.timeout = template, dtype, timeout
        self.name, self._named = name or derived, name is not None
        self.chunked_prefill = "{prefill_chunk}" in template
        self.save_dir: Path | None = None  # set by grade_kit(save_dir=...): dumps are copied there unchanged

    def __call__(self, checkpoint: Path, tokens: np.ndarray, prefill_chunk: int | None = None):
        import tempfile
        with tempfile.TemporaryDirectory() as td:
            tok, out = Path(td) / "tokens.npy", Path(td) / "out.safetensors"
            np.save(tok, tokens)
            cmd = self.template.format(checkpoint=shlex.quote(str(checkpoint)), tokens=shlex.quote(str(tok)),
                                       out=shlex.quote(str(out)), prefill_chunk=int(prefill_chunk or 0))
            p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=self.timeout)
            lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
            if p.returncode == UNSUPPORTED_EXIT:
                why = [ln for ln in lines if ln.startswith("unsupported:")]
                if why:
                    raise EngineUnsupported(why[-1][len("unsupported:"):].strip())
            if p.returncode != 0:
                raise EngineError(f"exit {p.returncode}: {lines[-1].strip() if lines else '(no stderr)'}",
                                  "\n".join(lines[-40:]))
            tensors, meta = read_dump(out)
            if self.save_dir is not None:  # the engine's file as it wrote it, metadata included
                self.save_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out, self.save_dir / f"{Path(checkpoint).parent.name}.safetensors")
            if not self._named and meta.get("engine"):
                self.name = meta["engine"]
            return tensors, meta


class EngineError(RuntimeError):
    """An engine command failed: a one-line summary, and the end of its stderr for the JSON report."""

    def __init__(self, summary: str, stderr_tail: str = ""):
        super().__init__(summary)
        self.stderr_tail = stderr_tail


# ------------------------------------------------------------------ grading
@dataclass
class CaseResult:
    case: str
    letter: str
    factor: str
    status: str  # pass | fail | error | unsupported
    detail: str = ""
    dtype: str = "float32"
    first_failure: str | None = None
    first_failing_layer: int | None = None
    seconds: float = 0.0
    requires: list[str] = field(default_factory=list)
    # after attribute(): "factor" (this case's factor is the cause), "explained" (an earlier failure
    # explains it: explained_by), "unconfirmed" (a required case was unsupported or not run)
    attribution: str | None = None
    explained_by: list[str] = field(default_factory=list)
    stderr_tail: str | None = field(default=None, repr=False)
    report: dict | None = field(default=None, repr=False)

    @property
    def failed(self) -> bool:
        return self.status in ("fail", "error")


def _grading_dtype(explicit: str | None, meta: dict, engine) -> tuple[str, str | None]:
    """(dtype, note): explicit > the dump's dtype metadata > the engine's dtype attribute > float32."""
    if explicit:
        return normalize_dtype(explicit), None
    md = meta.get("dtype")
    if md:
        if str(md).lower() in _DTYPE_ALIASES:
            return normalize_dtype(md), None
        return "float32", f"dump dtype {md!r} unknown: float32 tolerances"
    return normalize_dtype(getattr(engine, "dtype", None) or "float32"), None


def grade_case(kit_dir: Path, name: str, engine: Callable, dtype: str | None = None,
               overrides: dict | None = None, save_dir: Path | None = None) -> CaseResult:
    d = Path(kit_dir) / name
    meta = json.loads((d / "case.json").read_text())
    res = CaseResult(name, meta["letter"], meta.get("factor", ""), "pass", requires=list(meta.get("requires", [])))
    t0 = time.perf_counter()
    tokens = np.load(d / "tokens.npy", allow_pickle=False)
    dump_meta: dict = {}
    try:
        chunk = meta.get("prefill_chunk")
        if chunk and not getattr(engine, "chunked_prefill", False):
            raise EngineUnsupported(f"this case prefills in chunks of {chunk} tokens and the engine cannot be "
                                    "told to (a command needs {prefill_chunk}; an engine object the "
                                    "attribute chunked_prefill and a prefill_chunk argument)")
        out = engine(d / "checkpoint", tokens, prefill_chunk=chunk) if chunk else engine(d / "checkpoint", tokens)
        if isinstance(out, tuple):
            out, dump_meta = out
    except EngineUnsupported as e:
        res.status, res.detail = "unsupported", str(e)
    except EngineError as e:
        res.status, res.detail, res.stderr_tail = "error", str(e), e.stderr_tail
    except Exception as e:  # an engine that crashes fails the case; the message says why
        res.status, res.detail = "error", f"{type(e).__name__}: {e}"
    res.seconds = time.perf_counter() - t0
    if res.status != "pass":
        return res
    res.dtype, note = _grading_dtype(dtype, dump_meta, engine)
    golden, _ = read_dump(d / "golden.safetensors")
    if save_dir is not None and not isinstance(engine, CommandEngine):
        write_dump(out, Path(save_dir) / f"{name}.safetensors",
                   {"dtype": res.dtype, "engine": getattr(engine, "name", "engine"),
                    "config_hash": meta["config_hash"], "tokens_sha256": tokens_hash(tokens), **dump_meta})
    absent = [n for n in meta.get("dump_tensors", []) if n not in out]
    if absent:
        res.status = "unsupported"
        res.detail = f"the dump has no {', '.join(absent)} (what this case's factor adds): not implemented"
        return res
    try:
        rep = compare_dumps(golden, out, res.dtype, overrides, ref_name=f"{name}/golden", cand_name=name)
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
        ties = sum(r.excused_ties or 0 for r in rep.tensors)
        if ties:
            res.detail += f"; {ties} exact index ties broken another way (allowed)"
    if note:
        res.detail += f" ({note})"
    return res


def attribute(results: list[CaseResult]) -> list[CaseResult]:
    """Name each failure's cause. A failing case whose requirements (the baseline and the cases its
    factor builds on, transitively) all passed is attributed to its own factor; if one of them
    failed, it is explained by the earliest failing ones; if one was unsupported or not run, its
    cause is unconfirmed."""
    by = {r.case: r for r in results}

    def deps(name: str) -> list[str]:
        seen: list[str] = []
        todo = list(CASE_BY_NAME[name].all_requires) if name in CASE_BY_NAME else []
        while todo:
            n = todo.pop(0)
            if n not in seen:
                seen.append(n)
                todo.extend(CASE_BY_NAME[n].all_requires)
        return [c.name for c in CASES if c.name in seen]  # kit order: the baseline first

    for r in results:
        r.attribution, r.explained_by = None, []
        if not r.failed:
            continue
        ds = deps(r.case)
        failed = [n for n in ds if n in by and by[n].failed]
        unknown = [n for n in ds if n not in by or by[n].status == "unsupported"]
        if failed:
            # the roots: failed requirements not themselves explained by another failed requirement
            roots = [n for n in failed if not any(m in failed for m in deps(n))]
            r.attribution, r.explained_by = "explained", roots
        elif unknown:
            r.attribution, r.explained_by = "unconfirmed", unknown
        else:
            r.attribution = "factor"
    return results


def grade_kit(kit_dir: str | Path, engine: Callable, cases: list[str] | None = None, dtype: str | None = None,
              overrides: dict | None = None, save_dir: str | Path | None = None) -> list[CaseResult]:
    """Grade the engine on the kit's cases (or the named ones plus what they require), attributed."""
    in_kit = kit_cases(kit_dir)
    names = [c.name for c in _select(cases)] if cases else in_kit
    for n in names:
        if n not in in_kit:
            raise OracleError(f"{Path(kit_dir) / 'kit.json'}: case {n!r} is not in this kit")
    if isinstance(engine, CommandEngine):
        engine.save_dir = None if save_dir is None else Path(save_dir)
    return attribute([grade_case(Path(kit_dir), n, engine, dtype, overrides,
                                 None if save_dir is None else Path(save_dir)) for n in names])


def grade_outputs(kit_dir: str | Path, candidate_dir: str | Path, dtype: str | None = None,
                  overrides: dict | None = None) -> list[CaseResult]:
    """Grade dumps an engine already wrote: candidate_dir/<case>.safetensors (missing -> error);
    each dump's own dtype metadata picks its tolerances unless dtype is given."""
    cdir = Path(candidate_dir)

    class FromFiles:
        chunked_prefill = True  # whoever wrote a chunked case's dump was asked to prefill in chunks

        def __call__(self, checkpoint: Path, tokens: np.ndarray, prefill_chunk: int | None = None):
            p = cdir / f"{checkpoint.parent.name}.safetensors"
            if not p.is_file() and prefill_chunk:
                raise EngineUnsupported(f"{p}: no dump for this case (it asks for a prefill in chunks of "
                                        f"{prefill_chunk} tokens)")
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no dump for this case")
            return read_dump(p)
    return grade_kit(kit_dir, FromFiles(), dtype=dtype, overrides=overrides)


def format_results(results: list[CaseResult], engine_name: str = "engine") -> str:
    letters = {r.case: r.letter for r in results}  # the kit's own letters (case.json)

    def _label(name: str) -> str:
        letter = letters.get(name) or getattr(CASE_BY_NAME.get(name), "letter", "")
        return f"{letter} {name}".strip()
    lines = [f"conformance: {engine_name}",
             f"{'':2}{'case':<25} {'status':<12} {'s':>5}  detail"]
    for r in results:
        lines.append(f"{r.letter:>1} {r.case:<25} {r.status.upper():<12} {r.seconds:5.1f}  {r.detail}")
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "unsupported")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("pass", "fail")))
    own = [r for r in results if r.attribution == "factor"]
    if own:
        lines.append("causes (the case's factor; everything it builds on passed):")
        lines += [f"  {_label(r.case)}: {r.factor}" for r in own]
    expl = [r for r in results if r.attribution == "explained"]
    if expl:
        lines.append("explained by an earlier failure (fix that first):")
        lines += [f"  {_label(r.case)}: see {', '.join(_label(n) for n in r.explained_by)}" for r in expl]
    unc = [r for r in results if r.attribution == "unconfirmed"]
    if unc:
        lines.append("cause unconfirmed (a case it builds on was unsupported or not run):")
        lines += [f"  {_label(r.case)}: {r.factor}? (needs {', '.join(_label(n) for n in r.explained_by)})"
                  for r in unc]
    return "\n".join(lines)


def results_json(results: list[CaseResult], engine_name: str = "engine") -> dict[str, Any]:
    return {"engine": engine_name, "ok": not any(r.failed for r in results),
            "causes": [r.case for r in results if r.attribution == "factor"],
            "cases": [{k: v for k, v in r.__dict__.items()} for r in results]}
