"""The model's contracts with CTranslate2 and with the rest of the project."""

import math

import pytest
import torch

from wdserve.distill.checkpoint import load_model, read_checkpoint, save_checkpoint
from wdserve.distill.model import (
    BOS_ID,
    PAD_ID,
    ModelConfig,
    Transformer,
    count_parameters,
    sinusoidal_table,
)
from wdserve.distill.vocab import Vocab, train_sentencepiece

SHAPES = {
    "pre-norm tied": {},
    "post-norm gelu": {"pre_norm": False, "activation": "gelu"},
    "narrow decoder": {"dec_dim": 16, "dec_heads": 2, "dec_ffn": 32, "share_embeddings": False},
    "untied": {"share_embeddings": False, "tie_output": False},
}


def tiny(**overrides) -> ModelConfig:
    values = {"vocab_size": 60, "enc_layers": 2, "enc_dim": 32, "enc_heads": 4, "enc_ffn": 64,
              "dec_layers": 2, "dec_dim": 32, "dec_heads": 4, "dec_ffn": 64, "dropout": 0.0}
    return ModelConfig(**{**values, **overrides})


@pytest.mark.parametrize("overrides", SHAPES.values(), ids=SHAPES.keys())
def test_incremental_decoding_matches_full_forward(overrides):
    torch.manual_seed(0)
    model = Transformer(tiny(**overrides)).eval()
    src = torch.randint(4, 60, (3, 7))
    src[0, 5:] = PAD_ID
    tgt = torch.cat([torch.full((3, 1), BOS_ID), torch.randint(4, 60, (3, 5))], dim=1)
    full = model(src, tgt)
    memory, mask, _ = model.encoder(src)
    state = model.start_state()
    steps = [model.decoder(tgt[:, t : t + 1], memory, mask, state) for t in range(tgt.size(1))]
    assert full.shape == (3, 6, 60)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", SHAPES.values(), ids=SHAPES.keys())
def test_forward_with_hidden_gives_each_layers_state_and_the_same_logits(overrides):
    """The states intermediate-layer KD reads: one per layer of each stack, the last of which the
    final norm and output projection turn into ``forward``'s logits, unchanged by asking for them."""
    torch.manual_seed(0)
    model = Transformer(tiny(**overrides, dec_layers=3)).eval()
    src = torch.randint(4, 60, (2, 7))
    tgt = torch.cat([torch.full((2, 1), BOS_ID), torch.randint(4, 60, (2, 4))], dim=1)
    logits, encoder_hidden, decoder_hidden = model.forward_with_hidden(src, tgt)
    torch.testing.assert_close(logits, model(src, tgt), atol=0, rtol=0)
    cfg = model.config
    assert [h.shape for h in encoder_hidden] == [(2, 7, cfg.enc_dim)] * cfg.enc_layers
    assert [h.shape for h in decoder_hidden] == [(2, 5, cfg.dec_dim)] * 3
    last = decoder_hidden[-1]
    if model.decoder.final_norm is not None:
        last = model.decoder.final_norm(last)
    torch.testing.assert_close(model.decoder.output_proj(last), logits)
    assert not any(torch.allclose(a, b) for a, b in zip(decoder_hidden, decoder_hidden[1:], strict=False))
    memory, mask, _ = model.encoder(src)
    with pytest.raises(ValueError, match="teacher-forced"):
        model.decoder(tgt[:, :1], memory, mask, model.start_state(), return_hidden=True)


def test_padding_does_not_change_the_translation_of_a_sentence():
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    src = torch.randint(4, 60, (1, 5))
    padded = torch.cat([src, torch.full((1, 3), PAD_ID)], dim=1)
    tgt = torch.tensor([[BOS_ID, 7, 8]])
    torch.testing.assert_close(model(src, tgt), model(padded, tgt), atol=1e-5, rtol=1e-5)


def test_sinusoidal_table_is_sin_half_then_cos_half_from_position_zero():
    table = sinusoidal_table(10, 8)
    assert table.shape == (10, 8)
    assert torch.all(table[0, :4] == 0) and torch.all(table[0, 4:] == 1)
    increment = math.log(10000.0) / 3
    assert table[3, 1].item() == pytest.approx(math.sin(3 * math.exp(-increment)), abs=1e-6)


def test_tied_tables_share_storage_and_count_once():
    tied = Transformer(tiny())
    assert tied.decoder.output_proj.weight is tied.encoder.embedding.tokens.weight
    untied = Transformer(tiny(share_embeddings=False, tie_output=False))
    assert count_parameters(untied) - count_parameters(tied) == 2 * 60 * 32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"activation": "swish"}, "activation"), ({"enc_heads": 5}, "divisible"),
     ({"dec_dim": 16, "dec_heads": 2}, "share_embeddings")],
)
def test_invalid_configs_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_config_round_trips_and_rejects_unknown_fields():
    config = tiny(pre_norm=False)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**config.to_dict(), "n_layers": 3})


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Vocab:
    lines = [f"the {a} sees {b} near the {c}" for a in "abcdefgh" for b in ("cat", "dog", "bird")
             for c in ("house", "tree")]
    path = train_sentencepiece(lines, tmp_path_factory.mktemp("vocab") / "spm.model", vocab_size=40)
    return Vocab(path)


def test_vocabulary_puts_special_tokens_where_ctranslate2_expects_them(vocab):
    assert vocab.tokens[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert vocab.decode(vocab.encode("the cat sees dog")) == "the cat sees dog"


def test_checkpoint_alone_rebuilds_its_model(tmp_path, vocab):
    torch.manual_seed(0)
    model = Transformer(tiny(vocab_size=len(vocab), pre_norm=False)).eval()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, vocab, meta={"name": "teacher", "method": "teacher"})
    loaded, loaded_vocab, state = load_model(path)
    assert state["meta"]["name"] == "teacher" and loaded_vocab.tokens == vocab.tokens
    src, tgt = torch.tensor([[5, 6, 3]]), torch.tensor([[BOS_ID, 7]])
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt))
    assert not list(tmp_path.glob("*.tmp")), "atomic save left a temporary file behind"


def test_unreadable_checkpoint_is_named_in_the_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        read_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")
