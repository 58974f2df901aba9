"""What a model costs to train: the numbers a large-vs-compact comparison needs.

Training FLOPs per image are counted by `torch.utils.flop_counter` on the run's real architecture:
one training step (forward and backward through everything the step runs: the VAE encoder unless
latents are cached, the text encoder, the denoiser) on the first example of the first batch the
fit trained on. The counter sees matrix products and convolutions, which are nearly all of a
diffusion model's arithmetic; FLOPs = 2 x multiply-accumulates. Sampling FLOPs are measured where
images are made, by `medsd sample` at its own settings (`<samples>/cost/`).

The count runs once training has ended, so it cannot change the run it measures: no batch is
drawn for it, and it runs with the random state forked and gradients returned rather than stored.
Its cost is one training step at batch 1, after the last real one.

`CostAccounting` (a Lightning callback every `medsd fit` has) writes it with parameter counts,
wall-clock time, images seen, peak GPU memory and GPU-hours into `<run>/metrics.json` under
"cost". Time and images survive a resume from checkpoint (the callback's state is checkpointed).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from datamodules.atomic import write_atomically

from .modes import restored_modes, set_modes
from .sharding import is_sharded

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """Total and trainable parameters (a shared tensor is counted once). A module that trains
    only part of a tensor (textual inversion's new token rows) says how much with
    `learned_parameter_count()`."""
    unique = {id(p): p for p in module.parameters()}.values()
    learned = getattr(module, "learned_parameter_count", None)
    return {
        "total": sum(p.numel() for p in unique),
        "trainable": learned() if learned else sum(p.numel() for p in unique if p.requires_grad),
    }


@contextmanager
def flop_count() -> Iterator[Callable[[], int]]:
    """The one FLOP counter of training and sampling: the FLOPs computed inside the block
    (forward and backward), returned by the function it yields once the block is done."""
    with FlopCounterMode(display=False) as counter:
        yield lambda: int(counter.get_total_flops())


def count_flops(run) -> int:
    """FLOPs of everything `run()` computes."""
    with flop_count() as total:
        run()
    return total()


def first_example(batch: dict) -> dict:
    """A batch cut down to its first example (tensors and lists alike, also inside nested dicts
    such as a prepared cache's text conditioning); tensors are copied, so that keeping the example
    does not keep the whole batch."""

    def cut(value):
        if isinstance(value, dict):
            return first_example(value)
        if isinstance(value, torch.Tensor):
            return value[:1].clone()
        return value[:1] if isinstance(value, list) else value

    return {key: cut(value) for key, value in batch.items()}


class CostAccounting(L.Callback):
    """Counts a run's cost and writes it to `<default_root_dir>/metrics.json` at the end of training.

    Args:
        count_flops: count the training FLOPs per image once training has ended (one step at
            batch 1); off leaves them null.
    """

    def __init__(self, count_flops: bool = True):
        self.count_flops = count_flops
        self.wall_seconds = 0.0  # over every fit of this run, resumes included
        self.images = 0
        self._started: float | None = None
        self._example: dict | None = None  # the first trained example, which the count runs on

    def state_dict(self) -> dict:
        # Checkpoints are saved mid-training: include the time of the fit in progress.
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return {"wall_seconds": self.wall_seconds + running, "images": self.images}

    def load_state_dict(self, state_dict: dict) -> None:
        self.wall_seconds = state_dict["wall_seconds"]
        self.images = state_dict["images"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._started = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.count_flops and self._example is None:
            self._example = first_example(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += len(batch["prompts"]) * trainer.world_size

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._started is not None:
            self.wall_seconds += time.perf_counter() - self._started
            self._started = None
        cuda = pl_module.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(pl_module.device) if cuda else None
        if cuda and trainer.world_size > 1:
            peak = int(pl_module.all_gather(torch.tensor(peak, device=pl_module.device)).max())
        if not trainer.is_global_zero:
            return
        per_image = self._count(trainer, pl_module) if self.count_flops else None
        cost = {
            "parameters": parameter_counts(pl_module),
            "training": {
                "flops_per_image": per_image,
                "images": self.images,
                "flops_total": per_image * self.images if per_image else None,
                "wall_seconds": self.wall_seconds,
                "images_per_second": self.images / self.wall_seconds if self.wall_seconds else None,
                "devices": f"{trainer.world_size} x {pl_module.device.type}",
                "precision": str(trainer.precision),
                "peak_gpu_memory_bytes": peak,
                "gpu_hours": self.wall_seconds * trainer.world_size / 3600 if cuda else None,
            },
        }
        update_metrics(Path(trainer.default_root_dir), {"cost": cost})
        log.info("cost written to %s", Path(trainer.default_root_dir) / METRICS_FILE)

    def _count(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int | None:
        if getattr(pl_module, "loss_of_batch", None) is None or self._example is None:
            return None
        if is_sharded(trainer):
            # Outside FSDP's forward the weights are 1/N shards; the counts do not depend on
            # sharding, so a one-GPU run of the same config gives them.
            log.info("FLOPs are not counted under FSDP: count them on a one-device run of this config")
            return None
        return training_flops(pl_module, self._example, trainer.precision_plugin.forward_context)


def training_flops(module: L.LightningModule, example: dict, precision=nullcontext) -> int:
    """FLOPs of one training step of `module` (its `loss_of_batch` hook, forward and backward) on
    `example`, under the `precision` context, leaving the random state, the modes and every
    parameter and gradient as found."""
    trained = [p for p in module.parameters() if p.requires_grad]
    cuda = [module.device] if module.device.type == "cuda" else []

    def train_step() -> None:
        with precision():
            loss = module.loss_of_batch(example, torch.Generator().manual_seed(0))
        if trained:  # gradients returned, not accumulated into .grad
            torch.autograd.grad(loss, trained, allow_unused=True)

    with torch.random.fork_rng(devices=cuda), restored_modes(module):
        set_modes(module, training=True)  # a training step's modes (dropout on where it trains)
        return count_flops(train_step)


def update_metrics(folder: Path, fields: dict) -> None:
    """Merge `fields` into `folder/metrics.json` (created if absent), written atomically."""
    path = folder / METRICS_FILE
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics.update(fields)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
