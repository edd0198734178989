"""`dsref plan`: which device mesh fits a model on a system (sim.plan on the command line).

Registered by experiments/cli.py's build_parser. Errors are ValueErrors naming the option: the
root main prints them as one line and exits 2.
"""

from __future__ import annotations

import json

from dsref.reference.cli_common import number, positive_int

DESCRIPTION = """\
Per-device memory of MODEL on SYSTEM split over a device mesh: weights (the tensor table at the
quantisation's stored bytes, each tensor split as its partition spec says), KV cache and an
upper bound of one prefill chunk's activations, against the device memory of the hardware catalog.
Exit 0 when the mesh fits (with --search: when some mesh fits), 1 when not.

The mesh has three axes; their product must equal the system's device count (devices per node x
--nodes); an axis not named has size 1:

  data    data parallel: every weight replicated, the batch (and its KV cache) split
  expert  expert parallel: routed experts split whole over it (it must divide their count);
          attention and dense layers treat it as more data parallelism (DeepSeek's attention-DP +
          MoE-EP), so the batch and KV cache are split over data x expert
  tensor  tensor parallel (Megatron): attention heads, FFN width and vocabulary split; MLA's
          latent KV cache is shared by all heads, so tensor does not split it

A dimension an axis does not divide stays replicated on that axis. Formulas, assumptions and
worked plans (V3 on 8x H200, 2x8 H800, TPU v5p-64): docs/memory-plan.md."""

EPILOG = """\
examples:
  dsref plan --model deepseek-v3 --system h200-node --mesh expert=8 --quant fp8
  dsref plan --model deepseek-v3 --system h200-node --search --quant fp8 --batch 32 --context 32768
  dsref plan --model deepseek-v3 --system h800-node --nodes 2 --mesh expert=8,tensor=2
  dsref plan --model deepseek-v3 --system tpu-v5p-64 --search --quant bf16"""


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def _load(args):
    from dsref.reference.cli import load_model
    from dsref.reference.mesh import parse_mesh
    from dsref.sim.plan import PlanError, resolve_hardware
    from dsref.sim.quant import get_quant
    if args.model is None and args.config is None:
        raise PlanError("--model or --config: give the model (a preset name, a checkpoint directory or a config.json)")
    cfg = load_model(args.model, "--model") if args.model is not None else load_model(args.config, "--config")
    try:
        quant = get_quant(args.quant)
    except ValueError as e:
        raise PlanError(f"--quant {args.quant}: {e}") from None
    hw = resolve_hardware(args.system, args.nodes)
    mesh = None if args.mesh is None else parse_mesh(args.mesh, "--mesh")
    if mesh is None and not args.search:
        raise PlanError("--mesh: give a mesh (e.g. --mesh expert=8) or --search to try every one")
    return cfg, quant, hw, mesh


def cmd_plan(args) -> int:
    from dsref.sim.plan import plan, search_meshes
    cfg, quant, hw, mesh = _load(args)
    kw = dict(batch=args.batch, context=args.context, chunk=args.chunk, mtp=args.mtp,
              memory_fraction=args.memory_fraction)
    if args.search:
        if mesh is not None:
            raise ValueError("--mesh and --search: give one (--search tries every mesh)")
        plans = search_meshes(cfg, quant, hw, **kw)
        if args.json:
            print(json.dumps([p.to_dict() for p in plans], indent=1, default=float))
        else:
            print_search(plans)
        return 0 if any(p.fits for p in plans) else 1
    p = plan(cfg, quant, hw, mesh, **kw)
    if args.json:
        print(json.dumps(p.to_dict(), indent=1, default=float))
    else:
        print_plan(p)
    return 0 if p.fits else 1


def _header(p) -> str:
    mtp = " + MTP" if p.mtp else ""
    return (f"{p.model}{mtp} ({p.quant}) on {p.hw.system}"
            + (f", {p.hw.nodes} nodes" if p.hw.nodes > 1 else "")
            + f": {p.hw.n_devices} x {p.hw.device.id}, {_gb(p.hw.memory_bytes)} each, "
              f"usable {p.memory_fraction:g} = {_gb(p.usable)}")


def print_plan(p) -> None:
    print(_header(p))
    print(f"mesh {p.mesh} (data={p.mesh.data}, expert={p.mesh.expert}, tensor={p.mesh.tensor}); "
          f"batch {p.batch} x context {p.context:,}, prefill chunk {p.chunk:,} tokens")
    print("  weights per device (every device holds the same bytes):")
    for g, b in p.weights["groups"].items():
        if b:
            print(f"    {g:<16} {_gb(b):>12}")
    w = p.weights
    print(f"    {'total':<16} {_gb(w['per_device']):>12}   (model {_gb(w['model'])}; all {p.hw.n_devices} "
          f"devices hold {_gb(w['sum_over_devices'])}, {w['sum_over_devices'] / w['model']:.2f}x)")
    print(f"  KV cache         {_gb(p.kv):>12}   ({p.sequences_per_replica} sequence(s) per replica = "
          f"ceil({p.batch} / batch split {p.mesh.batch_split}) x {p.context:,} tokens x "
          f"{p.kv_per_token:,.0f} B/token)")
    a = p.activations
    parts = ", ".join(f"{k} {_gb(v)}" for k, v in a.items() if k != "total")
    print(f"  activations      {_gb(a['total']):>12}   (upper bound: {parts})")
    verdict = "fits" if p.fits else "DOES NOT FIT"
    print(f"  total            {_gb(p.total):>12}   of {_gb(p.usable)} usable: {verdict}, "
          f"headroom {_gb(p.usable - p.total)}")
    print(f"  KV capacity      {p.kv_tokens_per_replica:,} tokens per replica x {p.mesh.batch_split} replicas = "
          f"{p.kv_tokens_total:,} tokens of batch x context")


def print_search(plans) -> None:
    p0 = plans[0]
    print(_header(p0))
    print(f"batch {p0.batch} x context {p0.context:,}, prefill chunk {p0.chunk:,} tokens; "
          f"{len(plans)} meshes (data x expert x tensor = {p0.hw.n_devices}), fitting first, most KV first")
    print(f"  {'data':>4} {'expert':>6} {'tensor':>6} {'weights':>12} {'KV cache':>12} {'activ.':>12} "
          f"{'total':>12}  {'fits':<4} {'KV tokens (mesh)':>17}")
    for p in plans:
        m = p.mesh
        print(f"  {m.data:>4} {m.expert:>6} {m.tensor:>6} {_gb(p.weights['per_device']):>12} {_gb(p.kv):>12} "
              f"{_gb(p.activations['total']):>12} {_gb(p.total):>12}  {'yes' if p.fits else 'no':<4} "
              f"{p.kv_tokens_total:>17,}")
    n = sum(p.fits for p in plans)
    print(f"  {n} of {len(plans)} meshes fit" if n else "  no mesh fits")


def register(subparsers) -> None:
    from dsref.reference.cli_common import HelpFormatter
    from dsref.sim.plan import DEFAULT_CHUNK, DEFAULT_MEMORY_FRACTION
    p = subparsers.add_parser("plan", help="which device mesh fits a model on a system (memory per device)",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="preset name (deepseek-v3, ...) or checkpoint directory")
    src.add_argument("--config", default=None, metavar="FILE", help="a Hugging Face config.json")
    p.add_argument("--system", required=True,
                   help="system preset (hwmodels/data/systems: h200-node, h800-node, tpu-v5p-64, ...; `dsref hw list`)")
    p.add_argument("--nodes", type=positive_int, default=None,
                   help="nodes of a node preset (--system h800-node --nodes 2 = 16 H800), or fewer than a "
                        "cluster preset's; default: one node, or the cluster's num_nodes")
    p.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                   help="e.g. expert=8 or data=2,expert=8; product = device count (or use --search)")
    p.add_argument("--search", action="store_true", help="plan every mesh of the device count and list which fit")
    p.add_argument("--quant", default="fp8",
                   help="weight format (sim.quant): fp8 (DeepSeek's FP8 recipe), bf16, nvfp4, mxfp4, int8, "
                        "q4_k_m, ...; +kv-<dtype> sets the KV-cache type, e.g. fp8+kv-fp8")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences in flight over the whole mesh")
    p.add_argument("--context", type=positive_int, default=4096, help="tokens per sequence held in the KV cache")
    p.add_argument("--chunk", type=positive_int, default=DEFAULT_CHUNK,
                   help="prefill chunk (tokens per batch replica) the activation bound is sized for "
                        "(default: %(default)s, SGLang's chunked_prefill_size on H100/H200-class GPUs)")
    p.add_argument("--mtp", action="store_true",
                   help="also hold the MTP module(s) (speculative decoding): their weights and KV cache")
    p.add_argument("--memory-fraction", type=number(0.0, 1.0, low_open=True), default=DEFAULT_MEMORY_FRACTION,
                   help="share of device memory the model may use (default: %(default)s, vLLM's "
                        "gpu_memory_utilization default; the rest is the runtime's)")
    p.add_argument("--json", action="store_true", help="print JSON (a list of plans with --search)")
    p.set_defaults(func=cmd_plan)

