"""The one training loop every recipe uses.

AdamW with linear warmup and cosine decay, gradient clipping, a seeded per-epoch shuffle,
and checkpoints from which a resumed run continues with the same batches it would have
seen. Optional bf16 autocast, taken only on CPUs that compute in bfloat16 natively
(elsewhere it is many times slower than float32, so the loop keeps float32 and says so).
Progress is a tqdm bar; the run directory gets `metrics.csv` (training loss), `eval.csv`
(validation metrics per epoch) and `curves.png`.

Under torchrun the objective is wrapped in DistributedDataParallel; `batch_size` is the
global batch, each rank taking its share of every batch, and only rank 0 logs,
evaluates and checkpoints. Same seed and global batch, same run, for any process count.
"""

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vlm.errors import VlmError
from vlm.progress import progress_bar
from vlm.train import checkpoint, distributed
from vlm.train.curves import CsvLog, plot_curves

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training set
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.1  # AdamW decay, for matrices only (see param_groups)
    beta2: float = 0.98  # AdamW's second-moment decay; CLIP uses 0.98 for stability
    warmup_steps: int = 100  # linear ramp from 0 to lr
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    bf16: bool = False  # autocast to bfloat16 where the CPU has AMX/AVX512-BF16 (see native_bf16)
    seed: int = 0  # seeds initialisation and the shuffle
    checkpoint_every: int = 200  # steps between checkpoints (there is one at every epoch end too)
    log_every: int = 10  # steps averaged into one metrics.csv row
    workers: int = 1  # DataLoader worker processes
    group_by_length: bool = False  # batch sequences of similar length together (less padding)
    # Stop after this many steps (None: every epoch), on the full run's learning-rate
    # schedule: a trial run (or a test) is the first max_steps steps of the full run.
    max_steps: int | None = None

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or null for every epoch), got {self.max_steps}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: weight matrices decay; biases, norms,
    embeddings (token, positional, class) and scalars such as CLIP's logit scale do not."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # tied weights appear twice
                continue
            seen.add(id(param))
            if param.ndim < 2 or isinstance(module, nn.Embedding) or "embedding" in name:
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX). Without either,
    torch emulates it: a bf16 training step measured here ran ~40x slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """The epoch's shuffled batches (the last partial one dropped); same for the same seed.

    With `lengths`, examples are sorted by length within windows of 64 batches before
    batching, and the batches shuffled again: little padding, still a random order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is not None:
        window = 64 * batch_size
        order = [i for s in range(0, n, window) for i in sorted(order[s : s + window], key=lambda i: lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


class Trainer:
    """Runs `objective` over `dataset` and keeps the run directory up to date.

    Args:
        model: the module whose trainable state is checkpointed.
        objective: a module whose forward(batch dict) returns the scalar loss, sharing
            `model`'s parameters (DDP wraps it under torchrun).
        groups: optimiser parameter groups (see `param_groups`).
        evaluate: () -> dict of validation metrics, called at each epoch end (rank 0).
        after_step: called after each optimiser step (e.g. to clamp a parameter).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        groups: Sequence[dict],
        config: TrainConfig,
        run_dir: Path,
        dataset: Dataset,
        collate: Callable,
        objective: nn.Module,
        evaluate: Callable[[], dict] | None = None,
        after_step: Callable[[], None] | None = None,
    ):
        self.model, self.config, self.run_dir = model, config, Path(run_dir)
        self.dataset, self.collate = dataset, collate
        self.evaluate, self.after_step = evaluate, after_step
        self.world, self.rank = distributed.world_size(), distributed.rank()
        if config.batch_size % self.world:
            raise VlmError(f"batch_size {config.batch_size} does not split evenly over {self.world} processes")
        self.objective = objective
        if self.world > 1:
            self.objective = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2))
        self.batches_per_epoch = len(dataset) // config.batch_size
        if self.batches_per_epoch == 0:
            raise VlmError(f"{len(dataset)} training examples is fewer than one batch of {config.batch_size}")
        self.schedule_steps = self.batches_per_epoch * config.epochs  # warmup and cosine span these
        self.total_steps = min(self.schedule_steps, config.max_steps or self.schedule_steps)  # where training stops
        self.train_log = CsvLog(self.run_dir / "metrics.csv")
        self.eval_log = CsvLog(self.run_dir / "eval.csv")
        self.step, self.train_seconds, self.skipped = 0, 0.0, 0
        self.last_eval: dict = {}
        self.bf16 = config.bf16 and native_bf16()
        if config.bf16 and not self.bf16:
            log.warning(
                "bf16 is off: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where it is many times slower; training in float32"
            )

    def fit(self, *, resume: bool = False) -> dict:
        """Train to the end (or from the last checkpoint with resume=True); returns the
        last validation metrics."""
        self._start(resume)
        config = self.config
        main = distributed.is_main()
        bar = progress_bar(total=self.total_steps, initial=self.step, desc="training", unit="step", disable=not main)
        while self.step < self.total_steps:
            epoch, first = divmod(self.step, self.batches_per_epoch)
            lengths = self.dataset.lengths() if config.group_by_length else None
            batches = epoch_batches(len(self.dataset), config.batch_size, config.seed, epoch, lengths)[first:]
            batches = [b[self.rank :: self.world] for b in batches]  # this rank's share of each batch
            # Seeds augmentation here and in the workers, so a resumed run sees the same images.
            torch.manual_seed(config.seed * 7919 + self.step)
            random.seed(config.seed * 7919 + self.step)
            loader = DataLoader(
                self.dataset, batch_sampler=batches, collate_fn=self.collate, num_workers=config.workers
            )
            losses, started = [], time.perf_counter()
            for batch in loader:
                if self.step == self.total_steps:
                    break
                losses.append(self._train_step(batch))
                self.step += 1
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=epoch, refresh=False)
                # A run cut short by max_steps ends as an epoch does: logged, evaluated, saved.
                at_epoch_end = self.step % self.batches_per_epoch == 0 or self.step == self.total_steps
                if len(losses) == config.log_every or at_epoch_end:
                    self.train_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    if main:
                        self._log(epoch, losses)
                    losses = []
                if at_epoch_end and main:
                    self._evaluate(epoch)
                    plot_curves(self.train_log, self.eval_log, self.run_dir / "curves.png")
                if (at_epoch_end or self.step % config.checkpoint_every == 0) and main:
                    self._save()
                if at_epoch_end:
                    distributed.barrier()
        bar.close()
        return self.last_eval

    def _train_step(self, batch: dict) -> float:
        """One optimiser step; returns the loss averaged over ranks."""
        for reason in batch["skipped"]:
            log.warning("skipped %s", reason)
        self.skipped += round(distributed.average(len(batch["skipped"])) * self.world)
        factor = lr_factor(self.step, self.schedule_steps, self.config.warmup_steps, self.config.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor
        if batch["size"] == 0:  # every example of this batch was unreadable
            if self.world > 1:  # the other ranks would wait for this one forever
                raise VlmError(f"all {len(batch['skipped'])} examples of a batch share were unreadable; check the data")
            return float("nan")
        self.model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.objective(batch)
        loss.backward()
        if self.config.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        return distributed.average(loss.item())

    def _log(self, epoch: int, losses: list[float]) -> None:
        finite = [x for x in losses if math.isfinite(x)]
        self.train_log.append(
            {
                "step": self.step,
                "epoch": epoch,
                "lr": f"{self.optimizer.param_groups[0]['lr']:.3e}",
                "loss": f"{sum(finite) / max(1, len(finite)):.5f}",
                "skipped": self.skipped,
                "seconds": f"{self.train_seconds:.1f}",
            }
        )

    def _evaluate(self, epoch: int) -> None:
        if self.evaluate is None:
            return
        self.model.eval()
        self.last_eval = {k: round(v, 5) if isinstance(v, float) else v for k, v in self.evaluate().items()}
        log.info("epoch %d validation: %s", epoch, self.last_eval)
        self.eval_log.append({"step": self.step, "epoch": epoch, **self.last_eval})

    def _save(self) -> None:
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        checkpoint.save_checkpoint(
            self.run_dir,
            {
                # Frozen weights come from the recipe's starting point; only trained ones are kept.
                "model": {k: v for k, v in self.model.state_dict().items() if k in trainable},
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "train_seconds": self.train_seconds,
                "skipped": self.skipped,
                "config": asdict(self.config),
            },
        )

    def _start(self, resume: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        exists = checkpoint.has_checkpoint(self.run_dir)
        distributed.barrier()  # every rank has looked before rank 0 may clear the logs
        if exists and not resume:
            raise VlmError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out")
        if not exists:
            if resume:
                log.warning("%s has no checkpoint; starting from scratch", self.run_dir)
            if distributed.is_main():
                self.train_log.path.unlink(missing_ok=True)
                self.eval_log.path.unlink(missing_ok=True)
            return
        state = checkpoint.load_checkpoint(self.run_dir)
        missing = {name for name, p in self.model.named_parameters() if p.requires_grad} - set(state["model"])
        if missing:
            raise VlmError(
                f"{self.run_dir}: checkpoint lacks {len(missing)} trained tensors (e.g. {sorted(missing)[0]}); was the recipe changed?"
            )
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.train_seconds, self.skipped = state["step"], state["train_seconds"], state["skipped"]
        if distributed.is_main():
            self.train_log.truncate_after(self.step)
            self.eval_log.truncate_after(self.step)
        log.info("resumed %s at step %d of %d", self.run_dir, self.step, self.total_steps)
