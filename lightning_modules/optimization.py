"""The optimiser every strategy trains with: AdamW (or bitsandbytes' 8-bit AdamW) over parameter
groups, stepped per batch by a diffusers learning-rate schedule; and the memory it needs."""

from __future__ import annotations

import lightning as L
import torch
from diffusers.optimization import get_scheduler
from torch import nn

from .settings import Optimizer


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def checkpoint_trained_parts(parts: list[nn.Module]) -> None:
    """Gradient checkpointing (compute traded for memory) in the parts that train, by diffusers'
    or transformers' switch."""
    for part in parts:
        if any(p.requires_grad for p in part.parameters()):
            enable = (
                getattr(part, "enable_gradient_checkpointing", None) or part.gradient_checkpointing_enable
            )
            enable()


def adamw_with_schedule(module: L.LightningModule, groups: list[dict], settings: Optimizer) -> dict:
    """`configure_optimizers`' answer: AdamW over the non-empty `groups`, stepped per batch by the
    learning-rate schedule `settings` names."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(module).__name__} has nothing to train with these settings")
    hyper = dict(
        lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay
    )
    if settings.kind == "adamw8bit":
        import bitsandbytes  # imported here: loading its native kernels takes a while

        optimizer = bitsandbytes.optim.AdamW8bit(groups, **hyper)
    else:
        fused = settings.fused if settings.fused is not None else module.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, **hyper, fused=fused)
    schedule = get_scheduler(
        settings.schedule,
        optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=int(module.trainer.estimated_stepping_batches),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
