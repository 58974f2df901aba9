"""What a strategy's checkpoints hold: only the trained weights (the frozen ones come from the
backbone again) and their exponential moving average, if kept."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from diffusers.training_utils import EMAModel

from .optimization import trainable_parameters
from .sharding import unwrapped_name

if TYPE_CHECKING:
    from .diffusion import DiffusionModule


def trained_names(module: DiffusionModule) -> set[str]:
    """The state-dict keys of the trained weights (FSDP's wrapper segments left out)."""
    return {unwrapped_name(name) for name, p in module.named_parameters() if p.requires_grad}


def keep_trained(module: DiffusionModule, checkpoint: dict) -> None:
    """Trim a checkpoint Lightning is saving to the trained weights, and add the EMA's."""
    trainable = trained_names(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
    if module.ema is not None:
        checkpoint["ema"] = module.ema.state_dict()


def load_trained(module: DiffusionModule, checkpoint: dict) -> None:
    """The trained weights (and EMA, if kept) of a checkpoint dict; every trained weight must be
    there. The frozen ones are the backbone's already."""
    trainable, state_dict = trained_names(module), checkpoint["state_dict"]
    missing = trainable - state_dict.keys()
    if missing:
        raise KeyError(f"the state dict lacks trained weights, e.g. {sorted(missing)[:3]}")
    module.load_state_dict({k: v for k, v in state_dict.items() if k in trainable}, strict=False)
    if module.ema_decay is not None and "ema" in checkpoint:
        module.ema = EMAModel(trainable_parameters(module), decay=module.ema_decay)
        module.ema.load_state_dict(checkpoint["ema"])


@contextmanager
def ema_weights(module: DiffusionModule) -> Iterator[None]:
    """Inside the block the EMA weights replace the live ones (if EMA is on)."""
    if module.ema is None:
        yield
        return
    params = trainable_parameters(module)
    module.ema.store(params)
    module.ema.copy_to(params)
    try:
        yield
    finally:
        module.ema.restore(params)
