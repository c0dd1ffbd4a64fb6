"""The ``LossFn`` type ``distill.train.train`` calls (its docstring states the contract), the default loss,
and ``unwrap`` for loss functions that receive a DistributedDataParallel wrapper.

Default loss, label-smoothed cross-entropy over the target vocabulary V
(Szegedy et al. 2016, in fairseq's form), summed over non-pad target tokens::

    L = (1 - eps - eps / (V - 1)) * NLL + eps / (V - 1) * sum_v -log p(v)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wdserve.distill.batching import Batch
from wdserve.distill.model import PAD_ID

LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, Any]]]


def label_smoothed_nll(
    logits: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, NLL), each summed over the positions where ``target != ignore_index``.

    ``logits`` (B, T, V) any float dtype (computed in float32), ``target`` (B, T).
    """
    lprobs = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.size(-1))  # (B*T, V)
    target = target.reshape(-1)
    keep = target != ignore_index
    lprobs, target = lprobs[keep], target[keep]  # (N, V), (N,)
    nll = -lprobs.gather(1, target[:, None]).squeeze(1)
    smooth = -lprobs.sum(dim=-1)
    eps_other = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_other) * nll + eps_other * smooth
    return loss.sum(), nll.sum()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (itself otherwise).

    Under torchrun a ``loss_fn`` receives the wrapper: call it for the forward pass
    (that is what synchronises gradients) and use ``unwrap`` to reach attributes.
    """
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def default_loss(epsilon: float) -> LossFn:
    """Label-smoothed cross-entropy of ``module(src, tgt_in)`` against ``tgt_out``."""

    def loss_fn(module: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, nll = label_smoothed_nll(module(batch.src, batch.tgt_in), batch.tgt_out, epsilon)
        return loss, {"nll": nll.detach()}

    return loss_fn
