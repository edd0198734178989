"""benchmarks/bench_llamacpp.py: skips cleanly without llama.cpp, prepares the converter's input
without touching the checkpoint, and (only where llama.cpp and its converter are installed,
$LLAMA_CPP_CONVERTER set) converts and times a tiny checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_llamacpp.py"


@pytest.fixture(scope="module")
def bl():
    spec = importlib.util.spec_from_file_location("bench_llamacpp", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """tiny-v3 through our writer (random numpy weights, float32) plus dsref's tokenizer.json."""
    from dsref.reference.checkpoint import save_checkpoint
    from dsref.reference.init_checkpoint import train_tokenizer
    from dsref.reference.params import tensors
    from dsref.reference.presets import get_preset

    # 512 ids: at 256 a byte-level BPE has no merges, and llama.cpp refuses a BPE vocabulary without
    cfg = get_preset("tiny-v3").replace(vocab_size=512)
    rng = np.random.default_rng(0)
    ts = {t.name: (rng.standard_normal(t.shape) * 0.05).astype(np.float32) for t in tensors(cfg)}
    d = tmp_path_factory.mktemp("ck") / "tiny-v3"
    save_checkpoint(ts, cfg, d, dtype="float32")
    train_tokenizer(cfg.vocab_size).save(str(d / "tokenizer.json"))
    return d


def _no_llama(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError


def test_skips_cleanly_without_llama_cpp(bl, monkeypatch, capsys):
    _no_llama(monkeypatch)
    assert bl.main(["--checkpoint", "/nonexistent"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("llama.cpp not available: cannot import llama_cpp")
    assert bl.main(["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "cannot import llama_cpp" in d["skipped"]
    r = bl.measure("/nonexistent", "float32", 8, 4, 1)
    assert set(r) == {"engine", "skipped"}


def test_skips_without_converter(bl, monkeypatch, tmp_path):
    import types
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    monkeypatch.delenv("LLAMA_CPP_CONVERTER", raising=False)
    why, conv = bl.availability(None)
    assert conv is None and "convert_hf_to_gguf.py not given" in why
    why, _ = bl.availability(str(tmp_path))  # a folder without the script
    assert "does not exist" in why
    bad = tmp_path / "convert_hf_to_gguf.py"
    bad.write_text("import a_module_that_is_not_there\n")
    why, _ = bl.availability(str(bad))
    assert why.startswith("cannot import the converter") and "a_module_that_is_not_there" in why


def test_bad_arguments_are_refused_before_anything_runs(bl, monkeypatch):
    _no_llama(monkeypatch)
    with pytest.raises(ValueError, match="dtype"):
        bl.measure("/x", "int8", 8, 4, 1)
    with pytest.raises(ValueError, match="new_tokens"):
        bl.measure("/x", "float32", 8, 1, 1)
    with pytest.raises(ValueError, match="runs"):
        bl.measure("/x", "float32", 8, 4, 0)
    with pytest.raises(SystemExit, match="--dtypes"):
        bl.main(["--dtypes", "float64"])
    with pytest.raises(SystemExit, match="--prompt-lens"):
        bl.main(["--prompt-lens", "128,x"])


def test_prepare_converter_input(bl, tiny_ckpt, tmp_path):
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tiny_ckpt.iterdir()}
    r = bl.prepare_converter_input(tiny_ckpt, tmp_path / "in")
    d = Path(r["dir"])
    st = d / "model.safetensors"
    assert st.is_symlink() and st.resolve() == (tiny_ckpt / "model.safetensors").resolve()
    assert json.loads((d / "config.json").read_text()) == json.loads((tiny_ckpt / "config.json").read_text())
    assert (d / "tokenizer.json").read_bytes() == (tiny_ckpt / "tokenizer.json").read_bytes()
    assert json.loads((d / "tokenizer_config.json").read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast"}
    assert r["tokenizer"] == "checkpoint tokenizer.json" and r["notes"] == []
    assert 512 >= r["tokenizer_ids"] > 256
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tiny_ckpt.iterdir()}
    assert after == before  # the checkpoint is untouched
    with pytest.raises(ValueError, match="not empty"):
        bl.prepare_converter_input(tiny_ckpt, d)


def _copy(src: Path, dst: Path, *, cfg_edit=None, tokenizer=True) -> Path:
    dst.mkdir()
    (dst / "model.safetensors").symlink_to((src / "model.safetensors").resolve())
    cfg = json.loads((src / "config.json").read_text())
    if cfg_edit:
        cfg_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    if tokenizer is True:
        (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    elif tokenizer:
        (dst / "tokenizer.json").write_text(json.dumps(tokenizer))
    return dst


def test_prepare_fills_in_and_refuses(bl, tiny_ckpt, tmp_path):
    # transformers' save_pretrained of a bare config: no tokenizer; architectures from model_type
    c = _copy(tiny_ckpt, tmp_path / "a", cfg_edit=lambda c: c.pop("architectures"), tokenizer=False)
    r = bl.prepare_converter_input(c, tmp_path / "a-in")
    cfg = json.loads((Path(r["dir"]) / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and r["notes"]
    assert r["tokenizer"].startswith("dsref train_tokenizer")
    assert bl._byte_level_bpe(json.loads((Path(r["dir"]) / "tokenizer.json").read_text())) is None
    c = _copy(tiny_ckpt, tmp_path / "b", cfg_edit=lambda c: c.update(rope_interleave=False))
    with pytest.raises(ValueError, match="rope_interleave"):
        bl.prepare_converter_input(c, tmp_path / "b-in")
    c = _copy(tiny_ckpt, tmp_path / "c", cfg_edit=lambda c: c.update(architectures=["LlamaForCausalLM"]))
    with pytest.raises(ValueError, match="architectures"):
        bl.prepare_converter_input(c, tmp_path / "c-in")
    tok = json.loads((tiny_ckpt / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581"}
    c = _copy(tiny_ckpt, tmp_path / "d", tokenizer=tok)
    with pytest.raises(ValueError, match="Metaspace"):
        bl.prepare_converter_input(c, tmp_path / "d-in")
    c = _copy(tiny_ckpt, tmp_path / "e", cfg_edit=lambda c: c.update(vocab_size=100))
    with pytest.raises(ValueError, match="vocab_size"):
        bl.prepare_converter_input(c, tmp_path / "e-in")
    from dsref.reference.init_checkpoint import train_tokenizer
    c = _copy(tiny_ckpt, tmp_path / "g", tokenizer=json.loads(train_tokenizer(256).to_str()))
    with pytest.raises(ValueError, match="no BPE merges"):
        bl.prepare_converter_input(c, tmp_path / "g-in")
    (tmp_path / "f").mkdir()
    with pytest.raises(ValueError, match="config.json: missing"):
        bl.prepare_converter_input(tmp_path / "f", tmp_path / "f-in")


def test_prompt_ids_and_agreement(bl):
    ids = bl._prompt_ids(16, 32000)
    assert ids == np.random.default_rng(0).integers(0, 32000, 16).tolist()  # as bench_decode.py draws
    assert bl._prompt_ids([3, 4], 10) == [3, 4]
    with pytest.raises(ValueError, match="prompt_tokens"):
        bl._prompt_ids([3, 10], 10)
    with pytest.raises(ValueError, match="prompt_tokens"):
        bl._prompt_ids(0, 10)
    a = bl.agreement([1, 2, 3, 4], [1, 2, 5, 4])
    assert a == {"compared": 4, "equal": 3, "first_difference": 2, "same_prefix": 2}
    assert bl.agreement([1, 2], [1, 2])["first_difference"] is None


def test_convert_and_measure_tiny(bl, tiny_ckpt, tmp_path):
    if not os.environ.get("LLAMA_CPP_CONVERTER"):
        pytest.skip("LLAMA_CPP_CONVERTER not set (llama.cpp's converter is optional)")
    r = bl.measure(tiny_ckpt, "float32", 8, 4, 1, gguf_dir=str(tmp_path))
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert r["gguf_type"] == "f32" and r["kv_cache_type"] == "f32" and not r["reused"]
    assert len(r["tokens"]) == 4 and all(0 <= t < 512 for t in r["tokens"])
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["internal_decode_tokens_per_s"] > 0  # llama.cpp counted the one-token decodes
    assert r["same_tokens_every_run"]
    again = bl.convert(tiny_ckpt, "float32", bl.find_converter(), tmp_path)
    assert again["reused"] and again["gguf"] == r["gguf"]  # same files, same type: the GGUF is reused
