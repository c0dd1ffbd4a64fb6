"""Fixtures shared across the test areas.

``tiny_workdir`` is a pipeline run directory built in seconds: synthetic data, a
SentencePiece model, a teacher and two students given a few dozen optimizer steps
(not training: just enough that they emit ordinary pieces and often ``</s>``
instead of repeating ``<s>``, as an untouched random model does, which decodes
to empty strings), and their CTranslate2 exports. Their translations are garbage,
but non-empty, valid garbage: every stage after training (export, serving, load
testing) can run on it.
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
