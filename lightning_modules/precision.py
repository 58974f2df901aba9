"""The precision policy: trained weights in fp32, frozen ones in the mixed precision's half type
on the GPU, and the VAE in whatever dtype keeps its images finite."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

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


def place_frozen_weights(module: DiffusionModule, precision: str, sharded: bool) -> torch.dtype:
    """Cast the frozen U-Net, text encoder and VAE weights for a fit on the GPU under a mixed
    precision; returns the dtype the VAE's inputs must have (VAE calls run outside autocast)."""
    if sharded:
        # FSDP keeps every weight in fp32 shards and gathers them in the compute precision, the
        # VAE's included.
        return HALF_PRECISIONS.get(precision, torch.float32)
    if module.device.type != "cuda" or precision not in HALF_PRECISIONS:
        return module._vae_dtype
    # The fp16 VAE overflows into NaNs (black images), so under 16-mixed it stays fp32.
    if precision == "bf16-mixed":
        vae_dtype = torch.bfloat16
    else:
        module.vae.requires_grad_(False)
        module.vae.to(torch.float32)
        vae_dtype = torch.float32
    cast_frozen_parameters(module.unet, HALF_PRECISIONS[precision])
    cast_frozen_parameters(module.text_encoder, HALF_PRECISIONS[precision])
    cast_frozen_parameters(module.vae, vae_dtype)
    return vae_dtype
