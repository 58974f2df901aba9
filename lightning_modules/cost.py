"""What a model costs to train and to sample: the numbers a large-vs-compact comparison needs.

FLOPs are counted by `torch.utils.flop_counter` on the run's real architecture (batch 1, so the
count is per image): one training step (forward and backward through everything the step runs:
the VAE encoder unless latents are cached, the text encoder, the denoiser), and one generated
image at the validation settings (text encoding, every denoising step with its guidance batch, VAE
decoding). The counter sees matrix products and convolutions, which are nearly all of a diffusion
model's arithmetic; FLOPs = 2 x multiply-accumulates. Counting costs one extra step and one extra
image at the start of training.

`CostAccounting` (a Lightning callback every `medsd fit` has) writes them with parameter counts,
wall-clock time, images seen, peak GPU memory and GPU-hours into `<run>/metrics.json` under
"cost". Time and images survive a resume from checkpoint (the callback's state is checkpointed).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from datamodules.atomic import write_atomically

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


def count_flops(run) -> int:
    """FLOPs of everything `run()` computes, forward and backward."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def first_example(batch: dict) -> dict:
    """A batch cut down to its first example (tensors and lists alike, also inside nested dicts
    such as a prepared cache's text conditioning)."""

    def cut(value):
        if isinstance(value, dict):
            return first_example(value)
        return value[:1] if isinstance(value, torch.Tensor | list) else value

    return {key: cut(value) for key, value in batch.items()}


class CostAccounting(L.Callback):
    """Counts a run's cost and writes it to `<default_root_dir>/metrics.json` at the end of training.

    Args:
        count_flops: count training and sampling FLOPs per image at the start of training (one
            extra step and one extra image); off leaves them null.
    """

    def __init__(self, count_flops: bool = True):
        self.count_flops = count_flops
        self.wall_seconds = 0.0  # over every fit of this run, resumes included
        self.images = 0
        self._started: float | None = None
        self._flops: dict = {}

    def state_dict(self) -> dict:
        # Checkpoints are saved mid-training: include the time of the fit in progress.
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return {"wall_seconds": self.wall_seconds + running, "images": self.images}

    def load_state_dict(self, state_dict: dict) -> None:
        self.wall_seconds = state_dict["wall_seconds"]
        self.images = state_dict["images"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.count_flops:
            self._flops = self._count(trainer, pl_module)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._started = time.perf_counter()

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
        per_image = self._flops.get("training_flops_per_image")
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
            "sampling": self._flops.get("sampling", {}),
        }
        update_metrics(Path(trainer.default_root_dir), {"cost": cost})
        log.info("cost written to %s", Path(trainer.default_root_dir) / METRICS_FILE)

    def _count(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """Training and sampling FLOPs per image, with the RNG state and gradients left as found."""
        counts: dict = {}
        step = getattr(pl_module, "loss_of_batch", None)  # the modules' hook for this count
        if step is None:
            return counts
        if is_sharded(trainer):
            # Outside FSDP's forward the weights are 1/N shards; the counts do not depend on
            # sharding, so a one-GPU run of the same config gives them.
            log.info("FLOPs are not counted under FSDP: count them on a one-device run of this config")
            return counts
        batch = next(iter(trainer.train_dataloader))
        batch = trainer.strategy.batch_to_device(first_example(batch), pl_module.device)
        context = trainer.precision_plugin.forward_context
        with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):

            def train_step() -> None:
                with context():
                    loss = step(batch, torch.Generator().manual_seed(0))
                loss.backward()

            counts["training_flops_per_image"] = count_flops(train_step)
            for p in pl_module.parameters():
                p.grad = None
            generate = getattr(pl_module, "generate", None)
            validation = getattr(pl_module, "validation", None)
            if generate is not None and validation is not None:
                prompt = (validation.prompts or [""])[0]
                with torch.no_grad():
                    flops = count_flops(lambda: generate([prompt], [validation.seed]))
                counts["sampling"] = {
                    "flops_per_image": flops,
                    "steps": validation.num_inference_steps,
                    "guidance_scale": validation.guidance_scale,
                    "note": "at the validation settings; FLOPs scale with steps (x2 with guidance > 1)",
                }
        return counts


def update_metrics(folder: Path, fields: dict) -> None:
    """Merge `fields` into `folder/metrics.json` (created if absent), written atomically."""
    path = folder / METRICS_FILE
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics.update(fields)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
