"""`dsref golden`, `dsref compare`, `dsref conformance`: the oracle's command line (docs/oracle.md).

Exit status: 0 within tolerance / all cases pass, 1 out of tolerance / a case fails
or errors, 2 bad input (missing file, not safetensors, shape mismatch, bad tokens).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dsref.reference.cli_common import mesh_arg, number

_DTYPES = ("float32", "bf16", "fp8", "float64")


_tolerance = number(0.0)  # --rtol / --atol: finite, >= 0 (0 demands exact equality)


def _overrides(args) -> dict[str, float]:
    from dsref.reference.oracle.golden import OracleError
    out: dict[str, float] = {}
    if getattr(args, "rtol", None) is not None:
        out["rel"] = args.rtol
    if getattr(args, "atol", None) is not None:
        out["atol"] = args.atol
    from dsref.reference.oracle.compare import check_tolerance
    for item in getattr(args, "tol", None) or []:
        key, sep, val = item.partition("=")
        try:
            if not sep:
                raise ValueError
            v = float(val)
        except ValueError:
            raise OracleError(f"--tol {item!r}: expected NAME=NUMBER, e.g. rel=1e-3, cos=0.999, "
                              "routing=0.02, logits.rel=2e-2") from None
        try:
            out[key.strip()] = check_tolerance(key.strip(), v)
        except OracleError as e:
            raise OracleError(f"--tol {item!r}: {e}") from None
    return out


def _add_tol_args(p):
    p.add_argument("--rtol", type=_tolerance, help="max relative error max|ref-cand|/max|ref| for every tensor "
                   "(finite, >= 0; default: by dtype)")
    p.add_argument("--atol", type=_tolerance, help="max absolute error for every tensor, finite, >= 0 "
                   "(default: not checked)")
    p.add_argument("--tol", action="append", metavar="NAME=VAL",
                   help="one tolerance: rel, cos, routing, atol, or per tensor kind (logits.rel, hidden.cos, "
                        "topk_ids.routing, ...); repeatable")


_NPY_MAGIC = b"\x93NUMPY"


def load_tokens_checked(path: str, vocab_size: int):
    """Token ids [batch, seq] from ``path`` for a model of ``vocab_size``; OracleError naming the file
    for anything else: not a file, not a .npy (a text file), a non-integer or object dtype, ids < 0 or
    >= vocab_size (checked in the file's own dtype, so uint64 ids are not wrapped)."""
    import numpy as np

    from dsref.reference.oracle import golden
    from dsref.reference.oracle.golden import OracleError
    p = Path(path)
    if not str(path).strip():
        raise OracleError("--tokens: empty file name")
    if p.is_dir():
        raise OracleError(f"--tokens {p}: is a directory; give a .npy file of integer token ids [batch, seq]")
    if p.is_file():
        with p.open("rb") as f:
            head = f.read(len(_NPY_MAGIC))
        if head != _NPY_MAGIC:
            raise OracleError(f"--tokens {p}: not a .npy integer array (no .npy header: a text or other file); "
                              "save the ids with np.save(path, np.asarray(ids, np.int32))")
    raw = None
    if p.is_file():
        try:
            raw = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError):
            pass  # golden.load_tokens below names the problem (object arrays: never unpickled)
    if isinstance(raw, np.ndarray):
        if raw.dtype.kind not in "iu":
            raise OracleError(f"--tokens {p}: not a .npy integer array (dtype {raw.dtype}); save the ids with "
                              "np.save(path, np.asarray(ids, np.int32))")
        if raw.ndim == 2 and raw.size:
            lo, hi = raw.min(), raw.max()  # in the file's dtype: uint64 ids >= 2^63 stay what they are
            if lo < 0 or hi >= vocab_size:
                raise OracleError(f"--tokens {p}: token ids must lie in [0, {vocab_size}) (the model's vocab_size), "
                                  f"got min {lo} max {hi} (dtype {raw.dtype})")
    return golden.load_tokens(p)  # shape, object arrays, missing file: its own messages


def cmd_golden(args) -> int:
    from dsref.reference.oracle import golden
    from dsref.reference.oracle.golden import OracleError
    out_path = Path(args.out)
    if not str(args.out).strip():
        raise OracleError("--out: empty file name")
    if out_path.is_dir():
        raise OracleError(f"--out {args.out}: is a directory; give a .safetensors file name")
    if not out_path.parent.is_dir():
        raise OracleError(f"--out {args.out}: directory {out_path.parent} does not exist")
    ck = Path(args.checkpoint)
    if not str(args.checkpoint).strip() or not ck.is_dir():
        raise OracleError(f"--checkpoint {args.checkpoint}: not a directory; give a checkpoint directory "
                          "(config.json + safetensors)")
    cfg = golden.read_any_config(args.checkpoint)  # ModelConfigV4 for a DeepSeek-V4 config.json
    if golden.is_v4_checkpoint(args.checkpoint):
        # V4 runs numpy_v4 / model_v4 on one device (golden.run_reference_v4), or numpy_v4 layer by
        # layer with --stream (oracle/stream.py: float64 only)
        for opt, given in (("--mesh", getattr(args, "mesh", None) is not None),
                           ("--numerics", getattr(args, "numerics", "exact") != "exact")):
            if given:
                raise OracleError(f"{opt}: not supported for DeepSeek-V4 checkpoints ({args.checkpoint}); "
                                  "V4 goldens run on one device with exact numerics")
        if getattr(args, "stream", False) and args.dtype != "float64":
            raise OracleError(f"--stream: DeepSeek-V4 checkpoints ({args.checkpoint}) stream the float64 NumPy "
                              f"reference only, not --dtype {args.dtype}: use --dtype float64, or drop --stream")
    tokens = load_tokens_checked(args.tokens, cfg.vocab_size)
    golden.check_tokens(tokens, cfg, f"--tokens {args.tokens}")  # ids and length <= max_position_embeddings
    mesh = None
    from dsref.reference.distributed import initialize_from_args
    if initialize_from_args(args).process_count > 1 and getattr(args, "mesh", None) is None:
        raise OracleError("--coordinator/--distributed: a multi-process run needs --mesh over every device")
    if getattr(args, "mesh", None) is not None:
        if args.dtype != "float32":
            raise OracleError("--mesh runs the JAX reference: use --dtype float32 (float64 is the NumPy "
                              "reference on one CPU), or drop --mesh")
        if getattr(args, "stream", False):
            raise OracleError("--mesh and --stream: pick one (--stream runs layer by layer on one CPU; "
                              "--mesh holds the model on the mesh's devices)")
        from dsref.reference.mesh import make_mesh
        mesh = make_mesh(args.mesh)
    numerics = getattr(args, "numerics", "exact")
    if numerics != "exact":
        if args.dtype != "float64" or mesh is not None or getattr(args, "stream", False):
            raise OracleError(f"--numerics {numerics} runs the float64 NumPy reference in memory: use --dtype "
                              "float64 without --mesh or --stream")
        if not cfg.has_indexer:
            raise OracleError(f"--numerics {numerics}: DeepSeek-V3.2's FP8 indexer and KV cache; "
                              f"{args.checkpoint} ({cfg.name}) has no indexer")
    from dsref.reference.cli_common import compile_cache
    with compile_cache():  # the float32 path compiles the model: keep it for the next run
        if getattr(args, "stream", False):  # layer by layer: checkpoints larger than memory
            from dsref.reference.oracle import stream
            out = stream.write_stream_golden(args.checkpoint, tokens, args.out, args.dtype, progress=True)
        else:
            out = golden.write_golden(args.checkpoint, tokens, args.out, args.dtype, mesh, numerics=numerics)
    if mesh is not None:
        import jax
        if jax.process_index() != 0:  # several hosts: all compute, process 0 writes
            print(f"process {jax.process_index()}: done; process 0 writes {out}")
            return 0
    t, _ = golden.read_dump(out)
    print(f"wrote {out}: {len(t)} tensors ({args.dtype}), logits {list(t['logits'].shape)}")
    return 0


def cmd_compare(args) -> int:
    from dsref.reference.oracle import compare
    from dsref.reference.oracle.golden import OracleError
    for what, path in (("REFERENCE", args.reference), ("CANDIDATE", args.candidate)):
        if not str(path).strip():
            raise OracleError(f"{what}: empty file name; give a .safetensors dump")
    rep = compare.compare_files(args.reference, args.candidate, args.dtype, _overrides(args))
    if args.json:
        print(json.dumps(rep.to_json(), indent=2))
    else:
        print(compare.format_report(rep))
    return 0 if rep.ok else 1


def _engine(args):
    from dsref.reference.oracle import conformance
    if args.engine_cmd is not None:  # an empty --engine-cmd is refused, not taken for "none given"
        return conformance.CommandEngine(args.engine_cmd, dtype=args.dtype, name=args.engine_name)
    if args.engine == "transformers":
        from dsref.reference.oracle.hf_adapter import TransformersEngine
        try:
            return TransformersEngine()
        except ImportError as e:
            from dsref.reference.oracle.golden import OracleError
            raise OracleError(f"--engine transformers needs torch and transformers ({e}); install the test "
                              "extra: pip install torch==2.13.0 -e '.[test]'") from None
    return conformance.ReferenceEngine({"dsref": "float32", "dsref-bf16": "bfloat16",
                                        "dsref-float64": "float64"}[args.engine])


def _print_results(results, name, as_json) -> int:
    from dsref.reference.oracle import conformance
    if as_json:
        print(json.dumps(conformance.results_json(results, name), indent=2, default=str))
    else:
        print(conformance.format_results(results, name))
    return 1 if any(r.status in ("fail", "error") for r in results) else 0


def cmd_conformance(args) -> int:
    from dsref.reference.oracle import conformance
    if args.action == "list":
        for c in conformance.CASES:
            needs = ", ".join(n for n in c.all_requires if n != "baseline")
            print(f"{c.letter} {c.name:<25} {c.factor}" + (f"  [builds on: {needs}]" if needs else ""))
        return 0
    if args.action == "write":
        out = conformance.write_kit(args.dir, args.cases)
        print(f"wrote {len(conformance.kit_cases(out))} cases to {out}")
        return 0
    conformance.kit_cases(args.dir)  # a clear error for a directory that is not a kit
    if args.action == "run":
        from dsref.reference.cli_common import compile_cache
        eng = _engine(args)
        with compile_cache():  # the built-in dsref engines compile each case's model
            res = conformance.grade_kit(args.dir, eng, args.cases, args.dtype, _overrides(args), args.save)
        return _print_results(res, getattr(eng, "name", "engine"), args.json)
    # grade
    res = conformance.grade_outputs(args.dir, args.candidate_dir, args.dtype, _overrides(args))
    return _print_results(res, args.engine_name or str(args.candidate_dir), args.json)


HF_ENGINE_CMD = ("python -m dsref.reference.oracle.hf_adapter --checkpoint {checkpoint} --tokens {tokens} "
                 "--out {out}")


def register(sub) -> None:
    from dsref.reference.cli_common import HelpFormatter
    # golden: --dtype float64 is reference.numpy_ref, float32 the JAX model under jax.jit (oracle/golden.py).
    p = sub.add_parser("golden", help="run the reference and dump logits + per-layer tensors (safetensors)",
                       description="""\
Run the reference model of a checkpoint on token ids and write what other engines are graded
against: the logits, each layer's attention output and hidden state, and the MoE routing (router
logits, chosen experts sorted by expert id, their weights), in one safetensors file with metadata
(docs/oracle.md). --dtype float64 is the exact NumPy reference, float32 the fast JAX model.
Exit 0 written, 2 bad input.""",
                       epilog="""\
example:
  dsref conformance write /tmp/kit
  dsref golden --checkpoint /tmp/kit/dense-first-k/checkpoint \\
               --tokens /tmp/kit/dense-first-k/tokens.npy --out /tmp/ref.safetensors""",
                       formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--tokens", required=True, help="token ids [batch, seq], integer .npy; seq at most the "
                   "model's max_position_embeddings")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="precision of the reference")
    p.add_argument("--numerics", choices=("exact", "deepseek-fp8"), default="exact",
                   help="exact: the oracle. deepseek-fp8 (V3.2, with --dtype float64): DeepSeek's inference "
                        "code's numerics instead, its FP8 + Hadamard lightning indexer and FP8-rounded latent "
                        "KV cache, for an engine that follows them (it selects other keys on many rows: "
                        "docs/dsa-precision.md)")
    p.add_argument("--mesh", type=mesh_arg, metavar="AXIS=SIZE,...",
                   help="run the float32 reference over a device mesh (data=, expert=, tensor=; e.g. "
                        "expert=8 for 8 GPUs): each device loads only its shards; same dump as one device "
                        "within float32 rounding (docs/scaling.md)")
    from dsref.reference.distributed import add_distributed_args
    add_distributed_args(p)
    p.add_argument("--stream", action="store_true", help="for checkpoints larger than memory (DeepSeek-V3 671B "
                   "on a 64 GB machine): read and run one decoder layer at a time from the memory-mapped "
                   "files, with a progress bar per layer; same dump. float64 (bit-identical to the in-memory "
                   "dump) reads only the routed experts the tokens use, one at a time: for V3 about 10 GB "
                   "(the LM head in float64) plus 9.2 MB per token. float32 holds one whole layer in float32 "
                   "(46 GB for a V3 MoE layer). DeepSeek-V4: float64 only. Formula and measurements: docs/oracle.md")
    p.set_defaults(func=cmd_golden)

    p = sub.add_parser("compare", help="compare a candidate dump with a reference dump",
                       description="""\
Compare an engine's dump (CANDIDATE) with a reference dump such as `dsref golden` writes, tensor
by tensor: max abs/rel error, cosine similarity and, for the routing, the share of tokens whose
experts differ. Names the first layer out of tolerance. Tolerances default by the candidate's
dtype (docs/oracle.md). Exit 0 within tolerance, 1 not, 2 bad input.""",
                       epilog="example:\n  dsref compare /tmp/ref.safetensors /tmp/cand.safetensors --dtype bf16",
                       formatter_class=HelpFormatter)
    p.add_argument("reference", metavar="REFERENCE", help="reference dump (.safetensors), e.g. from `dsref golden`")
    p.add_argument("candidate", metavar="CANDIDATE", help="the engine's dump (.safetensors)")
    p.add_argument("--dtype", choices=_DTYPES, help="candidate's dtype: picks default tolerances "
                   "(default: the candidate's metadata, else float32)")
    _add_tol_args(p)
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("conformance", help="adversarial conformance kit for other engines",
                       description="""\
Small adversarial checkpoints with their golden dumps: a baseline that exercises every feature
at its simplest, and cases that each change one factor from it (RoPE pair layout, YaRN, expert
groups, correction bias, router precision, FP8 blocks, MTP, ...). A failing case is blamed on its
factor only when the baseline and the cases it builds on pass; otherwise the report names the
earlier failure that explains it (docs/oracle.md).

  list                                  the cases
  write DIR                             write the kit (checkpoint, tokens, golden per case)
  run DIR --engine E | --engine-cmd C   run an engine on every case and grade it
  grade DIR --candidate-dir OUTS        grade dumps OUTS/<case>.safetensors already written

--engine-cmd is run once per case with {checkpoint}, {tokens} (int32 .npy [batch, seq]) and
{out} (the .safetensors dump to write) filled in; exit 3 with an "unsupported: REASON" line
on stderr marks a checkpoint the engine cannot run (UNSUPPORTED, not a failure). Tolerances follow
each dump's "dtype" metadata unless --dtype is given. Engines take token ids as plain ids (0 and 1
included). Exit 0 when every case passes or is unsupported, 1 when one fails or errors, 2 bad input.""",
                       epilog=f"""\
examples:
  dsref conformance write /tmp/kit
  dsref conformance run /tmp/kit --engine-cmd \\
      "dsref golden --checkpoint {{checkpoint}} --tokens {{tokens}} --out {{out}}"
  dsref conformance run /tmp/kit --engine-cmd \\
      "{HF_ENGINE_CMD}\"""",
                       formatter_class=HelpFormatter)
    p.add_argument("action", choices=("list", "write", "run", "grade"), help="what to do (see above)")
    p.add_argument("dir", nargs="?", metavar="DIR", help="kit directory")
    p.add_argument("--cases", nargs="+", help="case names or letters (default: all); the cases they build on "
                   "are added")
    p.add_argument("--engine", choices=("dsref", "dsref-bf16", "dsref-float64", "transformers"), default="dsref",
                   help="built-in engine for run: our JAX model in float32 or bf16, the float64 NumPy reference, "
                        "or Hugging Face transformers (needs torch)")
    p.add_argument("--engine-cmd", metavar="COMMAND", help='run: your engine as a command template with '
                   '{checkpoint}, {tokens} and {out}, e.g. "mytool --checkpoint {checkpoint} --tokens {tokens} '
                   '--out {out}" (replaces --engine)')
    p.add_argument("--engine-name", metavar="NAME", help="run: the engine's name in the report (default: the "
                   "dumps' 'engine' metadata, else the command's module or program)")
    p.add_argument("--candidate-dir", metavar="OUTS", help="grade: directory with <case>.safetensors dumps")
    p.add_argument("--save", metavar="SAVE", help="run: also keep each engine dump as SAVE/<case>.safetensors "
                   "(an --engine-cmd dump is copied as the engine wrote it)")
    p.add_argument("--dtype", choices=_DTYPES, help="tolerance set (default: each dump's dtype metadata, else "
                   "the engine's dtype, else float32)")
    _add_tol_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_conformance_checked)


def _conformance_checked(args) -> int:
    from dsref.reference.oracle.golden import OracleError
    if args.action != "list" and not args.dir:
        raise OracleError(f"conformance {args.action}: the kit directory DIR is required")
    if args.action == "grade" and not args.candidate_dir:
        raise OracleError("conformance grade: --candidate-dir is required")
    if args.action == "grade" and not Path(args.candidate_dir).is_dir():
        raise OracleError(f"{args.candidate_dir}: no such directory")
    return cmd_conformance(args)


if __name__ == "__main__":  # pragma: no cover
    from dsref.experiments.cli import main
    sys.exit(main())
