"""Combinatorial intermediate-layer KD (Wu et al., EMNLP 2020, "Why Skip If You Can Combine").

Each student encoder layer ``i`` is supervised by a *group* of teacher encoder layers: their outputs
are concatenated, ``h_T = [t_{j1}; t_{j2}; ...]`` (width ``|group| * teacher_dim``), a learned linear
map ``W_i`` projects the student's output ``s_i`` to that width, and both are compared after L2
normalisation::

    intermediate = mean over student layers i and non-pad source tokens of
                   || W_i s_i / ||W_i s_i|| - h_T / ||h_T|| ||^2
    loss = a * T^2 * KL(p_teacher^T || p_student^T) + (1 - a - b) * NLL(gold) + b * intermediate

KL and NLL are sums over target tokens (``distill.kd``); the intermediate mean is multiplied by the
batch's target-token count so that all three terms are in the trainer's "summed over target tokens"
units.

Mapping modes, for ``L_t`` teacher and ``L_s`` student layers with ``k = L_t / L_s`` (a whole
number), teacher layers numbered from 1 and ``R_i = {k(i-1)+1, ..., k i}`` (the i-th block of k):

- ``regular``: group i = ``R_i``.                          6 -> 2: {1,2,3}, {4,5,6}
- ``overlap``: ``R_i`` plus its neighbours on each side (where they exist), so adjacent groups share
  two layers.                                             6 -> 2: {1,2,3,4}, {3,4,5,6}
- ``skip``: only the first and last layer of ``R_i`` (the middle is skipped; ``R_i`` itself when k <= 2).
                                                          6 -> 2: {1,3}, {4,6}
- ``cross``: every ``L_s``-th layer starting at i, interleaving the depth. 6 -> 2: {1,3,5}, {2,4,6}

The projections train alongside the student: ``CKDStudent`` wraps both, and ``student_of`` returns
the plain ``Transformer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wdserve.distill.kd import frozen, kl_sum
from wdserve.distill.losses import label_smoothed_nll, unwrap
from wdserve.distill.model import PAD_ID, Transformer

MAPPINGS = ("regular", "overlap", "skip", "cross")


def ckd_groups(teacher_layers: int, student_layers: int, mode: str = "regular") -> list[list[int]]:
    """Teacher encoder layers (1-based, as in the paper) supervising each student encoder layer."""
    if mode not in MAPPINGS:
        raise ValueError(f"unknown CKD mapping {mode!r}; expected one of {MAPPINGS}")
    if student_layers < 1 or teacher_layers % student_layers:
        raise ValueError(
            f"CKD needs the teacher's encoder layer count ({teacher_layers}) to be a multiple of the "
            f"student's ({student_layers})"
        )
    k = teacher_layers // student_layers
    blocks = [list(range(k * i + 1, k * (i + 1) + 1)) for i in range(student_layers)]
    if mode == "regular":
        return blocks
    if mode == "overlap":
        return [list(range(max(1, b[0] - 1), min(teacher_layers, b[-1] + 1) + 1)) for b in blocks]
    if mode == "skip":
        return [sorted({b[0], b[-1]}) for b in blocks]
    return [list(range(i + 1, teacher_layers + 1, student_layers)) for i in range(student_layers)]


class CKDStudent(nn.Module):
    """A student plus one linear map per encoder layer (student width -> concatenated teacher widths)."""

    def __init__(self, student: Transformer, teacher_dim: int, groups: list[list[int]]) -> None:
        super().__init__()
        if len(groups) != student.config.enc_layers:
            raise ValueError(f"{len(groups)} CKD groups for {student.config.enc_layers} encoder layers")
        self.student = student
        self.groups = groups
        self.projections = nn.ModuleList(
            nn.Linear(student.config.enc_dim, len(group) * teacher_dim) for group in groups
        )

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, with_hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Student logits; with ``with_hidden`` also each encoder layer's projected output.

        Everything the loss needs comes out of ``forward`` so that DistributedDataParallel sees it.
        """
        if not with_hidden:
            return self.student(src, tgt_in)
        memory, mask, hidden = self.student.encoder(src, return_hidden=True)
        logits = self.student.decoder(tgt_in, memory, mask)
        return logits, [projection(h) for projection, h in zip(self.projections, hidden, strict=True)]


def student_of(module: CKDStudent) -> Transformer:
    return unwrap(module).student


class CKDLoss:
    """``loss_fn(module, batch)`` for ``distill.train.train`` with a ``CKDStudent`` module.

    Stats (detached, summed over target tokens like the loss): nll, kl, intermediate.
    """

    def __init__(
        self,
        teacher: Transformer,
        alpha: float = 0.5,
        beta: float = 0.1,
        temperature: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        if alpha < 0 or beta < 0 or alpha + beta > 1:
            raise ValueError(f"CKD needs alpha, beta >= 0 and alpha + beta <= 1, got {alpha}, {beta}")
        self.teacher = frozen(teacher)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.label_smoothing = label_smoothing

    @staticmethod
    def intermediate(
        projected: list[torch.Tensor], teacher_hidden: list[torch.Tensor], groups: list[list[int]],
        src: torch.Tensor,
    ) -> torch.Tensor:
        """Mean over layers and non-pad source tokens of the squared distance of unit vectors."""
        keep = (src != PAD_ID).unsqueeze(-1)  # (B, S, 1)
        total = projected[0].new_zeros(())
        for predicted, group in zip(projected, groups, strict=True):
            target = torch.cat([teacher_hidden[j - 1] for j in group], dim=-1)  # (B, S, |g| * d_t)
            distance = (F.normalize(predicted, dim=-1) - F.normalize(target, dim=-1)).pow(2)
            total = total + (distance.sum(-1, keepdim=True) * keep).sum()
        return total / (keep.sum() * len(groups)).clamp(min=1)

    def __call__(self, module: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            memory, mask, teacher_hidden = self.teacher.encoder(batch.src, return_hidden=True)
            teacher_logits = self.teacher.decoder(batch.tgt_in, memory, mask)
        logits, projected = module(batch.src, batch.tgt_in, with_hidden=True)
        gold, nll = label_smoothed_nll(logits, batch.tgt_out, self.label_smoothing)
        kl = kl_sum(logits, teacher_logits, batch.tgt_out, self.temperature)
        inter = self.intermediate(projected, teacher_hidden, unwrap(module).groups, batch.src)
        tokens = (batch.tgt_out != PAD_ID).sum()
        loss = (
            self.alpha * self.temperature**2 * kl
            + (1 - self.alpha - self.beta) * gold
            + self.beta * inter * tokens
        )
        stats = {"nll": nll.detach(), "kl": kl.detach(), "intermediate": inter.detach() * tokens}
        return loss, stats
