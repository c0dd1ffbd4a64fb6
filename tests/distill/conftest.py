"""Tiny models and batches for the distillation tests (no vocabulary needed): the ``kit`` fixture."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from wdserve.distill.model import BOS_ID, EOS_ID, PAD_ID, ModelConfig, Transformer

VOCAB = 40
TEACHER = {"enc_layers": 4, "enc_dim": 32, "enc_heads": 4, "enc_ffn": 64,
           "dec_layers": 2, "dec_dim": 32, "dec_heads": 4, "dec_ffn": 64}


def config(**fields) -> ModelConfig:
    values = {"vocab_size": VOCAB, **TEACHER, "dropout": 0.0, "max_positions": 64, **fields}
    return ModelConfig(**values)


def teacher(seed: int = 0, **fields) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config(**fields)).eval()


def batch(seed: int = 0, size: int = 6, src_len: int = 7, tgt_len: int = 5) -> SimpleNamespace:
    """A padded batch: src = ids + </s>, tgt_in = <s> + ids, tgt_out = ids + </s> (the trainer's layout)."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (size, src_len), generator=generator)
    pieces = torch.randint(4, VOCAB, (size, tgt_len - 1), generator=generator)
    src[:, -1] = EOS_ID
    src[0, -3:] = PAD_ID  # one shorter row exercises padding
    src[0, -4] = EOS_ID
    tgt_in = torch.cat([torch.full((size, 1), BOS_ID), pieces], dim=1)
    tgt_out = torch.cat([pieces, torch.full((size, 1), EOS_ID)], dim=1)
    tgt_in[1, -2:] = PAD_ID
    tgt_out[1, -2:] = PAD_ID
    tgt_out[1, -3] = EOS_ID
    return SimpleNamespace(src=src, tgt_in=tgt_in, tgt_out=tgt_out, n_tokens=int((tgt_out != PAD_ID).sum()))


def steps_lower_loss(module: torch.nn.Module, loss_fn, data: SimpleNamespace, steps: int = 12,
                     lr: float = 3e-3) -> tuple[float, float]:
    """(first loss, last loss) over a few Adam steps on one batch."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = loss_fn(module, data)
        (loss / data.n_tokens).backward()
        optimizer.step()
        losses.append(float(loss.detach()) / data.n_tokens)
    return losses[0], losses[-1]


@pytest.fixture
def kit() -> SimpleNamespace:
    torch.set_num_threads(1)
    return SimpleNamespace(config=config, teacher=teacher, batch=batch, steps_lower_loss=steps_lower_loss,
                           VOCAB=VOCAB)
