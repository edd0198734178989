"""dsref sim: the cost model and the simulator.

    dsref sim local --model M --device D --quant Q [--context L] [--batch B] [--prompt-tokens T]
                    [--mla-form absorbed|expanded_cache] [--json]
    dsref sim serve --scenario NAME|FILE [--duration S] [--json]     SimPy serving simulation
    dsref sim train --scenario NAME|FILE [--json]                    one simulated training step
"""
# serve and train live in their own modules (sim.serve_cli, sim.train_cli), each with
# register(sim_subparsers). Heavy imports (numpy, jax) happen inside the handlers.

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsref.reference.cli_common import integer, positive_int
from dsref.sim import serve_cli, train_cli

MAX_BATCH = 2**16  # = sim.local.MAX_BATCH (not imported: building the parser imports no numpy)


def check_out_path(option: str, path: str | None) -> None:
    """An output file option (--trace, --plot): checked before the run, so a bad path costs nothing
    and nothing is written (ValueError -> `dsref: error:`, exit 2)."""
    if path is None:
        return
    if not path.strip():
        raise ValueError(f"{option}: empty file name")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    if not p.parent.is_dir():
        raise ValueError(f"{option} {path}: directory {p.parent} does not exist")


def _gb(x) -> str:
    return "n/a" if x is None else f"{x / 1e9:,.2f} GB"


def cmd_local(args) -> int:
    from dsref.reference.cli import load_model
    from dsref.sim.local import estimate
    for opt, v in (("--device", args.device), ("--quant", args.quant)):
        if v is not None and not v.strip():
            raise ValueError(f"{opt}: empty value")
    from dsref.sim.local import check_sizes, resolve_target
    check_sizes(args.context, args.batch, args.prompt_tokens, ("--context", "--batch", "--prompt-tokens"))
    cfg = load_model(args.model, "--model", v4=True)
    if args.quant is None:  # V4 is costed at its release's FP8/FP4 storage; the others default to bf16
        args.quant = "fp8" if cfg.arch == "deepseek_v4" else "bf16"
    from dsref.sim.quant import get_quant
    for opt, v, check in (("--device", args.device, resolve_target), ("--quant", args.quant, get_quant)):
        try:
            check(v)
        except ValueError as e:
            raise ValueError(f"{opt} {v}: {e}") from None
    r = estimate(cfg, args.device, args.quant, context=args.context, batch=args.batch,
                 prompt_tokens=args.prompt_tokens, mla_form=args.mla_form, offload=args.offload)
    if args.json:
        print(json.dumps(r, indent=2, default=float))
        return 0 if r["fits"] else 1
    print(f"{r['model']} on {r['device']} ({r['quant']}, {r['weights_bits_per_weight']:.2f} bits/weight), "
          f"batch {r['batch']}, context {r['context']}, prompt {r['prompt_tokens']}")
    print(f"  memory    required {_gb(r['memory_required_bytes'])} = weights {_gb(r['weights_bytes'])} + KV cache "
          f"{_gb(r['kv_cache_bytes'])} + activations {_gb(r['activation_bytes'])}; available "
          f"{_gb(r['memory_available_bytes'])}")
    if r.get("bytes_on_host") is not None and r.get("offload") == "experts":
        print(f"  placement routed experts in host memory on the CPU ({_gb(r['bytes_on_host'])} with the embedding), "
              f"the rest on the accelerator ({_gb(r['bytes_on_device'])})")
    elif r.get("bytes_on_host") is not None:
        print(f"  placement {r['gpu_layers']} layers on the accelerator ({_gb(r['bytes_on_device'])}), "
              f"{_gb(r['bytes_on_host'])} in host memory")
    if not r["fits"]:
        print(f"  {r['message']}")
        return 1
    print(f"  decode    {r['decode_tokens_per_s']:,.2f} tokens/s ({r['decode_step_s'] * 1e3:,.1f} ms/step; "
          f"{_gb(r['decode_bytes_per_step'])} moved, {r['decode_flops_per_step'] / 1e9:,.1f} GFLOP per step)")
    print(f"  prefill   {r['prefill_tokens_per_s']:,.1f} tokens/s ({r['prefill_s']:,.2f} s for the prompt)")
    if r.get("graph_nodes"):
        per_node = r["decode_overhead_s"] / r["graph_nodes"] * 1e6
        print(f"  runtime   {r['graph_nodes']} llama.cpp graph nodes x {per_node:.1f} us = "
              f"{r['decode_overhead_s'] * 1e3:,.1f} ms per step" + ("" if per_node else " (no measured per-node cost)"))
    print("  decode time by op kind:")
    for kind, d in sorted(r["decode_breakdown"].items(), key=lambda kv: -kv[1]["time_s"]):
        ai = d["intensity_flop_per_byte"]
        print(f"    {kind:12s} {d['time_s'] * 1e3:9.2f} ms  {d['bound']}-bound  "
              f"intensity {'-' if ai is None else f'{ai:,.1f}'} FLOP/B")
    return 0


SIM_DESCRIPTION = """\
Estimate what running a model costs, without running it:

  local   tokens/s and memory of one model on one machine (a roofline cost model)
  serve   a discrete-event simulation of a serving deployment: throughput, TTFT/TPOT, cost
  train   a discrete-event simulation of one training step: step time, MFU, device-hours

Run `dsref sim SIM_COMMAND --help` for each one's options."""

LOCAL_DESCRIPTION = """\
Decode and prefill throughput and the memory budget of MODEL on DEVICE, from a roofline cost
model (compute vs memory bandwidth per operation). DEVICE is a catalog device id (h800,
raspberry-pi-5, radeon-pro-w7700, ... see `dsref hw list`), 'host' (this machine, after
`dsref hw probe`) or a node preset (raspberry-pi-5-w7700: layers split between GPU and host
memory, like llama.cpp's -ngl). Exit 0, or 1 when the model does not fit."""


def register_local(sub) -> None:
    from dsref.reference.cli_common import HelpFormatter
    p = sub.add_parser("local", help="tokens/s and memory of one model on one machine (roofline)",
                       description=LOCAL_DESCRIPTION,
                       epilog="example:\n  dsref sim local --model qwen2.5-14b --device raspberry-pi-5 --quant q4_k_m",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="preset name or checkpoint directory")
    p.add_argument("--device", required=True, help="device id, 'host', or node preset")
    p.add_argument("--quant", default=None,
                   help="weight format (default bf16; DeepSeek-V4: fp8, its release's FP8 + FP4-expert storage, "
                        "the only one accepted): fp32, bf16, fp8, int8, nvfp4, nvfp4_v2, mxfp4, q2_k, q3_k_s, q3_k_m, "
                        "q4_k_s, q4_k_m, q5_k_m, q6_k, q8_0, iq1_s; append +kv-<dtype> for the KV-cache type "
                        "(bf16, fp16, fp8, fp32; llama.cpp formats: bf16, fp16, fp32, q8_0), e.g. nvfp4+kv-fp8")
    p.add_argument("--context", type=positive_int, default=4096, help="tokens in the KV cache while decoding (>= 1)")
    p.add_argument("--batch", type=integer(1, MAX_BATCH, "the MoE statistics' cost grows with the batch"),
                   default=1, help=f"sequences decoded together (1..{MAX_BATCH:,})")
    p.add_argument("--prompt-tokens", type=positive_int, default=512,
                   help="prompt length for the prefill rate (>= 1)")
    p.add_argument("--mla-form", default="absorbed", choices=("absorbed", "expanded_cache"),
                   help="KV-cache layout of MLA models: absorbed (the compressed latent) or expanded_cache "
                        "(llama.cpp's pre-April-2025 expanded K/V)")
    p.add_argument("--offload", default="layers", choices=("layers", "experts"),
                   help="on a host + accelerator node: layers (llama.cpp -ngl: the last layers that fit go on "
                        "the accelerator) or experts (routed experts in host memory, run by the CPU; attention, "
                        "shared experts and KV cache on the accelerator: llama.cpp -ot exps=CPU, ktransformers)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_local)


def register(subparsers) -> argparse.ArgumentParser:
    """Add `sim` with `local`, `serve` and `train`."""
    from dsref.reference.cli_common import HelpFormatter
    sim = subparsers.add_parser("sim", help="cost model and simulator: local, serve, train",
                                description=SIM_DESCRIPTION,
                                epilog="example:\n  dsref sim serve --scenario single-node-h800",
                                formatter_class=HelpFormatter)
    sub = sim.add_subparsers(dest="sim_command", metavar="SIM_COMMAND")
    register_local(sub)
    serve_cli.register(sub)
    train_cli.register(sub)
    sim.set_defaults(func=lambda args: (sim.print_help(), 2)[1])
    return sim


def emit_outputs(args, result: dict, print_text, write_trace, write_plot) -> int:
    """Common tail of `sim serve` / `sim train`: optional trace and plot files, then JSON or text."""
    import json
    import sys
    if args.trace:
        write_trace(args.trace)
    if args.plot:
        write_plot(args.plot)
    if args.json:
        print(json.dumps(result, default=float))
    else:
        print_text(result)
        for what, path in (("trace", args.trace), ("plot", args.plot)):
            if path:
                print(f"  {what} written to {path}", file=sys.stderr)
    return 0
