"""A run resumed from a checkpoint ends bit-identical to the uninterrupted run (CPU)."""

import pytest
import torch
from safetensors.torch import load_file

from lightning_modules.randomness import step_seed
from tests.helpers.fit import tiny_fit

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def fit(root, steps: int, *extra: str) -> dict[str, torch.Tensor]:
    # tiny/unet.yaml: caption dropout, EMA and a warm-up schedule, all of which must resume.
    tiny_fit(root, "--trainer.max_steps", str(steps), *extra)
    return load_file(root / "export" / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_run_stopped_at_a_checkpoint_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """tiny/data.yaml gives 4 batches an epoch: the run is stopped after the checkpoint of step 4
    (as a kill at step 6 would leave it) and resumed to step 12, across two more epochs."""
    whole = fit(tmp_path / "whole", 12)
    fit(tmp_path / "resumed", 4)
    resumed = fit(tmp_path / "resumed", 12, "--ckpt_path", "last")
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name


def test_step_seeds_differ_by_step_and_rank_and_repeat():
    seeds = {step_seed(0, step, rank) for step in range(100) for rank in range(4)}
    assert len(seeds) == 400
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1) != step_seed(1, 5, 1)
    assert all(0 <= s < 2**63 for s in seeds)
