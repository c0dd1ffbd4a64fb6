"""The training loop every model in the project goes through: the teacher and each student.

A method supplies what differs -- the module to optimise, its loss and the plain
Transformer inside it that is evaluated and shipped (``student_of``) -- and this
loop owns the rest: token-count batches (built by ``distill.batching``), Adam with
an inverse-square-root schedule, gradient accumulation and clipping, mixed
precision on CUDA, dev BLEU, checkpoints, resumption and DistributedDataParallel
under ``torchrun``.

Without a method's loss the module trains on label-smoothed cross-entropy
(``distill.losses.default_loss``).

Learning rate at update ``step`` (1-based), Vaswani et al. 2017::

    lr(step) = lr * min(step / warmup, sqrt(warmup / step))

Files in ``out_dir``:

- ``checkpoint_last.pt``: the student as a loadable checkpoint plus ``train_state``
  (the whole module, optimizer, step, epoch and batch position, RNG states of every
  rank, best BLEU, history); written every ``eval_every`` updates, at the first log
  step after every ``save_every_s`` seconds of training, and at the end, and read back
  to resume. ``train_state["done"]`` marks a finished run;
- ``checkpoint_best.pt``: the student with the best dev BLEU so far (meta has
  ``dev_bleu`` and ``step``);
- ``checkpoint_avg.pt`` (``average_last`` = K > 1): the mean of the student's
  weights at the last K evaluations, written once at the end and evaluated; when
  it beats the best single checkpoint it also becomes ``checkpoint_best.pt``.
  The K snapshots wait in ``snapshots/`` (removed at the end) so a resumed run
  averages the same weights an uninterrupted one would.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from wdserve.distill.batching import Batch, Example, make_batches
from wdserve.distill.checkpoint import atomic_save, read_checkpoint, save_checkpoint
from wdserve.distill.losses import LossFn, default_loss
from wdserve.distill.model import Transformer, config_from_dict
from wdserve.distill.vocab import Vocab

log = logging.getLogger(__name__)

LAST, BEST, AVERAGED, SNAPSHOTS = "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_avg.pt", "snapshots"
AMP_MODES = ("auto", "bf16", "fp16", "none")


@dataclass
class TrainConfig:
    max_tokens: int = 4096  # per batch: sentences x longest (source or target + 1) side, padding included
    lr: float = 5e-4  # peak learning rate, reached after warmup_steps updates
    warmup_steps: int = 4000  # 0: constant lr
    max_steps: int = 100_000  # optimizer updates
    max_epochs: int = 0  # 0: no limit
    label_smoothing: float = 0.1
    accum_steps: int = 1  # batches per optimizer update
    clip_norm: float = 0.0  # max gradient L2 norm; 0: no clipping
    amp: str = "auto"  # auto | bf16 | fp16 | none; CUDA only, CPU always trains in float32
    seed: int = 1
    eval_every: int = 1000  # dev BLEU and checkpoint_last.pt every N updates
    log_every: int = 100
    # also write checkpoint_last.pt once this many seconds of training have passed since the last one
    # (checked at log steps), so a killed run loses little between evaluations; 0: only at evaluations
    save_every_s: float = 600.0
    average_last: int = 0  # K > 1: average the student's weights at the last K evaluations
    dev_beam_size: int = 1
    dev_batch_size: int = 64
    patience: int = 0  # > 0: stop after this many evaluations without a better dev BLEU
    device: str = "auto"  # auto (the module's accelerator, else cuda when present, else cpu) | cpu | cuda[:N]
    find_unused_parameters: bool = False  # DDP: set when the loss leaves some trainable parameters unused

    def __post_init__(self) -> None:
        positive = ("max_tokens", "lr", "max_steps", "accum_steps", "eval_every", "log_every",
                    "dev_beam_size", "dev_batch_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train config: {name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_epochs", "clip_norm", "average_last", "patience", "save_every_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"train config: {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"train config: label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"train config: amp must be one of {AMP_MODES}, got {self.amp!r}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        return config_from_dict(cls, values, "train")


@dataclass
class TrainResult:
    best_path: Path
    last_path: Path
    best_bleu: float
    steps: int
    history: list[dict]




def inverse_sqrt_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Rate for the ``step``-th update (1-based): linear warm-up to ``lr``, then lr * sqrt(warmup / step)."""
    if warmup_steps <= 0:
        return lr
    step = max(step, 1)
    return lr * min(step / warmup_steps, math.sqrt(warmup_steps / step))


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point entries (in float64, cast back); others from the last state."""
    if not states:
        raise ValueError("nothing to average")
    averaged = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            total = sum(state[key].double() for state in states)
            averaged[key] = (total / len(states)).to(last.dtype)
        else:
            averaged[key] = last
    return averaged


def train(
    module: nn.Module,
    vocab: Vocab,
    train_examples: list[Example],
    valid_pairs: list[tuple[str, str]],
    cfg: TrainConfig,
    out_dir: Path,
    meta: dict,
    loss_fn: LossFn | None = None,
    student_of: Callable[[nn.Module], Transformer] | None = None,
    trainable_parameters: Iterable[nn.Parameter] | None = None,
) -> TrainResult:
    """Trains ``module`` until ``cfg.max_steps``/``max_epochs``/``patience``; resumes from ``out_dir``.

    ``loss_fn(module, batch) -> (loss summed over target tokens, stats)``: stats values
    (floats or 0-dim tensors) are sums over the batch's target tokens too, logged per
    token. Each update divides the summed loss by the target tokens it covers.
    ``student_of(module)`` is the Transformer evaluated on ``valid_pairs`` and saved
    (default: ``module``). The loop calls ``module.train()``, so a frozen teacher that
    must keep dropout off belongs in the loss function, not inside ``module``. When
    ``out_dir`` holds a finished run, nothing trains and its result is returned.
    """
    out_dir = Path(out_dir)
    if not valid_pairs:
        raise ValueError("train: valid_pairs is empty; dev BLEU selects checkpoint_best.pt")
    state = read_checkpoint(out_dir / LAST) if (out_dir / LAST).is_file() else None
    if state is not None:
        train_state = state.get("train_state")
        if not isinstance(train_state, dict) or "step" not in train_state:
            raise ValueError(f"{out_dir / LAST} has no train_state to resume from; "
                             "move it away to start over")
        if train_state.get("done") and _stop_reason(train_state, cfg):
            log.info("%s: finished run found at step %d (best dev BLEU %.2f); not training again",
                     out_dir, train_state["step"], train_state["best_bleu"])
            return _result(out_dir, train_state)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    device = _resolve_device(cfg.device, module, local_rank)
    if world > 1 and not dist.is_initialized():
        # One group per process, kept across train() calls: a student trains several phases in one
        # process, and tearing a Gloo group down and up again between them was seen to fail to connect.
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_process_group)
    trainer = _Trainer(module, vocab, train_examples, valid_pairs, cfg, out_dir, meta,
                       loss_fn or default_loss(cfg.label_smoothing), student_of or (lambda m: m),
                       trainable_parameters, device, world, rank)
    return trainer.run(state)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _result(out_dir: Path, train_state: dict) -> TrainResult:
    return TrainResult(out_dir / BEST, out_dir / LAST, float(train_state["best_bleu"]),
                       int(train_state["step"]), list(train_state["history"]))


def _stop_reason(train_state: dict, cfg: TrainConfig) -> str | None:
    if train_state["step"] >= cfg.max_steps:
        return "max_steps"
    if cfg.max_epochs and train_state["epoch"] >= cfg.max_epochs:
        return "max_epochs"
    if cfg.patience and train_state["bad_evals"] >= cfg.patience:
        return "patience"
    return None


def _resolve_device(requested: str, module: nn.Module, local_rank: int) -> torch.device:
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    on = next((p.device for p in module.parameters() if p.device.type != "cpu"), None)
    if on is not None:
        return on
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            log.info("amp=%s applies to CUDA only; training in float32 on %s", amp, device)
        return None
    if amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class _Trainer:
    """The state of one training run; ``run`` is the loop, the rest are its steps."""

    def __init__(self, module, vocab, examples, valid_pairs, cfg, out_dir, meta, loss_fn, student_of,
                 trainable_parameters, device: torch.device, world: int, rank: int) -> None:
        self.cfg, self.vocab, self.out_dir, self.meta = cfg, vocab, Path(out_dir), dict(meta)
        self.loss_fn, self.student_of = loss_fn, student_of
        self.valid_sources = [src for src, _ in valid_pairs]
        self.valid_references = [tgt for _, tgt in valid_pairs]

        self.device, self.world, self.rank = device, world, rank
        self.raw = module.to(self.device)
        student = student_of(self.raw)
        if not isinstance(student, Transformer):
            raise TypeError(f"student_of(module) must return a distill.model.Transformer, "
                            f"got {type(student)}")
        self.student = student
        limit = student.config.max_positions
        self.examples = [ex for ex in examples if len(ex[0]) <= limit and len(ex[1]) + 1 <= limit]
        if len(self.examples) < len(examples):
            log.warning("dropped %d of %d training examples longer than max_positions=%d",
                        len(examples) - len(self.examples), len(examples), limit)
        if not self.examples:
            raise ValueError("train: no training examples")

        candidates = self.raw.parameters() if trainable_parameters is None else trainable_parameters
        params = [p for p in candidates if p.requires_grad]
        if not params:
            raise ValueError("train: the module has no trainable parameters")
        self.params = params
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
        self.amp_dtype = _amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.step = self.epoch = self.position = self.bad_evals = self.last_eval_step = 0
        self.best_bleu = -1.0
        self.history: list[dict] = []
        self.snapshots: list[str] = []
        self.elapsed_before = 0.0
        self.model: nn.Module = self.raw  # DDP wrapper under torchrun, set in run()
        self.batches_per_epoch: int | None = None  # known once the first epoch's batches are built

    # -- distributed helpers ------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_int(self, value: int) -> int:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.long,
                              device=self.device if self.device.type == "cuda" else "cpu")
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    # -- resumption --------------------------------------------------------------------------------
    def restore(self, state: dict | None) -> None:
        if state is None:
            _seed_everything(self.cfg.seed + self.rank)
            log.info("%s: starting a new run", self.out_dir)
            return
        ts = state["train_state"]
        self.raw.load_state_dict(ts["module"] if ts["module"] is not None else state["model"])
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scaler.load_state_dict(ts["scaler"])
        self.step, self.epoch, self.position = ts["step"], ts["epoch"], ts["position"]
        self.best_bleu, self.bad_evals, self.last_eval_step = ts["best_bleu"], ts["bad_evals"], ts["step"]
        self.history, self.snapshots, self.elapsed_before = ts["history"], ts["snapshots"], ts["elapsed"]
        changed = sorted(k for k, v in asdict(self.cfg).items() if ts["config"].get(k, v) != v)
        if changed:
            log.warning("resuming with changed train settings: %s", ", ".join(changed))
        if ts["world_size"] == self.world:
            _set_rng_state(ts["rng"][self.rank], self.device)
        else:  # another number of ranks: keep the place in the corpus, draw fresh randomness
            self.position = self.position * ts["world_size"] // self.world
            _seed_everything(self.cfg.seed + self.rank + self.step)
            log.warning("checkpoint was written by %d ranks, now %d: RNG streams restart",
                        ts["world_size"], self.world)
        log.info("%s: resuming from %s at step %d (epoch %d, batch %d), best dev BLEU %.2f",
                 self.out_dir, LAST, self.step, self.epoch + 1, self.position, self.best_bleu)

    # -- data ----------------------------------------------------------------------------------------
    def shard(self, epoch: int) -> list[Batch]:
        """This rank's batches of ``epoch``: every rank gets the same number."""
        batches = make_batches(self.examples, self.cfg.max_tokens, shuffle=True,
                               seed=self.cfg.seed * 100_003 + epoch)
        usable = len(batches) // self.world * self.world
        if usable == 0:
            raise ValueError(f"the corpus makes {len(batches)} batches of max_tokens={self.cfg.max_tokens}, "
                             f"fewer than the {self.world} ranks; lower max_tokens")
        return batches[self.rank : usable : self.world]

    def stream(self) -> Iterator[tuple[Batch, int, int]]:
        """(batch, epoch and position of the batch after it) from the saved position onwards."""
        epoch, position = self.epoch, self.position
        while not self.cfg.max_epochs or epoch < self.cfg.max_epochs:
            batches = self.shard(epoch)
            if self.batches_per_epoch is None:
                self.batches_per_epoch = len(batches)
            for i in range(position, len(batches)):
                yield (batches[i], epoch, i + 1) if i + 1 < len(batches) else (batches[i], epoch + 1, 0)
            epoch, position = epoch + 1, 0

    # -- the loop ------------------------------------------------------------------------------------
    def run(self, state: dict | None) -> TrainResult:
        cfg = self.cfg
        self.restore(state)
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.raw, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        self.raw.train()
        n_params = sum(p.numel() for p in self.params)
        log.info("training %d parameters on %s (amp %s, %d rank(s)), %d examples, max_tokens %d x %d accum",
                 n_params, self.device, self.amp_dtype or "off", self.world, len(self.examples),
                 cfg.max_tokens, cfg.accum_steps)

        self.session_start, self.session_step = time.time(), self.step
        self.saved_at = self.session_start
        self.window = self.new_window()
        self.eval_loss, self.eval_tokens = 0.0, 0
        batches = self.stream()
        while not _stop_reason(self.progress(), cfg):
            group = list(itertools.islice(batches, cfg.accum_steps))
            if not group:
                break
            self.update(group)
            if self.step % cfg.log_every == 0:
                self.log_progress()
            if self.step % cfg.eval_every == 0:
                self.evaluate_and_save()
            elif self.step % cfg.log_every == 0 and self.save_due():
                self.save_last(done=False)
                log.info("step %d: %s written (save_every_s %g)", self.step, LAST, cfg.save_every_s)
        if self.last_eval_step != self.step:
            self.evaluate_and_save()
        self.finish(_stop_reason(self.progress(), cfg) or "max_epochs")
        return TrainResult(self.out_dir / BEST, self.out_dir / LAST, self.best_bleu, self.step, self.history)

    def progress(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "bad_evals": self.bad_evals}

    def update(self, group: list[tuple[Batch, int, int]]) -> None:
        """One optimizer update over ``group`` (up to accum_steps batches)."""
        tokens = sum(batch.n_tokens for batch, _, _ in group)
        lr = inverse_sqrt_lr(self.step + 1, self.cfg.lr, self.cfg.warmup_steps)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        for k, (batch, epoch, position) in enumerate(group):
            batch = batch.to(self.device)
            last = k == len(group) - 1
            # Gradients cross ranks once per update, after the last batch of the group.
            sync = nullcontext() if self.world == 1 or last else self.model.no_sync()
            autocast = torch.autocast(self.device.type, dtype=self.amp_dtype,
                                      enabled=self.amp_dtype is not None)
            with sync:
                with autocast:
                    loss, stats = self.loss_fn(self.model, batch)
                self.scaler.scale(loss / tokens).backward()
            loss = loss.detach()
            self.window["loss"] += loss
            self.window["tokens"] += batch.n_tokens
            self.window["sentences"] += batch.src.size(0)
            for key, value in stats.items():
                value = value.detach() if isinstance(value, torch.Tensor) else value
                self.window["stats"][key] = self.window["stats"].get(key, 0.0) + value
            self.eval_loss += loss
            self.eval_tokens += batch.n_tokens
            self.epoch, self.position = epoch, position
        if self.cfg.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            self.window["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.window["lr"] = lr

    def new_window(self) -> dict:
        return {"loss": 0.0, "tokens": 0, "sentences": 0, "stats": {}, "start": time.time(), "lr": 0.0}

    def log_progress(self) -> None:
        window, self.window = self.window, self.new_window()
        tokens = max(window["tokens"], 1)
        loss = float(window["loss"]) / tokens
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {self.step}; lower lr or raise "
                                     f"warmup_steps (now {self.cfg.lr}, {self.cfg.warmup_steps})")
        if self.rank != 0:
            return
        now = time.time()
        stats = " ".join(f"{key} {float(value) / tokens:.3f}" for key, value in window["stats"].items())
        if "grad_norm" in window:
            stats += f" gnorm {float(window['grad_norm']):.2f}"
        per_step = (now - self.session_start) / max(self.step - self.session_step, 1)
        remaining = self.cfg.max_steps - self.step
        if self.cfg.max_epochs and self.batches_per_epoch:
            updates_per_epoch = math.ceil(self.batches_per_epoch / self.cfg.accum_steps)
            remaining = min(remaining, self.cfg.max_epochs * updates_per_epoch - self.step)
        log.info("step %d/%d epoch %d loss %.3f %s lr %.2e tok/s %.0f elapsed %s eta %s",
                 self.step, self.cfg.max_steps, self.epoch + 1, loss, stats, window["lr"],
                 window["tokens"] * self.world / max(now - window["start"], 1e-9),
                 _duration(self.elapsed()), _duration(max(remaining, 0) * per_step))

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.session_start

    # -- evaluation and checkpoints ----------------------------------------------------------------
    def dev_bleu(self, model: Transformer) -> float:
        from wdserve.distill.decode import translate
        from wdserve.distill.evaluate import score

        was_training = model.training
        model.eval()
        with torch.no_grad():
            hypotheses = translate(model, self.vocab, self.valid_sources, beam_size=self.cfg.dev_beam_size,
                                   batch_size=self.cfg.dev_batch_size, device=str(self.device))
        model.train(was_training)
        return float(score(hypotheses, self.valid_references)["bleu"])

    def save_best(self, model: Transformer, bleu: float, **extra: Any) -> None:
        meta = {**self.meta, "dev_bleu": bleu, "step": self.step, "dev_beam_size": self.cfg.dev_beam_size,
                **extra}
        save_checkpoint(self.out_dir / BEST, model, self.vocab, meta=meta)

    def evaluate_and_save(self) -> None:
        if self.rank == 0:
            start = time.time()
            bleu = self.dev_bleu(self.student)
            improved = bleu > self.best_bleu
            if improved:
                self.best_bleu, self.bad_evals = bleu, 0
                self.save_best(self.student, bleu)
            else:
                self.bad_evals += 1
            if self.cfg.average_last > 1:
                self.add_snapshot()
            entry = {"step": self.step, "epoch": self.epoch + 1, "dev_bleu": bleu,
                     "train_loss": float(self.eval_loss) / max(self.eval_tokens, 1),
                     "lr": inverse_sqrt_lr(max(self.step, 1), self.cfg.lr, self.cfg.warmup_steps),
                     "elapsed_s": round(self.elapsed(), 1)}
            self.history.append(entry)
            log.info("eval step %d: dev BLEU %.2f (best %.2f%s) train loss %.3f, %.1fs",
                     self.step, bleu, self.best_bleu, ", new best" if improved else
                     f", {self.bad_evals} without improvement", entry["train_loss"], time.time() - start)
        self.bad_evals = self.broadcast_int(self.bad_evals)
        self.eval_loss, self.eval_tokens = 0.0, 0
        self.last_eval_step = self.step
        self.save_last(done=False)

    def add_snapshot(self) -> None:
        name = f"step{self.step:09d}.pt"
        atomic_save({k: v.detach().cpu() for k, v in self.student.state_dict().items()},
                    self.out_dir / SNAPSHOTS / name)
        self.snapshots = [s for s in self.snapshots if s != name] + [name]
        for old in self.snapshots[: -self.cfg.average_last]:
            (self.out_dir / SNAPSHOTS / old).unlink(missing_ok=True)
        self.snapshots = self.snapshots[-self.cfg.average_last :]

    def train_state(self, done: bool, rng: list) -> dict:
        return {
            "module": None if self.raw is self.student else
            {k: v.detach().cpu() for k, v in self.raw.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": {"kind": "inverse_sqrt", "lr": self.cfg.lr, "warmup_steps": self.cfg.warmup_steps},
            "config": asdict(self.cfg),
            "step": self.step, "epoch": self.epoch, "position": self.position, "world_size": self.world,
            "rng": rng, "best_bleu": self.best_bleu, "bad_evals": self.bad_evals, "history": self.history,
            "snapshots": self.snapshots, "elapsed": self.elapsed(), "done": done,
        }

    def save_due(self) -> bool:
        """``save_every_s`` has passed since checkpoint_last.pt was written."""
        if not self.cfg.save_every_s:
            return False
        due = time.time() - self.saved_at >= self.cfg.save_every_s
        return bool(self.broadcast_int(int(due)))  # rank 0's clock decides for every rank

    def save_last(self, done: bool) -> None:
        rng = _rng_state(self.device)
        ranks = [rng]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, rng)
        if self.rank == 0:
            save_checkpoint(self.out_dir / LAST, self.student, self.vocab, meta=self.meta,
                            train_state=self.train_state(done, ranks))
        self.barrier()
        self.saved_at = time.time()

    def finish(self, reason: str) -> None:
        if self.rank == 0 and self.cfg.average_last > 1 and len(self.snapshots) > 1:
            self.average_snapshots()
        self.snapshots = []  # removed below; a run extended later averages its own new snapshots
        log.info("%s: training stopped (%s) at step %d; best dev BLEU %.2f", self.out_dir, reason, self.step,
                 self.best_bleu)
        self.save_last(done=True)
        if self.rank == 0:
            shutil.rmtree(self.out_dir / SNAPSHOTS, ignore_errors=True)

    def average_snapshots(self) -> None:
        states = [torch.load(self.out_dir / SNAPSHOTS / name, map_location="cpu") for name in self.snapshots]
        averaged = copy.deepcopy(self.student)
        averaged.load_state_dict(average_state_dicts(states))
        steps = [int(name[4:-3]) for name in self.snapshots]
        bleu = self.dev_bleu(averaged)
        save_checkpoint(self.out_dir / AVERAGED, averaged, self.vocab,
                        meta={**self.meta, "dev_bleu": bleu, "averaged_steps": steps})
        better = bleu > self.best_bleu
        log.info("average of %d checkpoints (steps %s): dev BLEU %.2f vs best single %.2f%s", len(steps),
                 steps, bleu, self.best_bleu, "; it becomes checkpoint_best.pt" if better else "")
        if better:
            self.best_bleu = bleu
            self.save_best(averaged, bleu, averaged_steps=steps)
        self.history.append({"step": self.step, "averaged_steps": steps, "dev_bleu": bleu})
