"""`dsref golden --stream` (reference/oracle/stream.py): the same dump as the in-memory golden,
computed one layer at a time, holding one layer's weights whatever the depth."""
from __future__ import annotations

import dataclasses
import tracemalloc
import weakref

import numpy as np
import pytest

from dsref.experiments.cli import main
from dsref.reference import checkpoint
from dsref.reference.checkpoint import save_checkpoint
from dsref.reference.oracle import compare, golden, stream
from dsref.reference.params import tensors
from dsref.reference.presets import get_preset


def _weights(cfg, seed: int, mtp: bool = True) -> dict[str, np.ndarray]:
    """Random weights of every tensor of the table (norms around 1, biases of both signs)."""
    rng = np.random.default_rng(seed)
    return {t.name: ((1 + 0.2 * rng.standard_normal(t.shape)) if t.name.endswith("norm.weight")
                     else 0.3 * rng.standard_normal(t.shape) if t.name.endswith("correction_bias")
                     else 0.1 * rng.standard_normal(t.shape)).astype(np.float32)
            for t in tensors(cfg, mtp=mtp)}


def _tokens(cfg, seed: int, shape=(2, 7)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape)


# hidden 160 = one full 128-wide FP8 block + a partial one, in rows and columns of most Linears;
# 2 layers (dense, MoE): the float32 test compiles the whole JAX model once, its cost is compile time
V3_160 = dataclasses.replace(get_preset("tiny-v3"), name="tiny-v3-160", hidden_size=160, num_hidden_layers=2)
V32 = get_preset("tiny-v32").replace(index_topk=3)  # 7 tokens: rows past 3 are sparse


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> (checkpoint dir, config): the layouts the writer produces."""
    d = tmp_path_factory.mktemp("stream")
    v3, qwen = get_preset("tiny-v3"), get_preset("tiny-qwen3-moe")
    return {
        # FP8 128x128 blocks with partial blocks, MTP module stored, sharded into several files
        "fp8-mtp-sharded": (save_checkpoint(_weights(V3_160, 1), V3_160, d / "a", dtype="fp8",
                                            max_shard_bytes=150_000), V3_160),
        # bf16, one file, config with MTP but a checkpoint without its weights (no mtp.0.logits)
        "bf16-no-mtp": (save_checkpoint(_weights(v3, 2, mtp=False), v3, d / "b", dtype="bfloat16"), v3),
        # float32, transformers' fused gate_up_proj experts, sharded
        "f32-fused-sharded": (save_checkpoint(_weights(v3, 3), v3, d / "c", dtype="float32",
                                              expert_layout="fused", max_shard_bytes=60_000), v3),
        # a GQA Qwen3-MoE (float64 only: the JAX model is DeepSeek's)
        "qwen3-moe": (save_checkpoint(_weights(qwen, 4), qwen, d / "d", dtype="bfloat16"), qwen),
        # V3.2 (the lightning indexer: index_ids, index_tie, index_tie_keys in the dump), FP8 16x16 blocks
        "v32-fp8": (save_checkpoint(_weights(V32, 5), V32, d / "e", dtype="fp8", fp8_block_size=(16, 16)), V32),
    }


@pytest.mark.parametrize("name", ["fp8-mtp-sharded", "bf16-no-mtp", "f32-fused-sharded", "qwen3-moe", "v32-fp8"])
def test_stream_float64_is_bit_identical(ckpts, name):
    ck, cfg = ckpts[name]
    if name == "fp8-mtp-sharded":
        assert len(list(ck.glob("*.safetensors"))) > 1
    tok = _tokens(cfg, 5)
    ref = golden.run_reference(ck, tok, "float64")
    got, times = stream.run_stream(ck, tok, "float64")
    assert sorted(got) == sorted(ref)
    assert (golden.MTP_LOGITS in got) == (name in ("fp8-mtp-sharded", "f32-fused-sharded", "v32-fp8"))
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert np.array_equal(got[k], ref[k]), f"{k}: max diff {np.abs(got[k] - ref[k]).max()}"
    assert [s for s, _ in times][:cfg.num_hidden_layers] == [f"layer {i}" for i in range(cfg.num_hidden_layers)]
    if name == "v32-fp8":
        assert {f"layers.{i}.{k}" for i in range(3) for k in ("index_ids", "index_tie", "index_tie_keys")} <= set(got)
        assert got["layers.0.index_tie"].dtype == bool and (got["layers.0.index_ids"][:, 3:] >= 0).all()


@pytest.mark.slow  # ~18 s on an idle 2-vCPU VM, nearly all of it compiling the in-memory JAX model
def test_stream_float32_matches_in_memory_float32(ckpts):
    ck, cfg = ckpts["fp8-mtp-sharded"]
    tok = _tokens(cfg, 6, (2, 5))
    ref = golden.run_reference(ck, tok, "float32")
    stream.HEAD_CHUNK_BYTES, old = 4 * cfg.hidden_size * 100, stream.HEAD_CHUNK_BYTES  # 3 vocabulary chunks
    try:
        got, _ = stream.run_stream(ck, tok, "float32")
    finally:
        stream.HEAD_CHUNK_BYTES = old
    assert sorted(got) == sorted(ref) and golden.MTP_LOGITS in got
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        if k.endswith("topk_ids"):
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        else:  # measured <= 5e-7 (float32 rounding: XLA fuses one layer, not the whole model)
            rel = np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()
            assert rel <= 1e-5, f"{k}: max rel error {rel:.2e}"
    assert compare.compare_dumps(ref, got, "float32").ok


def _table_bytes(cfg, itemsize: int):
    """(largest layer without its routed experts + one expert, the LM head) in bytes, from params."""
    per: dict = {}
    for t in tensors(cfg):
        if t.layer is not None:
            n = int(np.prod(t.shape[1:] if t.group == "routed_expert" else t.shape))
            per[t.layer] = per.get(t.layer, 0) + n
    return max(per.values()) * itemsize, cfg.vocab_size * cfg.hidden_size * itemsize


def _stream_peaks(cfg, ck, tok, monkeypatch):
    """(tracemalloc peak of the stream run, max bytes of checkpoint tensors alive at once)."""
    live, most = [0], [0]
    load = checkpoint._Plan._load

    def counting(self, hf, index=None):
        a = load(self, hf, index)
        live[0] += a.nbytes
        most[0] = max(most[0], live[0])
        weakref.finalize(a, lambda n=a.nbytes: live.__setitem__(0, live[0] - n))
        return a
    monkeypatch.setattr(checkpoint._Plan, "_load", counting)
    monkeypatch.setattr(checkpoint, "read_tensors", lambda *a, **k: pytest.fail("stream read the whole checkpoint"))
    tracemalloc.start()
    try:
        stream.run_stream(ck, tok, "float64")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        monkeypatch.undo()
    return peak, most[0]


def test_stream_holds_one_layer_whatever_the_depth(tmp_path, monkeypatch):
    # weights dominate the checkpoint's metadata (headers, the read plan: they grow with depth)
    base = dataclasses.replace(get_preset("tiny-v3"), num_nextn_predict_layers=0, hidden_size=128,
                               intermediate_size=512, moe_intermediate_size=256, n_routed_experts=8,
                               n_group=4, topk_group=2, num_experts_per_tok=2, vocab_size=64)
    peaks, inmem, made = {}, {}, {}
    for L in (2, 8):
        cfg = dataclasses.replace(base, num_hidden_layers=L)
        made[L] = cfg, save_checkpoint(_weights(cfg, L, mtp=False), cfg, tmp_path / f"L{L}", dtype="float32")
    tok = _tokens(base, 7, (1, 4))
    stream.run_stream(made[8][1], tok, "float64")  # first-call allocations (imports, caches) not counted
    for L, (cfg, ck) in made.items():
        peaks[L], alive = _stream_peaks(cfg, ck, tok, monkeypatch)
        layer32, head32 = _table_bytes(cfg, 4)
        assert alive <= max(layer32, head32), (L, alive, layer32, head32)  # float32 as stored
        tracemalloc.start()
        golden.run_reference(ck, tok, "float64")
        inmem[L] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print("tracemalloc peaks: stream", peaks, "in memory", inmem)
    assert peaks[8] <= 1.2 * peaks[2], peaks  # depth does not add weights
    assert inmem[8] >= 3 * inmem[2] / 2 and inmem[8] >= 4 * peaks[8], (inmem, peaks)


def test_cli_golden_stream(ckpts, tmp_path, capsys):
    ck, cfg = ckpts["fp8-mtp-sharded"]
    tok = tmp_path / "t.npy"
    np.save(tok, _tokens(cfg, 8, (1, 6)).astype(np.int32))
    out = tmp_path / "s.safetensors"
    assert main(["golden", "--checkpoint", str(ck), "--tokens", str(tok), "--out", str(out), "--dtype", "float64",
                 "--stream"]) == 0
    assert "wrote" in capsys.readouterr().out
    t, meta = golden.read_dump(out)
    ref, ref_meta = golden.read_dump(golden.write_golden(ck, golden.load_tokens(tok), tmp_path / "m.safetensors",
                                                         "float64"))
    assert sorted(t) == sorted(ref) and all(np.array_equal(t[k], ref[k]) for k in ref)
    assert meta["stream"] == "true" and int(meta["peak_rss_bytes"]) > 0 and "layer 0" in meta["step_seconds"]
    assert {k: v for k, v in meta.items() if k not in ("stream", "peak_rss_bytes", "step_seconds")} == ref_meta
    # bad input: exit 2, one line naming the field
    assert main(["golden", "--checkpoint", str(tmp_path / "nope"), "--tokens", str(tok), "--out", str(out),
                 "--stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--checkpoint" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([[0, cfg.vocab_size]]))
    assert main(["golden", "--checkpoint", str(ck), "--tokens", str(bad), "--out", str(out), "--stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tokens" in err and "vocab_size" in err and len(err.splitlines()) == 1


def test_stream_refuses_float32_for_gqa(ckpts):
    ck, cfg = ckpts["qwen3-moe"]
    with pytest.raises(golden.OracleError, match="float64"):
        stream.run_stream(ck, _tokens(cfg, 9), "float32")


def test_reader_reads_only_the_experts_used_and_fp8_rows(ckpts, monkeypatch):
    ck, cfg = ckpts["fp8-mtp-sharded"]
    got: set[tuple[str, int]] = set()
    item = checkpoint.ExpertStack.__getitem__

    def record(self, e):
        got.add((self._e.name.split(".mlp.")[0], int(e)))
        return item(self, e)
    monkeypatch.setattr(checkpoint.ExpertStack, "__getitem__", record)
    tok = _tokens(cfg, 10, (1, 3))
    dump, _ = stream.run_stream(ck, tok, "float64")
    want = {(f"model.layers.{m.group(1)}", int(e)) for k, v in dump.items()
            if (m := golden._LAYER_RE.match(k)) and m.group(2) == "topk_ids" for e in np.unique(v)}
    assert {g for g in got if int(g[0].rsplit(".", 1)[1]) < cfg.num_hidden_layers} == want
    assert len(want) < cfg.num_hidden_layers * cfg.n_routed_experts  # 3 tokens x top-4 of 16: not all
    # rows of an FP8 matrix (partial 128-row and -column blocks): the values read_tensors gives
    name = "model.layers.0.mlp.down_proj.weight"  # [160, 96]: block rows 0-127 and 128-159
    full = dict(checkpoint.read_tensors(ck, with_mtp=True))[name]
    ids = np.array([0, 127, 128, 159, 5])
    np.testing.assert_array_equal(checkpoint.LayerReader(ck, with_mtp=True).rows(name, ids), full[ids])
