"""`dsref golden --stream` on DeepSeek-V4 checkpoints (oracle/stream.py's V4 path): the in-memory
float64 golden's dump (golden.run_reference_v4), bit for bit, computed one decoder layer at a time
through checkpoint_v4.V4LayerReader, which never holds two layers' weights."""
from __future__ import annotations

import tracemalloc
import weakref

import numpy as np
import pytest

from dsref.experiments.cli import main
from dsref.reference import checkpoint_v4
from dsref.reference.checkpoint_v4 import save_checkpoint_v4
from dsref.reference.config_v4 import CSA, HASH_MOE, HCA, MOE, SLIDING
from dsref.reference.oracle import golden, stream
from dsref.reference.params_v4 import INT64, tensors
from dsref.reference.presets import get_preset

B, T = 2, 20  # CSA rate 4: 5 compressed entries, index_topk 3 of them (a real choice); window 6 < T


def small_cfg(layers=(CSA, HCA, SLIDING), mlp=(HASH_MOE, MOE, MOE)):
    # moe_intermediate_size 32: FP4's 1x32 scale blocks need the experts' input dims divisible by 32
    return get_preset("tiny-v4").replace(name=f"tiny-v4-stream-{len(layers)}", num_hidden_layers=len(layers),
                                         layer_types=layers, mlp_layer_types=mlp, moe_intermediate_size=32)


def weights(cfg, seed: int, mtp: bool = True) -> dict[str, np.ndarray]:
    """Every table tensor (with the MTP module): matrices ~ N(0, 1/fan_in), vectors ~ 1 + 0.3 N(0, 1)
    (the correction bias then reorders experts), tid2eid random distinct experts per token."""
    rng = np.random.default_rng(seed)
    w = {}
    for t in tensors(cfg, mtp=mtp):
        if t.stored == INT64:
            w[t.name] = np.stack([rng.permutation(cfg.n_routed_experts)[:cfg.num_experts_per_tok]
                                  for _ in range(t.shape[0])])
        elif len(t.shape) == 1:
            w[t.name] = (1 + 0.3 * rng.standard_normal(t.shape)).astype(np.float32)
        else:
            w[t.name] = (rng.standard_normal(t.shape) / np.sqrt(t.shape[-1])).astype(np.float32)
    return w


def tokens(cfg, seed: int, shape=(B, T)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> checkpoint dir: the writer's layouts (all with a CSA, an HCA and a sliding layer)."""
    d, cfg = tmp_path_factory.mktemp("stream_v4"), small_cfg()
    w = weights(cfg, 1)
    return cfg, {
        # DeepSeek's release: FP8 / FP4 with UE8M0 scales, one tensor per expert, MTP module 0
        "deepseek-release": save_checkpoint_v4(w, cfg, d / "a", names="deepseek", dtype="release"),
        # float32, DeepSeek's names, sharded into several files
        "deepseek-float32-sharded": save_checkpoint_v4(w, cfg, d / "b", names="deepseek", dtype="float32",
                                                       max_shard_bytes=200_000),
        # transformers' names: stacked experts, FP4 stacks read one expert's slice at a time
        "transformers-release": save_checkpoint_v4(w, cfg, d / "c", names="transformers", dtype="release"),
        # a config with an MTP module, a checkpoint without its weights: no mtp.0.logits in either dump
        "deepseek-no-mtp": save_checkpoint_v4(weights(cfg, 2, mtp=False), cfg, d / "d", names="deepseek",
                                              dtype="release"),
    }


@pytest.mark.parametrize("name", ["deepseek-release", "deepseek-float32-sharded", "transformers-release",
                                  "deepseek-no-mtp"])
def test_stream_float64_is_bit_identical(ckpts, name):
    cfg, cks = ckpts
    ck, tok = cks[name], tokens(cfg, 3)
    if name.endswith("sharded"):
        assert len(list(ck.glob("*.safetensors"))) > 1
    ref = golden.run_reference(ck, tok, "float64")
    got, times = stream.run_stream(ck, tok, "float64")
    assert sorted(got) == sorted(ref)
    assert (golden.MTP_LOGITS in got) == (name != "deepseek-no-mtp")
    assert {f"layers.{i}.{k}" for i in range(3) for k in ("attn_out", "hidden", "topk_ids")} <= set(got)
    assert "layers.0.index_ids" in got  # the CSA layer's indexer selection
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert np.array_equal(got[k], ref[k]), f"{k}: max diff {np.abs(got[k] - ref[k]).max()}"
    steps = ["layer 0", "layer 1", "layer 2"] + (["mtp"] if golden.MTP_LOGITS in got else []) + ["lm head"]
    assert [s for s, _ in times] == steps


def test_one_layer_of_weights_at_a_time(ckpts, monkeypatch):
    """Every weight array the stream holds (widened layer dicts, experts, globals) is tracked until
    freed: a layer's weights are all gone before the next layer's are read and before the LM head is;
    the routed experts read are exactly the ones the router chose; the checkpoint is never read whole."""
    cfg, cks = ckpts
    ck, tok = cks["deepseek-release"], tokens(cfg, 4, (1, 6))
    alive: dict[object, int] = {}  # owner (layer index, 'expert', or a global's name) -> live arrays
    events: list[tuple[str, object, dict]] = []

    def track(owner, a):
        alive[owner] = alive.get(owner, 0) + 1
        weakref.finalize(a, lambda: alive.__setitem__(owner, alive[owner] - 1))
        return a

    def live(skip=()):
        return {k: n for k, n in alive.items() if n and k not in skip}

    layer = stream._weights64_v4

    def weights64(reader, i):
        events.append(("layer", i, live()))
        w = layer(reader, i)
        for k, v in w.items():
            if isinstance(v, np.ndarray):
                track(i, v)
        return w
    used: set[tuple[int, int]] = set()
    get = stream._Experts64V4.__getitem__

    def expert(self, e):
        used.add((self.stack._row.layer, int(e)))
        return track(("expert", self.stack._row.layer), get(self, e))
    tensor = checkpoint_v4.V4LayerReader.tensor

    def one(self, name):
        events.append(("tensor", name, live(skip=(name,))))
        return track(name, tensor(self, name))
    monkeypatch.setattr(stream, "_weights64_v4", weights64)
    monkeypatch.setattr(stream._Experts64V4, "__getitem__", expert)
    monkeypatch.setattr(checkpoint_v4.V4LayerReader, "tensor", one)
    monkeypatch.setattr(checkpoint_v4.V4Stream, "__iter__", lambda self: pytest.fail("read the whole checkpoint"))
    dump, _ = stream.run_stream(ck, tok, "float64")
    L = cfg.num_hidden_layers
    assert [e[1] for e in events if e[0] == "layer"] == [*range(L), L]  # the MTP module after the layers
    for kind, what, held in events:
        layers = {k for k in held if not isinstance(k, str)}  # a layer index or ('expert', i)
        assert not layers, f"reading {kind} {what}: still holding weights of {sorted(map(str, layers))}"
    assert events[-1][:2] == ("tensor", "lm_head.weight")
    want = {(i, int(e)) for i in range(L) for e in np.unique(dump[f"layers.{i}.topk_ids"])}
    assert {u for u in used if u[0] < L} == want and len(want) < L * cfg.n_routed_experts


def _stream_peak(ck, tok) -> int:
    tracemalloc.start()
    try:
        stream.run_stream(ck, tok, "float64")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_stream_memory_does_not_grow_with_depth(tmp_path):
    """tracemalloc peaks at 2 and 6 layers: the in-memory golden grows by the weights of 4 layers,
    the stream only by its outputs (the dump grows with depth: measured 70 kB a layer here, a
    layer's float64 weights being about 1 MB)."""
    peaks, inmem = {}, {}
    tok = None
    for L in (2, 6):
        cfg = small_cfg((CSA, HCA) * (L // 2), (MOE,) * L).replace(
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, hidden_size=128,
            num_nextn_predict_layers=0, mtp_layer_types=())
        ck = save_checkpoint_v4(weights(cfg, L, mtp=False), cfg, tmp_path / f"L{L}", dtype="float32")
        tok = tokens(cfg, 5, (1, 4)) if tok is None else tok
        if L == 2:
            stream.run_stream(ck, tok, "float64")  # first-call allocations (imports, caches) not counted
        peaks[L] = _stream_peak(ck, tok)
        tracemalloc.start()
        golden.run_reference(ck, tok, "float64")
        inmem[L] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print("tracemalloc peaks: stream", peaks, "in memory", inmem)
    per_layer = (inmem[6] - inmem[2]) / 4  # what one more layer costs the in-memory golden
    assert peaks[6] - peaks[2] < per_layer / 2, (peaks, inmem)  # 4 more layers: not even half of one
    assert inmem[6] >= 2 * inmem[2] and inmem[6] >= 3 * peaks[6], (inmem, peaks)


def one_line_err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


def test_cli_golden_stream_v4(ckpts, tmp_path, capsys):
    cfg, cks = ckpts
    ck = cks["deepseek-release"]
    tok = tmp_path / "t.npy"
    np.save(tok, tokens(cfg, 6).astype(np.int32))
    out = tmp_path / "s.safetensors"
    assert main(["golden", "--checkpoint", str(ck), "--tokens", str(tok), "--out", str(out), "--dtype", "float64",
                 "--stream"]) == 0
    assert "wrote" in capsys.readouterr().out
    t, meta = golden.read_dump(out)
    ref, ref_meta = golden.read_dump(golden.write_golden(ck, golden.load_tokens(tok), tmp_path / "m.safetensors",
                                                         "float64"))
    assert sorted(t) == sorted(ref) and golden.MTP_LOGITS in t and all(np.array_equal(t[k], ref[k]) for k in ref)
    assert meta["stream"] == "true" and int(meta["peak_rss_bytes"]) > 0 and "layer 2" in meta["step_seconds"]
    assert {k: v for k, v in meta.items() if k not in ("stream", "peak_rss_bytes", "step_seconds")} == ref_meta
    # bad combinations: exit 2, one line naming the option; nothing written
    for extra, opt in ((["--dtype", "float32"], "--stream"), ([], "--stream"), (["--mesh", "data=1"], "--mesh"),
                       (["--dtype", "float64", "--numerics", "deepseek-fp8"], "--numerics")):
        bad = tmp_path / "bad.safetensors"
        assert main(["golden", "--checkpoint", str(ck), "--tokens", str(tok), "--out", str(bad), "--stream",
                     *extra]) == 2
        err = one_line_err(capsys)
        assert opt in err and str(ck) in err and not bad.exists(), err
    with pytest.raises(golden.OracleError, match="float64"):
        stream.run_stream(ck, tokens(cfg, 7), "float32")


def test_nan_in_a_used_expert_is_named(ckpts, tmp_path):
    """Experts are checked when read, as read_tensors_v4 checks every tensor: a UE8M0 scale byte of
    255 (NaN) in the experts of layer 1 fails the stream naming the tensor, as it fails in memory."""
    import shutil

    from dsref.reference.checkpoint import CheckpointError
    cfg, cks = ckpts
    ck = shutil.copytree(cks["deepseek-release"], tmp_path / "nan")
    f = ck / "model.safetensors"
    infos = checkpoint_v4.read_header_v4(f)
    with open(f, "r+b") as fh:
        for e in range(cfg.n_routed_experts):  # whichever experts the router picks
            fh.seek(infos[f"layers.1.ffn.experts.{e}.w1.scale"].start)
            fh.write(b"\xff")
    for run in (golden.run_reference, stream.run_stream):
        with pytest.raises(CheckpointError, match=r"layers\.1\.ffn\.experts\.\d+\.w1\.weight'?: non-finite"):
            run(ck, tokens(cfg, 8), "float64")
