"""The precision policy: trained weights in fp32, frozen ones in the mixed precision's half type
on the GPU, and the autoencoder in whatever dtype keeps its images finite."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .sharding import check_sharding_settings, is_sharded

if TYPE_CHECKING:
    from .diffusion import DiffusionModule

HALF_PRECISIONS = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def cast_frozen_parameters(module: nn.Module, dtype: torch.dtype) -> int:
    """Store frozen weights in `dtype` (halving their memory); trainable ones stay fp32.

    Keeping trainable weights in fp32 is what mixed precision needs: fp16 master weights lose
    small updates and make the gradient scaler fail. Returns how many tensors were cast.
    """
    count = 0
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            count += 1
    return count


def train_in_fp32(module: DiffusionModule, precision: str) -> None:
    """Trained weights are fp32 whatever the backbone was read in; half-precision frozen weights
    (`backbone.dtype`) need a mixed precision whose autocast meets them."""
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    dtype = module.backbone_spec.dtype
    if dtype is not None and precision not in HALF_PRECISIONS:
        raise ValueError(
            f"backbone.dtype '{dtype}' keeps the frozen weights in half precision: "
            f"train with precision bf16-mixed or 16-mixed, not '{precision}'"
        )


def refuse_half_trained_weights(precision: str) -> None:
    if precision in ("16-true", "bf16-true"):
        raise ValueError(
            f"precision '{precision}' would store the trainable weights in half precision; "
            "use bf16-mixed or 16-mixed (frozen parts then run in half precision on GPU)"
        )


def apply_precision_policy(module: DiffusionModule, trainer) -> torch.dtype:
    """At set-up, before Lightning moves the model to the GPU (FLUX.1-dev in fp32 is about 67 GB):
    refuse a precision the family or FSDP cannot train under, make the trained weights fp32 and
    place the frozen ones. Returns the dtype the autoencoder's inputs must have."""
    precision, sharded = str(trainer.precision), is_sharded(trainer)
    allowed = module.family.precisions
    if allowed is not None and precision not in allowed:
        raise ValueError(
            f"{type(module).__name__} runs under precision {' or '.join(map(repr, allowed))}, not "
            f"'{precision}': {module.family.precision_reason}"
        )
    if sharded:
        check_sharding_settings(module, precision)
    train_in_fp32(module, precision)
    return place_frozen_weights(module, precision, sharded, trainer.strategy.root_device.type)


def place_frozen_weights(module: DiffusionModule, precision: str, sharded: bool, device: str) -> torch.dtype:
    """Cast every frozen part for a fit on the GPU under a mixed precision; returns the dtype the
    autoencoder's inputs must have (its calls run outside autocast)."""
    if sharded:
        # FSDP keeps every weight in fp32 shards and gathers them in the compute precision, the
        # autoencoder's included.
        return HALF_PRECISIONS.get(precision, torch.float32)
    autoencoder = module.autoencoder
    if device != "cuda" or precision not in HALF_PRECISIONS:
        return next(autoencoder.parameters()).dtype
    # An fp16 VAE overflows into NaNs (black images), so under 16-mixed it stays fp32.
    autoencoder_dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    for part in module.children():
        if part is not autoencoder:
            cast_frozen_parameters(part, HALF_PRECISIONS[precision])
    cast_frozen_parameters(autoencoder, autoencoder_dtype)
    return autoencoder_dtype
