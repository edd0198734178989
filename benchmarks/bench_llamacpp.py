"""llama.cpp as the side-by-side decode peer: the same DeepSeek checkpoint, converted to GGUF
with llama.cpp's own converter, timed at batch 1 on the same CPU.

Measured (median of --runs runs after one warm-up run; load and conversion excluded):
  prompt eval tokens/s   one llama_decode over the whole prompt (--prompt-lens, 128 and 512)
  decode tokens/s        greedy steady state: the first new token comes from the prompt's
                         logits; the other new_tokens - 1 each take one llama_decode of one
                         token plus a numpy argmax over the logits, timed together
  internal               llama.cpp's own counters (llama_perf_context: t_p_eval, t_eval) for
                         the same runs, to show what the Python loop adds
  weight bandwidth       activated parameters (dsref's count: every weight a token multiplies,
                         k of E experts, LM head) x bytes per weight of the GGUF type x decode
                         tokens/s; --bandwidth also measures the read bandwidth the way
                         benchmarks/bench_decode.py does (dsref.hwmodels.probe)

Threads: n_threads = n_threads_batch = the cores this process may use (--threads to change).
llama.cpp's CPU backend here is built with OpenMP; libgomp's threads spin while they wait, so
when other processes hold the cores, two spinning threads lose most of their time
(--omp-wait-policy passive, or --threads 1, measures that; see docs/performance.md).

Skips cleanly (exit 0, one line "llama.cpp not available: <why>", and a "skipped" key with
--json) when llama_cpp or the converter cannot be imported.

Installation (what these numbers were taken with: llama-cpp-python 0.3.36, which vendors
llama.cpp ggml-org/llama.cpp@0c1e57098 (its CHANGELOG; ggml 0.25.3, gguf-py 0.19.0), Python
3.11, gcc 12.2, torch 2.13 CPU; the build took ~27 minutes at -j2 on 2 shared cores):
    pip download llama-cpp-python --no-binary :all: --no-deps -d /tmp/llcpp
    tar xzf /tmp/llcpp/llama_cpp_python-*.tar.gz -C /tmp/llcpp
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 pip install /tmp/llcpp/llama_cpp_python-*.tar.gz
    export LLAMA_CPP_CONVERTER=/tmp/llcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py
The wheel does not ship the converter; it lives in the sdist (vendor/llama.cpp, with its
`conversion/` package and `gguf-py/`, which it puts on sys.path itself; the PyPI `gguf` is
used only with NO_LOCAL_GGUF set and may lag the converter's architecture list). The
converter needs torch and transformers (both already in dsref's environment).

What the converter needs from a checkpoint (DeepseekV3ForCausalLM maps to llama.cpp's
DEEPSEEK2 architecture, MLA kept compressed in the KV cache):
  * config.json with "architectures": ["DeepseekV3ForCausalLM"] (or V2), the MLA and MoE
    fields (q_lora_rank, kv_lora_rank, qk_nope/rope_head_dim, v_head_dim, n_routed_experts,
    n_shared_experts, first_k_dense_replace, n_group, topk_group, scoring_func,
    norm_topk_prob, routed_scaling_factor); num_key_value_heads must equal the number of
    heads (it splits kv_b_proj into attn_k_b / attn_v_b itself, per head, and transposes k_b).
  * Hugging Face tensor names (model.layers.N.self_attn.kv_b_proj.weight, per-expert
    mlp.experts.E.{gate,up,down}_proj.weight, which it stacks, mlp.gate.e_score_correction_bias).
    Layers >= num_hidden_layers (MTP) are skipped.
  * A tokenizer it can recognise: it hashes the ids the tokenizer gives a fixed test string
    and accepts only the hashes in its list (convert_hf_to_gguf_update.py). A byte-level BPE
    trained on our own text (dsref init-checkpoint --tokenizer) is not in the list, so the
    conversion stops with "BPE pre-tokenizer was not recognized". This script therefore runs
    the converter through a small wrapper that, only for a tokenizer.json whose pre-tokenizer
    is plain ByteLevel (GPT-2 regex, no prefix space, no normaliser) -- checked here --
    answers "gpt-2", the llama.cpp pre-tokenizer with that same regex. Everything else is
    the converter's own code.
  * llama.cpp applies DeepSeek's rotary embedding to interleaved pairs (rope_interleave true,
    the original DeepSeek layout); a checkpoint with rope_interleave false is refused.
  * A byte-level BPE of only 256 ids (tiny presets) has no merges, and llama.cpp refuses a BPE
    vocabulary without merges: refused here with that reason.
  * No bos/eos ids in config.json and no special tokens (dsref's tokenizer has none): llama.cpp
    then takes id 11 as BOS, EOS and end-of-generation. The greedy loop here never stops on
    EOS, so only llama-cpp-python's high-level completion calls would be affected.
  * Checkpoints without tokenizer.json (transformers' save_pretrained of a bare config) get
    dsref's byte-level BPE (init_checkpoint.train_tokenizer) in the converter's input copy;
    only token ids are benchmarked, so the vocabulary's content does not matter.
The converter's input is a folder of symlinks to the checkpoint's safetensors plus copies of
config.json and tokenizer.json (and a tokenizer_config.json naming PreTrainedTokenizerFast,
so that transformers does not pick a tokenizer class from model_type); the checkpoint itself
is never modified. GGUFs are kept in --gguf-dir (default: a dsref-gguf folder in the temp
directory), named by a fingerprint of the checkpoint files and the output type.

Run:  python benchmarks/bench_llamacpp.py --checkpoint DIR [--dtypes float32,bfloat16]
          [--prompt-lens 128,512] [--new-tokens 32] [--runs 5] [--compare-dsref 16] [--json]
Without --checkpoint a small-v3 float32 checkpoint (seed 0, with tokenizer) is written to a
temporary folder first (dsref init-checkpoint, about two minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# GGUF output types by the dtype names this script accepts (ours and llama.cpp's)
GGUF_TYPES = {"float32": "f32", "f32": "f32", "bfloat16": "bf16", "bf16": "bf16", "float16": "f16", "f16": "f16"}
# bytes of a weight matrix element in that GGUF type (norms and biases stay f32; they are <0.1%)
_WEIGHT_BYTES = {"f32": 4, "bf16": 2, "f16": 2}
_ARCHS = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
_MODEL_TYPES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}

# Runs llama.cpp's converter unchanged except for one answer: a plain byte-level BPE whose
# hash is not in its list gets llama.cpp's "gpt-2" pre-tokenizer (same regex). The check that
# the tokenizer is such a BPE was made by prepare_converter_input before this runs.
_WRAPPER = r"""
import sys
conv = sys.argv[1]
sys.argv = [conv] + sys.argv[2:]
sys.path.insert(0, conv.rsplit("/", 1)[0])
import convert_hf_to_gguf as C
from conversion.base import TextModel
_orig = TextModel.get_vocab_base_pre
def _pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        print("bench_llamacpp: tokenizer hash not in the converter's list; byte-level BPE -> 'gpt-2'",
              file=sys.stderr)
        return "gpt-2"
TextModel.get_vocab_base_pre = _pre
C.main()
"""


def find_converter(explicit: str | None = None) -> Path | None:
    """convert_hf_to_gguf.py from --converter or $LLAMA_CPP_CONVERTER (the file or its folder)."""
    for c in (explicit, os.environ.get("LLAMA_CPP_CONVERTER")):
        if c:
            p = Path(c)
            p = p / "convert_hf_to_gguf.py" if p.is_dir() else p
            return p
    return None


_PROBED: dict[str, str | None] = {}  # converter path -> why it cannot be imported (None: it can)


def availability(converter: str | None = None) -> tuple[str | None, Path | None]:
    """(why llama.cpp cannot be used here, or None; the converter's path)."""
    try:
        importlib.import_module("llama_cpp")  # its shared library (and libgomp) loads here
    except Exception as e:  # ImportError, or OSError from a missing libllama
        return f"cannot import llama_cpp ({type(e).__name__}: {e}); pip install llama-cpp-python", None
    conv = find_converter(converter)
    if conv is None:
        return ("llama.cpp's convert_hf_to_gguf.py not given (--converter or $LLAMA_CPP_CONVERTER; it ships "
                "in the llama-cpp-python sdist under vendor/llama.cpp)"), None
    if not conv.is_file():
        return f"converter {conv} does not exist", None
    key = str(conv.resolve())
    if key not in _PROBED:  # importing it (torch, transformers) takes ~8 s: once per process
        probe = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                "import convert_hf_to_gguf", str(conv.parent)], capture_output=True, text=True)
        last = (probe.stderr.strip().splitlines() or ["no message"])[-1]
        _PROBED[key] = None if probe.returncode == 0 else f"cannot import the converter {conv} ({last})"
    return _PROBED[key], (None if _PROBED[key] else conv)


def _read_json(path: Path, what: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


def _byte_level_bpe(tok: dict) -> str | None:
    """Why tokenizer.json is not a plain GPT-2-style byte-level BPE, or None if it is."""
    model = tok.get("model") or {}
    pre = tok.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model type {model.get('type')!r}, not BPE"
    if pre.get("type") != "ByteLevel":
        return f"pre_tokenizer {pre.get('type')!r}, not ByteLevel"
    if not pre.get("use_regex", True) or pre.get("add_prefix_space", False):
        return "ByteLevel pre_tokenizer without the GPT-2 regex or with a prefix space"
    if tok.get("normalizer") is not None:
        return f"normalizer {tok['normalizer'].get('type')!r}"
    return None


def prepare_converter_input(checkpoint_dir: str | Path, work_dir: str | Path) -> dict:
    """Fill work_dir (new or empty) with what llama.cpp's converter reads, without touching the
    checkpoint: symlinks to its safetensors (and index), config.json (architectures filled in
    from model_type when missing), tokenizer.json (dsref's byte-level BPE when the checkpoint
    has none) and a tokenizer_config.json. Returns what was done."""
    src, dst = Path(checkpoint_dir), Path(work_dir)
    if not src.is_dir():
        raise ValueError(f"checkpoint {src}: not a directory")
    cfg = _read_json(src / "config.json", "the checkpoint's config.json")
    notes = []
    archs = cfg.get("architectures") or []
    if not any(a in _ARCHS for a in archs):
        mt = cfg.get("model_type")
        if archs or mt not in _MODEL_TYPES:
            raise ValueError(f"{src / 'config.json'}: architectures {archs} / model_type {mt!r}: llama.cpp's "
                             f"DeepSeek converter takes {', '.join(_ARCHS)}")
        cfg["architectures"] = [_MODEL_TYPES[mt]]
        notes.append(f"architectures set from model_type {mt}")
    if cfg.get("rope_interleave") is False:
        raise ValueError(f"{src / 'config.json'}: rope_interleave false; llama.cpp's DEEPSEEK2 rotates "
                         "interleaved pairs only")
    nh, nkv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    if nh != nkv:
        raise ValueError(f"{src / 'config.json'}: num_key_value_heads {nkv} != num_attention_heads {nh}; the "
                         "converter splits kv_b_proj per key/value head and expects MLA's one per query head")
    shards = sorted(p for p in src.iterdir() if p.name.endswith(".safetensors"))
    if not shards:
        raise ValueError(f"checkpoint {src}: no *.safetensors files")
    dst.mkdir(parents=True, exist_ok=True)
    if any(dst.iterdir()):
        raise ValueError(f"converter input folder {dst}: not empty")
    for p in shards + [q for q in [src / "model.safetensors.index.json"] if q.exists()]:
        (dst / p.name).symlink_to(p.resolve())
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tok_path = src / "tokenizer.json"
    if tok_path.exists():
        tok = _read_json(tok_path, "tokenizer")
        why = _byte_level_bpe(tok)
        if why:
            raise ValueError(f"{tok_path}: {why}; this script can pass only a plain byte-level BPE to llama.cpp "
                             "when its hash is unknown to the converter")
        shutil.copyfile(tok_path, dst / "tokenizer.json")
        tokenizer = "checkpoint tokenizer.json"
    else:
        from dsref.reference.init_checkpoint import train_tokenizer
        vocab = int(cfg.get("vocab_size", 0))
        if vocab < 256:
            raise ValueError(f"{src / 'config.json'}: vocab_size {vocab}; a byte-level tokenizer needs >= 256")
        train_tokenizer(vocab).save(str(dst / "tokenizer.json"))
        tokenizer = "dsref train_tokenizer (the checkpoint has no tokenizer.json)"
    tok = _read_json(dst / "tokenizer.json", "tokenizer")
    n_ids = len(tok["model"]["vocab"])
    if not tok["model"].get("merges"):  # llama.cpp: "cannot find tokenizer merges in model file"
        raise ValueError(f"{src}: tokenizer has no BPE merges ({n_ids} ids: bytes only); llama.cpp cannot load "
                         "a BPE vocabulary without merges (vocab_size must exceed 256)")
    if n_ids > int(cfg.get("vocab_size", 0)):
        raise ValueError(f"{tok_path}: {n_ids} ids, more than config.json's vocab_size {cfg.get('vocab_size')}")
    # transformers would otherwise choose a tokenizer class from model_type (DeepSeek -> Llama)
    (dst / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return {"dir": str(dst), "tokenizer": tokenizer, "tokenizer_ids": n_ids, "notes": notes,
            "shards": [p.name for p in shards]}


def _fingerprint(checkpoint_dir: Path, gtype: str, converter: Path) -> str:
    h = hashlib.sha256(f"{gtype}|{converter.resolve()}".encode())
    for p in sorted(checkpoint_dir.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def convert(checkpoint_dir: str | Path, dtype: str, converter: Path, gguf_dir: str | Path | None = None) -> dict:
    """GGUF of the checkpoint in the given type (reused when the same files were converted before)."""
    gtype = GGUF_TYPES.get(dtype)
    if gtype is None:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(GGUF_TYPES)}")
    ck = Path(checkpoint_dir).resolve()
    out_dir = Path(gguf_dir) if gguf_dir else Path(tempfile.gettempdir()) / "dsref-gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{ck.name}-{_fingerprint(ck, gtype, converter)}-{gtype}.gguf"
    if out.exists():
        return {"gguf": str(out), "gguf_type": gtype, "convert_s": 0.0, "reused": True}
    with tempfile.TemporaryDirectory(prefix="gguf-in-", dir=out_dir) as work:
        prep = prepare_converter_input(ck, Path(work) / "in")
        part = out.with_suffix(".part")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _WRAPPER, str(converter), prep["dir"], "--outtype", gtype,
                            "--outfile", str(part), "--model-name", ck.name], capture_output=True, text=True)
        convert_s = time.perf_counter() - t
        if r.returncode != 0:
            part.unlink(missing_ok=True)
            tail = " | ".join(r.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"llama.cpp's converter failed on {ck} ({gtype}): {tail}")
        os.replace(part, out)
    return {"gguf": str(out), "gguf_type": gtype, "convert_s": convert_s, "reused": False,
            "tokenizer": prep["tokenizer"], "notes": prep["notes"]}


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _prompt_ids(prompt_tokens, vocab: int) -> list[int]:
    """An int: that many ids drawn as benchmarks/bench_decode.py draws them; a list: those ids."""
    if isinstance(prompt_tokens, bool):
        raise ValueError("prompt_tokens: a count or a list of token ids, got a bool")
    if isinstance(prompt_tokens, int):
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens: at least 1, got {prompt_tokens}")
        import numpy as np
        return np.random.default_rng(0).integers(0, vocab, prompt_tokens).tolist()
    ids = [int(t) for t in prompt_tokens]
    if not ids or any(t < 0 or t >= vocab for t in ids):
        raise ValueError(f"prompt_tokens: need at least one id, each in [0, {vocab})")
    return ids


def _greedy_run(llm, prompt: list[int], new_tokens: int) -> dict:
    import llama_cpp
    import numpy as np
    n_vocab = llm.n_vocab()
    argmax = lambda: int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())
    llm.reset()  # n_tokens = 0; eval() then drops the whole KV cache of the previous run
    llama_cpp.llama_perf_context_reset(llm.ctx)
    t0 = time.perf_counter()
    llm.eval(prompt)
    toks = [argmax()]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([toks[-1]])
        toks.append(argmax())
    t2 = time.perf_counter()
    perf = llama_cpp.llama_perf_context(llm.ctx)
    r = {"tokens": toks, "prefill_s": t1 - t0, "decode_s": t2 - t1,
         "internal_p_eval_ms": perf.t_p_eval_ms, "internal_n_p_eval": perf.n_p_eval,
         "internal_eval_ms": perf.t_eval_ms, "internal_n_eval": perf.n_eval}
    return r


def measure(checkpoint_dir, dtype="float32", prompt_tokens=128, new_tokens=32, runs=5, *,
            converter: str | None = None, gguf_dir: str | None = None, threads: int | None = None,
            flash_attn: bool = False) -> dict:
    """llama.cpp's batch-1 prompt eval and greedy decode speed on checkpoint_dir.

    dtype: float32 / bfloat16 / float16 (the GGUF type; the KV cache is f32 for f32, else f16).
    prompt_tokens: a count (ids drawn as bench_decode.py draws them) or a list of ids.
    Returns medians over `runs` runs after one warm-up, every run's figures, the greedy tokens,
    versions and settings; {"engine": "llama.cpp", "skipped": why} when llama.cpp or its
    converter cannot be imported. Bad arguments raise ValueError.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens: an integer >= 2 (one from the prompt, the rest decoded), got {new_tokens!r}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs: an integer >= 1, got {runs!r}")
    if GGUF_TYPES.get(dtype) is None:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(GGUF_TYPES)}")
    why, conv = availability(converter)
    if why:
        return {"engine": "llama.cpp", "skipped": why}
    import llama_cpp

    cfg = _read_json(Path(checkpoint_dir) / "config.json", "the checkpoint's config.json")
    prompt = _prompt_ids(prompt_tokens, int(cfg.get("vocab_size", 0)))
    g = convert(checkpoint_dir, dtype, conv, gguf_dir)
    threads = threads or _threads()
    n_ctx = len(prompt) + new_tokens
    kv = llama_cpp.GGML_TYPE_F32 if g["gguf_type"] == "f32" else llama_cpp.GGML_TYPE_F16
    t = time.perf_counter()
    llm = llama_cpp.Llama(g["gguf"], n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, use_mmap=False, logits_all=False, flash_attn=flash_attn,
                          type_k=kv, type_v=kv, verbose=False)
    load_s = time.perf_counter() - t
    try:
        _greedy_run(llm, prompt, new_tokens)  # warm-up: first touch of weights and buffers
        rs = [_greedy_run(llm, prompt, new_tokens) for _ in range(runs)]
        system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    finally:
        llm.close()
    P, D = len(prompt), new_tokens - 1
    pre = [P / r["prefill_s"] for r in rs]
    dec = [D / r["decode_s"] for r in rs]
    ipre = [r["internal_n_p_eval"] / (r["internal_p_eval_ms"] / 1e3) for r in rs if r["internal_p_eval_ms"] > 0]
    idec = [r["internal_n_eval"] / (r["internal_eval_ms"] / 1e3) for r in rs if r["internal_eval_ms"] > 0]
    out = {
        "engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "system_info": system_info,
        "checkpoint": str(checkpoint_dir), **{k: g[k] for k in ("gguf", "gguf_type", "convert_s", "reused")},
        "gguf_bytes": os.path.getsize(g["gguf"]), "kv_cache_type": "f32" if kv == llama_cpp.GGML_TYPE_F32 else "f16",
        "flash_attn": flash_attn, "threads": threads, "n_ctx": n_ctx, "n_batch": 512, "load_s": load_s,
        "prompt_tokens": P, "new_tokens": new_tokens, "runs": runs,
        "prefill_tokens_per_s": statistics.median(pre), "decode_tokens_per_s": statistics.median(dec),
        "prefill_tokens_per_s_runs": pre, "decode_tokens_per_s_runs": dec,
        "internal_prefill_tokens_per_s": statistics.median(ipre) if ipre else None,
        "internal_decode_tokens_per_s": statistics.median(idec) if idec else None,
        "tokens": rs[0]["tokens"], "same_tokens_every_run": all(r["tokens"] == rs[0]["tokens"] for r in rs),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_cpu": os.getloadavg(),
    }
    try:  # dsref's activated-parameter count, as bench_decode.py uses it
        from dsref.reference.checkpoint import read_config
        act = read_config(checkpoint_dir).param_counts()["activated_params"]
        out["activated_weight_bytes_per_token"] = act * _WEIGHT_BYTES[g["gguf_type"]]
        out["decode_weight_bandwidth_Bps"] = out["activated_weight_bytes_per_token"] * out["decode_tokens_per_s"]
    except (ImportError, OSError, ValueError, KeyError) as e:  # one dsref cannot read is still benchmarked
        out["activated_weight_bytes_per_token"] = None
        out["activated_weight_bytes_note"] = f"dsref could not read the config ({e})"
    return out


def dsref_greedy(checkpoint_dir, prompt: list[int], new_tokens: int, dtype: str = "float32") -> list[int]:
    """Our greedy tokens on the same checkpoint (dsref.reference.decode.generate)."""
    import jax.numpy as jnp

    from dsref.reference.checkpoint import load_checkpoint
    from dsref.reference.decode import generate
    _, model = load_checkpoint(checkpoint_dir, dtype=jnp.float32 if dtype == "float32" else jnp.bfloat16)
    return generate(model, [prompt], new_tokens).tokens[0]


def agreement(a: list[int], b: list[int]) -> dict:
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), None)
    return {"compared": n, "equal": sum(x == y for x, y in zip(a, b)),
            "first_difference": first, "same_prefix": n if first is None else first}


def _make_checkpoint(tmp: str) -> str:
    out = os.path.join(tmp, "small-v3-f32")
    exe = Path(sys.executable).parent / "dsref"
    exe = str(exe) if exe.exists() else shutil.which("dsref")
    if exe is None:
        raise SystemExit("--checkpoint not given and the dsref command is not installed to make one")
    subprocess.run([exe, "init-checkpoint", "--preset", "small-v3", "--tokenizer", "--dtype", "float32",
                    "--out", out], check=True)
    return out


def _ints(s: str, name: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{name}: comma-separated integers, got {s!r}") from None
    if not v or any(x < 1 for x in v):
        raise SystemExit(f"{name}: positive integers, got {s!r}")
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="Hugging Face DeepSeek checkpoint folder (default: make small-v3)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="GGUF types to convert to and time")
    ap.add_argument("--prompt-lens", default="128,512")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    ap.add_argument("--converter", help="convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERTER)")
    ap.add_argument("--gguf-dir", help="where GGUFs are written and reused (default: <tmp>/dsref-gguf)")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (llama-cpp-python: off)")
    ap.add_argument("--omp-wait-policy", choices=("active", "passive"),
                    help="set OMP_WAIT_POLICY before llama.cpp loads (default: inherited; libgomp spins)")
    ap.add_argument("--compare-dsref", type=int, default=0, metavar="N",
                    help="also run dsref's greedy decode (float32) on the first prompt and compare N tokens")
    ap.add_argument("--bandwidth", action="store_true", help="measure the read bandwidth (dsref.hwmodels.probe)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.omp_wait_policy:  # read by libgomp when llama.cpp's library loads, i.e. at `import llama_cpp`
        if "llama_cpp" in sys.modules:
            raise SystemExit("--omp-wait-policy: llama_cpp is already loaded in this process")
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in GGUF_TYPES]
    if bad or not dtypes:
        raise SystemExit(f"--dtypes: {bad or a.dtypes!r} not among {', '.join(GGUF_TYPES)}")
    lens = _ints(a.prompt_lens, "--prompt-lens")
    if a.new_tokens < 2 or a.runs < 1:
        raise SystemExit("--new-tokens must be >= 2 and --runs >= 1")
    why, _ = availability(a.converter)
    if why:
        print(json.dumps({"engine": "llama.cpp", "skipped": why}) if a.json else f"llama.cpp not available: {why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        ck = a.checkpoint or _make_checkpoint(tmp)
        if not Path(ck).is_dir():
            raise SystemExit(f"--checkpoint {ck}: not a directory")
        res = {"engine": "llama.cpp", "checkpoint": ck, "load_before": os.getloadavg(), "results": []}
        for d in dtypes:
            for n in lens:
                res["results"].append(measure(ck, d, n, a.new_tokens, a.runs, converter=a.converter,
                                              gguf_dir=a.gguf_dir, threads=a.threads, flash_attn=a.flash_attn))
        if a.compare_dsref:
            first = next((r for r in res["results"] if r["gguf_type"] == "f32"), None)
            if first is None:
                res["dsref_agreement"] = {"skipped": "--compare-dsref needs a float32 run"}
            else:
                cfg = _read_json(Path(ck) / "config.json", "config")
                prompt = _prompt_ids(first["prompt_tokens"], int(cfg["vocab_size"]))
                n = min(a.compare_dsref, len(first["tokens"]))
                ours = dsref_greedy(ck, prompt, n)
                res["dsref_agreement"] = {"prompt_tokens": len(prompt), "dsref": ours,
                                          "llama_cpp": first["tokens"][:n], **agreement(ours, first["tokens"][:n])}
        if a.bandwidth:
            from dsref.hwmodels.probe import measure_memory_bandwidth
            th = a.threads or _threads()
            res["measured_read_bandwidth_Bps"] = bw = measure_memory_bandwidth(1 << 30, 5, th)
            for r in res["results"]:
                if r.get("decode_weight_bandwidth_Bps"):
                    r["decode_bandwidth_fraction"] = r["decode_weight_bandwidth_Bps"] / bw
        res["load_after"] = os.getloadavg()
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"llama.cpp (llama-cpp-python {res['results'][0]['llama_cpp_python']}), {ck}, "
          f"{res['results'][0]['threads']} threads, load average {res['load_before'][0]:.2f} -> "
          f"{res['load_after'][0]:.2f}")
    print(f"{'gguf':>5} {'prompt':>6} {'prefill tok/s':>14} {'decode tok/s':>13} {'(internal)':>10} "
          f"{'weight GB/s':>11} {'runs':>4}")
    for r in res["results"]:
        bw = r.get("decode_weight_bandwidth_Bps")
        print(f"{r['gguf_type']:>5} {r['prompt_tokens']:>6} {r['prefill_tokens_per_s']:>14.1f} "
              f"{r['decode_tokens_per_s']:>13.2f} {r['internal_decode_tokens_per_s'] or float('nan'):>10.2f} "
              f"{(bw or float('nan')) / 1e9:>11.2f} {r['runs']:>4}")
    if "measured_read_bandwidth_Bps" in res:
        print(f"measured read bandwidth {res['measured_read_bandwidth_Bps'] / 1e9:.2f} GB/s")
    if "dsref_agreement" in res:
        ag = res["dsref_agreement"]
        print("greedy tokens vs dsref (float32): " + (ag.get("skipped") or
              f"{ag['equal']}/{ag['compared']} equal, same first {ag['same_prefix']}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
