"""`dsref train`: train a DeepSeek-V3-shaped model on text, with DeepSeek-V3's objective.

    dsref train --preset mini-v3 --data DOCS --steps 300 --out RUN [--batch 16 --seq 128 --lr 1e-3]

The machinery is reference/train_run.py (data, checkpoints, resuming) over reference/train.py
(the objective, the optimizer, auxiliary-loss-free balancing).
"""

from __future__ import annotations

import json
import sys

from dsref.reference.cli_common import HelpFormatter, compile_cache, integer, mesh_arg, number, positive_int, seed

DESCRIPTION = """\
Train a DeepSeek-V3-shaped model on text, with DeepSeek-V3's objective: next-token
cross-entropy, plus lambda x the MTP module's loss (token t+2; --mtp-weight, V3: 0.3), plus
alpha x the sequence-wise balance loss (--balance-alpha, V3: 1e-4; default off). Experts are
balanced without an auxiliary loss: after each step each MoE layer's routing bias moves by
gamma x sign(mean load - load) (--bias-gamma, V3: 0.001), and the progress bar shows MaxVio
(max load / mean load - 1; 0 = perfectly balanced). AdamW (beta 0.9/0.95, weight decay 0.1,
clipping at 1.0, V3's settings) with linear warmup and cosine decay.

--data is a text file or a folder of them (files that are not UTF-8 text are skipped and
counted). Unless --tokenizer gives one, a byte-level BPE is trained on it at the model's
vocabulary size. The last --holdout of the tokens are held out; their loss is measured at
every checkpoint.

--out becomes a Hugging Face checkpoint (config.json, model.safetensors in float32 with the MTP
module, tokenizer.json) that `dsref generate`, `dsref golden` and transformers load, plus the
optimizer state and train_state.json (every step's metrics). It is written every
--checkpoint-every steps and at the end, atomically: a run killed at any moment leaves the last
complete checkpoint. Run the same command again to resume: the data order depends only on
--seed and the step, so the resumed run repeats an uninterrupted one exactly. Settings that
change the result must match the checkpoint's (an error names the one that differs)."""

EPILOG = """\
examples:
  # Python's own help topics (text that ships with Python) as the corpus
  python -c "import pydoc_data.topics as t; open('topics.txt', 'w').write('\\n\\n'.join(t.topics.values()))"
  # 10M parameters, 300 steps of 16 x 128 tokens (minutes on a laptop CPU)
  dsref train --preset mini-v3 --data topics.txt --steps 300 --out /tmp/mini-run
  dsref generate --checkpoint /tmp/mini-run --prompt "The for statement"
  dsref train --preset tiny-v3 --data README.md --steps 20 --out /tmp/tiny-run --json"""


def _train_config(args):
    from dsref.reference.train import TrainConfig
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    if warmup > args.steps:
        raise ValueError(f"--warmup {warmup}: more than --steps {args.steps}")
    return TrainConfig(steps=args.steps, lr=args.lr, warmup=warmup, min_lr_ratio=args.min_lr_ratio,
                       weight_decay=args.weight_decay, clip_norm=args.clip, mtp_weight=args.mtp_weight_used,
                       balance_alpha=args.balance_alpha, bias_gamma=args.bias_gamma, compute=args.compute,
                       fp8=args.fp8)


def _model(args):
    from dsref.reference.cli import load_model
    from dsref.reference.cli_common import host_memory_available
    name, option = (args.preset, "--preset") if args.preset else (args.config, "--config")
    cfg = load_model(name, option)
    if cfg.arch != "deepseek":
        raise ValueError(f"{option} {name}: a dense GQA model; dsref train trains DeepSeek MLA+MoE models "
                         "(mini-v3, tiny-v3, small-v3, or a DeepSeek config.json)")
    if getattr(cfg, "has_indexer", False):
        raise ValueError(f"{option} {name}: a V3.2 model (lightning indexer); training it needs the indexer's own "
                         "loss (a KL term to the attention's distribution), which is not implemented: the indexer "
                         "would only decay. Train a V3 model (mini-v3, tiny-v3)")
    if args.seq > cfg.max_position_embeddings:
        raise ValueError(f"--seq {args.seq}: the model's max_position_embeddings is {cfg.max_position_embeddings}")
    has_mtp = cfg.num_nextn_predict_layers > 0 and not args.no_mtp
    if args.mtp_weight and not has_mtp:
        raise ValueError(f"--mtp-weight {args.mtp_weight:g}: " + ("--no-mtp leaves no MTP module to weigh"
                         if args.no_mtp else f"{name} has no MTP module (num_nextn_predict_layers=0)"))
    args.mtp_weight_used = (0.3 if args.mtp_weight is None else args.mtp_weight) if has_mtp else 0.0
    pc = cfg.param_counts()
    n = pc["total_params"] + (pc["mtp_params"] if not args.no_mtp and cfg.num_nextn_predict_layers else 0)
    need, mem = n * 4 * 5, host_memory_available()  # weights, gradient, two AdamW moments, a checkpoint copy
    if mem is not None and need > mem[0]:
        raise ValueError(f"{option} {name}: {n:,} parameters need about {need / 2**30:,.1f} GiB for training state "
                         f"(float32 weights, gradients, AdamW moments), more than the {mem[0] / 2**30:,.1f} GiB "
                         f"available ({mem[1]}); pick a smaller model (mini-v3, tiny-v3)")
    return cfg


def cmd_train(args) -> int:
    from dsref.reference.train_run import RunSpec, run
    if args.checkpoint_every is None:
        args.checkpoint_every = max(1, min(100, args.steps))
    cfg = _model(args)
    mesh = None
    if args.mesh is not None:
        from dsref.reference.mesh import make_mesh, mesh_shape
        mesh = make_mesh(args.mesh)  # too few devices: one line naming --mesh
        if args.batch % mesh_shape(mesh).batch_split:
            raise ValueError(f"--batch {args.batch}: must be a multiple of the mesh's data x expert = "
                             f"{mesh_shape(mesh).batch_split} (each of those devices takes whole sequences)")
    spec = RunSpec(cfg=cfg, data=args.data, out=args.out, steps=args.steps, batch=args.batch, seq=args.seq,
                   seed=args.seed, tc=_train_config(args), tokenizer=args.tokenizer, holdout=args.holdout,
                   checkpoint_every=args.checkpoint_every, with_mtp=args.mtp_weight_used > 0, mesh=mesh)
    try:
        with compile_cache(disable=args.no_compile_cache):
            res = run(spec, progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr))
    except KeyboardInterrupt:
        print(f"dsref train: interrupted; {args.out} holds the last complete checkpoint: run the same command "
              "to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    ent = res["unigram_entropy"]
    print(f"trained {res['model']} ({res['parameters']:,} parameters) for {res['steps']} steps "
          f"({res['tokens_trained']:,} tokens); checkpoint: {res['checkpoint']}")
    print(f"  loss        {res['final_loss']:.4f} nats/token (mean of the last steps' next-token loss)")
    if res["eval_loss"] is not None:
        print(f"  held out    {res['eval_loss']:.4f} nats/token  (unigram entropy {ent:.4f}: a model that "
              "ignores context)")
    if res["tokens_per_s"]:
        print(f"  speed       {res['tokens_per_s']:,.0f} tokens/s (after compilation)")
    if res["max_violation"] is not None:
        per = ", ".join(f"layer {k}: {v:.2f}" for k, v in res["max_violation_per_layer"].items())
        print(f"  MaxVio      {res['max_violation']:.3f} (max load / mean load - 1, last steps; {per})")
    print(f"  try: dsref generate --checkpoint {res['checkpoint']} --prompt \"The \"", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a DeepSeek-V3-shaped model on text (V3 objective, resumable)",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--preset", help="a DeepSeek preset to train from scratch: mini-v3 (10M), tiny-v3, small-v3, ...")
    m.add_argument("--config", help="a DeepSeek config.json (or a checkpoint folder: its config) to train from scratch")
    p.add_argument("--data", required=True, help="a UTF-8 text file or a folder of text files")
    p.add_argument("--out", required=True, help="the run's folder: new or empty, or an earlier run's to resume it")
    p.add_argument("--steps", required=True, type=integer(1, 10**9), help="total optimizer steps")
    p.add_argument("--batch", type=integer(1, 65536), default=16, help="sequences per step")
    p.add_argument("--seq", type=integer(2, 1 << 20), default=128, help="tokens per sequence")
    p.add_argument("--lr", type=number(0, 10, low_open=True), default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=integer(0, 10**9), default=None, help="linear warmup steps (default steps/20)")
    p.add_argument("--min-lr-ratio", type=number(0, 1), default=0.1, help="the cosine ends at lr x this")
    p.add_argument("--weight-decay", type=number(0, 10), default=0.1, help="AdamW weight decay (V3: 0.1)")
    p.add_argument("--clip", type=number(0, 1e6, low_open=True), default=1.0, help="gradient clipping norm (V3: 1.0)")
    p.add_argument("--mtp-weight", type=number(0, 100), default=None,
                   help="lambda of the MTP loss (default 0.3 as V3's first 10T tokens, then V3 used 0.1)")
    p.add_argument("--balance-alpha", type=number(0, 100), default=0.0,
                   help="alpha of the sequence-wise balance loss (V3: 1e-4; 0 = off)")
    p.add_argument("--bias-gamma", type=number(0, 1), default=0.001,
                   help="auxiliary-loss-free bias update speed (V3: 0.001; 0 = off)")
    p.add_argument("--compute", choices=("float32", "bfloat16"), default="float32",
                   help="precision of the forward and backward (weights are kept in float32)")
    p.add_argument("--fp8", action="store_true",
                   help="DeepSeek-V3's FP8 recipe for the Linear GEMMs, simulated: e4m3 inputs in 1x128 activation "
                   "tiles and 128x128 weight blocks, float32 accumulation (use with --compute bfloat16, as V3)")
    p.add_argument("--no-mtp", action="store_true", help="train without the MTP module (its weights are not made)")
    p.add_argument("--mesh", type=mesh_arg, metavar="AXIS=SIZE,...",
                   help="train over a device mesh (one process): data=N and expert=N split the batch, expert=N "
                   "also puts E/N whole routed experts on each device, tensor=N splits the matmuls (docs/scaling.md)")
    p.add_argument("--tokenizer", help="a tokenizer.json to use instead of training a BPE on --data")
    p.add_argument("--holdout", type=number(0, 0.5), default=0.05, help="fraction of the tokens held out")
    p.add_argument("--checkpoint-every", type=positive_int, default=None,
                   help="steps between checkpoints (default 100, and always at the end)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the initial weights and of the data order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled programs on disk (default: $DSREF_CACHE_DIR or ~/.cache/dsref/jax)")
    p.add_argument("--json", action="store_true", help="print one JSON object (final_loss, tokens_per_s, steps, "
                   "max_violation, ...)")
    p.set_defaults(func=cmd_train)
