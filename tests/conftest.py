"""Fixtures shared across the test areas.

``tiny_workdir`` is a pipeline run directory built in seconds, without training:
synthetic data, a SentencePiece model, random-init teacher and students, and
their CTranslate2 exports. Random models translate into garbage, but valid
garbage: every stage after training (export, serving, load testing) can run on it.
"""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory in the pipeline layout (see COMMON.md), with untrained models:

    ``data/{train,valid,test}.{src,tgt}``, ``vocab/spm.model``,
    ``models/{teacher,student,student-kd}/checkpoint_best.pt`` and
    ``export/<name>-{int8,float32}/``. Languages are "xx" -> "yy". Treat it as read-only.
    """
    if torch is None:
        pytest.skip("tiny_workdir needs PyTorch")
    from distill.checkpoint import file_sha256, save_checkpoint
    from distill.data import write_parallel
    from distill.model import ModelConfig, Transformer
    from distill.synthetic import generate_pairs
    from distill.vocab import Vocab, train_sentencepiece
    from export.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("tiny_run")
    splits = {}
    for seed, (split, n) in enumerate(TINY_SPLITS.items(), start=11):
        splits[split] = generate_pairs(n, seed=seed)
        write_parallel(splits[split], root / "data" / f"{split}.src", root / "data" / f"{split}.tgt")
    corpus = [text for pair in splits["train"] for text in pair]
    vocab = Vocab(train_sentencepiece(corpus, root / "vocab" / "spm.model", TINY_VOCAB_SIZE))

    teacher_sha = None
    for index, (name, (architecture, method)) in enumerate(TINY_MODELS.items()):
        torch.manual_seed(1000 + index)
        config = ModelConfig(vocab_size=len(vocab), dropout=0.0, max_positions=TINY_MAX_POSITIONS,
                             **architecture)
        meta = {"name": name, "method": method, "source_lang": "xx", "target_lang": "yy"}
        if teacher_sha is not None:
            meta["teacher_sha256"] = teacher_sha
        checkpoint = root / "models" / name / "checkpoint_best.pt"
        save_checkpoint(checkpoint, Transformer(config).eval(), vocab, meta)
        if name == "teacher":
            teacher_sha = file_sha256(checkpoint)
        for quantization in TINY_QUANTIZATIONS:
            convert_checkpoint(checkpoint, root / "export" / f"{name}-{quantization}",
                               quantization=quantization, name=name)
    return root


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
    """The real Multi30k files (read in place, never copied), or a skip when absent."""
    path = Path(os.environ.get("WDSERVE_MULTI30K", REPO.parent / "shared" / "data" / "multi30k"))
    if not path.is_dir():
        pytest.skip(f"Multi30k not found at {path} (set WDSERVE_MULTI30K)")
    return path
