"""Used by test_training's DDP run, which imports it in each rank's process."""

from pathlib import Path

import torch
from lightning.pytorch import Callback


class SaveTrainableWeights(Callback):
    """Each rank saves its trained weights as `<run>/weights-rank<r>.pt` when training ends."""

    def on_train_end(self, trainer, pl_module):
        weights = {n: p.detach().cpu() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(weights, Path(trainer.default_root_dir) / f"weights-rank{trainer.global_rank}.pt")
