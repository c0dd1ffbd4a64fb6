"""Word-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016).

The teacher runs teacher-forced on the gold prefix; at every target position the student matches
the teacher's softened distribution as well as the gold token::

    loss = (1 - a) * NLL(gold) + a * T^2 * KL(p_teacher^T || p_student^T)

with ``p^T = softmax(logits / T)``. ``T^2`` keeps the gradient scale independent of ``T``. Sums run
over non-pad target tokens (the trainer divides by the token count). The teacher is frozen: eval
mode, no gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wdserve.distill.losses import label_smoothed_nll
from wdserve.distill.model import PAD_ID, Transformer


def kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``sum over non-pad positions of KL(softmax(t/T) || softmax(s/T))``; logits (B, T, V), target (B, T)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (B, T)
    return kl.masked_fill(target == PAD_ID, 0.0).sum()


def frozen(teacher: Transformer) -> Transformer:
    """The teacher in eval mode with gradients off (dropout off, nothing trained)."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class WordKDLoss:
    """``loss_fn(module, batch)`` for ``distill.train.train``: returns (loss summed over tokens, stats).

    ``module`` is anything whose ``forward(src, tgt_in)`` gives student logits (a ``Transformer`` or a
    ``WeightGenerator``). ``label_smoothing`` applies to the gold term only. Stats (detached sums over
    target tokens): nll, kl.
    """

    def __init__(
        self, teacher: Transformer, alpha: float = 0.5, temperature: float = 1.0, label_smoothing: float = 0.0
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"word_kd alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"word_kd temperature must be positive, got {temperature}")
        self.teacher = frozen(teacher)
        self.alpha = alpha
        self.temperature = temperature
        self.label_smoothing = label_smoothing

    def __call__(self, module: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher_logits = self.teacher(batch.src, batch.tgt_in)
        logits = module(batch.src, batch.tgt_in)
        gold, nll = label_smoothed_nll(logits, batch.tgt_out, self.label_smoothing)
        kl = kl_sum(logits, teacher_logits, batch.tgt_out, self.temperature)
        loss = (1 - self.alpha) * gold + self.alpha * self.temperature**2 * kl
        return loss, {"nll": nll.detach(), "kl": kl.detach()}
