"""FLUX.1: a transformer over 2x2 patches of 16-channel latents, CLIP (pooled vector) and T5 (token
sequence) text encoders, a flow-matching sampler; from a hub id / diffusers folder, or
`medsd/tiny-flux` (built from config, random weights, no download). Training: `flux.py`."""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..backbones import (
    TINY_FLUX,
    BackboneSpec,
    _not_found,
    build_clip_tokenizer,
    build_sampler,
    build_tiny_vae,
    tiny_clip_text_config,
)
from . import Family

# FLUX.1's VAE latent statistics (its vae/config.json): latents are (z - shift) * scale.
FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159

# FLUX.1-dev's sampler (its scheduler/scheduler_config.json): the sigma schedule is shifted at
# sampling time by an amount that grows with the number of image tokens.
FLUX_SAMPLER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


@dataclass
class FluxParts:
    """A FLUX.1 model's parts, named as FluxPipeline names them, and its sampler's config."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    tokenizer_2: PreTrainedTokenizerBase
    text_encoder_2: T5EncoderModel
    vae: AutoencoderKL
    transformer: FluxTransformer2DModel
    sampler_config: dict


def load_flux(spec: BackboneSpec) -> FluxParts:
    """FLUX's parts from a hub id / local diffusers folder, or `medsd/tiny-flux` built from config."""
    if spec.prediction_type is not None:
        raise ValueError("FLUX predicts a velocity by construction: leave backbone.prediction_type unset")
    if spec.name_or_path == TINY_FLUX:
        return build_tiny_flux()
    if spec.random_init:
        return build_random_flux(spec)
    where = dict(revision=spec.revision)
    weights = dict(where, variant=spec.variant, torch_dtype=spec.torch_dtype)
    path = spec.name_or_path
    try:
        parts = FluxParts(
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **where),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
            tokenizer_2=T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", **where),
            text_encoder_2=T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **weights),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
            transformer=FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", **weights),
            sampler_config=dict(
                FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler", **where)
            ),
        )
    except (OSError, ValueError) as error:  # hub, cache and file errors all derive from these
        raise _not_found("the FLUX model", path, error) from error
    return parts


def build_t5_tokenizer() -> T5TokenizerFast:
    """A real T5 (Unigram, SentencePiece-style) tokenizer built offline over single characters.

    Words split into characters, each word's first one carrying T5's word-start marker; enough
    for a tiny model to tell prompts apart, and the same class FluxPipeline loads for FLUX.1.
    """
    characters = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in characters] + [(f"▁{c}", -3.0) for c in characters]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_random_flux(spec: BackboneSpec) -> FluxParts:
    """The shipped FLUX.1 architecture of `spec`'s model with random weights. T5's SentencePiece
    vocabulary is not shipped: `build_t5_tokenizer`'s character tokenizer stands in for it (its
    ids lie in T5's range), with the published 512-token limit."""
    shipped, dtype = spec.architecture(), spec.torch_dtype
    tokenizer_2 = build_t5_tokenizer()
    tokenizer_2.model_max_length = shipped.tokenizer_settings("tokenizer_2")["model_max_length"]
    return FluxParts(
        tokenizer=shipped.clip_tokenizer(),
        text_encoder=shipped.build("text_encoder", CLIPTextModel, dtype),
        tokenizer_2=tokenizer_2,
        text_encoder_2=shipped.build("text_encoder_2", T5EncoderModel, dtype),
        vae=shipped.build("vae", AutoencoderKL, dtype),
        transformer=shipped.build("transformer", FluxTransformer2DModel, dtype),
        sampler_config=shipped.sampler_config(),
    )


def build_tiny_flux(seed: int = 0) -> FluxParts:
    """A FLUX.1-dev-shaped model small enough to train on a CPU in seconds.

    32x32 images, a VAE with 2x downsampling to 16 latent channels (FLUX's scaling and shift),
    a transformer with one double and one single block over 2x2 latent patches (8x8 = 64 image
    tokens) with a guidance embedding like FLUX.1-dev's, a 2-layer CLIP encoder over the real
    CLIP vocabulary and a 2-layer T5 encoder. Weights are random but deterministic in `seed`.
    """
    width = 32  # CLIP's hidden size (FLUX's pooled input) and T5's (its sequence input)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer()
        text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer, hidden_size=width))
        tokenizer_2 = build_t5_tokenizer()
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=width,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
                dropout_rate=0.0,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
            )
        )
        vae = build_tiny_vae(
            latent_channels=16,
            scaling_factor=FLUX_VAE_SCALING,
            shift_factor=FLUX_VAE_SHIFT,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        transformer = FluxTransformer2DModel(
            in_channels=16 * 4,  # a 2x2 patch of 16-channel latents
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=width,
            pooled_projection_dim=width,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
    sampler = FlowMatchEulerDiscreteScheduler(**FLUX_SAMPLER)
    sampler_config = dict(sampler.config, _class_name=type(sampler).__name__)
    return FluxParts(tokenizer, text_encoder, tokenizer_2, text_encoder_2, vae, transformer, sampler_config)


def flux_pipeline(parts, sampler: str | None = None) -> FluxPipeline:
    """A FluxPipeline over `parts` (FluxParts or a FluxLoRA: anything with their attributes), no copies.

    Its default image size is the VAE's `sample_size` (1024 for FLUX.1, 32 for the tiny model);
    FluxPipeline would otherwise assume 1024 px whatever the model.
    """
    pipe = FluxPipeline(
        scheduler=build_sampler(parts.sampler_config, sampler),
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        text_encoder_2=parts.text_encoder_2,
        tokenizer_2=parts.tokenizer_2,
        transformer=parts.transformer,
    )
    pipe.default_sample_size = parts.vae.config.sample_size // pipe.vae_scale_factor
    return pipe


def default_size(pipe: FluxPipeline) -> int:
    return pipe.default_sample_size * pipe.vae_scale_factor


FAMILY = Family(
    name="flux",
    load=load_flux,
    pipeline=flux_pipeline,
    tiny_models={TINY_FLUX: build_tiny_flux},
    denoiser="transformer",
    text_encoders=("text_encoder", "text_encoder_2"),
    block_classes=frozenset(
        {"FluxTransformerBlock", "FluxSingleTransformerBlock", "CLIPEncoderLayer", "T5Block", "ResnetBlock2D"}
    ),
    precisions=("32-true", "bf16-mixed"),
    precision_reason="FLUX is released in bf16, and it and its T5 encoder overflow in fp16",
    pipeline_classes=("FluxPipeline",),
    native_size=default_size,
)
