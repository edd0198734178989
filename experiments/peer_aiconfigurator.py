"""Side by side with a peer: NVIDIA's aiconfigurator and this project's simulator, predicting
the same published DeepSeek-V3/R1 serving deployments on NVIDIA GPUs.

aiconfigurator (pip ``aiconfigurator``; ``pip install 'deepseek-ref[peer]'``) predicts TTFT,
TPOT and throughput from per-operation latency tables measured on real GPUs (the tables ship
in its ``aiconfigurator-core`` wheel, no download at run time). It is an optional dependency:
when it is not installed, or refuses a deployment, its column says why and the table is still
built.

For each comparable published point, ``deployments()`` states our scenario and the
aiconfigurator inputs that describe the same deployment; ``run()`` returns one row per point:
{claim, published, ours, ours_error, aiconfigurator, aiconfigurator_error, notes}.

Our side is the record the project's own experiment returns for the claim (the same number
`dsref validate` reports): those experiments drive ``dsref.sim.scenario.load`` +
``dsref.sim.serve.simulate`` on the named scenario at the published operating point.

aiconfigurator's side runs in a child Python process (one for all points, with a timeout), so
a hang or a crash in it cannot take the table down. Its static modes are used because the
published figures are per-phase capacities measured one phase at a time ("assuming unlimited
resources for the non-tested phase", LMSYS): ``static_ctx`` for a prefill batch, ``static_gen``
for a decode batch held at the published size. Throughputs come out as
``static_ctx``: prompt tokens/s = batch x ISL / TTFT per attention-DP rank;
``static_gen``: output tokens/s = batch / TPOT per rank (TPOT already divided by the MTP
tokens per step when --nextn is given).

Where aiconfigurator cannot describe the published deployment (no H800 system; DeepEP tables
that stop at 8 nodes on H100 and 1 node on GB200), the row says so. A stand-in (h100_sxm for
H800; EP64 for a larger EP) is run only where a deployment names one, and the notes label it.

Run: ``python -m dsref.experiments.peer_aiconfigurator --out docs/peer_aiconfigurator.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from dsref.experiments.registry import load_claims, signed_error

#: The version the docs table was made with; pinned by the ``peer`` extra in pyproject.toml.
AIC_DIST = "aiconfigurator"
AIC_PINNED = "0.12.0"
INSTALL_HINT = "pip install 'deepseek-ref[peer]'"
#: aiconfigurator resolves this to its bundled copy of the Hugging Face config
#: (aiconfigurator_core/model_configs/deepseek-ai--DeepSeek-V3_config.json): FP8 block-scaled
#: weights, MTP depth 1 -- the checkpoint both DeepSeek and LMSYS served (R1 has the same shapes).
AIC_MODEL = "deepseek-ai/DeepSeek-V3"
DEFAULT_TIMEOUT_S = 300.0

# H800 = H100 SXM compute and HBM3 (80 GB, 3.35 TB/s) with NVLink cut to 400 GB/s bidirectional
# (ISCA'25 paper, claim isca_h800_nvlink; hwmodels/data/devices/h800.toml); DeepSeek's nodes have
# one 400 Gb/s CX7 IB NIC per GPU, as aiconfigurator's h100_sxm system (50 GB/s per GPU).
H800_STANDIN = ("h100_sxm stands in for the H800 (aiconfigurator has no H800 system): same SMs, "
                "clocks and HBM3; the H800's NVLink is 400 GB/s bidirectional vs the H100's 900 "
                "(aiconfigurator's intra-node EP traffic is timed at H100 NVLink speed)")
KV_NOTE = ("aiconfigurator times an FP8 KV cache (its SGLang wide-EP MLA tables have no BF16-KV rows); "
           "the deployment kept the MLA cache in BF16")
DEEPSEEK_ENGINE = ("DeepSeek's own inference engine is not one of aiconfigurator's backends; "
                   "sglang (DeepEP + DeepGEMM + DP attention, the closest open implementation) is used")


@dataclass(frozen=True)
class AicPoint:
    """The aiconfigurator inputs of one published deployment (cli_estimate keywords).

    ``batch`` is per attention-DP rank (per GPU with tp=1), as aiconfigurator counts it; the
    whole batch is ``batch x dp``. ``metric`` names the figure taken out of the estimate.
    """

    system: str
    backend: str
    mode: str                    # "static_ctx" (prefill batch) or "static_gen" (decode batch)
    isl: int
    osl: int
    batch: int
    dp: int
    ep: int
    metric: str                  # "input_tps_per_node" | "output_tps_per_node" | "output_tps_per_gpu" | "output_tps_per_user"
    gpus_per_node: int = 8       # of the *published* deployment, to turn per-GPU into per-node
    tp: int = 1
    prefix: int = 0              # prompt tokens already in the prefix cache
    nextn: int = 0               # MTP draft tokens per step
    nextn_accepted: float | None = None
    gemm_quant: str = "fp8_block"     # DeepSeek-V3's FP8 checkpoint: 128x128 block scales
    moe_quant: str = "fp8_block"
    # The deployments kept the MLA latent cache in BF16 (Day 6: "BF16 MLA"; SGLang's default), but
    # aiconfigurator 0.12's SGLang wide-EP MLA tables hold FP8-KV measurements only (kv_cache_dtype
    # 'fp8' in systems/data/*/mla/sglang/*/wideep_*_mla_perf.parquet): BF16 is refused. Stated in notes.
    kvcache_quant: str = "fp8"
    label: str = ""              # what differs from the published deployment (shown in notes)
    standin: str = ""            # the same in a few words, for the table ("" = the published shape)

    def kwargs(self) -> dict:
        """Keyword arguments of aiconfigurator.cli.api.cli_estimate."""
        kw = dict(model_path=AIC_MODEL, system_name=self.system, backend_name=self.backend, mode=self.mode,
                  isl=self.isl, osl=self.osl, batch_size=self.batch, tp_size=self.tp,
                  attention_dp_size=self.dp, moe_tp_size=1, moe_ep_size=self.ep, prefix=self.prefix,
                  gemm_quant_mode=self.gemm_quant, moe_quant_mode=self.moe_quant,
                  kvcache_quant_mode=self.kvcache_quant)
        if self.nextn:
            kw.update(nextn=self.nextn, nextn_accepted=self.nextn_accepted)
        return kw

    def describe(self) -> str:
        s = (f"{self.system}/{self.backend} {self.mode} ISL {self.isl} OSL {self.osl}"
             f"{f' prefix {self.prefix}' if self.prefix else ''} batch {self.batch}/GPU "
             f"TP{self.tp} DP{self.dp} EP{self.ep} GEMM {self.gemm_quant} MoE {self.moe_quant} KV {self.kvcache_quant}")
        if self.nextn:
            s += f" MTP nextn {self.nextn} accepted {self.nextn_accepted}"
        return s


@dataclass(frozen=True)
class Deployment:
    """One published point: the claim, our scenario and experiment, aiconfigurator's inputs."""

    claim: str
    scenario: str | None          # under sim/scenarios/ (None: the project has no scenario for it)
    experiment: str | None        # module under dsref.experiments whose record for the claim is "ours"
    part: str = ""                # entry of a multi-valued claim (as the experiment's record names it)
    published: float | None = None  # only for a multi-valued claim: the figure compared (as the record)
    aic: AicPoint | None = None
    aic_standin: AicPoint | None = None   # run when aiconfigurator refuses ``aic``; labelled in notes
    note: str = ""                # how the inputs were read from the source
    sources: tuple[str, ...] = field(default_factory=tuple)


# LMSYS, "Deploying DeepSeek with PD Disaggregation and Large-scale Expert Parallelism on 96 H100
# GPUs" (2025-05-05), lm-sys/lm-sys.github.io blog/2025-05-05-large-scale-ep.md, section Evaluation:
# prefill on 4 nodes EP32 at 1K/2K/4K prompts; decode on 9 nodes EP72, "256 sequences, 2,000 input
# length" (Profile Results, decode table); prefill "16,384 tokens per device" (Overall Throughput).
LMSYS_H100 = "LMSYS blog 2025-05-05 (lm-sys.github.io blog/2025-05-05-large-scale-ep.md), Evaluation + Profile Results"
# The GB200 claim (LMSYS, GB200 NVL72 Part II, 2025-09-25) states its own setup in public_claims.json:
# decode on 48 GPUs (EP48), 2,000-token inputs, 100-token outputs, BF16 KV cache, "batch chosen to make
# the KV cache roughly full" (no number given).
# The decode batch of 128 sequences/GPU is not in DeepSeek's Day-6 post (which gives the per-node
# throughput and the mean KV length 4,989): it is the SGLang team's entry in the 'DeepSeek Blog'
# column of their Profile Results decode table (their derivation), so it is attributed to them.
DAY6 = ("DeepSeek open-infra-index Day 6 (2025-03-01: per-node throughput, mean KV length 4,989) + the decode batch "
        "of 128/GPU as the SGLang team derived it (LMSYS blog 2025-05-05, Profile Results decode table, "
        "'DeepSeek Blog' column; not stated by DeepSeek)")

# Day 6 workload as the deepseek-day6 scenario reads it: mean prompt 4,383 tokens, 56.3% of them
# prefix-cache hits (the published daily totals); 16,384 new tokens per GPU per prefill step
# (the scenario's token budget; LMSYS's profile comparison uses the same 16,384 tokens/device).
D6_PROMPT = 4383
D6_PREFIX = round(0.563 * D6_PROMPT)
D6_BATCH_PREFILL = 16384 // (D6_PROMPT - D6_PREFIX)     # 8 requests of 1,915 new tokens
D6_KV = 4989                                            # published mean KV length per output token
D6_MTP_ACCEPT = 0.85                                    # low end of the published 85-90%

_D6_PREFILL = AicPoint("h100_sxm", "sglang", "static_ctx", isl=D6_PROMPT, osl=1, prefix=D6_PREFIX,
                       batch=D6_BATCH_PREFILL, dp=32, ep=32, metric="input_tps_per_node",
                       label=f"{H800_STANDIN}; {DEEPSEEK_ENGINE}", standin="H100 for H800; SGLang for DeepSeek's engine")
_D6_DECODE = AicPoint("h100_sxm", "sglang", "static_gen", isl=D6_KV, osl=100, batch=128, dp=144, ep=144,
                      nextn=1, nextn_accepted=D6_MTP_ACCEPT, metric="output_tps_per_node",
                      label=f"{H800_STANDIN}; {DEEPSEEK_ENGINE}", standin="H100 for H800; SGLang for DeepSeek's engine")
# aiconfigurator's h100 DeepEP tables cover 1-8 nodes: EP64 is the largest EP it times.
_D6_DECODE_EP64 = replace(_D6_DECODE, dp=64, ep=64, label=(
    "STAND-IN EP64 (8 nodes, 4 routed experts/GPU) for the published EP144 (18 nodes, 2/GPU); " + _D6_DECODE.label),
    standin="EP64 for EP144; " + _D6_DECODE.standin)
_H100_DECODE = AicPoint("h100_sxm", "sglang", "static_gen", isl=2000, osl=100, batch=256, dp=72, ep=72,
                        metric="output_tps_per_node")


def deployments() -> list[Deployment]:
    """The published NVIDIA-GPU DeepSeek-V3/R1 serving points both tools can be asked about."""
    return [
        Deployment("d6_prefill_node_tps", "deepseek-day6", "day6_serving", aic=_D6_PREFILL, sources=(DAY6,),
                   note=(f"prefill unit EP32/DP32 (4 nodes); prompt {D6_PROMPT} with {D6_PREFIX} cached "
                         f"(counted, as the claim); {D6_BATCH_PREFILL} requests/GPU = 16,384 new tokens/GPU")),
        Deployment("d6_decode_node_tps", "deepseek-day6", "day6_serving", aic=_D6_DECODE,
                   aic_standin=_D6_DECODE_EP64, sources=(DAY6,),
                   note=(f"decode unit EP144/DP144 (18 nodes), 128 seqs/GPU (SGLang's derivation, LMSYS 2025-05-05; "
                         f"DeepSeek states no batch) at KV {D6_KV}, MTP acceptance {D6_MTP_ACCEPT}")),
        Deployment("d6_output_speed", "deepseek-day6", "day6_serving", part="mid", published=21.0,
                   aic=replace(_D6_DECODE, metric="output_tps_per_user"),
                   aic_standin=replace(_D6_DECODE_EP64, metric="output_tps_per_user"), sources=(DAY6,),
                   note="midpoint of the published 20-22 tokens/s; same decode point as d6_decode_node_tps"),
        Deployment("sglang_h100_prefill_node_tps", "sglang-h100-4p9d", "published_sglang_h100",
                   aic=AicPoint("h100_sxm", "sglang", "static_ctx", isl=2000, osl=1, batch=8, dp=32, ep=32,
                                metric="input_tps_per_node"),
                   sources=(LMSYS_H100,),
                   note="4 nodes EP32/DP32, 2,000-token prompts, 16,384 tokens/GPU per step = 8 prompts/GPU"),
        Deployment("sglang_h100_decode_node_tps", "sglang-h100-4p9d", "published_sglang_h100",
                   aic=_H100_DECODE,
                   aic_standin=replace(_H100_DECODE, dp=64, ep=64, label=(
                       "STAND-IN EP64 (8 nodes) for the published EP72 (9 nodes): aiconfigurator's h100 DeepEP "
                       "tables stop at 8 nodes"), standin="EP64 for EP72"),
                   sources=(LMSYS_H100,),
                   note="9 nodes EP72/DP72, 256 seqs/GPU, 2,000-token inputs, 100-token outputs (KV 2,000-2,100)"),
        Deployment("dsprofile_prefill_node_tps", "deepseek-profile", "published_deepseek_profile",
                   aic=AicPoint("h100_sxm", "sglang", "static_ctx", isl=4096, osl=1, batch=16384 // 4096, dp=32, ep=32,
                                metric="input_tps_per_node", label=f"{H800_STANDIN}; {DEEPSEEK_ENGINE}",
                                standin="H100 for H800; SGLang for DeepSeek's engine"),
                   note=("profiled prefill: EP32/DP32 (4 nodes), 4,096-token prompts, 16,384 tokens/GPU = 4 prompts/GPU; "
                         "the profile routes tokens perfectly balanced, aiconfigurator has no such switch")),
        Deployment("lmsys_gb200_p2_decode_gpu_tps", "sglang-gb200-decode", "published_lmsys_gb200",
                   aic=AicPoint("gb200", "sglang", "static_gen", isl=2000, osl=100, batch=256, dp=48, ep=48,
                                metric="output_tps_per_gpu", gpus_per_node=4,
                                label="batch 256/GPU is an assumption (the claim says only 'KV cache roughly full')",
                                standin="batch assumed"),
                   note="decode 48 GB200 GPUs (12 trays x 4) EP48/DP48, 2,000-token inputs, 100-token outputs"),
    ]


#: Published serving claims left out, with the reason (printed under the table).
NOT_COMPARED: dict[str, str] = {
    "isca_tpot_ib_layer": ("a communication-only bound (the ISCA'25 paper's formula), not a deployment: "
                           "aiconfigurator predicts whole decode steps; ours is experiments/isca_tpot.py"),
    "isca_tpot_ib": "as isca_tpot_ib_layer: TPOT lower bound from EP traffic alone on 400 Gb/s IB",
    "isca_tpot_gb200": "as isca_tpot_ib_layer: TPOT lower bound from EP traffic alone on GB200 NVLink",
    "d6_cost": "arithmetic on published inputs (nodes x price), no performance model involved",
    "d6_revenue": "arithmetic on published inputs (token volumes x list prices)",
    "cloudmatrix_prefill_npu_tps": "Huawei Ascend 910C (CloudMatrix384): aiconfigurator models NVIDIA GPUs only",
    "cloudmatrix_decode_npu_tps": "as cloudmatrix_prefill_npu_tps",
    "cloudmatrix_decode_npu_tps_15ms": "as cloudmatrix_prefill_npu_tps",
    "asc_910c_60pct": "an Ascend-to-H100 ratio without a stated workload; aiconfigurator has no Ascend model",
}


# ----------------------------------------------------------------------------- aiconfigurator side

# Runs in a child interpreter: reads [[name, kwargs], ...] as JSON on stdin, prints one JSON
# object {name: {"ok": {...}} | {"error": "..."}}. Every point is caught on its own, so one
# refused deployment does not lose the others.
_WORKER = r"""
import json, logging, os, sys, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.CRITICAL)
real_stdout = sys.stdout
sys.stdout = sys.stderr          # aiconfigurator prints banners; keep stdout for the answer
from aiconfigurator.cli.api import cli_estimate
out = {}
for name, kw in json.load(sys.stdin):
    try:
        r = cli_estimate(**kw)
        raw = {k: r.raw.get(k) for k in ("tokens/s", "tokens/s/gpu", "tokens/s/user", "seq/s",
                                         "concurrency", "num_total_gpus", "memory")}
        out[name] = {"ok": {"ttft_ms": r.ttft, "tpot_ms": r.tpot, "raw": raw,
                            "backend_version": r.backend_version, "kv_cache_warning": r.kv_cache_warning,
                            "comm_fallbacks": [str(f) for f in (r.moe_comm_fallbacks or ())]}}
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {e}"}
real_stdout.write(json.dumps(out))
"""


def aic_versions() -> dict[str, str] | str:
    """{distribution: version} of aiconfigurator and its core, or the reason it cannot be used."""
    try:
        importlib.import_module(AIC_DIST)
    except ImportError as e:
        return f"not installed ({INSTALL_HINT}; import failed: {e})"
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for dist in (AIC_DIST, "aiconfigurator-core"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def start_aiconfigurator(points: dict[str, AicPoint]):
    """Start the child process for ``points``; a handle for ``finish_aiconfigurator``. It runs while
    our simulations do (each side is CPU-bound and single-threaded for the most part)."""
    if not points:
        return None, {}
    vers = aic_versions()
    if isinstance(vers, str):
        return None, {n: {"error": vers} for n in points}
    env = dict(os.environ, AICONFIGURATOR_LOG_LEVEL="ERROR")
    proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    return (proc, json.dumps([[n, p.kwargs()] for n, p in points.items()]), time.monotonic()), points


def finish_aiconfigurator(handle, points, timeout_s: float) -> dict[str, dict]:
    """{name: {"ok": result} | {"error": reason}} for every point of ``start_aiconfigurator``."""
    if handle is None:
        return points  # already the answers (nothing to run, or why it cannot run)
    proc, payload, t0 = handle
    left = max(1.0, timeout_s - (time.monotonic() - t0))
    try:
        stdout, stderr = proc.communicate(payload, timeout=left)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {n: {"error": f"aiconfigurator timed out after {timeout_s:.0f} s"} for n in points}
    try:
        res = json.loads(stdout)
    except json.JSONDecodeError:
        tail = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {n: {"error": f"aiconfigurator failed (exit {proc.returncode}): {tail}"} for n in points}
    return {n: res.get(n, {"error": "no answer from aiconfigurator"}) for n in points}


def run_aiconfigurator(points: dict[str, AicPoint], timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, dict]:
    """{name: {"ok": result} | {"error": reason}} for every point, in one child process."""
    handle, pts = start_aiconfigurator(points)
    return finish_aiconfigurator(handle, pts, timeout_s)


def aic_metric(p: AicPoint, res: dict) -> float:
    """The published figure's quantity out of one estimate (see the module docstring)."""
    if p.mode == "static_ctx":
        # seq/s = whole batch / TTFT; every prompt token counts (cached ones too, as the claims do)
        per_gpu = res["raw"]["seq/s"] * p.isl / res["raw"]["num_total_gpus"]
    else:
        per_gpu = res["raw"]["tokens/s/gpu"]
    if p.metric in ("input_tps_per_node", "output_tps_per_node"):
        return per_gpu * p.gpus_per_node
    if p.metric == "output_tps_per_gpu":
        return per_gpu
    if p.metric == "output_tps_per_user":
        return res["raw"]["tokens/s/user"]
    raise ValueError(f"AicPoint.metric: unknown {p.metric!r}")


def _short(err: str, n: int = 260) -> str:
    err = " ".join(err.split())
    if "Cross-node EP requires DeepEP A2A data" in err:  # say what it means before the raw message
        err = "no DeepEP all-to-all measurements for this many nodes in its tables -- " + err
    return err if len(err) <= n else err[: n - 3] + "..."


# ----------------------------------------------------------------------------- our side

def ours_records(experiments: set[str], claims: dict, fast: bool) -> dict[str, dict]:
    """{experiment: {record key: Record} | {"__error__": reason}} from the project's experiments."""
    out: dict[str, dict] = {}
    for name in sorted(experiments):
        try:
            mod = importlib.import_module(f"dsref.experiments.{name}")
        except ImportError as e:
            out[name] = {"__error__": f"experiment {name} not available ({e})"}
            continue
        try:
            out[name] = {r.key: r for r in mod.run(claims, fast=fast)}
        except Exception as e:  # a broken experiment costs its rows, not the table
            out[name] = {"__error__": f"experiment {name} failed: {type(e).__name__}: {e}"}
    return out


# ----------------------------------------------------------------------------- rows

def run(claims: dict | None = None, *, fast: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
        only: list[str] | None = None) -> list[dict]:
    """One row per deployment whose claim is in the claims file (see the module docstring)."""
    claims = load_claims() if claims is None else claims
    deps = [d for d in deployments() if d.claim in claims and (not only or d.claim in only)]
    points: dict[str, AicPoint] = {}
    for d in deps:
        if d.aic is not None:
            points[d.claim] = d.aic
            if d.aic_standin is not None:
                points[d.claim + ":standin"] = d.aic_standin
    handle, pts = start_aiconfigurator(points)
    try:
        recs = ours_records({d.experiment for d in deps if d.experiment}, claims, fast)
    except BaseException:
        if handle is not None:
            handle[0].kill()
        raise
    aic = finish_aiconfigurator(handle, pts, timeout_s)
    return [_row(d, claims[d.claim], recs, aic) for d in deps]


def _published(d: Deployment, claim: dict) -> float | None:
    if d.published is not None:
        return d.published
    v = claim.get("value")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _row(d: Deployment, claim: dict, recs: dict, aic: dict) -> dict:
    published = _published(d, claim)
    notes = [d.note] if d.note else []
    ours = None
    if d.scenario is None:
        ours_why = "no scenario: the project does not model this deployment yet"
    else:
        got = recs.get(d.experiment, {})
        rec = got.get(f"{d.claim}:{d.part}" if d.part else d.claim)
        if "__error__" in got:
            ours_why = got["__error__"]
        elif rec is None:
            ours_why = f"experiment {d.experiment} returns no record for {d.claim}"
        elif rec.predicted is None:
            ours_why = f"not modelled: {rec.note}"
        else:
            ours, ours_why = rec.predicted, ""
            notes.append(f"ours: {d.scenario} via experiments/{d.experiment}.py ({rec.reading or rec.note})")
    aic_value, aic_why, aic_standin, used = None, "", "", d.aic
    if d.aic is None:
        aic_why = "no aiconfigurator inputs for this deployment"
    else:
        res = aic.get(d.claim, {"error": "not run"})
        used = d.aic
        if "error" in res and d.aic_standin is not None and "not installed" not in res["error"]:
            refusal = res["error"]
            res = aic.get(d.claim + ":standin", {"error": "not run"})
            used = d.aic_standin
            notes.append(f"aiconfigurator refused the published shape ({_short(refusal, 200)})")
        if "error" in res:
            aic_why = _short(res["error"])
        else:
            aic_value = aic_metric(used, res["ok"])
            aic_standin = used.standin
            ok = res["ok"]
            extra = f"TTFT {ok['ttft_ms']:.0f} ms" if used.mode == "static_ctx" else f"TPOT {ok['tpot_ms']:.1f} ms"
            notes.append(f"aiconfigurator: {used.describe()} -> {extra} ({used.backend} tables {ok['backend_version']})")
            if used.label:
                notes.append(used.label)
            if used.kvcache_quant == "fp8":
                notes.append(KV_NOTE)
            if ok.get("comm_fallbacks"):
                notes.append("aiconfigurator substituted measured comm topology: " + "; ".join(ok["comm_fallbacks"]))
            if ok.get("kv_cache_warning"):
                notes.append("aiconfigurator warning: " + _short(ok["kv_cache_warning"], 160))
    return {
        "claim": d.claim, "role": claim.get("role", ""), "unit": claim.get("unit", ""),
        "hardware": claim.get("hardware", ""), "scenario": d.scenario,
        "published": published, "ours": ours, "ours_error": signed_error(ours, published),
        "ours_why": ours_why, "aiconfigurator": aic_value,
        "aiconfigurator_error": signed_error(aic_value, published), "aiconfigurator_why": aic_why,
        "aiconfigurator_standin": aic_standin,
        "aiconfigurator_kv": "FP8 KV for BF16" if aic_value is not None and used.kvcache_quant == "fp8" else "",
        "notes": "; ".join(n for n in notes if n), "sources": list(d.sources) or [claim.get("source", "")],
    }


# ----------------------------------------------------------------------------- report

def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"


def _err(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:+.0f}%"


def summary(rows: list[dict]) -> dict:
    """Mean |error| of each tool over the rows where both have a number (like for like)."""
    both = [r for r in rows if r["ours_error"] is not None and r["aiconfigurator_error"] is not None]
    mean = (lambda xs: sum(abs(x) for x in xs) / len(xs) if xs else None)
    same = [r for r in both if not r["aiconfigurator_standin"]]
    return {"rows_both": len(both),
            "ours_mean_abs_error": mean([r["ours_error"] for r in both]),
            "aiconfigurator_mean_abs_error": mean([r["aiconfigurator_error"] for r in both]),
            "rows_like_for_like": len(same),
            "like_for_like_ours_mean_abs_error": mean([r["ours_error"] for r in same]),
            "like_for_like_aiconfigurator_mean_abs_error": mean([r["aiconfigurator_error"] for r in same]),
            "closer": {r["claim"]: ("ours" if abs(r["ours_error"]) < abs(r["aiconfigurator_error"]) else "aiconfigurator")
                       for r in both}}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("deepseek-ref")
    except PackageNotFoundError:
        ours = "unknown (not installed)"
    commit = ""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        # the simulator's numbers come from the working tree, which may hold uncommitted edits
        if commit and subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                     capture_output=True, text=True, timeout=10).stdout.strip():
            commit += " + uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        pass
    aic = aic_versions()
    return {"deepseek-ref": ours + (f" (git {commit})" if commit else ""), "python": platform.python_version(),
            **(aic if isinstance(aic, dict) else {AIC_DIST: aic})}


def markdown(rows: list[dict], command: str, vers: dict) -> str:
    s = summary(rows)
    lines = [
        "# aiconfigurator side by side with the simulator",
        "",
        f"Generated by `{command}`; do not edit by hand.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        "",
        "Both tools predict the same published DeepSeek-V3/R1 serving points on NVIDIA GPUs. Error = "
        "(predicted - published) / published. **ours**: the record the project's own experiment returns for "
        "the claim (the number `dsref validate` shows), from `sim.serve` on the named scenario. "
        "**aiconfigurator**: NVIDIA's aiconfigurator (`pip install 'deepseek-ref[peer]'`, "
        f"pinned {AIC_DIST}=={AIC_PINNED}), static single-phase estimate (`static_ctx` for prefill, `static_gen` "
        "for decode) at the published batch, from its per-operation tables measured on real GPUs. A '-' comes "
        "with its reason under the table. The last column says what aiconfigurator ran in place of the "
        "published deployment where it could not describe it (no H800, no DeepSeek engine, DeepEP tables up to "
        "8 H100 nodes, SGLang MLA tables with an FP8 KV cache only): such errors are not like for like.",
        "",
        "| claim | hardware | published | ours | ours error | aiconfigurator | aiconfigurator error | aiconfigurator stand-in |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['claim']}` | {r['hardware']} | {_num(r['published'])} | {_num(r['ours'])} | "
                     f"{_err(r['ours_error'])} | {_num(r['aiconfigurator'])} | {_err(r['aiconfigurator_error'])} | "
                     f"{'-' if r['aiconfigurator'] is None else '; '.join(filter(None, (r['aiconfigurator_standin'], r['aiconfigurator_kv'])))} |")
    lines.append("")
    if s["rows_both"]:
        closer = ", ".join(f"`{k}` {v}" for k, v in s["closer"].items())
        lines += [f"Over the {s['rows_both']} rows where both tools give a number: mean |error| ours "
                  f"{s['ours_mean_abs_error'] * 100:.0f}%, aiconfigurator {s['aiconfigurator_mean_abs_error'] * 100:.0f}% "
                  f"(closer: {closer})."]
        if s["rows_like_for_like"]:
            lines.append(f"Like for like (same GPU, EP size and engine; only the KV cache dtype differs), "
                         f"{s['rows_like_for_like']} row{'s' if s['rows_like_for_like'] > 1 else ''}: ours "
                         f"{s['like_for_like_ours_mean_abs_error'] * 100:.0f}%, aiconfigurator "
                         f"{s['like_for_like_aiconfigurator_mean_abs_error'] * 100:.0f}%.")
        lines.append("")
    lines += ["Reading it: " + READING, ""]
    lines += ["## Notes per row", ""]
    for r in rows:
        lines.append(f"- `{r['claim']}` ({r['unit']}; role {r['role'] or '-'}; scenario {r['scenario'] or 'none'}): "
                     f"{r['notes'] or '-'}")
        if r["ours_why"]:
            lines.append(f"  - ours: {r['ours_why']}")
        if r["aiconfigurator_why"]:
            lines.append(f"  - aiconfigurator: {r['aiconfigurator_why']}")
        lines.append(f"  - source: {'; '.join(r['sources'])}")
    lines += ["", "## Published serving points not compared", ""]
    lines += [f"- `{k}`: {v}" for k, v in NOT_COMPARED.items()]
    missing = [d.claim for d in deployments() if d.claim not in {r["claim"] for r in rows}]
    if missing:
        lines += ["", "Listed in `deployments()` but not in the claims file when this page was made: "
                  + ", ".join(f"`{m}`" for m in missing) + "."]
    return "\n".join(lines) + "\n"


#: What a reader needs to weigh the two columns (checked in aiconfigurator 0.12.0's source, not guessed).
READING = (
    "mechanisms behind the aiconfigurator column, from its source. Its DeepSeek graph "
    "(aiconfigurator_core/sdk/models/deepseek.py) overlaps only the routed and shared experts of a decode "
    "step; we found no two-micro-batch overlap of compute with the DeepEP all-to-all for SGLang wide EP (its "
    "only ping-pong model is the separate 'afd' mode), while the H800 and H100 deployments overlap two "
    "micro-batches: its steps pay the all-to-all in full. Its single-point estimate has no EPLB option (its sweep tasks "
    "default to enable_eplb=False). A stand-in EP64 puts more routed experts on each GPU than the published "
    "EP72/EP144 (more expert weight read per decode step). Our simulator models the overlap "
    "(two_microbatch_overlap in the scenarios).")


# ----------------------------------------------------------------------------- CLI

DESCRIPTION = """\
Predict published DeepSeek-V3/R1 serving deployments on NVIDIA GPUs (DeepSeek's Day-6 H800
figures and prefill profile, LMSYS's SGLang H100 and GB200 runs) with this project's simulator and with NVIDIA's
aiconfigurator, and tabulate both errors against the published figures.

aiconfigurator is optional (pip install 'deepseek-ref[peer]'); without it its column says
"not installed" and the table is still made. Our side runs the project's experiments
(simulations of a few minutes; --fast for short ones)."""

EPILOG = """\
examples:
  python -m dsref.experiments.peer_aiconfigurator                 # print the table
  python -m dsref.experiments.peer_aiconfigurator --out docs/peer_aiconfigurator.md
  python -m dsref.experiments.peer_aiconfigurator --json --fast   # rows as JSON, short simulations"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default also prints the usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "python -m dsref.experiments.peer_aiconfigurator") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="FILE.md", default=None,
                   help="write the markdown table to FILE.md (the repository's is docs/peer_aiconfigurator.md); "
                        "without it the table is printed")
    p.add_argument("--json", action="store_true", help="print the rows and the summary as one JSON object")
    p.add_argument("--fast", action="store_true", help="short simulations on our side (quick check, less accurate)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds allowed for all aiconfigurator estimates together (default {DEFAULT_TIMEOUT_S:.0f})")
    p.add_argument("--claim", action="append", default=None, metavar="ID",
                   help="only this claim id (repeatable); one of: " + ", ".join(d.claim for d in deployments()))
    return p


def main(argv=None, prog: str | None = None) -> int:
    """The command line (``dsref peer aiconfigurator ...`` or ``python -m ...``); exit 0, or 2 on bad input."""
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout: must be > 0 seconds, got {args.timeout}")
    known = [d.claim for d in deployments()]
    for c in args.claim or []:
        if c not in known:
            parser.error(f"--claim {c}: not one of the deployments ({', '.join(known)})")
    if args.out is not None:
        if not args.out.strip():
            parser.error("--out: empty path")
        if os.path.isdir(args.out):
            parser.error(f"--out {args.out}: is a directory; give a file name")
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):  # checked before minutes of simulation, not after
            parser.error(f"--out {args.out}: folder {parent} does not exist")
    rows = run(fast=args.fast, timeout_s=args.timeout, only=args.claim)
    vers = versions()
    shown = [parser.prog] + list(sys.argv[1:] if argv is None else argv)
    if args.json:
        print(json.dumps({"versions": vers, "rows": rows, "summary": summary(rows),
                          "deployments": [asdict(d) for d in deployments()]}, indent=1))
    text = markdown(rows, " ".join(shown), vers)
    if args.out is not None:
        try:
            from dsref.reference.atomic import atomic_open
            with atomic_open(args.out, "w", encoding="utf-8") as f:  # a killed run leaves the old report
                f.write(text)
        except OSError as e:
            print(f"{parser.prog}: error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
            return 2
    elif not args.json:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
