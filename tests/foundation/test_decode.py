"""Greedy and beam search, and batched translation of text."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from wdserve.distill.decode import beam_search, greedy_search, sequence_log_probs, translate
from wdserve.distill.model import BOS_ID, EOS_ID, PAD_ID, ModelConfig, Transformer
from wdserve.distill.synthetic import generate_pairs
from wdserve.distill.vocab import Vocab, train_sentencepiece

TOKENS = list(range(4, 12))  # the reversal task's alphabet


def tiny(vocab_size: int, **overrides) -> ModelConfig:
    values = {"vocab_size": vocab_size, "enc_layers": 2, "enc_dim": 32, "enc_heads": 4, "enc_ffn": 64,
              "dec_layers": 2, "dec_dim": 32, "dec_heads": 4, "dec_ffn": 64, "dropout": 0.0}
    return ModelConfig(**{**values, **overrides})


def reversal_batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Sources ``x + [</s>]`` (padded) and targets ``reversed(x)`` for random ``x`` of 2-6 tokens."""
    sources, targets = [], []
    for _ in range(size):
        length = int(torch.randint(2, 7, (1,), generator=generator))
        ids = [TOKENS[int(i)] for i in torch.randint(0, len(TOKENS), (length,), generator=generator)]
        sources.append(ids + [EOS_ID])
        targets.append(ids[::-1])
    src = torch.full((size, 7), PAD_ID)
    for row, ids in enumerate(sources):
        src[row, : len(ids)] = torch.tensor(ids)
    return src, targets


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """A model trained for a few seconds to reverse sequences: confident, with real EOS decisions."""
    torch.manual_seed(0)
    model = Transformer(tiny(12))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        src, targets = reversal_batch(generator, 32)
        tgt_in = torch.full((32, 7), PAD_ID)
        tgt_out = torch.full((32, 7), PAD_ID)
        for row, ids in enumerate(targets):
            tgt_in[row, : len(ids) + 1] = torch.tensor([BOS_ID, *ids])
            tgt_out[row, : len(ids) + 1] = torch.tensor([*ids, EOS_ID])
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.view(-1, 12), tgt_out.view(-1), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_trained_fixture_learned_something(trained):
    src, targets = reversal_batch(torch.Generator().manual_seed(1), 64)
    outputs = greedy_search(trained, src)
    assert sum(out == tgt for out, tgt in zip(outputs, targets, strict=True)) > 16


def test_beam_of_one_is_greedy_on_a_random_model():
    torch.manual_seed(3)
    model = Transformer(tiny(40)).eval()
    src = torch.randint(4, 40, (6, 9))
    src[:, -1] = EOS_ID
    src[2, 5:], src[2, 4] = PAD_ID, EOS_ID
    greedy = greedy_search(model, src, max_len_a=1.0, max_len_b=5)
    assert greedy == beam_search(model, src, 1, max_len_a=1.0, max_len_b=5)
    assert len(greedy[2]) <= 10 and all(len(ids) <= 14 for ids in greedy)  # a * S + b, S without padding


def test_beam_of_one_is_greedy_on_a_trained_model(trained):
    src, _ = reversal_batch(torch.Generator().manual_seed(2), 64)
    for penalty in (0.0, 1.0):
        assert beam_search(trained, src, 1, length_penalty=penalty) == greedy_search(trained, src)


def test_wider_beams_never_score_worse_than_greedy(trained):
    src, _ = reversal_batch(torch.Generator().manual_seed(3), 64)
    greedy = sequence_log_probs(trained, src, greedy_search(trained, src))
    beam = sequence_log_probs(trained, src, beam_search(trained, src, 4, length_penalty=0.0))
    assert torch.all(beam >= greedy - 1e-4)


def test_beam_search_with_an_exhaustive_beam_finds_the_best_sequence():
    """With a beam wider than the search space, beam search must return the brute-force optimum."""
    torch.manual_seed(5)
    vocab_size, max_len, penalty = 6, 3, 1.0
    model = Transformer(tiny(vocab_size)).eval()
    src = torch.tensor([[4, 5, 4, EOS_ID], [5, 5, EOS_ID, PAD_ID]])

    def prefix_log_probs(row: int, tokens: list[int]) -> float:
        tgt_in = torch.tensor([[BOS_ID, *tokens[:-1]]])
        log_probs = F.log_softmax(model(src[row : row + 1], tgt_in), dim=-1)[0]
        return sum(float(log_probs[t, token]) for t, token in enumerate(tokens))

    # Every finished sequence (</s> at the end) and every sequence cut at the limit.
    candidates = [list(c) + [EOS_ID] for n in range(max_len) for c in itertools.product(
        [t for t in range(vocab_size) if t != EOS_ID], repeat=n)]
    candidates += [list(c) for c in itertools.product([t for t in range(vocab_size) if t != EOS_ID],
                                                      repeat=max_len)]
    with torch.no_grad():
        for row in range(2):
            best = max(candidates, key=lambda c: prefix_log_probs(row, c) / len(c) ** penalty)
            best = best[:-1] if best[-1] == EOS_ID else best
            found = beam_search(model, src[row : row + 1], 200, penalty, max_len_a=0.0, max_len_b=max_len)
            assert found == [best]


def test_search_does_not_leave_a_training_model_in_eval_mode(trained):
    trained.train()
    try:
        greedy_search(trained, torch.tensor([[4, 5, EOS_ID]]))
        beam_search(trained, torch.tensor([[4, 5, EOS_ID]]), 2)
        assert trained.training
    finally:
        trained.eval()


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Vocab:
    corpus = [text for pair in generate_pairs(300, seed=7) for text in pair]
    return Vocab(train_sentencepiece(corpus, tmp_path_factory.mktemp("spm") / "spm.model", 120))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_translate_returns_sentences_in_input_order(vocab, beam_size):
    torch.manual_seed(0)
    model = Transformer(tiny(len(vocab))).eval()
    sentences = [source for source, _ in generate_pairs(9, seed=8)] + [""]
    one_by_one = [translate(model, vocab, [s], beam_size=beam_size)[0] for s in sentences]
    batched = translate(model, vocab, sentences, beam_size=beam_size, batch_size=4)
    assert batched == one_by_one
    assert len(set(batched)) > 1  # different inputs, different outputs: order is observable
    assert translate(model, vocab, []) == []
