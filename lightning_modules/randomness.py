"""A training step's randomness follows from the seed and the step alone, so a resumed run is the
uninterrupted one.

A checkpoint holds the weights, optimiser, schedule and EMA, but not the random stream: resumed
from step 4, a run drew other noise, timesteps, caption dropouts and dropout masks than the
uninterrupted run did, and ended up to 8e-3 away from it. `StepSeeds` (a callback every
`medsd fit` has) seeds torch's generators at the start of every training step from the run's
seed (`seed_everything`), the step and the rank; the training data's order per epoch comes from
the seed and the epoch (`datamodules.base.EpochShuffle`). Random image augmentations in
DataLoader workers (random crops and flips, off by default) are not covered.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from datamodules.base import run_seed


def step_seed(seed: int, step: int, rank: int) -> int:
    """A well-mixed 63-bit seed for (run seed, step, rank): neighbouring steps get unrelated streams."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class StepSeeds(L.Callback):
    """Seeds torch's CPU and CUDA generators before each training step from (seed, step, rank),
    and gives the training sampler the epoch the trainer is in."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Lightning calls set_epoch with its own epoch counter, which a run resumed at an epoch's
        # end has one ahead: the sampler would serve the uninterrupted run's next epoch.
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.manual_seed(step_seed(run_seed(), trainer.global_step, trainer.global_rank))
