"""Word-level KD and combinatorial intermediate-layer KD losses."""

from __future__ import annotations

import copy

import pytest
import torch

from wdserve.distill.ckd import CKDLoss, CKDStudent, ckd_groups
from wdserve.distill.kd import WordKDLoss
from wdserve.distill.model import Transformer

torch.set_num_threads(1)


def test_word_kd_interpolates_gold_nll_and_teacher_kl(kit):
    from wdserve.distill.losses import label_smoothed_nll

    teacher, data = kit.teacher(), kit.batch()
    student = Transformer(kit.config(dec_layers=1)).eval()
    gold, _ = label_smoothed_nll(student(data.src, data.tgt_in), data.tgt_out, 0.0)
    pure_nll, _ = WordKDLoss(teacher, alpha=0.0)(student, data)
    torch.testing.assert_close(pure_nll, gold)
    # A student identical to the teacher has zero KL at any temperature: alpha = 1 gives 0.
    twin = copy.deepcopy(teacher)
    loss, stats = WordKDLoss(teacher, alpha=1.0, temperature=2.0)(twin, data)
    assert abs(float(loss.detach())) < 1e-4 and stats["kl"] < 1e-4
    _, stats = WordKDLoss(teacher, alpha=0.5, temperature=2.0)(student, data)
    assert stats["kl"] > 0.01
    # T^2 scaling: the KL term of the loss is alpha * T^2 * KL.
    loss, stats = WordKDLoss(teacher, alpha=1.0, temperature=2.0)(student, data)
    assert float(loss.detach()) == pytest.approx(4.0 * float(stats["kl"]), rel=1e-5)


def test_word_kd_keeps_the_teacher_frozen(kit):
    teacher = kit.teacher()
    teacher.train()
    loss_fn = WordKDLoss(teacher, alpha=0.5)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = Transformer(kit.config(dec_layers=1))
    first, last = kit.steps_lower_loss(student, loss_fn, kit.batch())
    assert last < first * 0.8


@pytest.mark.parametrize(
    ("teacher_layers", "student_layers", "mode", "expected"),
    [
        (6, 2, "regular", [[1, 2, 3], [4, 5, 6]]),
        (6, 2, "overlap", [[1, 2, 3, 4], [3, 4, 5, 6]]),
        (6, 2, "skip", [[1, 3], [4, 6]]),
        (6, 2, "cross", [[1, 3, 5], [2, 4, 6]]),
        (6, 3, "regular", [[1, 2], [3, 4], [5, 6]]),
        (6, 3, "overlap", [[1, 2, 3], [2, 3, 4, 5], [4, 5, 6]]),
        (6, 3, "skip", [[1, 2], [3, 4], [5, 6]]),
        (6, 3, "cross", [[1, 4], [2, 5], [3, 6]]),
        (4, 1, "skip", [[1, 4]]),
    ],
)
def test_ckd_mapping_modes_give_the_documented_groups(teacher_layers, student_layers, mode, expected):
    assert ckd_groups(teacher_layers, student_layers, mode) == expected


def test_ckd_rejects_unknown_modes_and_uneven_layers():
    with pytest.raises(ValueError, match="unknown CKD mapping"):
        ckd_groups(6, 2, "diagonal")
    with pytest.raises(ValueError, match="multiple"):
        ckd_groups(6, 4)


@pytest.mark.parametrize("mode", ["regular", "cross"])
def test_ckd_trains_student_and_projections(kit, mode):
    teacher = kit.teacher()
    student = Transformer(kit.config(enc_layers=2, enc_dim=16, enc_heads=2, dec_layers=1, dec_dim=16,
                                     dec_heads=2))
    module = CKDStudent(student, teacher.config.enc_dim, ckd_groups(4, 2, mode))
    assert [p.out_features for p in module.projections] == [64, 64]
    loss_fn = CKDLoss(teacher, alpha=0.3, beta=0.4, temperature=1.0)
    data = kit.batch()
    _, stats = loss_fn(module, data)
    assert 0 < float(stats["intermediate"]) / data.n_tokens <= 4.0  # squared distance of unit vectors
    first, last = kit.steps_lower_loss(module, loss_fn, kit.batch())
    assert last < first * 0.8
    before = [p.detach().clone() for p in module.projections.parameters()]
    kit.steps_lower_loss(module, CKDLoss(teacher, alpha=0.0, beta=1.0), kit.batch(), steps=2)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.projections.parameters(), strict=True))
