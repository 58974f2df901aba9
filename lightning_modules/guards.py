"""A run stops at the first non-finite gradient, before it reaches the weights.

Without it, a diverging run (a learning rate too high, NaN latents in a cache) ends "successfully"
with every weight NaN in its checkpoints and export. `NonFiniteGuard` (a callback every
`medsd fit` has) checks the gradients before each optimiser step: a non-finite one skips the
step, and past `max_skipped_steps` such steps stops the run with a message naming the step.
Checkpoints holding a non-finite weight are refused too, as are exports
(`DiffusionModule.write_export`), so the last good ones stay in place.

Under `16-mixed` the gradient scaler owns this: it skips steps with inf gradients (and lowers its
scale) by design, so only the checkpoints and exports are checked there.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch import nn

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite gradient or weight."""


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity."""
    floating = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if not floating:
        return []
    finite = torch.stack([v.detach().isfinite().all() for v in floating.values()]).cpu()
    return [name for name, ok in zip(floating, finite.tolist(), strict=True) if not ok]


def trained_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint or export of `module` writes: its trained parameters (the frozen ones
    come from the backbone again)."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def refuse_non_finite_weights(module: nn.Module, what: str) -> None:
    """Raise NonFiniteError if a trained weight of `module` is not finite (before writing `what`)."""
    bad = non_finite(trained_weights(module))
    if bad:
        raise NonFiniteError(
            f"not writing {what}: {len(bad)} trained weight(s) are NaN or infinite, e.g. {bad[:3]}"
        )


class NonFiniteGuard(L.Callback):
    """Skips optimiser steps whose gradients are not finite; stops the run past a number of them.

    Args:
        max_skipped_steps: steps with a non-finite gradient that are skipped (their gradients
            dropped, a warning logged) before the next one stops the run; 0 stops at the first.
    """

    def __init__(self, max_skipped_steps: int = 0):
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if str(trainer.precision) == "16-mixed":
            return
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        bad = non_finite(grads)
        if not bad:
            return
        step = trainer.global_step + 1
        if self.skipped >= self.max_skipped_steps:
            raise NonFiniteError(
                f"step {step}: the gradient of {len(bad)} trained tensor(s) is NaN or infinite (e.g. "
                f"{bad[:3]}); the run stops before it reaches the weights, its last checkpoints and "
                "export are kept. Lower the learning rate or check the data; "
                "--nan_guard.max_skipped_steps N skips up to N such steps instead"
            )
        self.skipped += 1
        for parameter in pl_module.parameters():
            parameter.grad = None  # AdamW leaves parameters without a gradient as they are
        log.warning(
            "step %d skipped: non-finite gradient in %s (%d of %d skips allowed)",
            step,
            bad[0],
            self.skipped,
            self.max_skipped_steps,
        )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # The trained weights only: checking the frozen ones too would read the whole model at
        # every checkpoint for weights that are never written.
        bad = non_finite(trained_weights(pl_module))
        if bad:
            raise NonFiniteError(
                f"step {trainer.global_step}: not writing a checkpoint: {len(bad)} weight(s) are NaN "
                f"or infinite, e.g. {bad[:3]}"
            )
