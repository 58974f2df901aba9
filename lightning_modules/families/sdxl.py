"""Stable Diffusion XL: two CLIP text encoders side by side, a U-Net with size conditioning, from a
hub id (`stabilityai/stable-diffusion-xl-base-1.0`), a diffusers folder, or `medsd/tiny-sdxl`
(built from config, no download). Training on it: `lightning_modules/sdxl.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..backbones import (
    TINY_SDXL,
    BackboneSpec,
    _not_found,
    build_clip_tokenizer,
    build_sampler,
    build_tiny_vae,
    tiny_clip_text_config,
)
from . import Family
from .stable_diffusion import SD_SCHEDULE, UNET_BLOCKS


@dataclass
class SDXLParts:
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    sampler_config: dict = field(default_factory=dict)


def load_sdxl(spec: BackboneSpec) -> SDXLParts:
    """An SDXL model from a hub id (`stabilityai/stable-diffusion-xl-base-1.0`), a local diffusers
    folder, or `medsd/tiny-sdxl` (built from config, no download)."""
    if spec.name_or_path == TINY_SDXL:
        parts = build_tiny_sdxl()
    else:
        parts = build_random_sdxl(spec) if spec.random_init else _load_pretrained(spec)
    if spec.prediction_type is not None:
        parts.noise_scheduler.register_to_config(prediction_type=spec.prediction_type)
        parts.sampler_config["prediction_type"] = spec.prediction_type
    return parts


def _load_pretrained(spec: BackboneSpec) -> SDXLParts:
    path, where = spec.name_or_path, {"revision": spec.revision}
    weights = dict(where, variant=spec.variant, torch_dtype=spec.torch_dtype)
    try:
        parts = SDXLParts(
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **where),
            tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **where),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", **weights
            ),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights),
            noise_scheduler=None,
            sampler_config=dict(DDPMScheduler.load_config(path, subfolder="scheduler", **where)),
        )
    except (OSError, ValueError) as error:
        raise _not_found("the Stable Diffusion XL model", path, error) from error
    parts.noise_scheduler = DDPMScheduler.from_config(parts.sampler_config)
    return parts


def build_random_sdxl(spec: BackboneSpec) -> SDXLParts:
    """The shipped SDXL architecture of `spec`'s model with random weights."""
    shipped, dtype = spec.architecture(), spec.torch_dtype
    sampler_config = shipped.sampler_config()
    return SDXLParts(
        tokenizer=shipped.clip_tokenizer(),
        tokenizer_2=shipped.clip_tokenizer("tokenizer_2"),
        text_encoder=shipped.build("text_encoder", CLIPTextModel, dtype),
        text_encoder_2=shipped.build("text_encoder_2", CLIPTextModelWithProjection, dtype),
        vae=shipped.build("vae", AutoencoderKL, dtype),
        unet=shipped.build("unet", UNet2DConditionModel, dtype),
        noise_scheduler=DDPMScheduler.from_config(sampler_config),
        sampler_config=sampler_config,
    )


def build_tiny_sdxl(seed: int = 0) -> SDXLParts:
    """An SDXL-shaped model small enough to train on a CPU in seconds: 32 px images, two 2-layer
    CLIP text encoders (the second with a projection, padding with "!" as SDXL's does), a U-Net
    with the text-and-time added embedding. Random weights, deterministic in `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer()
        tokenizer_2.pad_token = "!"
        text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_clip_text_config(tokenizer_2, projection_dim=32, hidden_act="gelu")
        )
        vae = build_tiny_vae()
        unet = UNet2DConditionModel(
            sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=64,  # the two encoders' states side by side
            attention_head_dim=(4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text + six size numbers
            norm_num_groups=16,
        )
    schedule = {k: SD_SCHEDULE[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    sampler = diffusers.EulerDiscreteScheduler(**schedule, steps_offset=1, timestep_spacing="leading")
    sampler_config = dict(sampler.config, _class_name=type(sampler).__name__)
    noise_scheduler = DDPMScheduler.from_config(sampler_config)
    return SDXLParts(
        tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, noise_scheduler, sampler_config
    )


def sdxl_pipeline(parts, sampler: str | None = None) -> StableDiffusionXLPipeline:
    """A pipeline over existing parts (a module's or `SDXLParts`), no copies; guidance contrasts
    against the empty prompt's embedding, the one caption dropout trains on (see the SDXL
    strategies' module)."""
    return StableDiffusionXLPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=parts.unet,
        scheduler=build_sampler(parts.sampler_config, sampler),
        force_zeros_for_empty_prompt=False,
    )


def pooled_prompts(module, prompts: list[str]) -> dict:
    """The SDXL pipeline's prompt arguments for a strategy module's validation images: both parts
    of its conditioning against the empty prompt's."""
    positive = module.kept_conditioning(prompts)
    negative = module.kept_conditioning(prompts, unconditional=True)
    return {
        "prompt_embeds": positive["prompt_embeds"],
        "pooled_prompt_embeds": positive["pooled"],
        "negative_prompt_embeds": negative["prompt_embeds"],
        "negative_pooled_prompt_embeds": negative["pooled"],
    }


FAMILY = Family(
    name="sdxl",
    load=load_sdxl,
    pipeline=sdxl_pipeline,
    tiny_models={TINY_SDXL: build_tiny_sdxl},
    text_encoders=("text_encoder", "text_encoder_2"),
    block_classes=UNET_BLOCKS,
    pipeline_classes=("StableDiffusionXLPipeline",),
    pipeline_prompts=pooled_prompts,
)
