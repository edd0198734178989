"""One process of tests/test_multihost.py (not collected by pytest: no test_ prefix).

    python tests/multihost_worker.py --out DIR [--coordinator H:P --num-processes N --process-id I]
                                     [--mesh expert=4,tensor=2] [--forward-mesh data=2,expert=4]

Builds tiny-v3 from seed 0 (every process the same weights), then for each --mesh and
--forward-mesh: places the weights on a mesh over ALL devices of all processes, runs the forward
pass on a fixed batch, and for --mesh also greedy generation on fixed prompts (generation
compiles three more programs: the slow part on CPU), gathering the results to this process. Without --mesh:
the single-device reference. Writes DIR/result-<process index>.npz and prints one line
"ok ..." at the end; any failure exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

#: Inputs shared with the single-device reference run (fixed here so every process agrees).
BATCH, SEQ = 8, 12
PROMPT_LENS = (5, 9, 3)
NEW_TOKENS = 6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--mesh", action="append", default=[], help="a layout to run forward and generate on")
    p.add_argument("--forward-mesh", action="append", default=[], help="a layout to run the forward pass on only")
    from dsref.reference.distributed import add_distributed_args, initialize_from_args
    add_distributed_args(p)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    info = initialize_from_args(args)  # first: before anything starts JAX's backend

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dsref.reference.decode import generate
    from dsref.reference.distributed import gather, to_global
    from dsref.reference.mesh import make_mesh, parse_mesh, place_batch, shard_model
    from dsref.reference.model import DeepseekModel, forward
    from dsref.reference.presets import get_preset

    cfg = get_preset("tiny-v3")
    model = DeepseekModel(cfg, rngs=nnx.Rngs(0))
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32)
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(0, cfg.vocab_size, n))) for n in PROMPT_LENS]
    logits_fn = jax.jit(lambda m, t: forward(m, t).logits)
    out: dict[str, np.ndarray] = {"tokens_in": toks}
    phases: dict[str, float] = {"init": time.perf_counter() - t0}

    def lap(name):  # seconds per phase, reported so a slow run shows where the time went
        phases[name] = time.perf_counter() - t0 - sum(phases.values())

    if not args.mesh and not args.forward_mesh:
        out["logits/single"] = np.asarray(logits_fn(model, jnp.asarray(toks)))
        lap("forward single")
        out["tokens/single"] = np.asarray(generate(model, prompts, NEW_TOKENS).tokens, np.int64)
        lap("generate single")
    for spec in [*args.mesh, *args.forward_mesh]:
        mesh = make_mesh(parse_mesh(spec))
        graph, state = nnx.split(model)
        placed = shard_model(nnx.merge(graph, jax.tree.map(lambda a: a, state)), mesh)
        with jax.set_mesh(mesh):
            logits = logits_fn(placed, place_batch(jnp.asarray(toks), mesh))
            # The batch is split over data x expert, which spans both processes: a collective fetch.
            out[f"logits/{spec}"] = gather(logits)
            out[f"crosses/{spec}"] = np.asarray(not logits.is_fully_addressable)
        # to_global (the no-transfer placement for weights) round-trips a batch split over both processes.
        split = to_global(toks, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "expert"))))
        out[f"to_global/{spec}"] = gather(split)
        # Processes owning the devices along the expert axis: two means the MoE's all_to_all
        # crosses the process boundary (tensor is innermost in make_mesh's device order).
        out[f"expert_processes/{spec}"] = np.asarray(sorted({d.process_index for d in mesh.devices[0, :, 0]}))
        lap(f"forward {spec}")
        if spec in args.mesh:
            out[f"tokens/{spec}"] = np.asarray(generate(placed, prompts, NEW_TOKENS, mesh=mesh).tokens, np.int64)
            lap(f"generate {spec}")
    out["summary"] = np.asarray(json.dumps({**info.__dict__, "seconds": phases}))
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, f"result-{info.process_index}.npz"), **out)
    print(f"ok {info}: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
