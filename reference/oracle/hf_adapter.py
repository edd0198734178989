"""Hugging Face transformers as an engine for golden/compare/conformance (an independent implementation).

torch and transformers are imported lazily, inside the functions: the package
never needs them unless this adapter is used. The model is loaded with
``AutoModelForCausalLM.from_pretrained(dir, dtype=float32, attn_implementation="eager")``
and the dump names (oracle.golden) are taken with forward hooks:

    layers.{i}.attn_out      output[0] of ``model.model.layers[i].self_attn`` (after o_proj)
    layers.{i}.hidden        output of ``model.model.layers[i]`` (the decoder layer)
    layers.{i}.router_logits / topk_weights / topk_ids
                             the (router_logits, topk_weights, topk_indices) that
                             ``model.model.layers[i].mlp.gate`` returns in transformers 5
                             (DeepseekV3TopkRouter / DeepseekV2TopkRouter)
    logits                   the model's output logits

Checkpoints transformers cannot load here (e.g. FP8 on a machine without a GPU
and without ``accelerate``) raise ``EngineUnsupported`` with transformers' reason.

As a command (the ``--engine-cmd`` contract of oracle.conformance.CommandEngine)::

    python -m dsref.reference.oracle.hf_adapter --checkpoint DIR --tokens TOKENS.npy --out DUMP.safetensors

writes the dump with golden-style metadata (dtype float32, config_hash, tokens_sha256);
exit 0 written, 2 bad input, 3 with ``unsupported: <reason>`` on stderr when transformers
cannot load the checkpoint (graded UNSUPPORTED, as the in-process engine is).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsref.reference.oracle.conformance import EngineUnsupported
from dsref.reference.oracle.golden import canonicalize


def load_model(checkpoint: str | Path):
    """transformers model (float32, eager attention, eval mode) from a checkpoint directory."""
    import torch
    import transformers
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=torch.float32, attn_implementation="eager")
    except (ImportError, RuntimeError, ValueError, NotImplementedError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngineUnsupported(f"transformers {transformers.__version__} cannot load {checkpoint}: "
                                f"{type(e).__name__}: {msg}") from None
    return model.eval()


def dump(model, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Logits and per-layer captures of a transformers DeepSeek model on tokens [B, T]."""
    import torch
    B, T = tokens.shape
    got: dict[str, np.ndarray] = {}
    hooks = []

    def arr(t):
        return t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy()

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(f"layers.{i}.attn_out", arr(first(out)))))
        hooks.append(layer.register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(f"layers.{i}.hidden", arr(first(out)))))
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):  # a router, not a dense MLP's gate_proj
            def on_gate(m, a, out, i=i):
                logits, wts, ids = out
                got[f"layers.{i}.router_logits"] = arr(logits).reshape(B, T, -1)
                got[f"layers.{i}.topk_weights"] = arr(wts).reshape(B, T, -1)
                got[f"layers.{i}.topk_ids"] = arr(ids).reshape(B, T, -1).astype(np.int32)
            hooks.append(gate.register_forward_hook(on_gate))
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(np.asarray(tokens, np.int64))).logits
    finally:
        for h in hooks:
            h.remove()
    got["logits"] = arr(logits)
    return canonicalize(got)


class TransformersEngine:
    """Conformance engine: transformers on CPU in float32 (eager attention)."""

    dtype = "float32"

    def __init__(self):
        import transformers
        self.name = f"transformers-{transformers.__version__}"

    def __call__(self, checkpoint: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return dump(load_model(checkpoint), tokens)


def main(argv=None) -> int:
    """``python -m dsref.reference.oracle.hf_adapter --checkpoint DIR --tokens T.npy --out D.safetensors``."""
    import argparse
    import sys

    from dsref.reference.checkpoint import CheckpointError, read_config
    from dsref.reference.oracle import conformance
    from dsref.reference.oracle.golden import OracleError, check_tokens, golden_metadata, load_tokens, write_dump
    p = argparse.ArgumentParser(
        prog="python -m dsref.reference.oracle.hf_adapter",
        description="Run Hugging Face transformers (float32, eager attention, CPU) on token ids and write a "
                    "dump that `dsref compare` and the conformance kit grade. Exit 0 written, 2 bad input, "
                    f"{conformance.UNSUPPORTED_EXIT} when transformers cannot load the checkpoint.",
        epilog="example:\n  dsref conformance run KIT --engine-cmd \"python -m dsref.reference.oracle.hf_adapter "
               "--checkpoint {checkpoint} --tokens {tokens} --out {out}\"",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokens", required=True, help="token ids [batch, seq], integer .npy")
    p.add_argument("--out", required=True, help="output .safetensors dump")
    args = p.parse_args(argv)
    prog = "hf_adapter"
    try:
        cfg = read_config(args.checkpoint)
        tokens = load_tokens(args.tokens)
        check_tokens(tokens, cfg, f"--tokens {args.tokens}")
        try:
            import transformers
            transformers.utils.logging.disable_progress_bar()  # stderr stays the reason, not a progress bar
        except ImportError as e:
            print(f"{prog}: error: needs torch and transformers ({e})", file=sys.stderr)
            return 2
        out = dump(load_model(args.checkpoint), tokens)
        write_dump(out, args.out, golden_metadata(cfg, tokens, "float32",
                                                  engine=f"transformers-{transformers.__version__}"))
    except conformance.EngineUnsupported as e:
        print(f"unsupported: {e}", file=sys.stderr)
        return conformance.UNSUPPORTED_EXIT
    except (OracleError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
