"""A training run: text in, a trained and resumable Hugging Face checkpoint out (``dsref train``).

    corpus (a text file or a folder of them)
      -> byte-level BPE at the model's vocabulary size (``tokenizers``; or a given tokenizer.json)
      -> token ids [N]: the first (1 - holdout) for training, the rest held out
      -> batches of B windows of T+1 consecutive tokens (``Batches``)
      -> ``reference.train.Trainer`` steps
      -> a checkpoint every ``checkpoint_every`` steps and at the end (``save_run``)

The output folder is one checkpoint, complete at every instant: config.json and
model.safetensors (float32, with the MTP module: transformers' ``from_pretrained`` and our
``load_checkpoint`` read it), tokenizer.json, optimizer.safetensors (AdamW's state, one tensor
per leaf, named by its path in the state tree) and train_state.json (the step, the settings,
the data's fingerprint, every step's metrics). It is assembled beside the target and swapped
in by ``reference.atomic.atomic_dir``, so a run killed at any moment (SIGKILL included, also in
the middle of a write) leaves the previous complete checkpoint.

Resuming: the same command again. The data order is a pure function of (seed, step): batch s
takes windows s*B .. s*B+B-1 of an endless sequence of epochs, each a permutation of the
corpus's non-overlapping windows drawn from ``numpy.random.default_rng([seed, epoch])``; the
training step itself draws no random numbers. So the checkpoint's step is the data position and
the PRNG state, and a resumed run repeats an uninterrupted one bit for bit (tests/test_train_cli.py
kills one with SIGKILL to check). Settings that would change the result (model, data,
tokenizer, batch, seq, seed, optimizer settings) must match the checkpoint's: a mismatch is an
error naming the option.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dsref.reference.atomic import atomic_dir
from dsref.reference.config import ModelConfig

FORMAT = "dsref-train/1"
STATE_FILE = "train_state.json"
OPT_FILE = "optimizer.safetensors"
TOKENIZER_FILE = "tokenizer.json"


# ------------------------------------------------------------------ data
@dataclass(frozen=True)
class Corpus:
    """The documents of ``--data`` (name relative to it, text), sorted by name."""

    path: str
    docs: tuple[tuple[str, str], ...]
    skipped: tuple[str, ...]  # files that are not UTF-8 text (binary files in a docs folder)

    @property
    def chars(self) -> int:
        return sum(len(t) for _, t in self.docs)


def _text(p: Path) -> str | None:
    b = p.read_bytes()
    if b"\0" in b:
        return None
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_corpus(path: str | Path) -> Corpus:
    """A UTF-8 text file, or every UTF-8 text file under a folder (hidden entries skipped,
    symlinked folders not followed; files that are not text are listed as skipped)."""
    p = Path(path)
    if not str(path).strip():
        raise ValueError("--data: empty path; give a text file or a folder of text files")
    if p.is_file():
        t = _text(p)
        if t is None:
            raise ValueError(f"--data {path}: not UTF-8 text; give a text file or a folder of text files")
        docs, skipped = [(p.name, t)], []
    elif p.is_dir():
        docs, skipped = [], []
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                q = Path(root) / f
                if f.startswith(".") or not q.is_file():
                    continue
                t = _text(q)
                (skipped.append(str(q.relative_to(p))) if t is None else docs.append((str(q.relative_to(p)), t)))
        docs.sort()
    elif p.exists():
        raise ValueError(f"--data {path}: not a file or a folder")
    else:
        raise ValueError(f"--data {path}: no such file or folder")
    if not any(t.strip() for _, t in docs):
        why = f" ({len(skipped)} non-text files skipped)" if skipped else ""
        raise ValueError(f"--data {path}: no text found{why}")
    return Corpus(str(path), tuple(docs), tuple(skipped))


def make_tokenizer(corpus: Corpus, vocab_size: int, tokenizer_file: str | None):
    """(tokenizer, trained?): the given tokenizer.json, or a byte-level BPE trained on the corpus."""
    from tokenizers import Tokenizer

    from dsref.reference.init_checkpoint import train_tokenizer
    if tokenizer_file is None:
        if vocab_size < 256:
            raise ValueError(f"--data: a byte-level BPE needs vocab_size >= 256; the model has {vocab_size} "
                             "(give --tokenizer, or a model with a larger vocabulary)")
        return train_tokenizer(vocab_size, texts=[t for _, t in corpus.docs]), True
    p = Path(tokenizer_file)
    if not p.is_file():
        raise ValueError(f"--tokenizer {tokenizer_file}: no such file")
    try:
        tok = Tokenizer.from_str(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, Exception) as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"--tokenizer {tokenizer_file}: not a tokenizers tokenizer.json ({str(e)[:120]})") from None
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"--tokenizer {tokenizer_file}: {tok.get_vocab_size()} ids, more than the model's "
                         f"vocabulary of {vocab_size}")
    return tok, False


def encode(tok, corpus: Corpus) -> np.ndarray:
    """Token ids of every document, in order, with a newline between documents."""
    enc = tok.encode_batch([t if t.endswith("\n") else t + "\n" for _, t in corpus.docs])
    return np.concatenate([np.asarray(e.ids, np.int32) for e in enc])


def unigram_entropy(ids: np.ndarray) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of a model that ignores context."""
    p = np.bincount(ids) / max(ids.size, 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


class Batches:
    """Batch s: windows s*B .. s*B+B-1 of an endless sequence of epochs; epoch e is the
    corpus's non-overlapping windows ids[i*T : i*T+T+1] in the order
    ``default_rng([seed, e]).permutation``. A pure function of (seed, s): the data position
    of a checkpoint is its step."""

    def __init__(self, ids: np.ndarray, batch: int, seq: int, seed: int):
        self.ids, self.batch, self.seq, self.seed = ids, batch, seq, seed
        self.windows = (ids.size - 1) // seq
        if self.windows < 1:
            raise ValueError(f"--seq {seq}: the training text has {ids.size} tokens, fewer than one window "
                             f"of {seq + 1}; give more text or a smaller --seq")
        self._perm: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.windows)}
        return self._perm[epoch]

    def position(self, step: int) -> dict[str, int]:
        g = step * self.batch
        return {"epoch": g // self.windows, "window": g % self.windows}

    def __call__(self, step: int) -> np.ndarray:
        rows = []
        for g in range(step * self.batch, (step + 1) * self.batch):
            i = int(self.order(g // self.windows)[g % self.windows]) * self.seq
            rows.append(self.ids[i:i + self.seq + 1])
        return np.stack(rows).astype(np.int32)


def heldout_batches(ids: np.ndarray, batch: int, seq: int, limit: int) -> list[np.ndarray]:
    """Up to ``limit`` batches of consecutive non-overlapping held-out windows (fixed: the same
    evaluation at every checkpoint)."""
    n = min((ids.size - 1) // seq, limit * batch)
    w = [ids[i * seq:i * seq + seq + 1] for i in range(n)]
    return [np.stack(w[k:k + batch]).astype(np.int32) for k in range(0, n - batch + 1, batch)] or (
        [np.stack(w).astype(np.int32)] if w else [])


def fingerprint(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, np.int32).tobytes()).hexdigest()


# ------------------------------------------------------------------ checkpoint
def _keyname(path) -> str:
    import jax
    return jax.tree_util.keystr(path, simple=True, separator=".")


def opt_state_arrays(opt_state) -> dict[str, np.ndarray]:
    """AdamW's state as {path in the state tree: array} (safetensors: never a pickle)."""
    import jax
    out = {}
    for path, a in jax.tree_util.tree_leaves_with_path(opt_state):
        out[_keyname(path)] = np.asarray(a)
    return out


def restore_opt_state(template, arrays: dict[str, np.ndarray], where: str):
    """The state tree of ``template`` (``tx.init(params)``) with the saved arrays; every leaf must
    be there with its shape and dtype."""
    import jax
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, t in leaves:
        k = _keyname(path)
        if k not in arrays:
            raise ValueError(f"{where}: optimizer state has no tensor {k!r} (a checkpoint of other settings?)")
        a = arrays[k]
        if a.shape != tuple(t.shape) or a.dtype != np.dtype(t.dtype):
            raise ValueError(f"{where}: optimizer tensor {k!r} is {a.dtype}{list(a.shape)}, expected "
                             f"{np.dtype(t.dtype)}{list(t.shape)}")
        out.append(a)
    if len(arrays) != len(leaves):
        raise ValueError(f"{where}: {len(arrays)} optimizer tensors, expected {len(leaves)}")
    return jax.tree_util.tree_unflatten(treedef, [o for o in out])


def save_run(out: Path, trainer, cfg: ModelConfig, tokenizer, state: dict[str, Any]) -> None:
    """One complete checkpoint (weights, optimizer, tokenizer, train_state.json) swapped in at ``out``."""
    from safetensors.numpy import save_file

    from dsref.reference.checkpoint import save_checkpoint
    with atomic_dir(out) as stage:
        save_checkpoint(trainer.model(), cfg, stage, dtype="float32", atomic=False)
        save_file(opt_state_arrays(trainer.opt_state), str(stage / OPT_FILE), metadata={"format": FORMAT})
        tokenizer.save(str(stage / TOKENIZER_FILE))
        (stage / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")


def read_state(out: Path) -> dict[str, Any] | None:
    """train_state.json of a ``dsref train`` folder; None when ``out`` is new or empty (after
    finishing an interrupted swap); an error for a folder that holds something else."""
    from dsref.reference.atomic import recover_dir
    if not out.exists():
        recover_dir(out)
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    f = out / STATE_FILE
    if not f.is_file():
        if any(out.iterdir()):
            raise ValueError(f"--out {out}: a folder that is not a `dsref train` checkpoint (no {STATE_FILE}); "
                             "give a new or empty folder, or a training run's folder to resume it")
        return None
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--out {out}: {STATE_FILE} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"--out {out}: {STATE_FILE} is not a {FORMAT} training state")
    return state


def load_run(out: Path, tc, state: dict[str, Any], mesh=None):
    """The Trainer of a checkpoint folder: weights, optimizer state and step restored exactly."""
    from safetensors.numpy import load_file

    from dsref.reference.checkpoint import load_checkpoint
    from dsref.reference.train import Trainer
    _, model = load_checkpoint(out, with_mtp=state["with_mtp"])
    tr = Trainer(model, tc, mesh)
    tr.load_opt_state(restore_opt_state(tr.opt_state, load_file(str(out / OPT_FILE)), f"--out {out}"))
    tr.steps_done = int(state["step"])
    return tr


# ------------------------------------------------------------------ the run
@dataclass(frozen=True)
class RunSpec:
    """What determines a run's result (compared on resume) and how it is run."""

    cfg: ModelConfig
    data: str
    out: str
    steps: int
    batch: int
    seq: int
    seed: int
    tc: Any  # reference.train.TrainConfig
    tokenizer: str | None = None
    holdout: float = 0.05
    checkpoint_every: int = 100
    eval_batches: int = 8
    with_mtp: bool = True
    mesh: Any = None  # a jax Mesh (reference/mesh.py) or None: one device


def _settings(spec: RunSpec, data: dict) -> dict[str, Any]:
    return {"model": spec.cfg.to_hf_dict(), "batch": spec.batch, "seq": spec.seq, "seed": spec.seed,
            "holdout": spec.holdout, "with_mtp": spec.with_mtp, "train_config": dataclasses.asdict(spec.tc),
            "data_sha256": data["sha256"]}


_OPTION = {"model": "--preset/--config", "batch": "--batch", "seq": "--seq", "seed": "--seed", "holdout": "--holdout",
           "with_mtp": "--no-mtp", "data_sha256": "--data/--tokenizer"}


def _check_resume(out: Path, old: dict, new: dict) -> None:
    for k, v in new.items():
        if k == "train_config":
            diff = [f for f in v if f != "steps" and old[k].get(f) != v[f]]
            if old[k].get("steps") != v["steps"]:
                diff.insert(0, "steps")
            if diff:
                f = diff[0]
                # b1/b2 have no option (V3's values): a checkpoint made otherwise (the Python API) needs a new --out
                opt = {"clip_norm": "--clip", "b1": "--out", "b2": "--out"}.get(f, "--" + f.replace("_", "-"))
                raise ValueError(f"{opt}: the checkpoint in {out} was trained with {f}={old[k].get(f)!r}, not "
                                 f"{v[f]!r}; give the same settings to resume, or a new --out")
        elif old.get(k) != v:
            raise ValueError(f"{_OPTION[k]}: differs from the run in {out} (its {k} is not this one's); give the "
                             "same settings to resume, or a new --out")


def run(spec: RunSpec, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) and return the summary ``dsref train --json`` prints."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsref.reference.model import DeepseekModel
    from dsref.reference.train import Trainer, loss_fn

    out = Path(spec.out)
    old = read_state(out)
    corpus = read_corpus(spec.data)
    tok_file = spec.tokenizer if spec.tokenizer is not None or old is None else str(out / TOKENIZER_FILE)
    tok, trained = make_tokenizer(corpus, spec.cfg.vocab_size, tok_file)
    if old is not None:
        trained = old["data"]["tokenizer_trained"]
    ids = encode(tok, corpus)
    n_hold = int(round(ids.size * spec.holdout))
    train_ids, held = ids[:ids.size - n_hold], ids[ids.size - n_hold:]
    data = {"path": corpus.path, "files": len(corpus.docs), "skipped_files": len(corpus.skipped),
            "chars": corpus.chars, "tokens": int(ids.size), "train_tokens": int(train_ids.size),
            "heldout_tokens": int(held.size), "sha256": fingerprint(ids), "tokenizer_trained": trained,
            "tokenizer_vocab": tok.get_vocab_size(),
            "unigram_entropy_train": unigram_entropy(train_ids),
            "unigram_entropy_heldout": unigram_entropy(held) if held.size else None}
    batches = Batches(train_ids, spec.batch, spec.seq, spec.seed)
    evals = heldout_batches(held, spec.batch, spec.seq, spec.eval_batches)
    settings = _settings(spec, data)
    if old is not None:
        _check_resume(out, {k: old.get(k) for k in settings}, settings)
        tr = load_run(out, spec.tc, old, spec.mesh)
        history, eval_hist = old["history"], old["eval"]
        log(f"resuming {out} at step {tr.steps_done} of {spec.steps}")
    else:
        tr = Trainer(DeepseekModel(spec.cfg, rngs=nnx.Rngs(spec.seed), with_mtp=spec.with_mtp), spec.tc, spec.mesh)
        history, eval_hist = [], []
    start = tr.steps_done
    eval_fn = jax.jit(lambda p, t: loss_fn(p, tr.graphdef, t, spec.tc)[1][0][0])

    def evaluate() -> float | None:
        if not evals:
            return None
        if spec.mesh is None:
            return float(np.mean([float(eval_fn(tr.params, jnp.asarray(b))) for b in evals]))
        from dsref.reference.mesh import place_batch
        with jax.set_mesh(spec.mesh):
            return float(np.mean([float(eval_fn(tr.params, place_batch(jnp.asarray(b), spec.mesh))) for b in evals]))

    def checkpoint(elapsed: float) -> None:
        state = {"format": FORMAT, "step": tr.steps_done, **settings, "data": data,
                 "position": batches.position(tr.steps_done), "moe_layers": list(tr.layers),
                 "mesh": None if spec.mesh is None else dict(spec.mesh.shape),
                 "history": history, "eval": eval_hist, "elapsed_s": elapsed}
        save_run(out, tr, spec.cfg, tok, state)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=spec.steps, initial=start, unit="step", desc="dsref train", file=__import__("sys").stderr,
                   dynamic_ncols=True)
    t0, step_s, tokens = time.perf_counter(), 0.0, 0
    elapsed0 = float(old["elapsed_s"]) if old else 0.0
    try:
        for s in range(start, spec.steps):
            t = time.perf_counter()
            m = tr.step(batches(s))
            rec = {"step": s + 1, "loss": float(m.loss), "main": float(m.main), "mtp": float(m.mtp),
                   "balance": float(m.balance), "grad_norm": float(m.grad_norm), "lr": float(m.lr),
                   "max_violation": [round(float(v), 6) for v in np.asarray(m.max_violation)]}
            if not np.isfinite(rec["loss"]):
                raise ValueError(f"--lr {spec.tc.lr}: the loss became {rec['loss']} at step {s + 1}; the last "
                                 f"checkpoint in {out} is unchanged; lower --lr")
            history.append(rec)
            if s > start:  # the first step compiles: tokens/s is over the steps after it (float() waited)
                step_s += time.perf_counter() - t
                tokens += spec.batch * spec.seq
            if bar is not None:
                rate = tokens / max(step_s, 1e-9)
                bar.set_postfix(loss=f"{rec['main']:.3f}", tok_s=f"{rate:,.0f}",
                                maxvio=f"{max(rec['max_violation'], default=0):.2f}", refresh=False)
                bar.update(1)
            if (s + 1) % spec.checkpoint_every == 0 and s + 1 < spec.steps:
                eval_hist.append({"step": s + 1, "loss": evaluate()})
                checkpoint(elapsed0 + time.perf_counter() - t0)
        if tr.steps_done > start or not eval_hist or eval_hist[-1]["step"] != tr.steps_done:
            eval_hist.append({"step": tr.steps_done, "loss": evaluate()})
            checkpoint(elapsed0 + time.perf_counter() - t0)
    finally:
        if bar is not None:
            bar.close()
    last = history[-min(10, len(history)):]
    mv = np.mean([h["max_violation"] for h in last], axis=0) if last and last[0]["max_violation"] else np.zeros(0)
    return {
        "checkpoint": str(out), "model": spec.cfg.name, "parameters": spec.cfg.param_counts()["total_params"],
        "steps": tr.steps_done, "resumed_from": start if old is not None else None,
        "final_loss": float(np.mean([h["main"] for h in last])) if last else None,
        "final_step_loss": history[-1]["loss"] if history else None,
        "eval_loss": eval_hist[-1]["loss"] if eval_hist else None,
        "unigram_entropy": data["unigram_entropy_heldout"] or data["unigram_entropy_train"],
        "tokens_per_s": tokens / step_s if tokens else None,
        "max_violation": float(mv.max()) if mv.size else None,
        "max_violation_per_layer": {str(i): float(v) for i, v in zip(tr.layers, mv)},
        "tokens_trained": tr.steps_done * spec.batch * spec.seq,
        "data": {k: data[k] for k in ("path", "files", "skipped_files", "tokens", "train_tokens", "heldout_tokens",
                                      "tokenizer_trained", "tokenizer_vocab")},
        "train_config": dataclasses.asdict(spec.tc),
    }
