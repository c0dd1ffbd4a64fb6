"""Word-level KD and combinatorial intermediate-layer KD losses."""

from __future__ import annotations

import copy
from types import SimpleNamespace

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
        # 6 -> 2: the groups the authors hard-code in onmt/models/model.py _stack_internals
        (6, 2, "regular_comb", [[1, 2, 3], [4, 5, 6]]),
        (6, 2, "overlap", [[1, 2, 3, 4], [3, 4, 5, 6]]),
        (6, 2, "cross_comb", [[1, 3], [4, 6]]),
        (6, 2, "skip_comb", [[1, 3, 5], [2, 4, 6]]),
        (6, 2, "skip_middle", [[1, 2], [5, 6]]),
        (6, 3, "regular_comb", [[1, 2], [3, 4], [5, 6]]),
        (6, 3, "overlap", [[1, 2, 3], [2, 3, 4, 5], [4, 5, 6]]),
        (6, 3, "cross_comb", [[1, 2], [3, 4], [5, 6]]),
        (6, 3, "skip_comb", [[1, 4], [2, 5], [3, 6]]),
        (6, 3, "skip_middle", [[1], [3], [6]]),
        (4, 1, "cross_comb", [[1, 4]]),
    ],
)
def test_ckd_mapping_modes_give_the_documented_groups(teacher_layers, student_layers, mode, expected):
    assert ckd_groups(teacher_layers, student_layers, mode) == expected


def test_ckd_rejects_unknown_modes_and_uneven_layers():
    with pytest.raises(ValueError, match="unknown CKD mapping"):
        ckd_groups(6, 2, "diagonal")
    with pytest.raises(ValueError, match="renamed to the authors' 'skip_comb'"):
        ckd_groups(6, 2, "cross")
    with pytest.raises(ValueError, match="multiple"):
        ckd_groups(6, 4)


@pytest.mark.parametrize("mode", ["regular_comb", "skip_comb"])
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


class FixedLogits(torch.nn.Module):
    """A "model" that returns the same logits whatever it is given."""

    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.logits = torch.tensor([logits])  # (1, T, V)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_word_kd_loss_at_temperature_2_matches_a_hand_computation():
    """Two target positions and a padded third, vocabulary of 3, T = 2, alpha = 0.5.

    Computed by hand with ``math`` (p^T = softmax(logits / 2)):
    KL(p_t^T || p_s^T) = sum_pos sum_v p_t^T(v) (log p_t^T(v) - log p_s^T(v)) = 0.563390377650005
    NLL(gold 1, 2) at T = 1 = 0.6489172611015374
    loss = 0.5 * NLL + 0.5 * 2^2 * KL = 1.4512393858507786
    The reversed KL(p_s^T || p_t^T) is 0.55397 and the KL at T = 1 is 2.0422: both fail this test.
    """
    from types import SimpleNamespace

    student = FixedLogits([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0], [9.0, -9.0, 0.0]])
    teacher = FixedLogits([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-9.0, 9.0, 0.0]])
    batch = SimpleNamespace(src=torch.tensor([[5, 3]]), tgt_in=torch.tensor([[2, 1, 2]]),
                            tgt_out=torch.tensor([[1, 2, 0]]))  # the third position is <pad>
    loss, stats = WordKDLoss(teacher, alpha=0.5, temperature=2.0)(student, batch)
    assert float(stats["kl"]) == pytest.approx(0.563390377650005, rel=1e-6)
    assert float(stats["nll"]) == pytest.approx(0.6489172611015374, rel=1e-6)
    assert float(loss) == pytest.approx(1.4512393858507786, rel=1e-6)


def hand_made_states():
    """One sentence of two source tokens (the second <pad>), three teacher layers of width 2 and
    two student layers with groups [1, 2] and [3] (layers numbered from 1)."""
    src = torch.tensor([[5, 0]])
    teacher_hidden = [torch.tensor([[[1.0, 0.0], [7.0, 7.0]]]),   # layer 1
                      torch.tensor([[[0.0, 1.0], [7.0, 7.0]]]),   # layer 2
                      torch.tensor([[[3.0, 4.0], [7.0, 7.0]]])]   # layer 3
    projected = [torch.tensor([[[1.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]]),  # for [t1; t2]
                 torch.tensor([[[0.0, 2.0], [5.0, 0.0]]])]                      # for t3
    return projected, teacher_hidden, [[1, 2], [3]], src


def test_ckd_intermediate_loss_matches_a_hand_computation():
    """Layer 1: unit([1,0,0,0]) against unit([1,0,0,1]) = [1,0,0,1]/sqrt(2): (1 - 1/sqrt 2)^2 + 1/2
    = 2 - sqrt 2. Layer 2: [0,1] against [0.6,0.8]: 0.36 + 0.04 = 0.4. The <pad> token counts for
    nothing. Sum (the authors' reduction) 2.4 - sqrt 2; mean over 2 layers x 1 token, half that.
    Comparing with the next teacher layer (t2; t3 for the first group, none for the second) fails."""
    projected, teacher_hidden, groups, src = hand_made_states()
    total = CKDLoss.intermediate(projected, teacher_hidden, groups, src, "sum")
    assert float(total) == pytest.approx(2.4 - 2**0.5, rel=1e-6)
    mean = CKDLoss.intermediate(projected, teacher_hidden, groups, src, "mean")
    assert float(mean) == pytest.approx((2.4 - 2**0.5) / 2, rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ckd_student_equal_to_the_teacher_has_no_intermediate_loss(kit, reduction):
    """A student that is the teacher, with identity projections and one teacher layer per student
    layer, matches every layer exactly: any other teacher layer would not."""
    teacher = kit.teacher()
    with torch.no_grad():  # distinct layers, so that a shifted layer would show
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn_like(p))
    twin = copy.deepcopy(teacher)
    module = CKDStudent(twin, teacher.config.enc_dim, ckd_groups(4, 4, "regular_comb"))
    with torch.no_grad():
        for projection in module.projections:
            projection.weight.copy_(torch.eye(teacher.config.enc_dim))
            projection.bias.zero_()
    data = kit.batch()
    _, stats = CKDLoss(teacher, alpha=0.2, beta=0.7, reduction=reduction)(module, data)
    assert float(stats["intermediate"]) < 1e-8
    shifted = CKDStudent(twin, teacher.config.enc_dim, [[2], [3], [4], [1]])
    shifted.load_state_dict(module.state_dict())
    _, stats = CKDLoss(teacher, alpha=0.2, beta=0.7, reduction=reduction)(shifted, data)
    assert float(stats["intermediate"]) > 0.01


def test_ckd_sum_is_the_mean_times_layers_and_source_tokens_in_the_loss(kit):
    """The loss's intermediate term: sum over layers and source tokens, or mean x target tokens."""
    teacher = kit.teacher()
    student = Transformer(kit.config(enc_layers=2, dec_layers=1))
    module = CKDStudent(student, teacher.config.enc_dim, ckd_groups(4, 2, "regular_comb"))
    data = kit.batch()
    sources = int((data.src != 0).sum())
    loss_sum, summed = CKDLoss(teacher, alpha=0.0, beta=1.0, reduction="sum")(module, data)
    loss_mean, meaned = CKDLoss(teacher, alpha=0.0, beta=1.0, reduction="mean")(module, data)
    assert float(loss_sum.detach()) == pytest.approx(float(summed["intermediate"]), rel=1e-6)
    per_token = float(summed["intermediate"]) / (2 * sources)
    assert float(loss_mean.detach()) == pytest.approx(per_token * data.n_tokens, rel=1e-5)


class FixedStates(torch.nn.Module):
    """A teacher, or a CKD student, that returns hand-made logits and layer states whatever it is given.

    As a student, ``encoder`` and ``decoder`` are its projected states and ``groups`` / ``decoder_groups``
    the teacher layers they are compared with (``CKDStudent``'s attributes)."""

    def __init__(self, encoder, decoder, groups=(), decoder_groups=()) -> None:
        super().__init__()
        self.logits = torch.zeros(1, 3, 8)  # (1, T, V): no gold or KL loss enters with beta = 1
        self.encoder_states, self.decoder_states = encoder, decoder
        self.groups, self.decoder_groups = list(groups), list(decoder_groups)

    def forward_with_hidden(self, src, tgt_in):
        return self.logits, self.encoder_states, self.decoder_states

    def forward(self, src, tgt_in, with_hidden=False):
        return self.logits, self.encoder_states, self.decoder_states


def decoder_states(pad_teacher=(9.0, 9.0), pad_student=(-1.0, 0.0, 0.0, 0.0)):
    """One sentence: a source of three tokens, a target of two and a <pad>. Two teacher decoder layers
    of width 2 supervise the student's one decoder layer as one group [1, 2] (regular_comb, 2 -> 1).

    Position 1: unit([1,0,0,0]) against unit([t1; t2]) = [1,0,1,0]/sqrt 2: (1 - 1/sqrt 2)^2 + 1/2
    = 2 - sqrt 2.
    Position 2: [0,3,0,2]/sqrt 13 against [0,2,0,3]/sqrt 13: 2/13. The <pad> position counts for nothing.
    """
    batch = SimpleNamespace(src=torch.tensor([[6, 7, 3]]), tgt_in=torch.tensor([[2, 4, 5]]),
                            tgt_out=torch.tensor([[4, 5, 0]]))
    teacher = [torch.tensor([[[1.0, 0.0], [0.0, 2.0], list(pad_teacher)]]),   # layer 1
               torch.tensor([[[1.0, 0.0], [0.0, 3.0], list(pad_teacher)]])]   # layer 2
    student = [torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 2.0], list(pad_student)]])]
    return batch, teacher, student


DECODER_SUM = 2 - 2**0.5 + 2 / 13


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ckd_decoder_loss_matches_a_hand_computation(reduction):
    """Through ``CKDLoss`` with alpha = 0, beta = 1: the loss is the decoder's intermediate term. The
    mean is over 1 layer x 2 target tokens, times the 2 target tokens: the sum again here.
    Masking with the source (no <pad> there) adds the pad position's distance and fails; so does
    comparing with the teacher's layers in the other order ([t2; t1]: 2 - sqrt 2 and 0.615...)."""
    batch, teacher_states, student_states = decoder_states()
    teacher = FixedStates([], teacher_states)
    student = FixedStates([], student_states, decoder_groups=[[1, 2]])
    loss, stats = CKDLoss(teacher, alpha=0.0, beta=1.0, reduction=reduction)(student, batch)
    assert float(loss) == pytest.approx(DECODER_SUM, rel=1e-6)
    assert float(stats["intermediate_decoder"]) == pytest.approx(DECODER_SUM, rel=1e-6)
    assert "intermediate_encoder" not in stats
    mean = CKDLoss.intermediate(student_states, teacher_states, [[1, 2]], batch.tgt_out, "mean")
    assert float(mean) == pytest.approx(DECODER_SUM / 2, rel=1e-6)


def test_ckd_decoder_loss_ignores_padded_target_positions():
    def loss(**pad_states) -> float:
        batch, teacher_states, student_states = decoder_states(**pad_states)
        student = FixedStates([], student_states, decoder_groups=[[1, 2]])
        return float(CKDLoss(FixedStates([], teacher_states), alpha=0.0, beta=1.0, reduction="sum")(
            student, batch)[0])

    assert loss(pad_teacher=(-5.0, 0.5), pad_student=(0.0, 0.0, 3.0, -8.0)) == loss()


def test_ckd_both_sides_add_the_encoder_and_decoder_terms():
    """The encoder's hand-made states (``hand_made_states``, source [5, <pad>]) and the decoder's
    above, under one beta as the authors add them: (2.4 - sqrt 2) + (2 - sqrt 2 + 2/13)."""
    projected, teacher_encoder, groups, src = hand_made_states()
    batch, teacher_decoder, student_decoder = decoder_states()
    batch.src = src
    teacher = FixedStates(teacher_encoder, teacher_decoder)
    student = FixedStates(projected, student_decoder, groups=groups, decoder_groups=[[1, 2]])
    loss, stats = CKDLoss(teacher, alpha=0.0, beta=1.0, reduction="sum")(student, batch)
    assert float(stats["intermediate_encoder"]) == pytest.approx(2.4 - 2**0.5, rel=1e-6)
    assert float(loss) == pytest.approx(2.4 - 2**0.5 + DECODER_SUM, rel=1e-6)


def decoder_twin(kit, decoder_groups):
    """A student that is the teacher (perturbed, so its layers differ), its decoder supervised with
    identity projections: its decoder states are the teacher's, layer for layer."""
    teacher = kit.teacher()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn_like(p))
    module = CKDStudent(copy.deepcopy(teacher), teacher.config.enc_dim, [], decoder_groups,
                        teacher.config.dec_dim)
    with torch.no_grad():
        for projection in module.decoder_projections:
            projection.weight.copy_(torch.eye(teacher.config.dec_dim))
            projection.bias.zero_()
    return teacher, module


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ckd_decoder_twin_matches_only_the_right_teacher_layers(kit, reduction):
    teacher, module = decoder_twin(kit, ckd_groups(2, 2, "regular_comb", "decoder"))
    data = kit.batch()
    _, stats = CKDLoss(teacher, alpha=0.2, beta=0.7, reduction=reduction)(module, data)
    assert float(stats["intermediate"]) < 1e-8
    shifted = CKDStudent(module.student, teacher.config.enc_dim, [], [[2], [1]], teacher.config.dec_dim)
    shifted.load_state_dict(module.state_dict())
    _, stats = CKDLoss(teacher, alpha=0.2, beta=0.7, reduction=reduction)(shifted, data)
    assert float(stats["intermediate"]) > 0.01


def test_ckd_decoder_loss_on_a_real_model_ignores_what_the_padded_target_positions_hold(kit):
    """Row 1 of the batch has two <pad> targets: whatever the decoder input holds there, the loss (its
    decoder term, KL and NLL) stays the same, although the states there change (counted unmasked)."""
    teacher = kit.teacher()
    student = Transformer(kit.config(enc_layers=2, dec_layers=1, dec_dim=16, dec_heads=2,
                                     share_embeddings=False))
    module = CKDStudent(student, teacher.config.enc_dim, [], [[1, 2]], teacher.config.dec_dim)
    loss_fn = CKDLoss(teacher, alpha=0.2, beta=0.7, reduction="sum")
    data = kit.batch()

    def unmasked() -> float:
        _, _, projected = module(data.src, data.tgt_in, with_hidden=True)
        _, _, hidden = teacher.forward_with_hidden(data.src, data.tgt_in)
        every_position = torch.ones_like(data.tgt_out)
        return float(CKDLoss.intermediate(projected, hidden, [[1, 2]], every_position).detach())

    before, stats = loss_fn(module, data)
    everywhere = unmasked()
    data.tgt_in[1, -2:] = torch.tensor([7, 9])
    after, _ = loss_fn(module, data)
    assert float(stats["intermediate"]) > 0.01
    assert float(after.detach()) == pytest.approx(float(before.detach()), rel=1e-6)
    assert unmasked() != pytest.approx(everywhere, rel=1e-3)


@pytest.mark.parametrize("sides", [["decoder"], ["encoder", "decoder"]])
def test_ckd_decoder_projections_receive_gradients(kit, sides):
    teacher = kit.teacher()
    student = Transformer(kit.config(enc_layers=2, dec_layers=1, dec_dim=16, dec_heads=2,
                                     share_embeddings=False))
    groups = ckd_groups(4, 2, "regular_comb") if "encoder" in sides else []
    module = CKDStudent(student, teacher.config.enc_dim, groups, ckd_groups(2, 1, "cross_comb", "decoder"),
                        teacher.config.dec_dim)
    assert [p.out_features for p in module.decoder_projections] == [2 * teacher.config.dec_dim]
    loss, stats = CKDLoss(teacher, alpha=0.3, beta=0.4)(module, kit.batch())
    assert ("intermediate_encoder" in stats) == ("encoder" in sides)
    loss.backward()
    for name, p in module.named_parameters():
        if name.startswith(("decoder_projections", "projections")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert len(module.projections) == len(groups)


def test_ckd_student_refuses_groups_that_do_not_fit(kit):
    student = Transformer(kit.config(dec_layers=1))
    with pytest.raises(ValueError, match="2 CKD groups for 1 decoder layers"):
        CKDStudent(student, 32, [], [[1], [2]], 32)
    with pytest.raises(ValueError, match="encoder, the decoder or both"):
        CKDStudent(student, 32, [], [], 32)
    with pytest.raises(ValueError, match="teacher's decoder layer count"):
        ckd_groups(3, 2, "regular_comb", "decoder")


def test_ckd_options_are_typed_and_refuse_what_cannot_work():
    from wdserve.config import CKDOptions, PipelineConfig, StudentSpec
    from wdserve.errors import ConfigError

    spec = StudentSpec("s", "ckd", ckd={"sides": ["encoder", "decoder"], "mapping": "overlap"})
    assert spec.ckd == CKDOptions(sides=("encoder", "decoder"), mapping="overlap")
    assert (spec.ckd.mapping_of("encoder"), spec.ckd.mapping_of("decoder")) == ("overlap", "overlap")
    assert CKDOptions(decoder_mapping="skip_middle").mapping_of("decoder") == "skip_middle"
    assert CKDOptions().sides == ("encoder",)
    for ckd, message in [
        ({"sides": ["encoder", "decodr"]}, r"sides: give one or both of \['encoder', 'decoder'\]"),
        ({"sides": "decoder"}, r"give a list such as \[encoder, decoder\]"),
        ({"sides": []}, "sides: give one or both"),
        ({"sides": ["decoder", "decoder"]}, "each once"),
        ({"decoder_mapping": "cross"}, "decoder_mapping 'cross' was renamed to the authors' 'skip_comb'"),
        ({"mapping": "diagonal"}, "unknown CKD mapping 'diagonal'"),
        ({"reduction": "max"}, "reduction must be one of"),
        ({"side": "decoder"}, r"ckd: unknown options \['side'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            StudentSpec("s", "ckd", ckd=ckd)
    config = {"teacher": {}, "data": {"synthetic": {"train": 10, "valid": 2, "test": 2}},
              "students": [{"name": "c", "method": "ckd", "ckd": {"sides": ["middle"]}}]}
    with pytest.raises(ConfigError, match=r"students\[0\]: ckd: sides"):
        PipelineConfig.from_dict(config)
