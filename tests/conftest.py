"""Shared fixtures: tiny random models, and (for parity tests) their transformers twins.

torch/transformers are the independent implementation we compare against; only
tests import them.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI's persistent compilation cache (reference.cli_common.compile_cache) would write into the
# real home during in-process command tests; tests that exercise it set their own directory.
os.environ.setdefault("DSREF_NO_COMPILE_CACHE", "1")
# The suite compiles hundreds of small XLA programs; LLVM at -O0 (XLA's HLO passes still run, so
# cost analyses and HLO text are unchanged) compiles them about twice as fast (measured 2026-11-30:
# test_oracle's test_our_models_pass_every_case 202 s -> 104 s). Results may differ from the default
# codegen in the last bits only, far inside every tolerance; the CLI and benchmarks/ keep XLA's defaults.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()  # test_multihost's FAST_COMPILE

import numpy as np
import pytest

from dsref.reference.config import ModelConfig


def hf_state_to_ours(sd: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """transformers 5 in-memory state dict -> our flat layout (fused gate_up_proj split)."""
    out = {}
    for name, t in sd.items():
        a = t.detach().float().numpy() if hasattr(t, "detach") else np.asarray(t)
        if name.endswith("mlp.experts.gate_up_proj"):
            F = cfg.moe_intermediate_size
            base = name[: -len("gate_up_proj")]
            out[base + "gate_proj.weight"] = a[:, :F]
            out[base + "up_proj.weight"] = a[:, F:]
        elif name.endswith("mlp.experts.down_proj"):
            out[name + ".weight"] = a
        else:
            out[name] = a
    return out


def randomize_hf(model, seed: int, std: float = 0.15, bias_scale: float = 0.3):
    """Give a transformers model adversarial weights: large random weights, norms around 1,
    correction biases of both signs (so selection with and without bias differ)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(bias_scale * torch.randn(p.shape, generator=g))
            elif p.dtype.is_floating_point:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def make_hf_model(cfg: ModelConfig, seed: int, **kw):
    import torch
    import transformers
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    d = cfg.to_hf_dict()
    if cfg.has_indexer:  # DeepSeek-V3.2 (model_type deepseek_v32): MLA + the lightning indexer
        cls_cfg, cls_model = transformers.DeepseekV32Config, transformers.DeepseekV32ForCausalLM
    elif cfg.scoring_func == "softmax":
        cls_cfg, cls_model = transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM
    else:
        cls_cfg, cls_model = transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM
    hf_cfg = cls_cfg(**d)
    hf_cfg._attn_implementation = "eager"
    model = cls_model(hf_cfg).eval()
    return randomize_hf(model, seed, **kw)


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def validation_records():
    """Every experiment's records on validate's default path (full-length simulations, no closed
    loop): what docs/validation.json holds. Computed once per session (per xdist worker) and
    shared by tests/test_experiments.py and tests/test_validation_gate.py."""
    from dsref.experiments import validate
    return validate.run_all(progress=False, fast=False)
