"""Hugging Face transformers as an engine for golden/compare/conformance (an independent implementation).

torch and transformers are imported lazily, inside the functions: the package
never needs them unless this adapter is used. The model is loaded with
``AutoModelForCausalLM.from_pretrained(dir, dtype=float32, attn_implementation="eager")``
and the dump names (oracle.golden) are taken with forward hooks:

    layers.{i}.attn_out      output[0] of ``model.model.layers[i].self_attn`` (after o_proj)
    layers.{i}.hidden        output of ``model.model.layers[i]`` (the decoder layer; V4's hc_mult
                             streams [B, T, n, D] flattened to [B, T, n*D], golden.V4_HIDDEN_LAYOUT)
    layers.{i}.router_logits / topk_weights / topk_ids
                             the (router_logits, topk_weights, topk_indices) that
                             ``model.model.layers[i].mlp.gate`` returns in transformers 5
                             (DeepseekV3TopkRouter / DeepseekV2TopkRouter)
    layers.{i}.index_ids     V3.2: the top-k key slots ``self_attn.indexer`` returns, future
                             (masked) slots of short rows replaced by -1; V4: the compressed
                             entries ``self_attn.compressor.indexer`` returns (-1: none visible)
    logits                   the model's output logits

What transformers cannot do is told apart from what it gets wrong:

* a missing optional dependency (an ``ImportError``, e.g. FP8 without ``accelerate``)
  raises ``EngineUnsupported``: graded UNSUPPORTED, with transformers' reason;
* anything transformers refuses while converting the weights (e.g. its CPU FP8
  dequantization rejecting a partial last block: "Weight shape (576, 7168) not
  divisible by scale grid (5, 56)") is an engine failure, with that message;
* FP8 checkpoints on a machine without a GPU are dequantized by transformers to
  bf16, so their dumps are marked (and graded) bf16;
* transformers has no MTP module: a dump of a checkpoint with one simply lacks
  ``mtp.0.logits`` (graded UNSUPPORTED by the kit's MTP case).

As a command (the ``--engine-cmd`` contract of oracle.conformance.CommandEngine,
through oracle.adapters.common)::

    python -m dsref.reference.oracle.hf_adapter --checkpoint DIR --tokens TOKENS.npy --out DUMP.safetensors

exit 0 written, 1 transformers failed (last stderr line: its message), 2 bad input,
3 with ``unsupported: <reason>`` on stderr.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsref.reference.oracle.adapters.common import EngineUnsupported, adapter_main, one_line
from dsref.reference.oracle.golden import canonicalize


class TransformersLoadError(RuntimeError):
    """transformers refused the checkpoint while converting it (its own message, not an environment gap)."""


def load_model(checkpoint: str | Path):
    """transformers model (float32, eager attention, eval mode) from a checkpoint directory."""
    import io
    import logging
    import re

    import torch
    import transformers
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    log = io.StringIO()  # transformers reports conversion errors in its load report, not in the exception
    handler = logging.StreamHandler(log)
    logger = transformers.utils.logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=torch.float32, attn_implementation="eager")
    except ImportError as e:
        raise EngineUnsupported(f"transformers {transformers.__version__} cannot load {checkpoint}: "
                                f"{one_line(e)}") from None
    except (RuntimeError, ValueError, NotImplementedError, KeyError) as e:
        found = re.findall(r"^(\w+(?:Error|Exception)): (.+)$", log.getvalue(), re.M)
        why = f"{found[0][0]}: {found[0][1]}" if found else one_line(e)
        raise TransformersLoadError(f"transformers {transformers.__version__} refused the checkpoint: {why}") from None
    finally:
        logger.removeHandler(handler)
    return model.eval()


def dump_dtype(model) -> str:
    """bf16 when transformers holds any weight in bf16 (its CPU FP8 path dequantizes to bf16), else float32."""
    import torch
    return "bf16" if any(p.dtype == torch.bfloat16 for p in model.parameters()) else "float32"


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
        # V4's layers return the hc_mult residual streams [B, T, n, D]: flattened as golden.V4_HIDDEN_LAYOUT
        hooks.append(layer.register_forward_hook(
            lambda m, a, out, i=i: got.__setitem__(f"layers.{i}.hidden", arr(first(out)).reshape(B, T, -1))))
        indexer = getattr(layer.self_attn, "indexer", None)
        if indexer is not None:  # V3.2: [B, T, k] top-k key slots, masked (future) ones included
            def on_index(m, a, out, i=i):
                ids = arr(first(out)).astype(np.int64)
                got[f"layers.{i}.index_ids"] = np.where(ids <= np.arange(T)[None, :, None], ids, -1).astype(np.int32)
            hooks.append(indexer.register_forward_hook(on_index))
        v4_indexer = getattr(getattr(layer.self_attn, "compressor", None), "indexer", None)
        if v4_indexer is not None:  # V4 CSA: [B, T, k] compressed entries, -1 where none is visible
            hooks.append(v4_indexer.register_forward_hook(
                lambda m, a, out, i=i: got.__setitem__(f"layers.{i}.index_ids", arr(first(out)).astype(np.int32))))
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
            logits = model(torch.as_tensor(np.asarray(tokens, np.int64)), use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    got["logits"] = arr(logits)
    return canonicalize(got)


class TransformersEngine:
    """Conformance engine: transformers on CPU in float32 (eager attention); returns (dump, metadata)."""

    dtype = "float32"

    def __init__(self):
        import transformers
        self.name = f"transformers-{transformers.__version__}"

    def __call__(self, checkpoint: Path, tokens: np.ndarray):
        model = load_model(checkpoint)
        return dump(model, tokens), {"dtype": dump_dtype(model), "engine": self.name}


def _run(args, checkpoint: Path, tokens: np.ndarray, cfg):
    try:
        import transformers
        transformers.utils.logging.disable_progress_bar()  # stderr stays the reason, not a progress bar
    except ImportError as e:
        raise EngineUnsupported(f"needs torch and transformers ({e})") from None
    model = load_model(checkpoint)
    return dump(model, tokens), f"transformers-{transformers.__version__}", dump_dtype(model)


def main(argv=None) -> int:
    """``python -m dsref.reference.oracle.hf_adapter --checkpoint DIR --tokens T.npy --out D.safetensors``."""
    return adapter_main(
        argv, prog="dsref.reference.oracle.hf_adapter", run=_run, v4=True,
        description="Run Hugging Face transformers (float32, eager attention, CPU) on token ids and write a "
                    "dump that `dsref compare` and the conformance kit grade.",
        example="dsref conformance run KIT --engine-cmd \"python -m dsref.reference.oracle.hf_adapter "
                "--checkpoint {checkpoint} --tokens {tokens} --out {out}\"")


if __name__ == "__main__":
    import sys
    sys.exit(main())
