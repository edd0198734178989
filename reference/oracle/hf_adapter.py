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
