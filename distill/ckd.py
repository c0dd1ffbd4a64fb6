"""Combinatorial intermediate-layer KD (Wu et al., EMNLP 2020, "Why Skip If You Can Combine").

Student layer ``i`` of a supervised stack (encoder or decoder) is compared with a *group* of teacher
layers of the same stack: their outputs are concatenated, ``h_T = [t_{j1}; t_{j2}; ...]`` (width
``|group| * teacher_dim``), a learned linear map ``W_i`` projects the student's output ``s_i`` to that
width, and both are compared after L2 normalisation::

    d(i, x) = || W_i s_i(x) / ||W_i s_i(x)|| - h_T(x) / ||h_T(x)|| ||^2
    intermediate = sum over student encoder layers i and non-pad source tokens x of d(i, x)
                 + sum over student decoder layers i and non-pad target tokens y of d(i, y)  (reduction="sum")
    loss = a * T^2 * KL(p_teacher^T || p_student^T) + (1 - a - b) * NLL(gold) + b * intermediate

``sides`` says which stacks are supervised: the encoder (the only one before issue #15), the decoder,
or both. Layer outputs are taken before the stack's final norm, as the authors' ``intermediate_out``.
Decoder states are teacher-forced on the gold prefix and masked where the target is ``<pad>``, as the
authors' ``_compute_internal_loss`` masks them with the gold target.

KL and NLL are sums over target tokens (``distill.kd``). ``reduction="sum"`` is the authors' code
(``onmt/utils/loss.py``: MSE summed over the hidden width, the layers and the tokens, encoder and
decoder terms added under one beta). ``reduction="mean"`` averages each side over its layers and
tokens and multiplies by the batch's target-token count: about ``1 / L_s`` as strong as the sum (it was
this module's only form before issue #15).

Mapping modes, named as in the authors' ``--enc_distillation_mode`` / ``--dec_distillation_mode``, for
``L_t`` teacher and ``L_s`` student layers of one stack with ``k = L_t / L_s`` (a whole number),
teacher layers numbered from 1 and ``R_i = {k(i-1)+1, ..., k i}`` (the i-th block of k). The authors
hard-code 6 -> 2; the general rule is ours and gives their groups there:

- ``regular_comb``: group i = ``R_i``.                               6 -> 2: {1,2,3}, {4,5,6}
- ``overlap``: ``R_i`` plus its neighbours on each side (where they exist). 6 -> 2: {1,2,3,4}, {3,4,5,6}
- ``cross_comb``: the first and last layer of ``R_i`` (``R_i`` itself when k <= 2). 6 -> 2: {1,3}, {4,6}
- ``skip_comb``: every ``L_s``-th layer starting at i, interleaving the depth. 6 -> 2: {1,3,5}, {2,4,6}
- ``skip_middle``: the middle of the teacher's stack is skipped: groups in the lower half take the
  first ``max(1, k-1)`` layers of ``R_i``, groups in the upper half the last. 6 -> 2: {1,2}, {5,6}

The projections train alongside the student: ``CKDStudent`` wraps both, and ``student_of`` returns
the plain ``Transformer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wdserve.config import CKD_REDUCTIONS, check_ckd_mapping
from wdserve.distill.kd import frozen, kl_sum
from wdserve.distill.losses import label_smoothed_nll, unwrap
from wdserve.distill.model import PAD_ID, Transformer


def ckd_groups(
    teacher_layers: int, student_layers: int, mode: str = "regular_comb", side: str = "encoder"
) -> list[list[int]]:
    """Teacher layers (1-based, as in the paper) supervising each student layer of one stack."""
    check_ckd_mapping(mode)
    if student_layers < 1 or teacher_layers % student_layers:
        raise ValueError(
            f"CKD needs the teacher's {side} layer count ({teacher_layers}) to be a multiple of the "
            f"student's ({student_layers})"
        )
    k = teacher_layers // student_layers
    blocks = [list(range(k * i + 1, k * (i + 1) + 1)) for i in range(student_layers)]
    if mode == "regular_comb":
        return blocks
    if mode == "overlap":
        return [list(range(max(1, b[0] - 1), min(teacher_layers, b[-1] + 1) + 1)) for b in blocks]
    if mode == "cross_comb":
        return [sorted({b[0], b[-1]}) for b in blocks]
    if mode == "skip_middle":
        keep = max(1, k - 1)
        return [b[:keep] if 2 * i < student_layers else b[-keep:] for i, b in enumerate(blocks)]
    return [list(range(i + 1, teacher_layers + 1, student_layers)) for i in range(student_layers)]


class CKDStudent(nn.Module):
    """A student plus one linear map per supervised layer (student width -> concatenated teacher widths).

    ``groups`` supervise the encoder's layers and ``decoder_groups`` the decoder's (``ckd_groups``); an
    empty list leaves that stack unsupervised. ``teacher_dim`` and ``teacher_decoder_dim`` are the
    teacher's widths of each stack.
    """

    def __init__(
        self,
        student: Transformer,
        teacher_dim: int,
        groups: list[list[int]],
        decoder_groups: list[list[int]] | None = None,
        teacher_decoder_dim: int | None = None,
    ) -> None:
        super().__init__()
        cfg = student.config
        decoder_groups = decoder_groups or []
        for side, side_groups, layers in (("encoder", groups, cfg.enc_layers),
                                          ("decoder", decoder_groups, cfg.dec_layers)):
            if side_groups and len(side_groups) != layers:
                raise ValueError(f"{len(side_groups)} CKD groups for {layers} {side} layers")
        if not groups and not decoder_groups:
            raise ValueError("CKD needs groups for the encoder, the decoder or both")
        if decoder_groups and teacher_decoder_dim is None:
            raise ValueError("decoder_groups need the teacher's decoder width, teacher_decoder_dim")
        self.student = student
        self.groups, self.decoder_groups = groups, decoder_groups
        self.projections = nn.ModuleList(nn.Linear(cfg.enc_dim, len(g) * teacher_dim) for g in groups)
        self.decoder_projections = nn.ModuleList(
            nn.Linear(cfg.dec_dim, len(g) * teacher_decoder_dim) for g in decoder_groups
        )

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, with_hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Student logits; with ``with_hidden`` also each supervised encoder layer's projected output
        and each supervised decoder layer's (empty lists for a stack without groups).

        Everything the loss needs comes out of ``forward`` so that DistributedDataParallel sees it.
        """
        if not with_hidden:
            return self.student(src, tgt_in)
        logits, encoder_hidden, decoder_hidden = self.student.forward_with_hidden(src, tgt_in)
        return logits, _project(self.projections, encoder_hidden), _project(self.decoder_projections,
                                                                            decoder_hidden)


def _project(projections: nn.ModuleList, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's output through its projection; none when the stack is not supervised."""
    if not projections:
        return []
    return [projection(h) for projection, h in zip(projections, hidden, strict=True)]


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
        reduction: str = "mean",
    ) -> None:
        if alpha < 0 or beta < 0 or alpha + beta > 1:
            raise ValueError(f"CKD needs alpha, beta >= 0 and alpha + beta <= 1, got {alpha}, {beta}")
        if reduction not in CKD_REDUCTIONS:
            raise ValueError(f"CKD reduction must be one of {CKD_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.teacher = frozen(teacher)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.label_smoothing = label_smoothing

    @staticmethod
    def intermediate(
        projected: list[torch.Tensor], teacher_hidden: list[torch.Tensor], groups: list[list[int]],
        tokens: torch.Tensor, reduction: str = "sum",
    ) -> torch.Tensor:
        """The squared distance of unit vectors, summed (or averaged) over layers and non-pad tokens of
        one stack.

        ``projected[i]`` (B, S, |g_i| * d_t) is student layer i mapped by ``W_i``; ``teacher_hidden[j]``
        (B, S, d_t) is the output of teacher layer j + 1 (groups number layers from 1); ``tokens``
        (B, S) are the ids the states belong to (the source for the encoder, the gold target for the
        decoder), so that ``<pad>`` positions count for nothing.
        """
        keep = (tokens != PAD_ID).unsqueeze(-1)  # (B, S, 1)
        total = projected[0].new_zeros(())
        for predicted, group in zip(projected, groups, strict=True):
            target = torch.cat([teacher_hidden[j - 1] for j in group], dim=-1)  # (B, S, |g| * d_t)
            distance = (F.normalize(predicted, dim=-1) - F.normalize(target, dim=-1)).pow(2)
            total = total + (distance.sum(-1, keepdim=True) * keep).sum()
        if reduction == "sum":
            return total
        return total / (keep.sum() * len(groups)).clamp(min=1)

    def __call__(self, module: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher_logits, teacher_encoder, teacher_decoder = self.teacher.forward_with_hidden(
                batch.src, batch.tgt_in)
        logits, projected_encoder, projected_decoder = module(batch.src, batch.tgt_in, with_hidden=True)
        gold, nll = label_smoothed_nll(logits, batch.tgt_out, self.label_smoothing)
        kl = kl_sum(logits, teacher_logits, batch.tgt_out, self.temperature)
        student = unwrap(module)
        stats = {"nll": nll.detach(), "kl": kl.detach()}
        inter = logits.new_zeros((), dtype=torch.float32)
        for side, projected, hidden, groups, tokens in (
            ("encoder", projected_encoder, teacher_encoder, student.groups, batch.src),
            ("decoder", projected_decoder, teacher_decoder, student.decoder_groups, batch.tgt_out),
        ):
            if not groups:
                continue
            term = self.intermediate(projected, hidden, groups, tokens, self.reduction)
            if self.reduction == "mean":  # into the trainer's "summed over target tokens" units
                term = term * (batch.tgt_out != PAD_ID).sum()
            stats[f"intermediate_{side}"] = term.detach()
            inter = inter + term
        loss = self.alpha * self.temperature**2 * kl + (1 - self.alpha - self.beta) * gold + self.beta * inter
        stats["intermediate"] = inter.detach()
        return loss, stats
