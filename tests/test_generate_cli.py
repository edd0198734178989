"""`dsref generate` end to end on a small checkpoint written by our writer, with a tokenizer."""
from __future__ import annotations

import json

import pytest
from flax import nnx

from dsref.experiments import cli
from dsref.reference.checkpoint import save_checkpoint
from dsref.reference.decode import generate
from dsref.reference.model import DeepseekModel
from dsref.reference.presets import get_preset


def main(argv) -> int:
    """The CLI root; argparse's SystemExit -> its code."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("ckpt")
    cfg = get_preset("tiny-v3").replace(vocab_size=320)  # room for a byte-level BPE
    model = DeepseekModel(cfg, rngs=nnx.Rngs(2), std=0.2, with_mtp=True)
    save_checkpoint(model, cfg, d, dtype="float32")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=["[UNK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the latent attention cache holds five hundred twelve values"] * 20, trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    assert tok.get_vocab_size() <= cfg.vocab_size
    tok.save(str(d / "tokenizer.json"))
    return d, model, tok


def test_generate_json_tokens(ckpt, capsys):
    d, model, _ = ckpt
    assert main(["generate", "--checkpoint", str(d), "--tokens", "5,6,7", "--max-new-tokens", "9", "--json",
                 "--stop"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == generate(model, [[5, 6, 7]], 9).tokens[0]
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert "text" in out  # the checkpoint has a tokenizer


def test_generate_prompt_streams_text(ckpt, capsys):
    d, model, tok = ckpt
    assert main(["generate", "--checkpoint", str(d), "--prompt", "the latent cache", "--max-new-tokens", "6",
                 "--stop"]) == 0
    cap = capsys.readouterr()
    ids = generate(model, [tok.encode("the latent cache").ids], 6).tokens[0]
    assert cap.out.startswith("the latent cache") and tok.decode(ids) in cap.out
    assert "tok/s decode" in cap.err


def test_generate_mtp_and_errors(ckpt, capsys):
    d, _, _ = ckpt
    assert main(["generate", "--checkpoint", str(d), "--tokens", "1,2", "--max-new-tokens", "8", "--mtp",
                 "--json", "--stop"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mtp_acceptance_rate"] is not None and len(out["tokens"]) == 8
    assert main(["generate", "--checkpoint", str(d), "--tokens", "1,x"]) == 2
    assert "argument --tokens: must be comma-separated" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(d), "--tokens", "1,999999"]) == 2
    err = capsys.readouterr().err
    assert "999999" in err and "vocab_size is 320" in err
    assert main(["generate", "--checkpoint", str(d / "missing"), "--tokens", "1"]) == 2
    # refused before anything is printed: the prompt is not echoed, nothing generated
    assert main(["generate", "--checkpoint", str(d), "--prompt", "the latent", "--max-new-tokens", "500"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and "max_position_embeddings 128" in cap.err and "new tokens fit" in cap.err


def test_generate_sampling_options(ckpt, capsys):
    """top-k beyond the vocabulary means off; a top-p that underflows float32 still keeps a token."""
    d, model, _ = ckpt
    base = ["generate", "--checkpoint", str(d), "--tokens", "5,6,7", "--max-new-tokens", "4", "--json", "--stop",
            "--temperature", "0.8", "--seed", "4"]
    assert main(base + ["--top-k", "0"]) == 0
    off = json.loads(capsys.readouterr().out)["tokens"]
    assert main(base + ["--top-k", "100000"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == off
    assert main(base + ["--top-p", "1e-300"]) == 0
    greedy = generate(model, [[5, 6, 7]], 4).tokens[0]
    assert json.loads(capsys.readouterr().out)["tokens"] == greedy  # only the most likely token is kept


def test_info_on_checkpoint_directory(ckpt, capsys):
    d, model, _ = ckpt
    assert main(["info", str(d), "--json", "--no-check"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_params"] == model.cfg.param_counts()["total_params"]
    assert out["checkpoint"]["num_tensors"] > 0 and out["checkpoint"]["quantized"] is False
