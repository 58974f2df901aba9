"""FLUX.1 with LoRA adapters on its transformer, trained with FLUX's rectified-flow objective.

FLUX differs from the Stable Diffusion family in every part the training loop touches: a
transformer over 2x2 patches of 16-channel latents instead of a U-Net, two text encoders (CLIP
gives a pooled vector, T5 the token sequence), a velocity target on a straight path between image
and noise instead of epsilon on a DDPM schedule, and a guidance-distilled model that takes the
guidance scale as an input. Its family (`families/flux.py`: parts, pipeline, `medsd/tiny-flux`)
gives `DiffusionModule` the parts and their roles; `FluxLoRA` brings its loss, text conditioning,
sampling and export, and keeps the rest (optimiser, EMA, checkpoints, validation grid, export).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict

from .backbones import TINY_FLUX, BackboneSpec
from .conditioning import from_arrays
from .diffusion import DiffusionModule
from .families import registered
from .lora import add_lora
from .modes import in_eval_mode
from .objectives import diffusion_loss, drop_captions, sample_noise
from .prompts import PromptTokenizer
from .validation_images import trainer_precision

# The query, key, value and output projections of both streams of the double blocks (image and
# text) and of the single blocks (which have no output projection of their own).
FLUX_ATTENTION_PROJECTIONS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]


# --- the objective --------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, H/2 * W/2, 4C] tokens, one per 2x2 patch, row by row (FLUX's layout)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


def latent_ids(height: int, width: int) -> torch.Tensor:
    """Position ids [H/2 * W/2, 3] of the packed tokens: (0, row, column), the axes of FLUX's RoPE."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def flow_matching_pair(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) of rectified flow: x_t = (1 - sigma) x_0 + sigma * noise lies on the straight
    path from the image (sigma 0) to the noise (sigma 1), and the velocity along it is noise - x_0."""
    s = sigmas.view(-1, *[1] * (latents.dim() - 1)).to(latents)
    return (1 - s) * latents + s * noise, noise - latents


@dataclass
class FlowMatching:
    """How FLUX's rectified-flow training draws noise levels and conditions the transformer.

    sigma_sampling: "uniform" draws each example's sigma uniformly in [0, 1), what diffusers'
        FLUX DreamBooth/LoRA script does by default (its weighting_scheme "none"); "logit_normal"
        draws sigmoid(N(logit_mean, logit_std)), which concentrates training on intermediate noise
        levels and was the best of the samplings compared in the SD3 paper (Esser et al. 2024).
        The sampler's resolution-dependent shift of sigma is an inference-time schedule and is
        not applied here (nor in diffusers' script).
    guidance: the guidance value fed to a guidance-distilled transformer (FLUX.1-dev) during
        training; ignored by models without a guidance embedding. diffusers' FLUX LoRA script
        defaults to 3.5, while the training commands of its FLUX README pass 1.0, the default
        here. Which suits medical images better is not established, hence a setting.
    """

    sigma_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    guidance: float = 1.0

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sigma in [0, 1) per example (CPU, fp32)."""
        if self.sigma_sampling == "uniform":
            return torch.rand(n, generator=generator)
        if self.sigma_sampling == "logit_normal":
            normal = torch.randn(n, generator=generator) * self.logit_std + self.logit_mean
            return torch.sigmoid(normal)
        raise ValueError(f"sigma_sampling must be 'uniform' or 'logit_normal', got {self.sigma_sampling!r}")


# --- the strategy ---------------------------------------------------------------------------


class FluxLoRA(DiffusionModule):
    """Low-rank adapters on a FLUX transformer's attention projections; everything else frozen.

    The export, `pytorch_lora_weights.safetensors` with its LoRA config in the metadata, loads
    into the base model's FluxPipeline with diffusers' `pipe.load_lora_weights(folder)`.

    Args:
        rank, alpha, dropout: the adapters' rank, scale numerator (alpha / rank scales their
            output; default alpha = rank) and dropout.
        target_modules: module names (suffixes) that get adapters; default: the attention
            projections of every block (FLUX_ATTENTION_PROJECTIONS).
        flow_matching: sigma sampling and training guidance (see FlowMatching).
        max_sequence_length: T5 tokens per prompt, padded and truncated, in training and in the
            validation images (FLUX.1-dev: 512, FluxPipeline's default; schnell: 256).
        backbone: default `medsd/tiny-flux`; a FLUX.1 hub id or local diffusers folder otherwise.
        objective: caption_dropout, noise_offset and loss ("l2" or "l1") apply; the DDPM-timestep
            settings (snr_gamma, min/max_timestep) do not and are refused.
        The other arguments are DiffusionModule's.
    """

    family = registered("flux")

    def __init__(
        self,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        flow_matching: FlowMatching | None = None,
        max_sequence_length: int = 512,
        backbone: BackboneSpec | None = None,
        **kwargs,
    ):
        super().__init__(backbone=backbone or BackboneSpec(TINY_FLUX), **kwargs)
        obj = self.objective
        if obj.snr_gamma is not None or obj.min_timestep != 0 or obj.max_timestep is not None:
            raise ValueError(
                "objective.snr_gamma, min_timestep and max_timestep belong to the DDPM schedule; "
                "FLUX's noise levels are set by flow_matching.sigma_sampling"
            )
        self.rank = rank
        self.flow_matching = flow_matching or FlowMatching()
        self.max_sequence_length = max_sequence_length
        add_lora(self.transformer, rank, alpha, dropout, target_modules or FLUX_ATTENTION_PROJECTIONS)
        self.enable_gradient_checkpointing()

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        """T5's, so that the DataModule's long-prompt policy measures prompts against the encoder
        that carries their content. The ids it adds to batches go unused: the training step encodes
        the prompt texts with both tokenizers, exactly as FluxPipeline does when sampling."""
        return PromptTokenizer(self.tokenizer_2, self.max_sequence_length)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], unconditional: bool = False) -> dict[str, torch.Tensor]:
        """Prompt texts (or as many empty prompts) -> FLUX's conditioning: T5's token states
        (`prompt_embeds`) and CLIP's pooled vector (`pooled`), by FluxPipeline's own encode_prompt,
        on the encoders' device (the CPU once a prepared cache replaced them), returned on this
        module's."""
        texts = [""] * len(prompts) if unconditional else list(prompts)
        device = next(self.text_encoder_2.parameters()).device
        sequence, pooled, _ = self.build_pipeline().encode_prompt(
            texts, device=device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": sequence.to(self.device), "pooled": pooled.to(self.device)}

    def velocity_loss(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The rectified-flow loss of the transformer's velocity at noise levels `sigmas`.

        `latents` are scaled VAE latents [B, 16, H, W]; the transformer sees them as packed 2x2
        patches and takes the time as sigma itself (in [0, 1]; it multiplies by 1000 inside).
        `text` is `encode_prompts`' conditioning; text tokens all sit at position (0, 0, 0).
        """
        noisy, target = flow_matching_pair(latents, noise, sigmas)
        height, width = latents.shape[-2:]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full_like(sigmas, self.flow_matching.guidance)
        prediction = self.transformer(
            hidden_states=pack_latents(noisy),
            timestep=sigmas,
            guidance=guidance,
            pooled_projections=text["pooled"],
            encoder_hidden_states=text["prompt_embeds"],
            txt_ids=latents.new_zeros(text["prompt_embeds"].shape[1], 3),
            img_ids=latent_ids(height, width).to(latents.device),
            return_dict=False,
        )[0]
        return diffusion_loss(unpack_latents(prediction, height, width), target, None, self.objective.loss)

    def diffusion_step(
        self, batch: dict, generator: torch.Generator | None, caption_dropout: float
    ) -> torch.Tensor:
        latents = self.batch_latents(batch, generator)
        noise = sample_noise(latents, self.objective.noise_offset, generator)
        sigmas = self.flow_matching.sample_sigmas(latents.shape[0], generator).to(latents.device)
        return self.velocity_loss(
            latents, noise, sigmas, self.text_conditioning(batch, generator, caption_dropout)
        )

    def text_conditioning(
        self, batch: dict, generator: torch.Generator | None, caption_dropout: float
    ) -> dict:
        """The prepared cache's conditioning, else the prompt texts encoded here (FLUX's encoders
        take texts, not the DataModule's ids); dropped captions become the empty prompt's."""
        if "text" in batch and self._cached_text:
            text = from_arrays(batch["text"])
        else:
            text = self.encode_prompts(batch["prompts"])
        if caption_dropout > 0:
            text = drop_captions(text, self.kept_conditioning.empty_prompt(), caption_dropout, generator)
        return text

    # --- validation images and export ---------------------------------------------------

    @torch.no_grad()
    @in_eval_mode
    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """One image per (prompt, seed) as [N, 3, H, W] in [0, 1], by FLUX's flow-matching sampler
        (or `validation.sampler`); CPU generators, so a seed gives the same noise on any device."""
        v = self.validation
        pipe = self.build_pipeline(v.sampler)
        pipe.set_progress_bar_config(disable=True)
        size = v.resolution or self.vae.config.sample_size
        text = self.kept_conditioning(list(prompts))
        with trainer_precision(self):
            images = pipe(
                prompt_embeds=text["prompt_embeds"],
                pooled_prompt_embeds=text["pooled"],
                num_inference_steps=v.num_inference_steps,
                guidance_scale=v.guidance_scale,
                generator=[torch.Generator().manual_seed(s) for s in seeds],
                height=size,
                width=size,
                max_sequence_length=self.max_sequence_length,
                output_type="pt",
            ).images
        return images.float()

    def export(self, folder: Path) -> dict:
        FluxPipeline.save_lora_weights(
            folder,
            transformer_lora_layers=get_peft_model_state_dict(self.transformer),
            # The LoRA config (alpha above all) travels with the weights, so loading scales them right.
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
        return {"format": "diffusers-lora", "rank": self.rank}
