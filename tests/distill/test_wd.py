"""Weight distillation and weight squeezing generators: shapes, gradients, folding, checkpoints."""

from __future__ import annotations

import pytest
import torch

from wdserve.distill.checkpoint import load_model, save_checkpoint
from wdserve.distill.kd import WordKDLoss
from wdserve.distill.model import Transformer
from wdserve.distill.vocab import Vocab, train_sentencepiece
from wdserve.distill.wd import WeightGenerator, layer_groups, live_student
from wdserve.distill.ws import squeezing_generator

# Student shapes covering every tensor kind: narrower decoder (cross-attention from a wider encoder),
# fewer layers on both sides, tied / untied output, shared / separate tables.
STUDENTS = {
    "narrow-decoder": {"enc_layers": 2, "dec_layers": 1, "dec_dim": 16, "dec_heads": 2, "dec_ffn": 32,
                       "share_embeddings": False},
    "narrow-untied": {"enc_layers": 4, "dec_layers": 1, "dec_dim": 16, "dec_heads": 2, "dec_ffn": 32,
                      "share_embeddings": False, "tie_output": False},
    "narrow-both": {"enc_layers": 1, "enc_dim": 16, "enc_heads": 2, "enc_ffn": 24,
                    "dec_layers": 2, "dec_dim": 16, "dec_heads": 2, "dec_ffn": 32},
    "same-width": {"enc_layers": 2, "dec_layers": 1},
}
MODES = ("wd", "ws", "gated-ws")


def distinct_parameters(model: Transformer) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("student", list(STUDENTS))
def test_generated_tensors_have_the_students_shapes(kit, student, mode):
    teacher = kit.teacher(tie_output=student != "narrow-untied")
    cfg = kit.config(**STUDENTS[student])
    generator = WeightGenerator(teacher, cfg, mode=mode)
    generated = {name: tuple(t.shape) for name, t in generator.generate().items()}
    assert generated == distinct_parameters(Transformer(cfg))
    kinds = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.out_proj.weight", "cross_attn.k_proj.weight", "cross_attn.out_proj.bias",
             "ffn.fc1.weight", "ffn.fc2.weight", "ffn_block.norm.weight", "embedding.tokens.weight"}
    assert all(any(name.endswith(kind) for name in generated) for kind in kinds)
    assert ("decoder.output_proj.weight" in generated) == (student == "narrow-untied")
    assert ("decoder.embedding.tokens.weight" in generated) == (not cfg.share_embeddings)


def test_teacher_gets_no_gradient_and_every_generator_parameter_does(kit):
    teacher = kit.teacher()
    with torch.no_grad():  # a trained teacher's biases are not all zero
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    generator = WeightGenerator(teacher, kit.config(**STUDENTS["narrow-decoder"]))
    generator.train()
    loss, _ = WordKDLoss(kit.teacher(), alpha=0.0)(generator, kit.batch())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not b.requires_grad for b in generator.buffers())
    assert all(p.grad is None for p in generator.student.parameters())  # the skeleton is never used
    trainable = {n: p for n, p in generator.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("generators.") for n in trainable)
    assert all(p.grad is not None for p in trainable.values())
    # Attention is invariant to a key bias, so its generator alone sees zero gradient.
    still = [n for n, p in trainable.items() if not p.grad.abs().sum() > 0 and "k_proj__bias" not in n]
    assert not still


@pytest.mark.parametrize("mode", MODES)
def test_folded_student_computes_what_the_generator_computes(kit, mode):
    teacher = kit.teacher()
    generator = WeightGenerator(teacher, kit.config(**STUDENTS["narrow-decoder"]), mode=mode)
    with torch.no_grad():  # move away from the init so A, B, gates, mixes all matter
        for p in generator.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    data = kit.batch()
    generator.eval()
    expected = generator(data.src, data.tgt_in)
    folded = generator.fold().eval()
    torch.testing.assert_close(folded(data.src, data.tgt_in), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("student", list(STUDENTS))
def test_live_student_follows_the_generator_through_training_steps(kit, student):
    """The path train() takes: generator forwards and optimizer steps, then the student on its own.

    With shared tables (same-width) the skeleton's embedding is reachable by several names; it
    must come out of every generator forward with its tensors tied and untouched.
    """
    teacher = kit.teacher(tie_output=student != "narrow-untied")
    generator = WeightGenerator(teacher, kit.config(**STUDENTS[student]))
    optimizer = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=0.01)
    data = kit.batch()
    for _ in range(2):
        optimizer.zero_grad()
        generator(data.src, data.tgt_in).logsumexp(-1).mean().backward()
        optimizer.step()
    live = live_student(generator)
    assert all(p.is_leaf for p in live.parameters())
    assert distinct_parameters(live) == distinct_parameters(Transformer(kit.config(**STUDENTS[student])))
    generator.eval()
    torch.testing.assert_close(live(data.src, data.tgt_in), generator(data.src, data.tgt_in),
                               atol=1e-5, rtol=1e-5)


def test_weight_distilled_student_is_an_ordinary_checkpoint(kit, tmp_path):
    corpus = [f"w{i} v{i % 7} u{i % 5}" for i in range(200)]
    vocab_path = train_sentencepiece(corpus, tmp_path / "spm.model", 30)
    vocab = Vocab(vocab_path)
    teacher = kit.teacher(vocab_size=len(vocab))
    cfg = kit.config(vocab_size=len(vocab), **STUDENTS["narrow-decoder"])
    folded = WeightGenerator(teacher, cfg).fold()
    save_checkpoint(tmp_path / "student.pt", folded, vocab, {"name": "s", "method": "wd"})
    model, _, state = load_model(tmp_path / "student.pt")
    assert list(state["model"]) == list(Transformer(cfg).state_dict())
    assert state["meta"]["method"] == "wd"
    src = torch.tensor([[5, 6, 7, 3]])
    tgt = torch.tensor([[2, 5, 6]])
    torch.testing.assert_close(model(src, tgt), folded.eval()(src, tgt))


def test_layer_count_not_a_multiple_is_a_clear_error(kit):
    with pytest.raises(ValueError, match=r"encoder has 4 layers and the student's 3.*multiple.*\[1, 2, 4\]"):
        WeightGenerator(kit.teacher(), kit.config(enc_layers=3))
    assert layer_groups(6, 2, "decoder") == [[0, 1, 2], [3, 4, 5]]


def test_wd_same_shape_tensor_starts_as_tanh_of_the_teacher(kit):
    teacher = kit.teacher()
    generated = WeightGenerator(teacher, kit.config(dec_layers=1)).generate()
    # Same shape, k = 1: W_s = 1 * tanh(W_t) + 0.
    same_shape = ("encoder.layers.3.ffn.fc1.weight", "encoder.final_norm.weight",
                  "encoder.embedding.tokens.weight")
    for name in same_shape:
        torch.testing.assert_close(generated[name], torch.tanh(teacher.get_parameter(name)))
    # k = 2 on the decoder: a learned mix of both teacher layers, not a copy of either.
    mixed = generated["decoder.layers.0.ffn.fc1.weight"]
    for j in (0, 1):
        copied = torch.tanh(teacher.get_parameter(f"decoder.layers.{j}.ffn.fc1.weight"))
        assert not torch.allclose(mixed, copied)


def test_weight_squeezing_reads_the_last_teacher_layer_of_each_group(kit):
    teacher = kit.teacher()
    generated = squeezing_generator(teacher, kit.config(enc_layers=2, dec_layers=1)).generate()
    # Same widths start as identity maps: student encoder layer i copies teacher layer 2i + 1.
    for i, j in ((0, 1), (1, 3)):
        teacher_weight = teacher.get_parameter(f"encoder.layers.{j}.self_attn.v_proj.weight")
        torch.testing.assert_close(generated[f"encoder.layers.{i}.self_attn.v_proj.weight"], teacher_weight)
    gated = squeezing_generator(teacher, kit.config(enc_layers=2, dec_layers=1), gated=True)
    own = gated.generators["encoder__layers__0__ffn__fc2__weight"].own
    expected = 0.5 * own + 0.5 * teacher.get_parameter("encoder.layers.1.ffn.fc2.weight")
    torch.testing.assert_close(gated.generate()["encoder.layers.0.ffn.fc2.weight"], expected)


@pytest.mark.parametrize("mode", MODES)
def test_generator_training_lowers_the_loss(kit, mode):
    generator = WeightGenerator(kit.teacher(), kit.config(**STUDENTS["narrow-decoder"]), mode=mode)
    generator.train()
    first, last = kit.steps_lower_loss(generator, WordKDLoss(kit.teacher(), alpha=0.0), kit.batch())
    assert last < first * 0.8


def projections_of(generator: WeightGenerator) -> dict[str, dict[int, torch.nn.Parameter]]:
    return {key: {int(axis): p for axis, p in tensor.proj.items()}
            for key, tensor in generator.generators.items()}


def test_shared_projections_map_each_width_space_with_one_p(kit):
    generator = WeightGenerator(kit.teacher(), kit.config(**STUDENTS["narrow-decoder"]))
    projections = projections_of(generator)
    spaces = {id(p): key for key, p in generator.spaces.items()}
    assert set(generator.spaces) == {"decoder__model", "decoder__ffn"}  # the encoder keeps its widths
    # Every P is its width space's, and every decoder tensor reading or writing the stream uses it.
    assert all(id(p) in spaces for axes in projections.values() for p in axes.values())
    stream = generator.spaces["decoder__model"]
    for kind in ("self_attn__q_proj", "self_attn__k_proj", "self_attn__out_proj", "ffn__fc1"):
        name = f"decoder__layers__0__{kind}__weight"
        assert projections[name][1 if "out_proj" not in name else 0] is stream, name
    assert projections["decoder__layers__0__self_attn__q_proj__bias"][0] is stream
    assert projections["decoder__embedding__tokens__weight"] == {1: stream}
    assert projections["decoder__layers__0__ffn__fc1__weight"][0] is generator.spaces["decoder__ffn"]
    assert projections["decoder__layers__0__cross_attn__k_proj__weight"] == {0: stream}  # reads 32 wide
    assert all(not axes for name, axes in projections.items() if name.startswith("encoder"))


def test_per_tensor_projections_are_private_and_square_where_widths_agree(kit):
    """The authors' code: one P per tensor and axis where widths differ (biases included), and on every
    axis of a decoder layer's tensors, square where widths agree; none on encoder layers of equal width."""
    teacher = kit.teacher()
    cfg = kit.config(**STUDENTS["narrow-decoder"])
    generator = WeightGenerator(teacher, cfg, projections="per-tensor")
    assert len(generator.spaces) == 0
    projections = projections_of(generator)
    every = [p for axes in projections.values() for p in axes.values()]
    assert len({id(p) for p in every}) == len(every)  # nothing shared
    student = dict(Transformer(cfg).named_parameters())
    for key, axes in projections.items():
        name = key.replace("__", ".")
        teacher_shape = generator.generators[key].teacher.shape[1:]
        differ = [a for a in range(student[name].dim()) if student[name].shape[a] != teacher_shape[a]]
        expected = list(range(student[name].dim())) if name.startswith("decoder.layers.") else differ
        assert sorted(axes) == expected, name
    square = projections["decoder__layers__0__cross_attn__k_proj__weight"]
    assert square[0].shape == (32, 16) and square[1].shape == (32, 32)  # reads the 32-wide encoder
    name = "encoder.layers.0.self_attn.q_proj.weight"  # k = 2, no P: a mix of two teacher layers
    assert not torch.allclose(generator.generate()[name], torch.tanh(teacher.get_parameter(name)))


def test_teacher_init_starts_one_to_one_tensors_equal_to_the_teacher(kit):
    teacher = kit.teacher()
    generated = WeightGenerator(teacher, kit.config(dec_layers=1), init="teacher").generate()
    for name in ("encoder.layers.3.ffn.fc1.weight", "encoder.final_norm.weight" if teacher.config.pre_norm
                 else "encoder.layers.0.ffn_block.norm.weight", "encoder.embedding.tokens.weight"):
        torch.testing.assert_close(generated[name], teacher.get_parameter(name))
    mixed = generated["decoder.layers.0.ffn.fc1.weight"]  # k = 2: a mix, through tanh as before
    assert not torch.allclose(mixed, teacher.get_parameter("decoder.layers.0.ffn.fc1.weight"))


@pytest.mark.parametrize("projections", ["shared", "per-tensor"])
def test_training_the_generator_leaves_its_teacher_copy_untouched(kit, projections):
    """What train() optimises: every parameter that requires grad. The teacher copies are not among them."""
    teacher = kit.teacher()
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    generator = WeightGenerator(teacher, kit.config(**STUDENTS["narrow-decoder"]), projections=projections)
    stacks = {key: tensor.teacher.clone() for key, tensor in generator.generators.items()}
    assert not any(name.endswith(".teacher") for name, _ in generator.named_parameters())
    kit.steps_lower_loss(generator, WordKDLoss(kit.teacher(), alpha=0.5), kit.batch(), steps=3, lr=0.05)
    for key, tensor in generator.generators.items():
        assert torch.equal(tensor.teacher, stacks[key]), key
    assert all(torch.equal(p, before[name]) for name, p in teacher.named_parameters())
