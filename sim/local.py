"""Single-machine inference estimate: decode and prefill tokens/s, memory needed vs available.

Targets are a catalog device id (``h800``, ``raspberry-pi-5``, ``host`` ...) or a
node preset (``raspberry-pi-5-w7700``: a host CPU plus one accelerator;
``h800-node``: several accelerators used tensor-parallel over their fabric; a node whose
host_cpu is its own device, e.g. ``ampereone-server``, is that CPU alone).

KV-cache layout (``mla_form``, MLA models only): 'absorbed' caches the latent
(kv_lora_rank + rope dim per token and layer); 'expanded_cache' caches the expanded
keys and values (heads x (nope + rope) + heads x v_head_dim), which is what llama.cpp did
before its MLA support (ggml-org/llama.cpp PR #12801, April 2025; e.g. the DeepSeek-R1 log
in ikawrakow/ik_llama.cpp issue #285, mainline build 4905: "KV self size = 9760 MiB, K
(f16): 5856 MiB, V (f16): 3904 MiB" for 2048 cells = 128 x (192 + 128) x 2 B x 61 layers).
The memory budget and the decode/prefill bytes use the same layout.

llama.cpp runtime (quantisations with runtime 'llama.cpp'): each step also pays graph nodes x the
target's measured per-node overhead (sim/llama_cpp.py, hwmodels/data/llama_cpp_overhead.toml).

Memory needed = weights at the quantisation's real bits (sim/quant.py) + KV cache at
the given context for every sequence + the activation working set: llama.cpp
and XLA reuse one compute buffer for the graph, so it is the largest single op's
inputs + outputs in the prefill chunk plus the fp32 logits. Operating-system and
runtime reservations are not modelled (no cited figure); the margin is reported.

Expert offload (``offload="experts"``: llama.cpp ``--override-tensor "exps=CPU"``, the
ktransformers placement): the routed experts (their weights, GEMMs and SwiGLU) stay in host
memory and run on the host CPU; attention, dense and shared-expert MLPs, the head and the KV
cache sit on the accelerator. Each MoE layer sends the hidden state over PCIe to the host and
the experts' output back (two copies per MoE layer and step, each paying the link's latency).

Partial offload (llama.cpp ``-ngl``, ``offload="layers"``): when the weights do not fit in the
accelerator, the last layers go to it (llama.cpp assigns layers
[n_layer - ngl, n_layer) to the GPU); the embedding, and the output layer unless
every layer fits, stay in host memory. Ops of host layers run at the host CPU's
peaks and memory bandwidth, ops of device layers at the device's; the hidden
state crosses PCIe into the device layers, and back out unless the output layer is on
the device, in which case the fp32 logits cross instead (llama.cpp copies them to the host).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from dsref.reference.config import ModelConfig
from dsref.reference.params import EMBED, ROUTED_EXPERT, tensors
from dsref.reference.presets import load_config
from dsref.sim import costmodel, llama_cpp, roofline
from dsref.sim.comm import CommOp, tp_comm
from dsref.sim.parallel import Parallelism
from dsref.sim.quant import Quant, get_quant, model_weight_bytes, tensor_bytes

LOGITS_BYTES = 4  # fp32 logits (both llama.cpp and reference/model.py return float32)

# Largest batch and prefill chunk an estimate takes: the MoE load statistics (sim/moe_stats.py)
# tabulate a binomial over tokens x top-k, so memory and time grow with the tokens of a step
# (2^26 prefill tokens: ~3 GB, ~10 s; a 2^20 decode batch: > 24 GB). Real deployments decode a
# few thousand sequences per device; these bounds are far above that.
MAX_BATCH = 2**16
MAX_PREFILL_TOKENS = 2**26


def check_sizes(context, batch, prompt_tokens, names=("context", "batch", "prompt_tokens")) -> None:
    """ValueError naming the argument (``names``: how the caller spells them) for a non-integer,
    a value < 1, a batch > MAX_BATCH or batch x prompt_tokens > MAX_PREFILL_TOKENS."""
    for arg, v in zip(names, (context, batch, prompt_tokens)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{arg} must be an integer >= 1, got {v!r}")
    if batch > MAX_BATCH:
        raise ValueError(f"{names[1]} must be <= {MAX_BATCH:,} sequences (the MoE statistics' cost grows "
                         f"with the batch), got {batch:,}")
    if batch * prompt_tokens > MAX_PREFILL_TOKENS:
        raise ValueError(f"{names[1]} x {names[2]} = {batch * prompt_tokens:,} prefill tokens exceeds "
                         f"{MAX_PREFILL_TOKENS:,} (2^26; the MoE statistics' memory grows with the tokens "
                         "of a step)")


@dataclass(frozen=True)
class Target:
    """What runs the model: ``device`` holds the weights it can; ``host`` (a CPU
    Device) holds the rest. n_devices > 1: tensor-parallel accelerators in a node."""

    name: str
    device: object
    host: object | None = None
    host_memory_bytes: float | None = None
    host_memory_bandwidth: float | None = None
    pcie_bandwidth: float | None = None
    n_devices: int = 1
    node: object | None = None


def resolve_target(name: str) -> Target:
    """A device id / device file / 'host', else a system (node) preset."""
    from dsref.hwmodels.catalog import CatalogError, load_device
    try:
        return Target(name, load_device(name))
    except CatalogError as dev_err:
        if name == "host":  # the probe file is missing: the device error says what to run
            raise
        try:
            from dsref.hwmodels.systems import load_system
        except ImportError:  # pragma: no cover - systems module not present
            raise dev_err from None
        try:
            sys_ = load_system(name)
        except CatalogError as sys_err:
            raise ValueError(f"{name!r} is neither a device ({dev_err}) nor a system ({sys_err})") from None
    node = getattr(sys_, "node", sys_)
    if node is not sys_:
        raise ValueError(f"{name!r} is a cluster; `sim local` takes a device or a single node")
    host = node.host_cpu
    if host is not None and host.id == node.device.id:  # a CPU-only node: the CPU is the device
        if node.devices_per_node != 1:
            raise ValueError(f"{name!r}: a CPU-only node must have devices_per_node = 1")
        return Target(name, node.device, node=node)
    return Target(name, node.device, host, node.host_memory_bytes, node.host_memory_bandwidth,
                  node.pcie_bandwidth, node.devices_per_node, node)


MLA_FORMS = ("absorbed", "expanded_cache")
OFFLOADS = ("layers", "experts")
# ops that run where the routed experts' weights are (costmodel._moe_ops)
EXPERT_OPS = ("routed_experts", "routed_silu_mul", "moe_combine")


def kv_bytes_per_token(cfg: ModelConfig, quant: Quant, mla_form: str = "absorbed") -> float:
    """KV-cache bytes per token (all layers) in the given cache layout."""
    if mla_form not in MLA_FORMS:
        raise ValueError(f"mla_form must be one of {MLA_FORMS}, got {mla_form!r}")
    return cfg.kv_cache_bytes_per_token(quant.kv_bytes, absorbed=mla_form == "absorbed")


def _layer_bytes(cfg: ModelConfig, quant: Quant, context: int, batch: int, mla_form: str) -> list[float]:
    w = model_weight_bytes(cfg, quant)["layers"]
    kv_layer = kv_bytes_per_token(cfg, quant, mla_form) / cfg.num_hidden_layers * context * batch
    return [x + kv_layer for x in w]


def activation_bytes(cfg: ModelConfig, quant: Quant, batch: int, prompt_tokens: int) -> float:
    """Largest single op's activations (in + out) in the prefill chunk, plus the fp32 logits."""
    ops = costmodel.prefill_ops(cfg, quant, batch, prompt_tokens, logits="last")
    act = max(op.act_bytes_read + op.act_bytes_written for op in ops)
    return act + batch * cfg.vocab_size * LOGITS_BYTES


def memory_budget(cfg: ModelConfig, quant: Quant, tgt: Target, context: int, batch: int, prompt_tokens: int,
                mla_form: str = "absorbed", offload: str = "layers") -> dict:
    wb = model_weight_bytes(cfg, quant)
    kv = kv_bytes_per_token(cfg, quant, mla_form) * context * batch
    act = activation_bytes(cfg, quant, batch, prompt_tokens)
    required = wb["total"] + kv + act
    dev_mem = tgt.device.require("memory_bytes") * tgt.n_devices
    host_mem = tgt.host_memory_bytes if tgt.host is not None else None
    if tgt.host is not None and host_mem is None:
        host_mem = tgt.host.memory_bytes
    available = dev_mem + (host_mem or 0.0)
    out = {"weights_bytes": wb["total"], "weights_bits_per_weight": wb["bits_per_weight"], "kv_cache_bytes": kv,
           "activation_bytes": act, "memory_required_bytes": required, "memory_available_bytes": available,
           "device_memory_bytes": dev_mem, "host_memory_bytes": host_mem}
    n = cfg.num_hidden_layers
    if tgt.host is None:
        out.update(fits=required <= dev_mem, gpu_layers=n, head_on_device=True)
        return out
    if offload == "experts":
        experts = sum(tensor_bytes(cfg, quant, t) for t in tensors(cfg) if t.group == ROUTED_EXPERT)
        on_host = experts + _embed_bytes(cfg, quant)
        on_device = required - on_host
        out.update(fits=on_device <= dev_mem and on_host <= (host_mem or 0.0), gpu_layers=n, head_on_device=True,
                   bytes_on_device=on_device, bytes_on_host=on_host, offload="experts")
        return out
    # Partial offload: the device keeps the activation buffer, then the last layers that fit.
    per_layer = _layer_bytes(cfg, quant, context, batch, mla_form)
    free = dev_mem - act
    gpu_layers = 0
    for b in reversed(per_layer):
        if b > free:
            break
        free -= b
        gpu_layers += 1
    head_bytes = wb["globals"] - _embed_bytes(cfg, quant)
    head_on_device = gpu_layers == n and head_bytes <= free
    on_device = act + sum(per_layer[n - gpu_layers:]) + (head_bytes if head_on_device else 0.0)
    on_host = required - on_device
    out.update(fits=on_host <= (host_mem or 0.0), gpu_layers=gpu_layers, head_on_device=head_on_device,
               bytes_on_device=on_device, bytes_on_host=on_host)
    return out


def _embed_bytes(cfg, quant) -> float:
    """Stored bytes of the input embedding (the tensor table's row), which stays in host memory."""
    row = next(t for t in tensors(cfg) if t.name == EMBED)
    return tensor_bytes(cfg, quant, row)


def _split_time(ops, tgt: Target, gpu_layers: int, head_on_device: bool, n_layers: int, tokens: int,
                act_bytes: float, hidden: int, cfg: ModelConfig, logit_rows: int, floor_s: float = 0.0,
                offload: str = "layers"):
    """Step time with ops placed on the device or on the host (partial offload) or TP over a node."""
    first_gpu = n_layers - gpu_layers
    if tgt.host is not None and offload == "experts":
        dev_ops = [op for op in ops if op.kind != "embed" and op.name not in EXPERT_OPS]
        host_ops = [op for op in ops if op.kind == "embed" or op.name in EXPERT_OPS]
    elif tgt.host is None or gpu_layers == n_layers and head_on_device:
        dev_ops = [op for op in ops if op.kind != "embed"] if tgt.host is not None else ops
        host_ops = [op for op in ops if op.kind == "embed"] if tgt.host is not None else []
    else:
        def on_dev(op):
            if op.layer is None:
                return op.kind != "embed" and head_on_device
            return op.layer >= first_gpu
        dev_ops = [op for op in ops if on_dev(op)]
        host_ops = [op for op in ops if not on_dev(op)]
    n = tgt.n_devices
    if n > 1:  # tensor parallel: each device does 1/n of the work
        from dataclasses import replace
        dev_ops = [replace(op, flops=op.flops / n, weight_bytes=op.weight_bytes / n,
                           kv_bytes_read=op.kv_bytes_read / n, kv_bytes_written=op.kv_bytes_written / n)
                   for op in dev_ops]
    comm: list[CommOp] = []
    if n > 1:
        comm += tp_comm(cfg, tokens, Parallelism(devices=n, tp=n, devices_per_node=n), act_bytes)
    if tgt.host is not None and offload == "experts" and cfg.is_moe:
        # each MoE layer: hidden state to the host's experts and their output back
        comm.append(CommOp("pcie_expert_io", tokens * hidden * act_bytes, "pcie", "pcie",
                           count=2 * cfg.num_moe_layers))
    elif tgt.host is not None and host_ops and dev_ops:
        # into the device layers; back out to the host's output layer, or the logits come out
        comm.append(CommOp("pcie_hidden_state", tokens * hidden * act_bytes, "pcie", "pcie",
                           count=1 if head_on_device else 2))
        if head_on_device:
            comm.append(CommOp("pcie_logits", logit_rows * cfg.vocab_size * LOGITS_BYTES, "pcie", "pcie"))
    dev_t = roofline.step_time(dev_ops, tgt.device, comm, node=tgt.node, kernel_floor_s=floor_s)
    host_t = None
    if host_ops:
        host_t = roofline.step_time(host_ops, tgt.host, memory_bandwidth=tgt.host_memory_bandwidth)
    return dev_t, host_t


def _merge_kinds(*steps) -> dict:
    out: dict = {}
    for s in steps:
        if s is None:
            continue
        for k, d in s.by_kind().items():
            o = out.setdefault(k, {"time_s": 0.0, "flops": 0.0, "bytes": 0.0, "memory_bound_time_s": 0.0})
            for f in o:
                o[f] += d[f]
    for d in out.values():
        d["intensity_flop_per_byte"] = d["flops"] / d["bytes"] if d["bytes"] else None
        d["bound"] = "memory" if d["memory_bound_time_s"] >= d["time_s"] / 2 else "compute"
    return out


def framework_floors(quant: Quant, tgt: Target) -> dict:
    """A serving framework's fixed costs on the target's accelerator (hwmodels/kernels.py): every
    kernel takes at least the launch floor (decode replays a captured CUDA graph, prefill launches
    eagerly), and each step pays the host overhead. All zero for llama.cpp plans (their per-node
    cost is runtime_overhead's) and for targets without a kernel profile."""
    from dsref.sim.stepcost import device_kernel_profile
    prof = None if quant.runtime == "llama.cpp" else device_kernel_profile(tgt.device)
    if prof is None:
        return {"decode_kernel_s": 0.0, "prefill_kernel_s": 0.0, "decode_host_s": 0.0, "prefill_host_s": 0.0}
    ovh = prof.step_overhead_s or {}
    return {"decode_kernel_s": prof.launch_graph_s, "prefill_kernel_s": prof.launch_eager_s,
            "decode_host_s": ovh.get("decode", 0.0), "prefill_host_s": ovh.get("prefill", 0.0),
            "profile": prof.name}


def runtime_overhead(cfg: ModelConfig, quant: Quant, tgt: Target) -> dict:
    """Per-graph fixed cost of the runtime on this target: llama.cpp graph nodes x the
    target's measured per-node overhead; zero for other runtimes or unmeasured targets."""
    if quant.runtime != "llama.cpp":
        return {"graph_nodes": None, "per_node_s": 0.0, "per_graph_s": 0.0, "source": "not a llama.cpp plan"}
    nodes = llama_cpp.graph_nodes(cfg)
    fig = llama_cpp.per_node_overhead(tgt.name, tgt.device.id)
    if fig is None:
        return {"graph_nodes": nodes, "per_node_s": 0.0, "per_graph_s": 0.0,
                "source": f"no measured llama.cpp per-node overhead for {tgt.name} (not modelled)"}
    return {"graph_nodes": nodes, "per_node_s": fig.value, "per_graph_s": nodes * fig.value,
            "source": f"{fig.source} (confidence {fig.confidence})"}



def _no_fit_message(cfg, quant, tgt, mem: dict, available: float) -> str:
    """Why a model does not fit a target: what it needs, part by part, against what is available."""
    gb = 1e9
    return (f"{cfg.name} ({quant.name}) does not fit on {tgt.name}: needs {mem['memory_required_bytes'] / gb:.1f} GB "
            f"(weights {mem['weights_bytes'] / gb:.1f} GB + KV cache {mem['kv_cache_bytes'] / gb:.2f} GB + "
            f"activations {mem['activation_bytes'] / gb:.2f} GB), available {available / gb:.1f} GB")

def estimate(model: str | ModelConfig, device: str, quant: str = "bf16", *, context: int = 4096, batch: int = 1,
             prompt_tokens: int = 512, mla_form: str = "absorbed", offload: str = "layers") -> dict:
    """Decode and prefill throughput and the memory budget of ``model`` on ``device``.

    context: tokens in the KV cache during decode (and the cache to allocate);
    prompt_tokens: the prefill length; mla_form: the KV-cache layout of MLA models
    ('absorbed' latent or llama.cpp's pre-April-2025 'expanded_cache'); offload: on a host +
    accelerator node, 'layers' (llama.cpp -ngl: the last layers that fit on the accelerator) or
    'experts' (routed experts on the host CPU, the rest on the accelerator). Returns a JSON-ready dict.
    """
    check_sizes(context, batch, prompt_tokens)
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {', '.join(OFFLOADS)}, got {offload!r}")
    cfg = load_config(model) if isinstance(model, str) else model
    if cfg.arch == "deepseek_v4":
        if offload != "layers":
            raise ValueError(f"offload {offload!r}: host offload is not modelled for DeepSeek-V4")
        return estimate_v4(cfg, device, quant, context=context, batch=batch, prompt_tokens=prompt_tokens)
    quant = get_quant(quant)
    tgt = resolve_target(device)
    if cfg.arch != "deepseek":
        mla_form = "absorbed"  # no MLA: the GQA cache has one layout
    if offload == "experts" and not (cfg.is_moe and tgt.host is not None):
        raise ValueError(f"offload 'experts' needs an MoE model and a host + accelerator node "
                         f"(model {cfg.name}, target {tgt.name})")
    mem = memory_budget(cfg, quant, tgt, context, batch, prompt_tokens, mla_form, offload)
    out = {"model": cfg.name, "device": tgt.name, "quant": quant.name, "context": context, "batch": batch,
           "prompt_tokens": prompt_tokens, "mla_form": mla_form, "offload": offload, **mem}
    gb = 1e9
    if not mem["fits"]:
        out.update(decode_tokens_per_s=None, prefill_tokens_per_s=None, decode_step_s=None,
                   message=_no_fit_message(cfg, quant, tgt, mem, mem["memory_available_bytes"]))
        return out
    n = cfg.num_hidden_layers
    ovh = runtime_overhead(cfg, quant, tgt)
    fl = framework_floors(quant, tgt)
    dec = costmodel.decode_ops(cfg, quant, batch, context, mla_form=mla_form)
    d_dev, d_host = _split_time(dec, tgt, mem["gpu_layers"], mem["head_on_device"], n, batch,
                                quant.act_bytes, cfg.hidden_size, cfg, batch, fl["decode_kernel_s"], offload)
    t_dec = d_dev.time_s + (d_host.time_s if d_host else 0.0) + ovh["per_graph_s"] + fl["decode_host_s"]
    pre_form = "expanded_cache" if mla_form == "expanded_cache" else "naive"
    if cfg.has_indexer and mla_form == "absorbed" and prompt_tokens > cfg.index_topk:
        # V3.2: past the top-k DeepSeek prefills in MLA's MQA mode, only the selected keys (paper sec. 1);
        # shorter prompts select every key, and its masked-MHA mode is the naive form plus the indexer
        pre_form = "absorbed"
    pre = costmodel.prefill_ops(cfg, quant, batch, prompt_tokens, logits="last", mla_form=pre_form)
    p_dev, p_host = _split_time(pre, tgt, mem["gpu_layers"], mem["head_on_device"], n, batch * prompt_tokens,
                                quant.act_bytes, cfg.hidden_size, cfg, batch, fl["prefill_kernel_s"], offload)
    t_pre = (p_dev.time_s + (p_host.time_s if p_host else 0.0)
             + ovh["per_graph_s"] * llama_cpp.graphs_per_step(prompt_tokens) + fl["prefill_host_s"])
    tot = costmodel.totals(dec)
    out.update(
        decode_step_s=t_dec, decode_tokens_per_s=batch / t_dec, prefill_s=t_pre,
        prefill_tokens_per_s=batch * prompt_tokens / t_pre,
        decode_flops_per_step=tot["flops"], decode_bytes_per_step=tot["bytes"],
        decode_weight_bytes_per_step=tot["weight_bytes"], decode_kv_bytes_per_step=tot["kv_bytes"],
        decode_breakdown=_merge_kinds(d_dev, d_host), prefill_breakdown=_merge_kinds(p_dev, p_host),
        decode_comm_s=d_dev.comm_time_s, decode_host_s=d_host.time_s if d_host else 0.0,
        graph_nodes=ovh["graph_nodes"], decode_overhead_s=ovh["per_graph_s"], overhead_source=ovh["source"],
        framework_floors=fl,
        memory_margin_bytes=mem["memory_available_bytes"] - mem["memory_required_bytes"],
        message=(f"fits: {mem['memory_required_bytes'] / gb:.1f} GB of {mem['memory_available_bytes'] / gb:.1f} GB"
                 + (f"; {mem['gpu_layers']}/{n} layers on {tgt.device.id}" if tgt.host is not None else "")))
    return out


# ------------------------------------------------------------------------ DeepSeek-V4
#: Quantisations a V4 estimate accepts: the weights are always costed at the release's own storage
#: (FP8 + FP4 experts, sim/costmodel_v4.py); the name only chooses activation / KV element sizes and
#: the GEMM rate, so only DeepSeek's FP8 recipe (optionally with another KV type) describes it.
V4_QUANTS = ("fp8",)


def v4_quant(quant: Quant | str) -> Quant:
    """The Quant of a V4 estimate; anything but fp8[+kv-<dtype>] is refused in one line."""
    q = get_quant(quant) if isinstance(quant, str) else quant
    if q.weight_format not in V4_QUANTS:
        raise ValueError(f"quant {q.name}: DeepSeek-V4 is costed at its release's storage (FP8 weights, FP4 "
                         "experts); use fp8, optionally fp8+kv-<dtype>")
    return q


def v4_memory(cfg, quant: Quant, context: int, batch: int, prompt_tokens: int) -> dict:
    """Weights (release bytes, hash tables included, no MTP) + cache of ``batch`` sequences at
    ``context`` (windows + compressed entries + indexer keys) + the largest prefill op's activations
    and the fp32 logits."""
    from dsref.sim import costmodel_v4
    wb = costmodel_v4.weight_bytes(cfg)
    kv = costmodel_v4.kv_cache_bytes(cfg, quant.kv_bytes, context) * batch
    ops = costmodel_v4.prefill_ops(cfg, quant, batch, prompt_tokens)
    act = max(op.act_bytes_read + op.act_bytes_written for op in ops) + batch * cfg.vocab_size * LOGITS_BYTES
    return {"weights_bytes": wb["total"], "weights_bits_per_weight": wb["bits_per_weight"], "kv_cache_bytes": kv,
            "activation_bytes": act, "memory_required_bytes": wb["total"] + kv + act}


def estimate_v4(cfg, device: str, quant: Quant | str = "fp8", *, context: int = 4096, batch: int = 1,
                prompt_tokens: int = 512) -> dict:
    """``estimate`` for a DeepSeek-V4 model (sim/costmodel_v4.py op lists) on a device or an
    accelerator node (tensor-parallel, as for other models). Host offload is not modelled for V4."""
    from dsref.sim import costmodel_v4
    check_sizes(context, batch, prompt_tokens)
    quant = v4_quant(quant)
    tgt = resolve_target(device)
    if tgt.host is not None:
        raise ValueError(f"device {tgt.name}: a host + accelerator node; offload is not modelled for DeepSeek-V4 "
                         "(give a device id or an accelerator node)")
    mem = v4_memory(cfg, quant, context, batch, prompt_tokens)
    dev_mem = tgt.device.require("memory_bytes") * tgt.n_devices
    mem.update(memory_available_bytes=dev_mem, device_memory_bytes=dev_mem, host_memory_bytes=None,
               fits=mem["memory_required_bytes"] <= dev_mem, gpu_layers=cfg.num_hidden_layers, head_on_device=True)
    out = {"model": cfg.name, "device": tgt.name, "quant": quant.name, "context": context, "batch": batch,
           "prompt_tokens": prompt_tokens, "mla_form": None, "offload": None, **mem,
           "kv_cache_bytes_per_token": cfg.kv_cache_bytes_per_token(quant.kv_bytes),
           "kv_window_bytes_per_sequence": cfg.kv_window_bytes(quant.kv_bytes)}
    gb = 1e9
    if not mem["fits"]:
        out.update(decode_tokens_per_s=None, prefill_tokens_per_s=None, decode_step_s=None,
                   message=_no_fit_message(cfg, quant, tgt, mem, dev_mem))
        return out
    n = cfg.num_hidden_layers
    fl = framework_floors(quant, tgt)
    dec = costmodel_v4.decode_ops(cfg, quant, batch, context)
    d_dev, _ = _split_time(dec, tgt, n, True, n, batch, quant.act_bytes, cfg.hidden_size, cfg, batch,
                           fl["decode_kernel_s"])
    t_dec = d_dev.time_s + fl["decode_host_s"]
    pre = costmodel_v4.prefill_ops(cfg, quant, batch, prompt_tokens)
    p_dev, _ = _split_time(pre, tgt, n, True, n, batch * prompt_tokens, quant.act_bytes, cfg.hidden_size, cfg,
                           batch, fl["prefill_kernel_s"])
    t_pre = p_dev.time_s + fl["prefill_host_s"]
    tot = costmodel.totals(dec)
    out.update(
        decode_step_s=t_dec, decode_tokens_per_s=batch / t_dec, prefill_s=t_pre,
        prefill_tokens_per_s=batch * prompt_tokens / t_pre,
        decode_flops_per_step=tot["flops"], decode_bytes_per_step=tot["bytes"],
        decode_weight_bytes_per_step=tot["weight_bytes"], decode_kv_bytes_per_step=tot["kv_bytes"],
        decode_breakdown=_merge_kinds(d_dev), prefill_breakdown=_merge_kinds(p_dev),
        decode_comm_s=d_dev.comm_time_s, decode_host_s=0.0, graph_nodes=None, decode_overhead_s=0.0,
        overhead_source="not a llama.cpp plan", framework_floors=fl,
        memory_margin_bytes=dev_mem - mem["memory_required_bytes"],
        message=f"fits: {mem['memory_required_bytes'] / gb:.1f} GB of {dev_mem / gb:.1f} GB")
    return out
