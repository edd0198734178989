"""A scenario resolved once: model, quantisation, hardware, parallel layout, KV capacity, step costs.

``resolve(scenario)`` looks the model up (reference.presets), the quantisation
(sim.quant), the node or cluster (hwmodels), checks everything that needs them
(errors name the scenario's file and field, as sim.scenario does for the
structure) and returns a ``Deployment``: what ``sim serve`` (sim.serve.ServeSim)
and ``sim train`` (sim.train.TrainSim) run. A scenario is resolved when it is
loaded (its errors surface there) and the result is kept with it, so each
scenario is resolved exactly once.

Serving: per role (prefill / decode / aggregated) the parallel layout, the KV
capacity = (device memory - weights per device under the layout - activation
reserve) / KV bytes per token, and the step costs (sim.stepcost, built on first
use: fitting the cost tables is the expensive part). Training: the layout of the
whole run (dp = devices / (pp x tp); EP spans DP ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from dsref.hwmodels.catalog import CatalogError
from dsref.hwmodels.systems import Cluster, load_system
from dsref.reference.config import ConfigError, ModelConfig
from dsref.reference.presets import load_config
from dsref.sim.local import activation_bytes, v4_memory, v4_quant
from dsref.sim.moe_stats import zipf_shares
from dsref.sim.parallel import Parallelism
from dsref.sim.quant import Quant, get_quant
from dsref.sim.scenario import Scenario, _err, _pos
from dsref.sim.stepcost import OpTable, StepCost

# (phase, MLA form, logits) of the serving step costs: prefill in the naive (expanded) MLA form
# with logits of the last position only, decode in the absorbed form (DeepSeek's choice).
SERVE_PHASES = (("prefill", "naive", "last"), ("decode", "absorbed", "all"))
# DeepSeek-V3.2 runs DSA in MLA's MQA (absorbed) mode for prefill too (DeepSeek-V3.2-Exp paper,
# sec. 1 "Instantiate DSA under MLA"); for short prefills it "specially implement[s] a masked MHA
# mode to simulate DSA" (Figure 3's caption): V3's naive form with the selection as a mask, plus
# the indexer. Both are fitted ('prefill', 'prefill_mha'); a prefill step runs the cheaper one.
SPARSE_SERVE_PHASES = (("prefill", "absorbed", "last"), ("decode", "absorbed", "all"),
                       ("prefill_mha", "naive", "last"))


# DeepSeek-V4 has no MLA forms (costmodel_v4 costs one attention); the form is a table key only.
V4_SERVE_PHASES = (("prefill", "v4", "last"), ("decode", "v4", "all"))


def is_v4(cfg) -> bool:
    return cfg.arch == "deepseek_v4"


def serve_phases(cfg: ModelConfig) -> tuple:
    """(phase, MLA form, logits) of the serving step costs of ``cfg``."""
    if is_v4(cfg):
        return V4_SERVE_PHASES
    return SPARSE_SERVE_PHASES if cfg.has_indexer else SERVE_PHASES


@dataclass
class Deployment:
    """What one scenario runs on; built by ``resolve``. ``roles``: serving roles in this mode;
    ``par``: their layouts (training: the one key 'train'); ``capacity``: KV capacity per role."""

    sc: Scenario
    cfg: ModelConfig
    quant: Quant
    node: object
    cluster: object | None
    device: object
    latency_s: dict
    roles: tuple[str, ...] = ()
    par: dict[str, Parallelism] = field(default_factory=dict)
    capacity: dict[str, dict] = field(default_factory=dict)
    _costs: dict = field(default_factory=dict, repr=False)
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def link_node(self):
        """The node whose links carry the traffic; None when devices are split (the catalog's
        link bandwidths are per package: the split device's own figures apply)."""
        return self.node if self.sc.device_split == 1 else None

    def step_costs(self, role: str) -> dict[str, StepCost]:
        """{'prefill', 'decode', 'mtp'} step costs of a serving role (the MTP module = the last
        layer + head in the decode form), fitted once per deployment; V3.2 adds 'prefill_mha';
        DeepSeek-V4 has no 'mtp'."""
        if role not in self._costs:
            par, c = self.par[role], {}
            r = self.sc.instance(role)
            shares = (zipf_shares(self.cfg.n_routed_experts, r.routing_zipf)
                      if r.routing_zipf > 0 and self.cfg.is_moe else None)
            for phase, form, logits in serve_phases(self.cfg):
                if (phase, form) not in self._tables:
                    self._tables[(phase, form)] = OpTable.build(self.cfg, self.quant, self.device, mla_form=form,
                                                                logits=logits)
                kind = phase.split("_")[0]  # prefill_mha: a prefill step
                c[phase] = StepCost(self.cfg, self.quant, self.device, par, mla_form=form, logits=logits,
                                    node=self.link_node, latency_s=self.latency_s, table=self._tables[(phase, form)],
                                    phase=kind, cuda_graph=uses_cuda_graph(r.cuda_graph, kind),
                                    routing_shares=shares, kernel_floors=self.sc.kernel_floors)
            L = self.cfg.num_hidden_layers
            if is_v4(self.cfg):  # V4's MTP is not costed: _check_instance refuses MTP for it
                self._costs[role] = c
                return c
            c["mtp"] = StepCost(self.cfg, self.quant, self.device, par, mla_form="absorbed", logits="all",
                                node=self.link_node, latency_s=self.latency_s, layers=(L - 1, L),
                                table=self._tables[("decode", "absorbed")],
                                cuda_graph=uses_cuda_graph(r.cuda_graph, "decode"), routing_shares=shares,
                                kernel_floors=self.sc.kernel_floors)
            self._costs[role] = c
        return self._costs[role]


CUDA_GRAPH_MODES = ("auto", "on", "off")


def uses_cuda_graph(mode: str, phase: str) -> bool:
    """Whether a step's kernels replay from a captured graph: 'on' / 'off', or 'auto' = decode steps
    (SGLang, vLLM and TensorRT-LLM capture decode batches; prefill shapes vary and run eagerly)."""
    if mode == "auto":
        return phase == "decode"
    return mode == "on"


def mtp_depths(r) -> tuple[float, ...]:
    """Per-depth conditional acceptance of an instance's MTP drafts (empty: MTP off)."""
    if r.mtp_acceptance_per_depth:
        return tuple(r.mtp_acceptance_per_depth)
    return (r.mtp_acceptance,) if r.mtp_acceptance > 0 else ()


def mtp_tokens_per_step(depths) -> float:
    """Expected tokens a sequence gains per decode step with drafts accepted at ``depths``:
    1 (the verified token) + a1 + a1 a2 + ... (a draft counts only if every earlier one did)."""
    out, run = 1.0, 1.0
    for a in depths:
        run *= a
        out += run
    return out


def resolve(sc: Scenario) -> Deployment:
    """The scenario's Deployment (resolved once, then kept with the scenario)."""
    dep = sc._deployment
    if dep is None:
        dep = _resolve_serve(sc) if sc.kind == "serve" else _resolve_train(sc)
        object.__setattr__(sc, "_deployment", dep)
    return dep


# ------------------------------------------------------------------ lookups
def _model(sc: Scenario) -> ModelConfig:
    try:
        return load_config(sc.model)
    except (ConfigError, ValueError, KeyError) as e:
        raise _err(sc.source, "model", f"unknown model {sc.model!r} ({e})") from None


def _quant(sc: Scenario) -> Quant:
    try:
        q = get_quant(sc.quant)
    except ValueError as e:
        raise _err(sc.source, "quant", str(e)) from None
    if sc.kv_dtype:
        try:
            q = get_quant(sc.quant, kv_dtype=sc.kv_dtype)
        except ValueError as e:
            raise _err(sc.source, "kv_dtype", str(e)) from None
    return q


def _v4_quant(sc: Scenario, q: Quant) -> Quant:
    """V4 is costed at its release storage (FP8 + FP4 experts): sim.local.v4_quant's rule, naming the field."""
    try:
        return v4_quant(q)
    except ValueError as e:
        raise _err(sc.source, "quant", f"model {sc.model}: {e}") from None


def _system(sc: Scenario):
    """(node, cluster or None, device) with device_split applied."""
    try:
        s = load_system(sc.system)
    except (CatalogError, FileNotFoundError, OSError, ValueError) as e:
        raise _err(sc.source, "system", _system_help(sc.system, e)) from None
    node, cluster = (s.node, s) if isinstance(s, Cluster) else (s, None)
    split = getattr(sc, "device_split", 1)  # a training scenario runs whole devices
    dev = node.device if split == 1 else split_device(node.device, split)
    return node, cluster, dev


def _system_help(name: str, err: Exception) -> str:
    """Why ``system`` is not a system: a device id gets told so and how to use one; else the known systems."""
    from dsref.hwmodels.catalog import DEVICES_DIR
    from dsref.hwmodels.systems import list_systems
    try:
        systems = list_systems()
    except (CatalogError, OSError):
        systems = []
    known = f"systems: {', '.join(s.name for s in systems)}" if systems else f"({err})"
    if str(name).strip() and "/" not in str(name) and (DEVICES_DIR / f"{name}.toml").is_file():
        nodes = [s.name for s in systems if getattr(s, "node", s).device.id == name]
        use = f" such as {', '.join(nodes)}" if nodes else ""
        return (f"{name!r} is a device, not a system; a scenario runs on a node or cluster preset{use} "
                f"(hwmodels/data/systems/*.toml name their device; a one-device system is a node file with "
                f"devices_per_node = 1; one device alone: `dsref sim local --device {name}`); {known}")
    return f"unknown system {name!r}; {known}"


def _latency_s(cluster) -> dict:
    """Per-call network latency from the cluster preset (max_latency, else hop_latency), else none."""
    if cluster is None:
        return {}
    lat = cluster.max_latency_s or cluster.hop_latency_s
    return {"inter": lat} if lat else {}


def _base(sc: Scenario) -> Deployment:
    cfg = _model(sc)
    quant = _quant(sc)
    if is_v4(cfg):
        if sc.kind != "serve":
            raise _err(sc.source, "model", f"{cfg.name}: training step costs of a DeepSeek-V4 model are not "
                       "modelled (`dsref sim serve` and `sim local` take V4)")
        quant = _v4_quant(sc, quant)
    node, cluster, dev = _system(sc)
    return Deployment(sc, cfg, quant, node, cluster, dev, _latency_s(cluster))


# ------------------------------------------------------------------ serving
def _resolve_serve(sc: Scenario) -> Deployment:
    dep = _base(sc)
    dep.roles = sc.roles
    for role in dep.roles:
        _check_instance(dep, role)
    return dep


def _instance_devices(dep: Deployment, role: str) -> int:
    r = dep.sc.instance(role)
    return r.devices if r.devices > 0 else r.nodes * dep.node.devices_per_node * dep.sc.device_split


def _check_instance(dep: Deployment, role: str) -> None:
    sc, cfg, dev = dep.sc, dep.cfg, dep.device
    s, r = sc.source, sc.instance(role)
    for k in ("instances", "tp", "ep", "pp", "token_budget_per_device", "max_batch_per_device"):
        _pos(sc, f"{role}.{k}", getattr(r, k))
    for k in ("nodes", "devices", "attn_dp", "redundant_experts", "node_limit", "max_requests_per_step", "moe_tp"):
        _pos(sc, f"{role}.{k}", getattr(r, k), True)
    n = _instance_devices(dep, role)
    if n <= 0:
        raise _err(s, f"{role}.nodes", "the instance has zero devices")
    if not 0.0 <= r.mtp_acceptance < 1.0:
        raise _err(s, f"{role}.mtp_acceptance", f"must be in [0, 1), got {r.mtp_acceptance}")
    depth = r.mtp_acceptance_per_depth
    if len(depth) > 8 or any(not 0.0 < a <= 1.0 for a in depth):
        raise _err(s, f"{role}.mtp_acceptance_per_depth",
                   f"must list 1 to 8 acceptance rates in (0, 1], got {list(depth)}")
    fld = "mtp_acceptance_per_depth" if depth else "mtp_acceptance"
    if mtp_depths(r) and cfg.num_nextn_predict_layers < 1:
        raise _err(s, f"{role}.{fld}", f"model {cfg.name} has no MTP module")
    if mtp_depths(r) and is_v4(cfg):
        raise _err(s, f"{role}.{fld}", f"model {cfg.name}: DeepSeek-V4's MTP module is not costed "
                   "(sim/costmodel_v4.py counts the main layers); set it to 0 / [] for V4")
    if r.cuda_graph not in CUDA_GRAPH_MODES:
        raise _err(s, f"{role}.cuda_graph", f"must be one of {', '.join(CUDA_GRAPH_MODES)}, got {r.cuda_graph!r}")
    if r.routing_zipf < 0 or r.routing_zipf > 4:
        raise _err(s, f"{role}.routing_zipf", f"must be in [0, 4] (0 = uniform routing), got {r.routing_zipf}")
    tp, pp, ep = r.tp, r.pp, r.ep
    dp = r.attn_dp or n // (tp * pp)
    if dp * tp * pp != n:
        raise _err(s, f"{role}.attn_dp", f"attn_dp {dp} x tp {tp} x pp {pp} must equal the {n} devices")
    if ep > n:
        raise _err(s, f"{role}.ep", f"EP degree {ep} exceeds the {n} devices of the instance")
    if cfg.is_moe:
        slots = cfg.n_routed_experts + r.redundant_experts
        if slots % ep:
            raise _err(s, f"{role}.ep", f"EP degree {ep} does not divide the {slots} expert slots "
                       f"({cfg.n_routed_experts} routed + {r.redundant_experts} redundant)")
    elif ep > 1:
        raise _err(s, f"{role}.ep", f"model {cfg.name} has no experts")
    if cfg.num_hidden_layers < pp:
        raise _err(s, f"{role}.pp", f"{pp} stages for {cfg.num_hidden_layers} layers")
    moe_tp = r.moe_tp or (tp // ep if cfg.is_moe and tp % ep == 0 else 1)
    if cfg.is_moe and (ep * moe_tp > n or n % (ep * moe_tp)):
        raise _err(s, f"{role}.moe_tp", f"ep {ep} x moe_tp {moe_tp} must divide the {n} devices of the instance")
    if cfg.is_moe and cfg.moe_intermediate_size % moe_tp:
        raise _err(s, f"{role}.moe_tp", f"moe_tp {moe_tp} does not divide the experts' width "
                   f"{cfg.moe_intermediate_size}")
    par = dep.par[role] = Parallelism(
        devices=n, dp=dp, tp=tp, ep=ep, pp=pp,
        expert_slots=(cfg.n_routed_experts + r.redundant_experts) if cfg.is_moe else 0,
        devices_per_node=sc.scaleup_devices or dep.node.devices_per_node * sc.device_split,
        node_limit=r.node_limit or None, moe_tp=moe_tp if cfg.is_moe else 1)
    cap = dep.capacity[role] = _kv_capacity(dep, role, par)
    if cap["kv_tokens_per_device"] < 1:
        raise _err(s, f"{role}.nodes", f"model does not fit in memory: weights {cap['weight_bytes_per_device'] / 1e9:.1f}"
                   f" GB + activation reserve {cap['activation_reserve_bytes'] / 1e9:.1f} GB per device "
                   f"exceed the {dev.memory_bytes / 1e9:.1f} GB of a {dev.id}")


def _kv_capacity(dep: Deployment, role: str, par: Parallelism) -> dict:
    """KV-cache tokens per device = (memory - weights under the layout - activation reserve) / KV bytes per token.

    DeepSeek-V4: a sequence of c tokens holds the sliding windows (min(W, c) entries per layer)
    plus floor(c / m) compressed entries per compressed layer (costmodel_v4.kv_cache_bytes). The
    simulator books KV in tokens, linearly, so a V4 request is booked as c + ``kv_fixed_tokens``
    tokens of kv_bytes_per_token (ModelConfigV4.kv_cache_bytes_per_token, the compressed part)
    where kv_fixed_tokens = the full windows' bytes / kv_bytes_per_token: never below its real
    cache (min(W, c) <= W, floor(c / m) m <= c), above it by less than the window below W tokens
    and one block per compressed layer (tests/test_sim_v4.py)."""
    cfg, q, r = dep.cfg, dep.quant, dep.sc.instance(role)
    if is_v4(cfg):
        w = v4_weight_bytes_per_device(cfg, par)["total"]
    else:
        w = par.weight_bytes_per_device(cfg, q)["total"]
    reserve = r.activation_reserve_bytes
    if reserve < 0:
        reserve = (v4_memory(cfg, q, 1, 1, r.token_budget_per_device)["activation_bytes"] if is_v4(cfg)
                   else activation_bytes(cfg, q, 1, r.token_budget_per_device))
    per_tok = cfg.kv_cache_bytes_per_token(q.kv_bytes) / par.pp
    fixed = cfg.kv_window_bytes(q.kv_bytes) / par.pp / per_tok if is_v4(cfg) else 0.0
    free = dep.device.require("memory_bytes") - w - reserve
    return {"weight_bytes_per_device": w, "activation_reserve_bytes": reserve,
            "kv_bytes_per_token": per_tok, "kv_fixed_tokens": fixed, "kv_tokens_per_device": max(0.0, free) // per_tok,
            "kv_tokens_per_instance": max(0.0, free) // per_tok * par.dp}


def v4_weight_bytes_per_device(cfg, par: Parallelism) -> dict[str, float]:
    """Parallelism.weight_bytes_per_device for DeepSeek-V4, from the release bytes of
    costmodel_v4.weight_split (FP8 + FP4 experts, scales and hash tables included): routed experts
    split over the expert slots / ep and moe_tp, everything else divided by TP; the layers divided
    by PP (the mean stage), the globals not (as Parallelism.weight_bytes_per_device)."""
    from dsref.sim.costmodel_v4 import weight_split
    b = weight_split(cfg)
    E = cfg.n_routed_experts
    expert = b["experts"] / E * par.slots(cfg) / max(par.ep, 1) / max(par.moe_tp, 1) / par.pp
    other, glob = b["non_expert"] / par.tp / par.pp, b["globals"] / par.tp
    return {"experts": expert, "non_expert": other, "globals": glob, "total": expert + other + glob}


# ------------------------------------------------------------------ training
def _train_devices(dep: Deployment) -> int:
    d = dep.sc
    if d.devices:
        return d.devices
    if d.nodes:
        return d.nodes * dep.node.devices_per_node
    return dep.cluster.num_devices if dep.cluster is not None else dep.node.devices_per_node


def _resolve_train(sc: Scenario) -> Deployment:
    dep = _base(sc)
    d, s, cfg, dev = sc, sc.source, dep.cfg, dep.device
    for k in ("pp", "ep", "tp", "seq_len", "global_batch", "micro_batch", "token_budget"):
        _pos(sc, k, getattr(d, k))
    for k in ("seed", "nodes", "devices"):
        _pos(sc, k, getattr(d, k), True)
    if d.nodes and dep.cluster is not None and d.nodes > dep.cluster.num_nodes:
        raise _err(s, "nodes", f"{d.nodes} nodes exceed the {dep.cluster.num_nodes} of system {d.system}")
    n = _train_devices(dep)
    if n <= 0:
        raise _err(s, "devices", "zero devices")
    if d.schedule not in ("dualpipe", "1f1b"):
        raise _err(s, "schedule", f"must be 'dualpipe' or '1f1b', got {d.schedule!r}")
    if d.recompute not in ("none", "selective", "full"):
        raise _err(s, "recompute", f"must be none, selective or full, got {d.recompute!r}")
    if d.stage_split not in ("even", "balanced"):
        raise _err(s, "stage_split", f"must be 'even' or 'balanced', got {d.stage_split!r}")
    if n % (d.pp * d.tp):
        raise _err(s, "pp", f"pp {d.pp} x tp {d.tp} does not divide the {n} devices")
    dp = n // (d.pp * d.tp)
    if cfg.is_moe and cfg.n_routed_experts % d.ep:
        raise _err(s, "ep", f"EP degree {d.ep} does not divide the {cfg.n_routed_experts} experts")
    if d.ep > dp:
        raise _err(s, "ep", f"EP degree {d.ep} exceeds the data-parallel degree {dp} (EP spans DP ranks)")
    if d.pp > cfg.num_hidden_layers:
        raise _err(s, "pp", f"{d.pp} stages for {cfg.num_hidden_layers} layers")
    per_rank = d.global_batch / dp
    if per_rank != int(per_rank) or int(per_rank) % d.micro_batch:
        raise _err(s, "global_batch", f"{d.global_batch} sequences do not split into DP {dp} ranks x "
                   f"micro-batches of {d.micro_batch}")
    m = int(per_rank) // d.micro_batch
    rc = d.comm_reserved_cores
    if rc < 0 or (rc and (dev.cores is None or rc >= dev.cores)):
        raise _err(s, "comm_reserved_cores", f"{rc} reserved of the device's {dev.cores} cores "
                   f"({dev.source_file}: field 'cores')")
    if d.mtp and cfg.num_nextn_predict_layers < 1:
        raise _err(s, "mtp", f"model {cfg.name} has no MTP module (num_nextn_predict_layers = 0)")
    if not 0.0 < d.goodput <= 1.0:
        raise _err(s, "goodput", f"must be in (0, 1], got {d.goodput}")
    if d.schedule == "dualpipe":
        if d.pp % 2:
            raise _err(s, "pp", "DualPipe needs an even number of stages")
        if m % 2 or m // 2 < d.pp:
            raise _err(s, "micro_batch", f"DualPipe needs an even number of micro-batches >= 2*pp; got {m}")
    dep.par["train"] = Parallelism(devices=n, dp=dp, tp=d.tp, ep=d.ep, pp=d.pp,
                                   expert_slots=cfg.n_routed_experts, devices_per_node=dep.node.devices_per_node,
                                   node_limit=d.node_limit or None)
    return dep


def split_device(dev, n: int):
    """A catalog device run as ``n`` logical devices (e.g. the two dies of an Ascend 910C):
    peaks, memory, bandwidths, power and price divided by n (thin adapter; the catalog is per package)."""
    figs = {k: (replace(f, value=f.value / n) if f.value is not None else f) for k, f in dev.figures.items()}

    def div(x):
        return None if x is None else x / n
    return replace(dev, id=f"{dev.id}/{n}", name=f"{dev.name} (1/{n})", figures=figs,
                   peak_flops={k: v / n for k, v in dev.peak_flops.items()}, memory_bytes=div(dev.memory_bytes),
                   memory_bandwidth=div(dev.memory_bandwidth), intra_node_bandwidth=div(dev.intra_node_bandwidth),
                   network_bandwidth=div(dev.network_bandwidth), power_w=div(dev.power_w),
                   price_usd_per_hour=div(dev.price_usd_per_hour))

