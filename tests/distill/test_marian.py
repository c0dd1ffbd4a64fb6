"""A pretrained Marian teacher imported through ``distill.marian`` computes what transformers computes.

The teacher is ``tests/conftest.py``'s tiny ``MarianMTModel`` with a ``MarianTokenizer`` (no downloads,
``build_tiny_marian``): separate source and target SentencePiece models trained on the synthetic
language pair, one ``vocab.json`` in its own order that leaves out one source piece (so ``<unk>`` is
exercised) and holds a language code. The model is warmed up from random weights, and its
final_logits_bias and ``<pad>`` row (where its decoder starts) are random too, so a permuted row, a
swapped norm or a dropped bias changes the numbers.
"""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from wdserve.distill.batching import encode_pairs  # noqa: E402
from wdserve.distill.checkpoint import load_model  # noqa: E402
from wdserve.distill.decode import beam_search, greedy_search  # noqa: E402
from wdserve.distill.losses import label_smoothed_nll  # noqa: E402
from wdserve.distill.marian import (  # noqa: E402
    PRETRAINED_CARD,
    SUPPRESSED_LOGIT,
    MarianImportError,
    import_marian,
    load_pretrained,
)
from wdserve.distill.model import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    ModelConfig,
    Transformer,
)
from wdserve.distill.students import student_config  # noqa: E402
from wdserve.distill.vocab import Vocab  # noqa: E402
from wdserve.distill.wd import MODES, WeightGenerator  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

LANGUAGE_CODE = ">>yy<<"  # in the tiny model's vocab.json (tests/conftest.py TINY_MARIAN_LANGUAGE_CODE)
MAX_NEW_TOKENS = 40


@pytest.fixture(scope="module")
def marian(tiny_marian):
    """(directory of the saved model and tokenizer, model, tokenizer, sentence pairs, the left-out piece)."""
    return tiny_marian


@pytest.fixture(scope="module")
def imported(marian, tmp_path_factory):
    """(the imported model, its vocab, the checkpoint dict, the checkpoint path) loaded back from disk."""
    root = marian[0]
    path = import_marian(root, tmp_path_factory.mktemp("imported"), local_files_only=True)
    model, vocab, state = load_model(path)
    return model, vocab, state, path


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [PAD_ID] * (width - len(row)) for row in rows])


def _marian_id(tokenizer, token: str) -> int:
    """Marian's id of a wdserve token: wdserve's <s> is where Marian's decoder starts, its <pad>."""
    return tokenizer.pad_token_id if token == "<s>" else tokenizer.convert_tokens_to_ids(token)


def _to_marian(vocab: Vocab, tokenizer, ids: list[int]) -> list[int]:
    return [_marian_id(tokenizer, vocab.tokens[i]) for i in ids]


def _generated(tokenizer, vocab: Vocab, sequences: torch.Tensor) -> list[list[int]]:
    """transformers' outputs as wdserve ids: decoder start dropped, cut before </s>."""
    by_token = {token: i for i, token in enumerate(vocab.tokens)}
    outputs = []
    for row in sequences.tolist():
        row = row[1:]
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        outputs.append([by_token[tokenizer.convert_ids_to_tokens(i)] for i in row])
    return outputs


def test_vocabulary_is_wdserve_specials_then_marian_tokens_in_order(marian, imported):
    _, model, tokenizer, _, _ = marian
    ours, vocab, state, path = imported
    marian_order = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    ordinary = [t for t in marian_order if t not in ("</s>", "<unk>", "<pad>")]
    assert vocab.tokens == list(SPECIAL_TOKENS) + ordinary
    assert len(vocab) == ours.config.vocab_size == model.config.vocab_size + 1
    assert not vocab.is_joint and isinstance(state["vocab"], dict)
    assert state["meta"]["source_lang"] == "xx" and state["meta"]["target_lang"] == "yy"
    card = json.loads((path.parent / PRETRAINED_CARD).read_text())
    assert card["source"] == str(marian[0]) and card["format"] == "marian"
    config = ours.config
    assert (config.pre_norm, config.activation, config.position_encoding, config.output_bias) == (
        False, "silu", "marian", True)
    assert config.layer_norm_eps == model.model.encoder.layers[0].self_attn_layer_norm.eps  # too small to see


def test_tokenization_matches_marian_tokenizer(marian, imported):
    _, _, tokenizer, pairs, left_out = marian
    _, vocab, _, _ = imported
    sources = [s for s, _ in pairs[:6]] + [f"{LANGUAGE_CODE} {pairs[7][0]}"]
    for text in sources:
        ids = vocab.encode_source(text) + [EOS_ID]
        assert _to_marian(vocab, tokenizer, ids) == tokenizer(text)["input_ids"]
    assert vocab.encode_source(sources[-1])[0] == vocab.tokens.index(LANGUAGE_CODE)
    assert left_out in vocab.encode_source_pieces(pairs[0][0]) and UNK_ID in vocab.encode_source(pairs[0][0])
    for _, text in pairs[:6]:
        ids = vocab.encode_target(text)
        labels = tokenizer(text_target=text)["input_ids"]
        assert _to_marian(vocab, tokenizer, ids) + [tokenizer.eos_token_id] == labels
        assert vocab.decode(ids + [EOS_ID]) == text
        assert vocab.decode(ids) == tokenizer.decode(labels, skip_special_tokens=True,
                                                     use_source_tokenizer=False)
    # The two models cut differently, so using the wrong one would show.
    assert any(vocab.encode_source(t) != vocab.encode_target(t) for _, t in pairs[:6])
    with pytest.raises(ValueError, match="encode_source or encode_target"):
        vocab.encode(pairs[0][0])


def test_logits_equal_transformers_with_padding(marian, imported):
    _, model, tokenizer, pairs, _ = marian
    ours, vocab, _, _ = imported
    sources = [s for s, _ in pairs[:5]]
    targets = [t for _, t in pairs[10:15]]
    batch = tokenizer(sources, text_target=targets, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is exercised
    decoder_in = transformers.models.marian.modeling_marian.shift_tokens_right(
        batch["labels"], tokenizer.pad_token_id, model.config.decoder_start_token_id)
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_in).logits  # (B, T, V)
        src = _pad([vocab.encode_source(s) + [EOS_ID] for s in sources])
        tgt_in = _pad([[BOS_ID] + vocab.encode_target(t) for t in targets])
        mine = ours(src, tgt_in)  # (B, T, V + 1)
    real = batch["labels"] != tokenizer.pad_token_id  # positions whose decoder input is not padding
    assert tuple(mine.shape[:2]) == tuple(real.shape)
    columns = [i for i, token in enumerate(vocab.tokens) if i not in (PAD_ID, BOS_ID)]
    marian_columns = [_marian_id(tokenizer, vocab.tokens[i]) for i in columns]
    torch.testing.assert_close(mine[real][:, columns], theirs[real][:, marian_columns], atol=1e-5, rtol=1e-5)
    # <pad> and <s> are never predicted, though Marian's <pad> (wdserve's <s>) has a high logit ...
    assert (mine[real][:, [PAD_ID, BOS_ID]] < SUPPRESSED_LOGIT / 2).all()
    assert (theirs[real][:, tokenizer.pad_token_id] > theirs[real].median(dim=-1).values).all()
    # ... so wdserve's distribution is Marian's without <pad>, as CTranslate2's converter makes it.
    kept = [i for i in range(theirs.size(-1)) if i != tokenizer.pad_token_id]
    theirs_lp = torch.log_softmax(theirs[real][:, kept], dim=-1)
    mine_lp = torch.log_softmax(mine[real], dim=-1)[:, [vocab.tokens.index(tokenizer.convert_ids_to_tokens(i))
                                                         for i in kept]]
    torch.testing.assert_close(mine_lp, theirs_lp, atol=1e-5, rtol=1e-5)


def _generation_config(tokenizer, num_beams: int) -> transformers.GenerationConfig:
    """OPUS-MT's settings (no <pad> output), with wdserve's search rules spelled out."""
    pad = tokenizer.pad_token_id
    beam = {"early_stopping": True, "length_penalty": 1.0} if num_beams > 1 else {}
    return transformers.GenerationConfig(
        num_beams=num_beams, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, bad_words_ids=[[pad]],
        decoder_start_token_id=pad, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        renormalize_logits=True,  # scores over the vocabulary without <pad>, as wdserve and CTranslate2
        **beam,  # early_stopping: a sentence is done when it has num_beams finished hypotheses
    )


@pytest.mark.parametrize("beam_size", [1, 4])
def test_search_equals_generate(marian, imported, beam_size):
    _, model, tokenizer, pairs, _ = marian
    ours, vocab, _, _ = imported
    sources = [s for s, _ in pairs[20:26]]
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    with torch.no_grad():
        sequences = model.generate(**batch, generation_config=_generation_config(tokenizer, beam_size))
    theirs = _generated(tokenizer, vocab, sequences)
    src = _pad([vocab.encode_source(s) + [EOS_ID] for s in sources])
    if beam_size == 1:
        mine = greedy_search(ours, src, max_len_a=0, max_len_b=MAX_NEW_TOKENS)
    else:
        mine = beam_search(ours, src, beam_size, 1.0, max_len_a=0, max_len_b=MAX_NEW_TOKENS)
    assert mine == theirs
    finished = [row for row in sequences.tolist() if tokenizer.eos_token_id in row]
    assert len(finished) >= len(sources) // 2  # most end in </s>, not at the length limit
    assert len({tuple(ids) for ids in mine}) > 1 and all(ids for ids in mine)


def test_checkpoint_round_trips_and_old_joint_checkpoints_keep_loading(imported, tmp_path):
    ours, vocab, state, path = imported
    assert set(state["model"]) == set(ours.state_dict())
    assert state["model"]["decoder.output_proj.bias"][BOS_ID] == SUPPRESSED_LOGIT
    again = Vocab(vocab.to_state())
    assert again.tokens == vocab.tokens and again.source_model_bytes == vocab.source_model_bytes
    with pytest.raises(ValueError, match="source_model_bytes and target_model_bytes"):
        _ = vocab.model_bytes
    # A joint wdserve vocabulary is still stored as the SentencePiece model's bytes.
    from wdserve.distill.vocab import train_sentencepiece

    joint = Vocab(train_sentencepiece(["a b c d e f", "b c d e f g"], tmp_path / "spm.model", 12))
    assert joint.to_state() == joint.model_bytes and joint.encode("a b") == joint.encode_source("a b")
    # A checkpoint written before the Marian options existed loads with wdserve's own behaviour.
    config = ModelConfig(vocab_size=len(joint), enc_layers=1, enc_dim=8, enc_heads=2, enc_ffn=16,
                         dec_layers=1, dec_dim=8, dec_heads=2, dec_ffn=16).to_dict()
    old = {key: value for key, value in config.items()
           if key not in ("position_encoding", "scale_embeddings", "output_bias")}
    weights = Transformer(ModelConfig(**old)).state_dict()
    torch.save({"config": old, "model": weights, "vocab": joint.model_bytes, "meta": {}}, tmp_path / "old.pt")
    model, loaded, _ = load_model(tmp_path / "old.pt")
    assert loaded.is_joint and loaded.tokens == joint.tokens and model.decoder.output_proj.bias is None
    assert (model.config.position_encoding, model.config.scale_embeddings) == ("tensor2tensor", True)


def test_offline_without_cache_is_a_clear_error(tmp_path):
    with pytest.raises(MarianImportError, match="offline"):
        load_pretrained("wdserve-tests/no-such-marian-model", local_files_only=True)
    with pytest.raises(MarianImportError, match="no such directory"):
        load_pretrained(str(tmp_path / "missing" / "model"), local_files_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MarianImportError, match="does not hold a complete MarianMTModel"):
        load_pretrained(tmp_path / "empty", local_files_only=True)


@pytest.mark.parametrize("mode", MODES)
def test_weight_distilled_student_keeps_the_teachers_suppressed_tokens(marian, imported, mode):
    """A generated stu1 (phase 1, then folded) copies the teacher's output bias: tanh would squash the
    suppressed <pad> and <s> logits from -1e4 to -1, a value ordinary logits do not reliably beat."""
    _, _, _, pairs, _ = marian
    teacher, vocab, _, _ = imported
    torch.manual_seed(0)
    generator = WeightGenerator(teacher, student_config(teacher.config, "stu1"), mode=mode)
    assert not any(name.startswith("decoder__output_proj__bias") for name in generator.generators)
    optimizer = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=3e-3)
    examples = encode_pairs(vocab, pairs[:96])
    for start in range(0, len(examples), 32):  # a few phase-1 steps: the generator moves, the copy must not
        chunk = examples[start : start + 32]
        src, tgt = _pad([s for s, _ in chunk]), [t for _, t in chunk]
        logits = generator(src, _pad([[BOS_ID] + t for t in tgt]))
        loss, _ = label_smoothed_nll(logits, _pad([t + [EOS_ID] for t in tgt]), 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (logits[..., [PAD_ID, BOS_ID]] < SUPPRESSED_LOGIT / 2).all()  # phase 1 trains with it, too

    student = generator.fold().eval()
    assert torch.equal(student.decoder.output_proj.bias, teacher.decoder.output_proj.bias)
    assert (student.decoder.output_proj.bias[[PAD_ID, BOS_ID]] == SUPPRESSED_LOGIT).all()
    src = _pad([vocab.encode_source(s) + [EOS_ID] for s, _ in pairs[100:116]])
    with torch.no_grad():
        probabilities = torch.softmax(student(src, _pad([[BOS_ID]] * len(src))), dim=-1)  # (B, 1, V)
    assert (probabilities[..., [PAD_ID, BOS_ID]] == 0).all()
    for outputs in (greedy_search(student, src, max_len_a=0, max_len_b=MAX_NEW_TOKENS),
                    beam_search(student, src, 4, 1.0, max_len_a=0, max_len_b=MAX_NEW_TOKENS)):
        emitted = {token for ids in outputs for token in ids}
        assert emitted and not emitted & {PAD_ID, BOS_ID}
