"""The optimiser settings: torch's AdamW and bitsandbytes' 8-bit AdamW behind the same schedule."""

from types import SimpleNamespace

import bitsandbytes
import pytest
import torch
from torch import nn

from lightning_modules.optimization import adamw_with_schedule
from lightning_modules.settings import Optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(lr=1e-3, weight_decay=1e-2, warmup_steps=0, schedule="constant")


def updates(kind: str, steps: int = 3) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    """The weights after `steps` steps on fixed gradients, from the same start."""
    weight = nn.Parameter(torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)))
    holder = SimpleNamespace(
        device=torch.device("cpu"), trainer=SimpleNamespace(estimated_stepping_batches=10)
    )
    optimizer = adamw_with_schedule(holder, [{"params": [weight]}], Optimizer(kind=kind, **SETTINGS))[
        "optimizer"
    ]
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        weight.grad = torch.randn(weight.shape, generator=generator)
        optimizer.step()
    return weight.detach(), optimizer


def test_8bit_adamw_follows_torch_adamw_and_stores_its_moments_in_8_bits():
    start = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    reference, _ = updates("adamw")
    quantised, optimizer = updates("adamw8bit")
    assert isinstance(optimizer, bitsandbytes.optim.AdamW8bit)
    state = next(iter(optimizer.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    # Three steps on random gradients move a weight by 1-3 learning rates (1e-3 each); the
    # 8-bit moments change that by a small fraction of one step.
    moved = (reference - start).abs().mean()
    assert moved > 1e-3
    assert (quantised - reference).abs().mean() < 0.05 * 1e-3
