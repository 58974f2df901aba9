"""Typed settings groups of the training core; in YAML they are nested under `model.init_args`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Objective:
    """What the denoiser is trained on.

    snr_gamma: Min-SNR-gamma loss weighting (5.0 is the usual value); None for plain MSE.
    noise_offset: std of a per-channel constant added to the noise (0.05-0.1 helps dark images).
    caption_dropout: share of captions replaced by the empty prompt, so classifier-free guidance
        works at sampling time (0.1 is common; 0 for textual inversion).
    min_timestep / max_timestep: restrict the sampled timesteps to [min, max).
    loss: "l2" (mean squared error, the usual) or "l1" (mean absolute error, as MSDM trains).
    """

    snr_gamma: float | None = None
    noise_offset: float = 0.0
    caption_dropout: float = 0.0
    min_timestep: int = 0
    max_timestep: int | None = None
    loss: Literal["l2", "l1"] = "l2"


@dataclass
class Optimizer:
    """AdamW with a warm-up and a learning-rate schedule.

    kind: "adamw" (torch's) or "adamw8bit" (bitsandbytes' AdamW8bit: both moment estimates
        stored in 8 bits with block-wise scales, 2 bytes per trained weight instead of 8; what
        makes full fine-tuning of a large U-Net fit on one GPU).
    schedule: one of diffusers' names: constant, constant_with_warmup, linear, cosine,
        cosine_with_restarts, polynomial.
    fused: torch's fused AdamW kernel (kind "adamw"); None uses it on GPU.
    """

    kind: Literal["adamw", "adamw8bit"] = "adamw"

    lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "constant_with_warmup"
    warmup_steps: int = 0
    fused: bool | None = None


@dataclass
class Validation:
    """Images rendered at every validation, one per prompt with seed `seed + index`.

    sampler: a diffusers scheduler class name; None uses the backbone's own (PNDM for SD 1.x).
    """

    prompts: list[str] = field(default_factory=list)
    seed: int = 0
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    sampler: str | None = None
    resolution: int | None = None
