"""Stable Diffusion 1.x / 2.x: five parts (tokenizer, CLIP text encoder, VAE, U-Net, noise
scheduler) from a hub id or diffusers folder, or the built-in tiny models `medsd/tiny-sd` and
`medsd/tiny-sd2` (built from config, no download) and the shipped `medsd/demo-base` folder."""

from __future__ import annotations

from dataclasses import dataclass, field

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

from ..backbones import (
    TINY_SD,
    TINY_SD2,
    BackboneSpec,
    _not_found,
    build_clip_tokenizer,
    build_sampler,
    build_tiny_vae,
    local_name,
    tiny_clip_text_config,
)
from . import Family

# Stable Diffusion 1.x's noise schedule and default sampler, shared by the tiny backbone so that
# the demo exercises the same scheduler code path as the real model.
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
)


@dataclass
class Backbone:
    tokenizer: PreTrainedTokenizerBase
    text_encoder: nn.Module
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    # Config of the sampler the model ships with (PNDM for SD 1.x); exports keep it.
    sampler_config: dict = field(default_factory=dict)


def load_backbone(spec: BackboneSpec, dtype: torch.dtype | None = None) -> Backbone:
    """Load every part of a Stable Diffusion-family model (weights in `dtype`, default fp32)."""
    if spec.name_or_path in (TINY_SD, TINY_SD2):
        backbone = build_tiny_backbone(sd2=spec.name_or_path == TINY_SD2)
    elif spec.random_init:
        backbone = build_random_backbone(spec, dtype or spec.torch_dtype)
    else:
        backbone = _load_pretrained(spec, dtype or spec.torch_dtype)
    if spec.prediction_type is not None:
        backbone.noise_scheduler.register_to_config(prediction_type=spec.prediction_type)
        backbone.sampler_config["prediction_type"] = spec.prediction_type
    return backbone


def _load_pretrained(spec: BackboneSpec, dtype: torch.dtype | None) -> Backbone:
    where = dict(revision=spec.revision)
    weights = dict(where, variant=spec.variant, torch_dtype=dtype)
    path = local_name(spec.name_or_path)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **where)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
        sampler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler", **where))
    except (OSError, ValueError) as error:  # hub, cache and file errors all derive from these
        raise _not_found("the Stable Diffusion model", path, error) from error
    noise_scheduler = DDPMScheduler.from_config(sampler_config)
    return Backbone(tokenizer, text_encoder, vae, unet, noise_scheduler, sampler_config)


def build_random_backbone(spec: BackboneSpec, dtype: torch.dtype | None = None) -> Backbone:
    """The shipped architecture of `spec`'s model (SD 1.x / 2.x) with random weights."""
    shipped = spec.architecture()
    sampler_config = shipped.sampler_config()
    return Backbone(
        tokenizer=shipped.clip_tokenizer(),
        text_encoder=shipped.build("text_encoder", CLIPTextModel, dtype),
        vae=shipped.build("vae", AutoencoderKL, dtype),
        unet=shipped.build("unet", UNet2DConditionModel, dtype),
        noise_scheduler=DDPMScheduler.from_config(sampler_config),
        sampler_config=sampler_config,
    )


def build_tiny_backbone(seed: int = 0, sd2: bool = False) -> Backbone:
    """A Stable Diffusion 1.x-shaped model small enough to train on a CPU in seconds.

    32x32 images, a VAE with 2x downsampling to 4 latent channels, a two-level U-Net with
    cross-attention width 32 and a 2-layer CLIP text encoder over the real CLIP vocabulary.
    Weights are random but deterministic in `seed`. With `sd2`, shaped like Stable Diffusion 2.x
    instead: v-prediction, linear projections in the transformer blocks, attention heads of
    fixed width per level, a GELU (OpenCLIP-style) text encoder and a DDIM sampler.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer()
        activation = "gelu" if sd2 else "quick_gelu"
        text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer, hidden_act=activation))
        vae = build_tiny_vae()
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=(4, 8) if sd2 else 8,
            use_linear_projection=sd2,
            norm_num_groups=16,
        )
    if sd2:
        sampler = diffusers.DDIMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type="v_prediction")
    else:
        sampler = diffusers.PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True)
    sampler_config = dict(sampler.config, _class_name=type(sampler).__name__)
    noise_scheduler = DDPMScheduler.from_config(sampler_config)
    return Backbone(tokenizer, text_encoder, vae, unet, noise_scheduler, sampler_config)


def sd_pipeline(parts, sampler: str | None = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline over existing parts (a `Backbone` or a strategy module), no copies.
    A model conditioned on another encoder than CLIP (a domain BERT) gets none: the pipeline is
    called with its prompt embeddings (see `domain_text_pipeline.DomainTextPipeline`)."""
    if not isinstance(parts.text_encoder, CLIPTextModel):
        return unet_pipeline(parts.vae, parts.unet, parts.sampler_config, sampler)
    text = dict(text_encoder=parts.text_encoder, tokenizer=parts.tokenizer)
    return unet_pipeline(parts.vae, parts.unet, parts.sampler_config, sampler, **text)


def unet_pipeline(
    vae, unet, sampler_config: dict, sampler: str | None = None, text_encoder=None, tokenizer=None
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline over a VAE and U-Net; without a text encoder and tokenizer for
    models conditioned on another encoder (a domain BERT), whose prompt embeddings the caller passes.

    The safety checker is left out: on medical images its NSFW classifier fires on anatomy and
    silently replaces images with black ones, which would corrupt a synthetic data set.
    """
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_sampler(sampler_config, sampler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# The repeated blocks of the U-Net families: the U-Nets' and VAEs' attention and ResNet blocks,
# and the layers of their text encoders (CLIP, or a BERT-like domain encoder).
UNET_BLOCKS = frozenset({"BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer", "BertLayer"})

FAMILY = Family(
    name="stable-diffusion",
    load=load_backbone,
    pipeline=sd_pipeline,
    tiny_models={TINY_SD: build_tiny_backbone, TINY_SD2: lambda: build_tiny_backbone(sd2=True)},
    block_classes=UNET_BLOCKS,
    pipeline_classes=("StableDiffusionPipeline",),
)
