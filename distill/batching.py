"""Token ids to tensors: the one padding function, and the token-count batches training reads.

An example is (source pieces + ``</s>``, target pieces without specials). A batch
feeds the decoder ``<s> + target`` and scores it against ``target + </s>``; every
tensor is right-padded with ``PAD_ID``. Batches group examples of similar length
so that sentences x longest side (source, or target + 1) stays within
``max_tokens``, padding included.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from wdserve.distill.model import BOS_ID, EOS_ID, PAD_ID
from wdserve.distill.vocab import Vocab

Example = tuple[list[int], list[int]]


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) source pieces + EOS, right-padded with PAD_ID
    tgt_in: torch.Tensor  # (B, T) BOS + target pieces
    tgt_out: torch.Tensor  # (B, T) target pieces + EOS
    n_tokens: int  # non-pad target tokens, the loss normaliser

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.src.to(device, non_blocking=True), self.tgt_in.to(device, non_blocking=True),
                     self.tgt_out.to(device, non_blocking=True), self.n_tokens)


def pad_ids(rows: list[list[int]], device: str | torch.device = "cpu") -> torch.Tensor:
    """``rows`` of token ids right-padded with ``PAD_ID`` into one (len(rows), longest row) tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)  # built on the CPU: one copy to the device, not one per row


def encode_pairs(vocab: Vocab, pairs: Iterable[tuple[str, str]]) -> list[Example]:
    """(source pieces + EOS, target pieces) per pair, the input ``make_batches`` expects."""
    return [(vocab.encode_source(src) + [EOS_ID], vocab.encode_target(tgt)) for src, tgt in pairs]


def _cost(example: Example) -> int:
    src, tgt = example
    return max(len(src), len(tgt) + 1)


def _collate(group: list[Example]) -> Batch:
    return Batch(
        src=pad_ids([src for src, _ in group]),
        tgt_in=pad_ids([[BOS_ID, *tgt] for _, tgt in group]),
        tgt_out=pad_ids([[*tgt, EOS_ID] for _, tgt in group]),
        n_tokens=sum(len(tgt) + 1 for _, tgt in group),
    )


def make_batches(
    examples: list[Example], max_tokens: int, shuffle: bool = False, seed: int = 0
) -> list[Batch]:
    """Groups examples of similar length so that sentences x longest side <= ``max_tokens``.

    ``examples`` are (source ids ending in EOS, target ids without specials); the
    batches add BOS to the decoder input and EOS to the target. An example longer
    than ``max_tokens`` on its own gets a batch of its own. With ``shuffle``, which
    equal-length examples share a batch and the order of batches both depend on
    ``seed``; without it batches come shortest first.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    order.sort(key=lambda i: _cost(examples[i]))  # stable: shuffled ties stay shuffled
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        cost = _cost(examples[i])
        if current and max(longest, cost) * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, cost)
    if current:
        groups.append(current)
    if shuffle:
        rng.shuffle(groups)
    return [_collate([examples[i] for i in group]) for group in groups]
