"""Worker for tests/test_mesh.py: runs every documented mesh layout on 8 simulated CPU devices
and writes, per layout, its differences from one device. Run in its own process (the device
count is fixed when JAX starts): ``python tests/mesh_worker.py OUT.json [LAYOUT ...]``."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

# 8 CPU devices; LLVM's optimisation off: the layouts are compared with one device compiled the
# same way, and compiling ~30 programs takes a third less CPU time (78 s against 120 s, one layout)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsref.reference.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dsref.reference.config import ModelConfig  # noqa: E402
from dsref.reference.decode import generate  # noqa: E402
from dsref.reference.mesh import LAYOUTS, make_mesh, parse_mesh, place_batch  # noqa: E402
from dsref.reference.model import DeepseekModel, forward  # noqa: E402
from dsref.reference.presets import get_preset  # noqa: E402
from dsref.reference.sharded_load import load_sharded  # noqa: E402


def config() -> ModelConfig:
    """tiny-v3 made adversarial for sharding: 16 experts top-4 (expert=8 leaves 2 per device,
    fewer than k), 4 heads (tensor=8 does not divide them: replicated), a vocabulary the
    tensor axis does not divide, FP8 blocks smaller than the dims (partial blocks in slices)."""
    c = get_preset("tiny-v3").to_hf_dict()
    c.update(vocab_size=250, quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                  "activation_scheme": "dynamic", "weight_block_size": [16, 16]})
    return ModelConfig.from_hf_dict(c, name="tiny-v3-mesh")


def capture_fn(model, tokens):
    cap = {}
    out = forward(model, tokens, capture=cap)
    return out.logits, cap


def loss_and_grads(model, tokens):
    """A training step's loss (next-token cross-entropy) and its gradient for every weight."""
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = forward(nnx.merge(graphdef, params), tokens[:, :-1]).logits
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return jax.value_and_grad(loss)(params)


def worst_rel(tree, ref) -> float:
    """Largest error over the leaves, each relative to its reference's largest magnitude."""
    return max(rel(a, b) if np.abs(np.asarray(b)).max() > 0 else float(np.abs(np.asarray(a)).max())
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref), strict=True))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main(out_path: str, names: list[str]) -> None:
    cfg = config()
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 7)), jnp.int32)
    prompts = [list(map(int, rng.integers(0, cfg.vocab_size, n))) for n in (5, 9, 3)]
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(DeepseekModel(cfg, rngs=nnx.Rngs(3), with_mtp=True, std=0.3), cfg, d, dtype="fp8")
        _, ref_model = load_checkpoint(d, with_mtp=True)
        ref_logits, ref_cap = jax.jit(capture_fn)(ref_model, tokens)
        ref_gen = generate(ref_model, prompts, 5)
        ref_mtp = generate(ref_model, prompts, 5, use_mtp=True)
        ref_state = ref_model.state_dict()
        ref_loss, ref_grads = jax.jit(loss_and_grads)(ref_model, tokens)
        results = {}
        for name in names:
            t0 = time.perf_counter()
            mesh = make_mesh(parse_mesh(LAYOUTS[name]))
            _, model = load_sharded(d, mesh, with_mtp=True)
            state = model.state_dict()
            r = {"mesh": LAYOUTS[name],
                 "load_equal": all(np.array_equal(state[k], ref_state[k]) for k in ref_state),
                 "experts_split": str(model.stacks[-1].stacked("mlp.experts.gate_proj.weight").sharding.spec)}
            with jax.set_mesh(mesh):
                fn = jax.jit(capture_fn)
                placed = place_batch(tokens, mesh)
                r["all_to_all"] = fn.lower(model, placed).compile().as_text().count("all-to-all(")
                logits, cap = fn(model, placed)
            r["logits_rel"] = rel(logits, ref_logits)
            r["capture_rel"] = {k: rel(v, ref_cap[k]) for k, v in cap.items() if v.dtype.kind == "f"}
            r["ids_equal"] = all(np.array_equal(np.sort(v, -1), np.sort(ref_cap[k], -1))
                                 for k, v in cap.items() if v.dtype.kind in "iu")
            with jax.set_mesh(mesh):
                loss, grads = jax.jit(loss_and_grads)(model, place_batch(tokens, mesh))
            r["loss_rel"], r["grads_rel"] = rel(loss, ref_loss), worst_rel(grads, ref_grads)
            r["greedy_equal"] = generate(model, prompts, 5, mesh=mesh).tokens == ref_gen.tokens
            if name == "data x expert":  # MTP self-speculation once: it compiles four more programs
                r["mtp_equal"] = generate(model, prompts, 5, mesh=mesh, use_mtp=True).tokens == ref_mtp.tokens
            r["seconds"] = round(time.perf_counter() - t0, 1)
            results[name] = r
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(LAYOUTS))
