"""The training loop: batching, loss, schedule, resumption, checkpoints, CLI."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wdserve.distill.batching import encode_pairs, make_batches, pad_ids
from wdserve.distill.checkpoint import load_model, read_checkpoint
from wdserve.distill.cli import configure_train, run_train
from wdserve.distill.data import write_parallel
from wdserve.distill.losses import default_loss, label_smoothed_nll
from wdserve.distill.model import BOS_ID, EOS_ID, PAD_ID, ModelConfig, Transformer
from wdserve.distill.synthetic import generate_pairs
from wdserve.distill.train import (
    TrainConfig,
    average_state_dicts,
    inverse_sqrt_lr,
    train,
)
from wdserve.distill.vocab import Vocab, train_sentencepiece
from wdserve.errors import ConfigError

torch.set_num_threads(1)

MODEL = {"enc_layers": 2, "enc_dim": 32, "enc_heads": 2, "enc_ffn": 64,
         "dec_layers": 2, "dec_dim": 32, "dec_heads": 2, "dec_ffn": 64, "max_positions": 64}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Vocab, list[tuple[str, str]], list[tuple[list[int], list[int]]]]:
    pairs = generate_pairs(200, seed=3)
    path = tmp_path_factory.mktemp("vocab") / "spm.model"
    train_sentencepiece([text for pair in pairs for text in pair], path, vocab_size=120)
    vocab = Vocab(path)
    return vocab, pairs, encode_pairs(vocab, pairs)


def tiny_model(vocab: Vocab, seed: int = 0, dropout: float = 0.1) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=len(vocab), dropout=dropout, **MODEL))


def config(**overrides) -> TrainConfig:
    values = {"max_tokens": 400, "lr": 3e-3, "warmup_steps": 5, "max_steps": 12, "eval_every": 4,
              "log_every": 2, "seed": 7, "dev_batch_size": 16}
    return TrainConfig(**{**values, **overrides})


META = {"name": "tiny", "method": "teacher", "source_lang": "xx", "target_lang": "yy"}


# -- batches, loss, schedule -------------------------------------------------------------------------

def test_make_batches_respects_max_tokens_and_adds_specials(corpus):
    _, _, examples = corpus
    batches = make_batches(examples, max_tokens=300, shuffle=True, seed=1)
    seen = []
    for batch in batches:
        rows = batch.src.size(0)
        assert rows == 1 or max(batch.src.size(1), batch.tgt_in.size(1)) * rows <= 300
        assert batch.tgt_in.shape == batch.tgt_out.shape
        assert (batch.tgt_in[:, 0] == BOS_ID).all()
        lengths = (batch.tgt_out != PAD_ID).sum(dim=1)
        assert batch.n_tokens == int(lengths.sum())
        for i in range(rows):
            n = int(lengths[i])
            assert batch.tgt_out[i, n - 1] == EOS_ID  # target = pieces + EOS
            assert torch.equal(batch.tgt_in[i, 1:n], batch.tgt_out[i, : n - 1])  # shifted by BOS
            src = [t for t in batch.src[i].tolist() if t != PAD_ID]
            seen.append((src, batch.tgt_out[i, : n - 1].tolist()))
    assert sorted(seen) == sorted(examples)  # every example exactly once, unchanged

    again = make_batches(examples, max_tokens=300, shuffle=True, seed=1)
    other = make_batches(examples, max_tokens=300, shuffle=True, seed=2)
    assert [b.src.tolist() for b in again] == [b.src.tolist() for b in batches]
    assert [b.src.tolist() for b in other] != [b.src.tolist() for b in batches]


def test_make_batches_gives_an_oversized_example_its_own_batch():
    examples = [([5] * 3 + [EOS_ID], [6] * 2), ([5] * 40 + [EOS_ID], [6] * 30), ([7, EOS_ID], [8])]
    batches = make_batches(examples, max_tokens=20)
    assert sorted(b.src.size(0) for b in batches) == [1, 2]
    assert max(b.src.size(1) for b in batches) == 41


def test_pad_ids_right_pads_every_row_to_the_longest():
    padded = pad_ids([[5, 6, 7], [8], [9, 10]])
    assert padded.dtype == torch.long
    assert padded.tolist() == [[5, 6, 7], [8, PAD_ID, PAD_ID], [9, 10, PAD_ID]]


def test_label_smoothed_nll_matches_cross_entropy_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    target = torch.randint(4, 11, (2, 5))
    target[1, 3:] = PAD_ID
    loss, nll = label_smoothed_nll(logits, target, epsilon=0.0)
    expected = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=PAD_ID, reduction="sum")
    assert torch.allclose(loss, expected) and torch.allclose(nll, expected)

    eps = 0.1
    loss, nll = label_smoothed_nll(logits, target, epsilon=eps)
    lprobs = logits.log_softmax(-1)[target != PAD_ID]  # (8, 11)
    gold = target[target != PAD_ID]
    smoothed = torch.full_like(lprobs, eps / 10).scatter(1, gold[:, None], 1 - eps)
    assert torch.allclose(loss, -(smoothed * lprobs).sum(), atol=1e-5)
    assert torch.allclose(nll, expected)


def test_inverse_sqrt_schedule_warms_up_peaks_and_decays():
    assert inverse_sqrt_lr(1, 1e-3, 100) == pytest.approx(1e-5)
    assert inverse_sqrt_lr(50, 1e-3, 100) == pytest.approx(5e-4)
    assert inverse_sqrt_lr(100, 1e-3, 100) == pytest.approx(1e-3)
    assert inverse_sqrt_lr(400, 1e-3, 100) == pytest.approx(5e-4)
    assert inverse_sqrt_lr(10_000, 1e-3, 100) == pytest.approx(1e-4)
    assert inverse_sqrt_lr(7, 1e-3, 0) == 1e-3  # no warm-up: constant


def test_train_config_rejects_unknown_and_invalid_settings():
    with pytest.raises(ValueError, match="max_step"):
        TrainConfig.from_dict({"max_step": 10})
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="max_tokens"):
        TrainConfig(max_tokens=0)


# -- training runs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    vocab, pairs, examples = corpus
    losses: list[float] = []
    base = default_loss(0.1)

    def recording_loss(module, batch):
        loss, stats = base(module, batch)
        losses.append(float(loss.detach()) / batch.n_tokens)
        return loss, stats

    out = tmp_path_factory.mktemp("run")
    result = train(tiny_model(vocab, dropout=0.0), vocab, examples, pairs[:20],
                   config(max_steps=40, eval_every=20), out, META, loss_fn=recording_loss)
    return result, losses, out


def test_training_lowers_the_loss(finished_run):
    result, losses, _ = finished_run
    assert result.steps == 40 and len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)  # ~5.1 -> ~4.0 nats in 40 updates
    assert [entry["step"] for entry in result.history] == [20, 40]
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]


def test_last_update_used_the_scheduled_learning_rate(finished_run):
    result, _, _ = finished_run
    train_state = read_checkpoint(result.last_path)["train_state"]
    assert train_state["done"] and train_state["step"] == 40
    lr = train_state["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(inverse_sqrt_lr(40, 3e-3, 5))
    assert train_state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)


def test_best_checkpoint_is_a_plain_loadable_transformer(finished_run, corpus):
    result, _, _ = finished_run
    model, vocab, state = load_model(result.best_path)
    assert isinstance(model, Transformer) and len(vocab) == len(corpus[0])
    assert state["meta"]["name"] == "tiny" and state["meta"]["method"] == "teacher"
    assert state["meta"]["dev_bleu"] == pytest.approx(result.best_bleu)
    assert state["meta"]["step"] in (20, 40)


def test_a_finished_run_is_returned_without_training_again(finished_run, corpus, caplog):
    result, _, out = finished_run
    vocab, pairs, examples = corpus
    stamp = result.last_path.stat().st_mtime_ns

    def must_not_train(module, batch):
        raise AssertionError("a finished run trained again")

    with caplog.at_level(logging.INFO, logger="wdserve.distill.train"):
        again = train(tiny_model(vocab, seed=9), vocab, examples, pairs[:20],
                      config(max_steps=40, eval_every=20), out, META, loss_fn=must_not_train)
    assert again.steps == 40 and again.best_bleu == result.best_bleu and again.history == result.history
    assert result.last_path.stat().st_mtime_ns == stamp
    assert "not training again" in caplog.text


class SimulatedKill(RuntimeError):
    pass


def killing_loss(after_calls: int):
    base = default_loss(0.1)
    calls = [0]

    def loss_fn(module, batch):
        calls[0] += 1
        if calls[0] > after_calls:
            raise SimulatedKill(f"killed at loss call {calls[0]}")
        return base(module, batch)

    return loss_fn


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


@pytest.mark.parametrize("interruption", ["kill", "kill between evaluations", "max_steps"])
def test_resumed_training_matches_an_uninterrupted_run(corpus, tmp_path, caplog, interruption):
    """Dropout, accumulation, clipping and an epoch boundary all have to survive the restart bit for bit."""
    vocab, pairs, examples = corpus
    settings = {"accum_steps": 2, "clip_norm": 1.0, "max_steps": 12, "eval_every": 4, "save_every_s": 0}
    if interruption == "kill between evaluations":  # only save_every_s writes checkpoint_last.pt by then
        settings |= {"eval_every": 12, "save_every_s": 1e-9}
    valid = pairs[:8]
    full = train(tiny_model(vocab), vocab, examples, valid, config(**settings), tmp_path / "full", META)
    epochs_crossed = read_checkpoint(full.last_path)["train_state"]["epoch"]
    assert epochs_crossed >= 1, "the run should cross an epoch boundary"

    run = tmp_path / "interrupted"
    if interruption.startswith("kill"):  # dies in update 10, after checkpoint_last.pt was written at step 8
        with pytest.raises(SimulatedKill):
            train(tiny_model(vocab), vocab, examples, valid, config(**settings), run, META,
                  loss_fn=killing_loss(after_calls=2 * 9 + 1))
        expected_resume = 8
    else:  # a finished shorter run, extended
        train(tiny_model(vocab), vocab, examples, valid, config(**{**settings, "max_steps": 6}), run, META)
        expected_resume = 6
    assert read_checkpoint(run / "checkpoint_last.pt")["train_state"]["step"] == expected_resume
    halfway = final_weights(run / "checkpoint_last.pt")

    with caplog.at_level(logging.INFO, logger="wdserve.distill.train"):
        resumed = train(tiny_model(vocab, seed=123), vocab, examples, valid, config(**settings), run, META)
    assert f"at step {expected_resume}" in caplog.text
    assert resumed.steps == 12

    expected, got = final_weights(full.last_path), final_weights(resumed.last_path)
    assert expected.keys() == got.keys()
    assert any(not torch.equal(halfway[k], expected[k]) for k in expected)  # training moved on after resuming
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_failed_save_leaves_the_previous_checkpoint_intact(corpus, tmp_path, monkeypatch):
    vocab, pairs, examples = corpus
    out = tmp_path / "run"
    train(tiny_model(vocab), vocab, examples, pairs[:8], config(max_steps=4), out, META)
    before = (out / "checkpoint_last.pt").read_bytes()

    real_save = torch.save

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        train(tiny_model(vocab), vocab, examples, pairs[:8], config(max_steps=8), out, META)
    monkeypatch.setattr(torch, "save", real_save)

    assert (out / "checkpoint_last.pt").read_bytes() == before
    assert read_checkpoint(out / "checkpoint_last.pt")["train_state"]["step"] == 4
    load_model(out / "checkpoint_best.pt")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_patience_stops_when_dev_bleu_never_improves(corpus, tmp_path):
    vocab, pairs, examples = corpus
    unreachable = [(src, "qqqq zzzz wwww") for src, _ in pairs[:8]]  # BLEU stays 0 whatever the model says
    result = train(tiny_model(vocab), vocab, examples, unreachable,
                   config(max_steps=100, eval_every=2, patience=2), tmp_path / "run", META)
    assert result.steps == 6  # best at step 2, no better at 4 and 6
    assert [entry["step"] for entry in result.history] == [2, 4, 6]


class ScaledStudent(nn.Module):
    """A wrapper with a trainable parameter outside the student, as distillation modules have."""

    def __init__(self, student: Transformer) -> None:
        super().__init__()
        self.student = student
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, src, tgt_in):
        return self.student(src, tgt_in) * self.log_scale.exp()


def test_wrapper_module_saves_its_student_and_resumes_with_its_own_state(corpus, tmp_path):
    vocab, pairs, examples = corpus
    out = tmp_path / "run"
    module = ScaledStudent(tiny_model(vocab))
    result = train(module, vocab, examples, pairs[:8], config(max_steps=4, average_last=2, eval_every=2), out,
                   META, student_of=lambda m: m.student)
    model, _, state = load_model(result.best_path)
    assert isinstance(model, Transformer)
    assert "log_scale" not in state["model"]
    train_state = read_checkpoint(result.last_path)["train_state"]
    assert float(train_state["module"]["log_scale"]) != 0.0  # trained, and saved with the module

    averaged = read_checkpoint(out / "checkpoint_avg.pt")
    assert averaged["meta"]["averaged_steps"] == [2, 4]
    assert not (out / "snapshots").exists()

    resumed_module = ScaledStudent(tiny_model(vocab, seed=5))
    train(resumed_module, vocab, examples, pairs[:8], config(max_steps=6, average_last=2, eval_every=2), out,
          META, student_of=lambda m: m.student)
    assert read_checkpoint(out / "checkpoint_last.pt")["train_state"]["step"] == 6


def test_average_state_dicts_is_the_elementwise_mean():
    states = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, {"w": torch.tensor([3.0, 6.0]),
                                                                      "n": torch.tensor(4)}]
    averaged = average_state_dicts(states)
    assert torch.equal(averaged["w"], torch.tensor([2.0, 4.0]))
    assert int(averaged["n"]) == 4


# -- command line ------------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_train(parser)
    return parser.parse_args(argv)


def test_cli_trains_a_teacher_from_files(corpus, tmp_path, capsys):
    vocab, pairs, _ = corpus
    write_parallel(pairs[:150], tmp_path / "train.xx", tmp_path / "train.yy")
    write_parallel(pairs[150:170], tmp_path / "valid.xx", tmp_path / "valid.yy")
    spm = tmp_path / "spm.model"
    spm.write_bytes(vocab.model_bytes)
    settings = tmp_path / "teacher.json"
    settings.write_text(json.dumps({"model": MODEL, "train": {"max_tokens": 400, "max_steps": 50,
                                                              "warmup_steps": 2, "eval_every": 50}}))
    args = parse(["--train-src", str(tmp_path / "train.xx"), "--train-tgt", str(tmp_path / "train.yy"),
                  "--valid-src", str(tmp_path / "valid.xx"), "--valid-tgt", str(tmp_path / "valid.yy"),
                  "--vocab", str(spm), "--out", str(tmp_path / "teacher"), "--config", str(settings),
                  "--max-steps", "3", "--source-lang", "xx", "--target-lang", "yy"])
    run_train(args)
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 3  # the flag overrides the file
    model, _, state = load_model(Path(report["best"]))
    assert model.config.enc_dim == 32 and model.config.vocab_size == len(vocab)
    assert state["meta"]["method"] == "teacher" and state["meta"]["source_lang"] == "xx"
    assert not math.isnan(report["dev_bleu"])


def test_cli_names_an_unknown_setting(corpus, tmp_path):
    vocab, pairs, _ = corpus
    write_parallel(pairs[:10], tmp_path / "t.xx", tmp_path / "t.yy")
    spm = tmp_path / "spm.model"
    spm.write_bytes(vocab.model_bytes)
    settings = tmp_path / "bad.yaml"
    settings.write_text("train:\n  max_stepz: 5\n")
    args = parse(["--train-src", str(tmp_path / "t.xx"), "--train-tgt", str(tmp_path / "t.yy"),
                  "--valid-src", str(tmp_path / "t.xx"), "--valid-tgt", str(tmp_path / "t.yy"),
                  "--vocab", str(spm), "--out", str(tmp_path / "out"), "--config", str(settings)])
    with pytest.raises(ConfigError, match="max_stepz"):
        run_train(args)
