"""Checkpoints that rebuild their model on their own.

A checkpoint is one ``torch.save`` dict:

- ``config``: ``ModelConfig.to_dict()``; ``model``: the state dict;
- ``vocab``: ``Vocab.to_state()``, the SentencePiece model's bytes (or, for an imported
  teacher's split vocabulary, a dict of its tokens and two models), so export and
  evaluation need nothing else;
- ``meta``: free-form facts (name, method, language pair, teacher hash, ...);
- ``train_state`` (optional): optimizer, scheduler, step, RNG states for resuming.

Writes go to a temporary file in the same directory and are renamed into place,
so a kill never leaves a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from wdserve.distill.model import ModelConfig, Transformer
from wdserve.distill.vocab import Vocab


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Calls ``write(handle)`` on a temporary file beside ``path`` and renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_save_text(text: str, path: Path) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_checkpoint(
    path: Path,
    model: Transformer,
    vocab: Vocab,
    meta: dict | None = None,
    train_state: dict | None = None,
) -> None:
    state = {
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "vocab": vocab.to_state(),
        "meta": dict(meta or {}),
    }
    if train_state is not None:
        state["train_state"] = train_state
    atomic_save(state, path)


def read_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path} is not a readable wdserve checkpoint: {err}") from err
    missing = {"config", "model", "vocab"} - set(state) if isinstance(state, dict) else {"config"}
    if missing:
        raise ValueError(f"{path} is not a wdserve checkpoint (missing {sorted(missing)})")
    return state


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[Transformer, Vocab, dict]:
    """Rebuilds the model from a checkpoint alone; returns (model in eval mode, vocab, checkpoint dict)."""
    state = read_checkpoint(path)
    model = Transformer(ModelConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, Vocab(state["vocab"]), state


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
