"""Compact domain models trained from scratch (MSDM, "Prompt to Polyp"): a medsd-trained VAE, a new
U-Net built from settings, and a frozen text encoder (CLIP, or a BERT-like domain encoder).

Nothing loads from a model hub but the text encoder, so the family has no tiny model of its own:
its tiny runs build the U-Net small over the tiny CLIP or BERT (`medsd/tiny-clip`,
`medsd/tiny-bert`) and a VAE folder. Training: `lightning_modules/compact.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from ..architectures import architecture
from ..backbones import (
    TINY_BERT,
    TINY_CLIP,
    BackboneSpec,
    _not_found,
    load_clip_text_encoder,
    load_text_encoder,
)
from . import Family
from .stable_diffusion import SD_SCHEDULE, UNET_BLOCKS, sd_pipeline


@dataclass
class CompactParts:
    tokenizer: PreTrainedTokenizerBase
    text_encoder: nn.Module
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sampler_config: dict
    uses_clip: bool  # a CLIP encoder: the model is a plain Stable Diffusion pipeline


def is_clip(name_or_path: str, revision: str | None = None, random_init: bool = False) -> bool:
    """Whether a text model is a CLIP one (its tokenizer pads with end-of-text, and its export is a
    plain Stable Diffusion pipeline) rather than a BERT-like encoder."""
    if name_or_path in (TINY_CLIP, TINY_BERT):
        return name_or_path == TINY_CLIP
    if random_init:
        return architecture(name_or_path).config("text_encoder")["model_type"].startswith("clip")
    try:
        model_type = AutoConfig.from_pretrained(name_or_path, revision=revision).model_type
    except (OSError, ValueError) as error:
        raise _not_found("the text encoder", name_or_path, error) from error
    return model_type.startswith("clip")


def load_compact(
    spec: BackboneSpec,
    text_model: str,
    text_model_revision: str | None,
    max_length: int,
    unet_settings: dict,
    text_model_random_init: bool = False,
) -> CompactParts:
    """The VAE folder `spec` names, the text encoder (`text_model_random_init`: its shipped
    architecture with random weights), and a new U-Net over both (random weights from the
    caller's RNG state); the noise schedule is Stable Diffusion's and the sampler DDIM, as in MSDM."""
    try:
        vae = AutoencoderKL.from_pretrained(Path(spec.name_or_path))
    except (OSError, ValueError) as error:
        raise ValueError(f"{spec.name_or_path} is not a diffusers AutoencoderKL folder: {error}") from error
    uses_clip = is_clip(text_model, text_model_revision, text_model_random_init)
    load = load_clip_text_encoder if uses_clip else load_text_encoder
    tokenizer, text_encoder = load(text_model, text_model_revision, text_model_random_init)
    limit = text_encoder.config.max_position_embeddings
    if max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds {text_model}'s {limit} positions")
    # The exported CLIP pipeline pads prompts to the tokenizer's limit: make it the training one.
    tokenizer.model_max_length = max_length
    unet = build_unet(vae, text_encoder.config.hidden_size, **unet_settings)
    sampler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type="epsilon")
    sampler_config = dict(sampler.config, _class_name=type(sampler).__name__)
    noise_scheduler = DDPMScheduler.from_config(sampler_config)
    return CompactParts(tokenizer, text_encoder, vae, unet, noise_scheduler, sampler_config, uses_clip)


def build_unet(
    vae: AutoencoderKL,
    cross_attention_dim: int,
    image_size: int,
    block_out_channels: tuple[int, ...],
    **settings,
) -> UNet2DConditionModel:
    """A Stable Diffusion-shaped U-Net over `vae`'s latents: every level but the deepest has
    cross-attention at the text encoder's width."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    levels = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=image_size // factor,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=tuple(block_out_channels),
        cross_attention_dim=cross_attention_dim,
        **settings,
    )


FAMILY = Family(
    name="compact",
    load=load_compact,
    pipeline=sd_pipeline,  # with a domain encoder, one without text parts
    block_classes=UNET_BLOCKS,
)
