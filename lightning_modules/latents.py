"""How an autoencoder maps images to a denoiser's latents and back: a KL VAE (Stable Diffusion,
SDXL, FLUX, compact) or Kandinsky's MoVQ.

Every call runs in fp32 outside autocast, or in the autoencoder's own dtype (`dtype`): the
caller decides it by the precision policy (`precision.py`), since an fp16 VAE overflows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class LatentCodec:
    """Images in [-1, 1] <-> latents in the space the denoiser is trained in."""

    def posterior(self, autoencoder: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and std in the autoencoder's own latent space, fp32: what a
        prepared cache stores."""
        raise NotImplementedError

    def sample(
        self,
        autoencoder: nn.Module,
        mean: torch.Tensor,
        std: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """A draw from the posterior, in the denoiser's latent space."""
        raise NotImplementedError

    def decode(self, autoencoder: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser-space latents (in the autoencoder's dtype) -> images in [-1, 1]."""
        raise NotImplementedError


@dataclass(frozen=True)
class KLLatents(LatentCodec):
    """A KL VAE: latents are `(z - shift_factor) * scaling_factor` of a posterior draw z."""

    def posterior(self, autoencoder, pixels):
        posterior = autoencoder.encode(pixels).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def sample(self, autoencoder, mean, std, generator):
        eps = torch.randn(mean.shape, generator=generator).to(mean)
        return (mean + std * eps - shift(autoencoder)) * autoencoder.config.scaling_factor

    def decode(self, autoencoder, latents):
        return autoencoder.decode(latents / autoencoder.config.scaling_factor + shift(autoencoder)).sample


def shift(autoencoder: nn.Module) -> float:
    return getattr(autoencoder.config, "shift_factor", None) or 0.0


@dataclass(frozen=True)
class VQLatents(LatentCodec):
    """Kandinsky's MoVQ: deterministic, unquantised and unscaled latents (the pipeline decodes
    them with `movq.decode(latents, force_not_quantize=True)`); the std is zero, so that a
    prepared cache gives them back exactly, and no noise is drawn."""

    def posterior(self, autoencoder, pixels):
        latents = autoencoder.encode(pixels).latents.float()
        return latents, torch.zeros_like(latents)

    def sample(self, autoencoder, mean, std, generator):
        return mean

    def decode(self, autoencoder, latents):
        return autoencoder.decode(latents, force_not_quantize=True).sample


KL_LATENTS = KLLatents()
VQ_LATENTS = VQLatents()
