"""Fixtures shared across the test areas.

``tiny_workdir`` is a pipeline run directory built in seconds: synthetic data, a
SentencePiece model, a teacher and two students given a few dozen optimizer steps
(not training: just enough that they emit ordinary pieces and often ``</s>``
instead of repeating ``<s>``, as an untouched random model does, which decodes
to empty strings), and their CTranslate2 exports. Their translations are garbage,
but non-empty, valid garbage: every stage after training (export, serving, load
testing) can run on it.

``tiny_marian`` and ``tiny_opus_marian`` are tiny pretrained teachers in Hugging Face's
Marian format (``build_tiny_marian``), the kind ``distill.marian`` imports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import pytest

try:
    import torch
except ImportError:  # a serving-only install runs the server tests without PyTorch
    torch = None
else:
    torch.set_num_threads(1)  # 2 shared cores: threads only fight each other

REPO = Path(__file__).resolve().parents[1]

TINY_SPLITS = {"train": 400, "valid": 30, "test": 30}
TINY_VOCAB_SIZE = 200
TINY_MAX_POSITIONS = 128  # keeps garbage translations short; CTranslate2 refuses positions past it
TINY_TEACHER = {"enc_layers": 3, "enc_dim": 64, "enc_heads": 4, "enc_ffn": 128,
                "dec_layers": 3, "dec_dim": 64, "dec_heads": 4, "dec_ffn": 128}
TINY_STUDENT = {"enc_layers": 3, "enc_dim": 64, "enc_heads": 4, "enc_ffn": 128,
                "dec_layers": 1, "dec_dim": 32, "dec_heads": 2, "dec_ffn": 64,
                "share_embeddings": False}
TINY_MODELS = {  # name -> (architecture, meta["method"])
    "teacher": (TINY_TEACHER, "teacher"),
    "student": (TINY_STUDENT, "wd"),
    "student-kd": (TINY_STUDENT, "seqkd"),
}
TINY_QUANTIZATIONS = ("int8", "float32")
TINY_WARM_UP_STEPS = 40


def _warm_up(model, examples: list[tuple[list[int], list[int]]], steps: int) -> None:
    """A few teacher-forced cross-entropy steps (independent of distill.train on purpose)."""
    import torch.nn.functional as F

    from wdserve.distill.batching import pad_ids
    from wdserve.distill.model import BOS_ID, EOS_ID, PAD_ID

    torch.set_num_threads(1)  # CTranslate2 raises the OpenMP thread count it shares with torch; undo that
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        start = (step * 32) % (len(examples) - 32)
        batch = examples[start : start + 32]
        src = pad_ids([s for s, _ in batch])
        tgt_in, tgt_out = pad_ids([[BOS_ID] + t for _, t in batch]), pad_ids([t + [EOS_ID] for _, t in batch])
        loss = F.cross_entropy(model(src, tgt_in).transpose(1, 2), tgt_out, ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as ``wdserve pipeline`` lays it out (``wdserve.artifacts.RunDir``), with barely
    trained models:

    ``data/{train,valid,test}.{src,tgt}``, ``vocab/spm.model``,
    ``models/{teacher,student,student-kd}/checkpoint_best.pt`` and
    ``export/<name>-{int8,float32}/``. Languages are "xx" -> "yy". Treat it as read-only.
    """
    if torch is None:
        pytest.skip("tiny_workdir needs PyTorch")
    from wdserve.distill.checkpoint import file_sha256, save_checkpoint
    from wdserve.distill.data import write_parallel
    from wdserve.distill.model import EOS_ID, ModelConfig, Transformer
    from wdserve.distill.synthetic import generate_pairs
    from wdserve.distill.vocab import Vocab, train_sentencepiece
    from wdserve.export.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("tiny_run")
    splits = {}
    for seed, (split, n) in enumerate(TINY_SPLITS.items(), start=11):
        splits[split] = generate_pairs(n, seed=seed)
        write_parallel(splits[split], root / "data" / f"{split}.src", root / "data" / f"{split}.tgt")
    corpus = [text for pair in splits["train"] for text in pair]
    vocab = Vocab(train_sentencepiece(corpus, root / "vocab" / "spm.model", TINY_VOCAB_SIZE))
    examples = [(vocab.encode(src) + [EOS_ID], vocab.encode(tgt)) for src, tgt in splits["train"]]

    teacher_sha = None
    for index, (name, (architecture, method)) in enumerate(TINY_MODELS.items()):
        torch.manual_seed(1000 + index)
        config = ModelConfig(vocab_size=len(vocab), dropout=0.0, max_positions=TINY_MAX_POSITIONS,
                             **architecture)
        meta = {"name": name, "method": method, "source_lang": "xx", "target_lang": "yy"}
        if teacher_sha is not None:
            meta["teacher_sha256"] = teacher_sha
        checkpoint = root / "models" / name / "checkpoint_best.pt"
        model = Transformer(config)
        _warm_up(model, examples, TINY_WARM_UP_STEPS)
        save_checkpoint(checkpoint, model, vocab, meta)
        if name == "teacher":
            teacher_sha = file_sha256(checkpoint)
        for quantization in TINY_QUANTIZATIONS:
            convert_checkpoint(checkpoint, root / "export" / f"{name}-{quantization}",
                               quantization=quantization, name=name)
    return root


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """Every test starts with one torch thread: loading a CTranslate2 model resets torch's (shared
    OpenMP) thread count to the core count, and two threads fighting on 2 shared cores slowed
    training steps ten-fold."""
    if torch is not None:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    """The real Multi30k files (read in place, never copied), or a skip when absent."""
    # default: what `wdserve data multi30k data/multi30k` writes, else the development machine's copy
    candidates = [REPO / "data" / "multi30k", REPO.parent / "shared" / "data" / "multi30k"]
    default = next((c for c in candidates if c.is_dir()), candidates[0])
    path = Path(os.environ.get("WDSERVE_MULTI30K", default))
    if not path.is_dir():
        pytest.skip(f"Multi30k not found at {path} (set WDSERVE_MULTI30K)")
    return path


# ---------------------------------------------------------------------------------------------------
# A tiny pretrained Marian teacher (Hugging Face format), for distill.marian and everything downstream

TINY_MARIAN_LANGUAGE_CODE = ">>yy<<"  # a target-language token, as multilingual OPUS-MT models have


class TinyMarian(NamedTuple):
    root: Path  # the saved MarianMTModel and MarianTokenizer files (config.json, source.spm, vocab.json, ...)
    model: Any  # transformers.MarianMTModel, in eval mode
    tokenizer: Any  # transformers.MarianTokenizer
    pairs: list[tuple[str, str]]  # synthetic sentence pairs the SentencePiece models were trained on
    left_out: str  # a source piece vocab.json lacks, so it encodes to <unk>


def _sentencepiece(lines: list[str], size: int) -> bytes:
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=size,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return buffer.getvalue()


def _ordinary_pieces(model: bytes) -> list[str]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i))]


def build_tiny_marian(root: Path, random_pad_row: bool) -> TinyMarian:
    """A tiny ``MarianMTModel`` with a ``MarianTokenizer`` built and saved in ``root`` (no downloads).

    Separate source and target SentencePiece models trained on the synthetic language pair, one
    ``vocab.json`` in its own order that leaves out one source piece (so ``<unk>`` is exercised) and holds
    a language code. The model is warmed up from random weights, and its final_logits_bias is random too,
    with ``<pad>`` (where Marian's decoder starts) the argmax unless suppressed. ``random_pad_row`` makes
    the ``<pad>`` embedding random, so a wrongly mapped start row changes the numbers; real OPUS-MT models
    keep it zero, which CTranslate2's own converter relies on (its decoder starts from a zero embedding).
    """
    import json
    import random

    transformers = pytest.importorskip("transformers")
    from wdserve.distill.synthetic import generate_pairs

    torch.set_num_threads(1)
    pairs = generate_pairs(300, seed=3)
    source_spm = _sentencepiece([s for s, _ in pairs], 60)
    target_spm = _sentencepiece([t for _, t in pairs], 60)
    (root / "source.spm").write_bytes(source_spm)
    (root / "target.spm").write_bytes(target_spm)
    target_pieces = _ordinary_pieces(target_spm)
    # A source piece the vocabulary lacks: MarianTokenizer (and wdserve) must map it to <unk>.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=source_spm)
    left_out = next(p for p in sp.encode(pairs[0][0], out_type=str) if p not in target_pieces and len(p) > 1)
    pieces = [TINY_MARIAN_LANGUAGE_CODE]
    for piece in _ordinary_pieces(source_spm) + target_pieces:
        if piece not in pieces and piece != left_out:
            pieces.append(piece)
    random.Random(0).shuffle(pieces)  # Marian's order is not the SentencePiece models' order
    vocab = {"</s>": 0, "<unk>": 1, **{piece: i + 2 for i, piece in enumerate(pieces)}}
    vocab["<pad>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.MarianTokenizer(str(root / "source.spm"), str(root / "target.spm"),
                                             str(root / "vocab.json"), source_lang="xx", target_lang="yy")
    pad = vocab["<pad>"]
    config = transformers.MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=48, max_position_embeddings=128,
        activation_function="swish", scale_embedding=True, pad_token_id=pad, decoder_start_token_id=pad,
        eos_token_id=0, dropout=0.1)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config)
    with torch.no_grad():  # Marian's <pad> row is where its decoder starts
        if random_pad_row:
            model.model.shared.weight[pad].normal_(0.0, 0.3)
    _warm_up_marian(model, tokenizer, pairs, steps=60, zero_pad_row=not random_pad_row)
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.3)
        model.final_logits_bias[0, pad] = 5.0  # Marian's <pad>: the argmax unless suppressed
    model.generation_config.forced_eos_token_id = None  # wdserve returns a hypothesis at the limit as is
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return TinyMarian(root, model, tokenizer, pairs, left_out)


def _warm_up_marian(model, tokenizer, pairs: list[tuple[str, str]], steps: int, zero_pad_row: bool) -> None:
    """A few dozen cross-entropy steps: an untrained model repeats one token and never emits </s>, which
    would leave the search comparisons little to compare. They also make every norm and bias distinct.
    ``zero_pad_row`` keeps the <pad> row zero, as Marian trains it (the tied output projection moves it)."""
    pad_row = model.model.shared.weight[tokenizer.pad_token_id]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        chunk = pairs[(step * 32) % 256 :][:32]
        batch = tokenizer([s for s, _ in chunk], text_target=[t for _, t in chunk], padding=True,
                          return_tensors="pt")
        batch["labels"] = batch["labels"].masked_fill(batch["labels"] == tokenizer.pad_token_id, -100)
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        if zero_pad_row:
            with torch.no_grad():
                pad_row.zero_()
    model.eval()


@pytest.fixture(scope="session")
def tiny_marian(tmp_path_factory: pytest.TempPathFactory) -> TinyMarian:
    """A tiny Marian model whose <pad> row is random (``build_tiny_marian``). Treat it as read-only."""
    if torch is None:
        pytest.skip("tiny_marian needs PyTorch")
    return build_tiny_marian(tmp_path_factory.mktemp("marian"), random_pad_row=True)


@pytest.fixture(scope="session")
def tiny_opus_marian(tmp_path_factory: pytest.TempPathFactory) -> TinyMarian:
    """A tiny Marian model shaped like a real OPUS-MT one: its <pad> row is zero. Treat it as read-only."""
    if torch is None:
        pytest.skip("tiny_opus_marian needs PyTorch")
    return build_tiny_marian(tmp_path_factory.mktemp("opus_marian"), random_pad_row=False)
