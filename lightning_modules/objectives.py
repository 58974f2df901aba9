"""Pure functions of the denoising objective: timesteps, noise, targets, loss weighting.

They take tensors and a scheduler and return tensors, so each can be checked against a hand
computation without a model.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from .conditioning import Conditioning, as_arrays, from_arrays


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    device: torch.device | str = "cpu",
    min_timestep: int = 0,
    max_timestep: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in [min_timestep, max_timestep)."""
    high = num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= min_timestep < high <= num_train_timesteps:
        raise ValueError(
            f"timestep range [{min_timestep}, {high}) must lie within [0, {num_train_timesteps})"
        )
    t = torch.randint(min_timestep, high, (batch_size,), generator=generator)
    return t.to(device)


def sample_noise(
    latents: torch.Tensor, noise_offset: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise like `latents`, plus an optional per-channel offset.

    The offset (a constant shift per image and channel) lets the model learn to change an
    image's mean brightness, which plain zero-mean noise barely teaches; it matters for
    X-rays, whose backgrounds are mostly black.
    """
    shape = latents.shape
    noise = torch.randn(shape, generator=generator).to(latents)
    if noise_offset:
        offset = torch.randn(shape[0], shape[1], *([1] * (len(shape) - 2)), generator=generator)
        noise = noise + noise_offset * offset.to(latents)
    return noise


def prediction_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the network must predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type '{kind}' (use 'epsilon' or 'v_prediction')")


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023).

    The weight min(SNR, gamma) / SNR for epsilon targets; for v targets the MSE already carries
    a factor SNR + 1, hence min(SNR, gamma) / (SNR + 1).
    """
    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    kind: str = "l2",
) -> torch.Tensor:
    """Mean squared ("l2") or mean absolute ("l1", MSDM's) error in fp32, optionally weighted per
    sample."""
    error = prediction.float() - target.float()
    if kind == "l2":
        error = error.pow(2)
    elif kind == "l1":
        error = error.abs()
    else:
        raise ValueError(f"loss must be 'l2' or 'l1', got {kind!r}")
    per_sample = error.flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def drop_captions(
    values: Conditioning,
    unconditional: Conditioning,
    probability: float,
    generator: torch.Generator | None = None,
) -> Conditioning:
    """Replace each caption by the empty prompt with `probability`.

    Training on some unconditional examples is what lets classifier-free guidance work at
    sampling time. `values` are token ids [B, L], or cached text embeddings [B, L, D], or a dict
    of such tensors (SDXL's and FLUX's states and pooled vector: one draw drops a caption from all
    of them); `unconditional` is the empty prompt's, of the same form without the batch or with
    a batch of one.
    """
    if probability <= 0:
        return values
    arrays, empty = as_arrays(values), as_arrays(unconditional)
    batch = next(iter(arrays.values())).shape[0]
    drop = torch.rand(batch, generator=generator) < probability

    def replace(name: str) -> torch.Tensor:
        kept = arrays[name]
        where = drop.to(kept.device).view(-1, *[1] * (kept.dim() - 1))
        return torch.where(where, empty[name].reshape(1, *kept.shape[1:]).to(kept), kept)

    return from_arrays({name: replace(name) for name in arrays})


def ddpm_loss(
    scheduler: DDPMScheduler,
    objective,
    latents: torch.Tensor,
    generator: torch.Generator | None,
    predict,
) -> torch.Tensor:
    """The denoising loss of a model on a DDPM noise schedule, with `objective`'s (a
    `settings.Objective`) noise offset, timestep range, min-SNR weighting and loss.

    `predict(noisy, timesteps)` is the model's prediction; it is called after the noise and the
    timesteps are drawn from `generator`, so that anything it draws (caption dropout) comes after.
    """
    noise = sample_noise(latents, objective.noise_offset, generator)
    timesteps = sample_timesteps(
        latents.shape[0],
        scheduler.config.num_train_timesteps,
        latents.device,
        objective.min_timestep,
        objective.max_timestep,
        generator,
    )
    prediction = predict(scheduler.add_noise(latents, noise, timesteps), timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    weights = (
        None if objective.snr_gamma is None else min_snr_weights(scheduler, timesteps, objective.snr_gamma)
    )
    return diffusion_loss(prediction, target, weights, objective.loss)
