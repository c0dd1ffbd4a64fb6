"""Two Gloo ranks on CPU under torchrun train one model: same weights everywhere, one writer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from wdserve.distill.checkpoint import load_model, read_checkpoint
from wdserve.distill.synthetic import generate_pairs
from wdserve.distill.vocab import train_sentencepiece

torch.set_num_threads(1)

WORKER = textwrap.dedent("""
    import os, sys
    from pathlib import Path

    import torch

    from wdserve.distill.batching import encode_pairs
    from wdserve.distill.model import ModelConfig, Transformer
    from wdserve.distill.synthetic import generate_pairs
    from wdserve.distill.train import TrainConfig, train
    from wdserve.distill.vocab import Vocab

    torch.set_num_threads(1)
    out, vocab = Path(sys.argv[1]), Vocab(Path(sys.argv[2]))
    rank = int(os.environ["RANK"])
    pairs = generate_pairs(120, seed=5)
    torch.manual_seed(100 + rank)  # different weights per rank: DDP must start everyone from rank 0's
    model = Transformer(ModelConfig(vocab_size=len(vocab), enc_layers=1, enc_dim=32, enc_heads=2, enc_ffn=64,
                                    dec_layers=1, dec_dim=32, dec_heads=2, dec_ffn=64, max_positions=64))
    torch.save(model.state_dict(), out / f"initial{rank}.pt")
    cfg = TrainConfig(max_tokens=300, lr=3e-3, warmup_steps=2, max_steps=6, eval_every=3, log_every=2,
                      accum_steps=2, clip_norm=1.0)
    result = train(model, vocab, encode_pairs(vocab, pairs), pairs[:6], cfg, out / "run", {"name": "ddp"})
    torch.save(model.state_dict(), out / f"final{rank}.pt")
    # A second run in the same process, as a weight-distilled student's phase 2 is.
    second = train(model, vocab, encode_pairs(vocab, pairs), pairs[:6], cfg, out / "run2", {"name": "ddp"})
    (out / f"steps{rank}").write_text(f"{result.steps} {second.steps}")
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_train_identical_weights_and_rank0_writes(tmp_path):
    """Also: a second train() in the same processes reuses the process group."""
    pairs = generate_pairs(120, seed=5)
    texts = [text for pair in pairs for text in pair]
    spm = train_sentencepiece(texts, tmp_path / "spm.model", vocab_size=100)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path),
               str(spm)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in 180 s: {err.stderr}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert [(tmp_path / f"steps{rank}").read_text() for rank in (0, 1)] == ["6 6", "6 6"]
    initial0, initial1 = (torch.load(tmp_path / f"initial{rank}.pt") for rank in (0, 1))
    final0, final1 = (torch.load(tmp_path / f"final{rank}.pt") for rank in (0, 1))
    assert any(not torch.equal(initial0[k], initial1[k]) for k in initial0)  # the ranks started apart
    for name in final0:
        assert torch.equal(final0[name], final1[name]), name
    assert any(not torch.equal(final0[k], initial0[k]) for k in final0)  # and they trained

    state = read_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    train_state = state["train_state"]
    assert train_state["done"] and train_state["step"] == 6 and train_state["world_size"] == 2
    assert len(train_state["rng"]) == 2  # each rank's random streams, for an exact resume
    for name, value in state["model"].items():
        assert torch.equal(value, final0[name]), name
    model, _, best = load_model(tmp_path / "run" / "checkpoint_best.pt")
    assert best["meta"]["name"] == "ddp" and best["meta"]["step"] in (3, 6)
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if p.suffix == ".tmp"]
    assert not leftovers, leftovers
