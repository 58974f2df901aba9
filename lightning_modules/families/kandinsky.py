"""Kandinsky 2.2: a prior (prompt -> CLIP image embedding) and a decoder (embedding -> MoVQ latents
-> image), from `kandinsky-community/kandinsky-2-2-decoder` and `kandinsky-community/kandinsky-2-2-prior`
(or local copies), or `medsd/tiny-kandinsky` (built from config, random weights, no download);
the combined text-to-image pipeline over them, and the pipeline of a decoder export. Training
the decoder: `lightning_modules/kandinsky.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    KandinskyV22CombinedPipeline,
    PriorTransformer,
    UnCLIPScheduler,
    UNet2DConditionModel,
    VQModel,
)
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ..backbones import (
    TINY_KANDINSKY,
    BackboneSpec,
    _not_found,
    build_clip_tokenizer,
    build_sampler,
    random_base,
    tiny_clip_text_config,
)
from ..latents import VQ_LATENTS
from . import Family
from .stable_diffusion import UNET_BLOCKS

KANDINSKY_PRIOR = "kandinsky-community/kandinsky-2-2-prior"

# The decoder's training noise schedule, as kandinsky-2-2-decoder's scheduler config gives it.
DECODER_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the decoder U-Net's adapters in an export


@dataclass
class KandinskyParts:
    """The frozen prior (text -> CLIP image embedding) and the decoder (embedding -> image)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModelWithProjection
    prior: PriorTransformer
    prior_scheduler: UnCLIPScheduler
    image_encoder: CLIPVisionModelWithProjection
    image_processor: CLIPImageProcessor
    unet: UNet2DConditionModel
    movq: VQModel
    sampler_config: dict  # the decoder's scheduler (DDPM), also its training noise schedule
    noise_scheduler: DDPMScheduler | None = None  # set by load_decoder_backbone, for training


def load_kandinsky(
    decoder: str,
    prior: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
    random_init: bool = False,
    architecture_overrides: dict | None = None,
) -> KandinskyParts:
    """Every part of Kandinsky 2.2. `prior` None means the one that goes with `decoder`: the tiny
    model's own, else kandinsky-2-2-prior. `revision` applies to the decoder. `random_init`: the
    shipped architectures of both with random weights (see BackboneSpec)."""
    if decoder == TINY_KANDINSKY:
        if prior not in (None, TINY_KANDINSKY):
            raise ValueError(f"{TINY_KANDINSKY} has its own prior; got prior {prior!r}")
        return build_tiny_kandinsky()
    prior = prior or KANDINSKY_PRIOR
    if random_init:
        return build_random_kandinsky(decoder, prior, dtype, architecture_overrides)
    weights = dict(variant=variant, torch_dtype=dtype)
    try:
        prior_parts = dict(
            tokenizer=CLIPTokenizer.from_pretrained(prior, subfolder="tokenizer"),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(
                prior, subfolder="text_encoder", **weights
            ),
            prior=PriorTransformer.from_pretrained(prior, subfolder="prior", **weights),
            prior_scheduler=UnCLIPScheduler.from_pretrained(prior, subfolder="scheduler"),
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(
                prior, subfolder="image_encoder", **weights
            ),
            image_processor=CLIPImageProcessor.from_pretrained(prior, subfolder="image_processor"),
        )
    except (OSError, ValueError) as error:  # hub, cache and file errors all derive from these
        raise _not_found("the Kandinsky 2.2 prior", prior, error) from error
    try:
        unet = UNet2DConditionModel.from_pretrained(decoder, subfolder="unet", revision=revision, **weights)
        movq = VQModel.from_pretrained(decoder, subfolder="movq", revision=revision, **weights)
        sampler_config = dict(DDPMScheduler.load_config(decoder, subfolder="scheduler", revision=revision))
    except (OSError, ValueError) as error:
        raise _not_found("the Kandinsky 2.2 decoder", decoder, error) from error
    return KandinskyParts(**prior_parts, unet=unet, movq=movq, sampler_config=sampler_config)


def build_random_kandinsky(
    decoder: str, prior: str, dtype: torch.dtype | None = None, overrides: dict | None = None
) -> KandinskyParts:
    """The shipped architectures of a Kandinsky 2.2 decoder and prior with random weights."""
    from ..architectures import architecture

    decoder_parts, prior_parts = architecture(decoder, overrides), architecture(prior, overrides)
    processor = prior_parts.config("image_processor", "preprocessor_config.json")
    return KandinskyParts(
        tokenizer=prior_parts.clip_tokenizer(),
        text_encoder=prior_parts.build("text_encoder", CLIPTextModelWithProjection, dtype),
        prior=prior_parts.build("prior", PriorTransformer, dtype),
        prior_scheduler=UnCLIPScheduler.from_config(prior_parts.sampler_config()),
        image_encoder=prior_parts.build("image_encoder", CLIPVisionModelWithProjection, dtype),
        image_processor=CLIPImageProcessor(**processor),
        unet=decoder_parts.build("unet", UNet2DConditionModel, dtype),
        movq=decoder_parts.build("movq", VQModel, dtype),
        sampler_config=decoder_parts.sampler_config(),
    )


def build_tiny_kandinsky(seed: int = 0) -> KandinskyParts:
    """A Kandinsky 2.2-shaped model small enough to train on a CPU in seconds.

    32x32 images, a MoVQ with 2x downsampling to 4 latent channels, a two-level decoder U-Net with
    Kandinsky's image-embedding conditioning and learned-variance output, and a one-layer prior;
    CLIP text and image embeddings are 32-wide. Weights are random but deterministic in `seed`.
    """
    width = 32  # CLIP embedding width, shared by the text encoder, prior and image encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer()
        clip = dict(hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        text_config = tiny_clip_text_config(tokenizer, **clip, projection_dim=width)
        text_encoder = CLIPTextModelWithProjection(text_config)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(**clip, image_size=32, patch_size=8, projection_dim=width)
        )
        prior = PriorTransformer(
            num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=width
        )
        # Its un-normalisation std starts at zero, which would make every sampled embedding zero.
        nn.init.ones_(prior.clip_std)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=8,  # noise prediction and learned variance
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            block_out_channels=(32, 64),
            layers_per_block=1,
            encoder_hid_dim=width,
            encoder_hid_dim_type="image_proj",
            addition_embed_type="image",
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=16,
            resnet_time_scale_shift="scale_shift",
        )
        movq = VQModel(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
            up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 32),  # its spatial norms use 32 groups
            layers_per_block=1,
            latent_channels=4,
            num_vq_embeddings=16,
            vq_embed_dim=4,
            norm_num_groups=8,
            norm_type="spatial",
            sample_size=32,
        )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    prior_scheduler = UnCLIPScheduler(
        variance_type="fixed_small_log", prediction_type="sample", clip_sample=True, clip_sample_range=5.0
    )
    sampler_config = dict(DDPMScheduler(**DECODER_SCHEDULE).config, _class_name="DDPMScheduler")
    return KandinskyParts(
        tokenizer,
        text_encoder,
        prior,
        prior_scheduler,
        image_encoder,
        image_processor,
        unet,
        movq,
        sampler_config,
    )


def combined_pipeline(parts: KandinskyParts, sampler: str | None = None) -> KandinskyV22CombinedPipeline:
    """Prior and decoder as one text-to-image pipeline over `parts` (no copies)."""
    return KandinskyV22CombinedPipeline(
        unet=parts.unet,
        scheduler=build_sampler(parts.sampler_config, sampler),
        movq=parts.movq,
        prior_prior=parts.prior,
        prior_image_encoder=parts.image_encoder,
        prior_text_encoder=parts.text_encoder,
        prior_tokenizer=parts.tokenizer,
        prior_scheduler=parts.prior_scheduler,
        prior_image_processor=parts.image_processor,
    )


def native_size(pipe: KandinskyV22CombinedPipeline) -> int:
    """The image side the decoder was built for; the pipeline's own default (512) when its U-Net
    does not say."""
    sample_size = pipe.unet.config.sample_size
    return sample_size * pipe.decoder_pipe.movq_scale_factor if sample_size else 512


def pipeline_from_export(
    folder: Path, manifest: dict, base_model: str | None = None, dtype: torch.dtype = torch.float32
) -> KandinskyV22CombinedPipeline:
    """The combined pipeline of a KandinskyDecoderTuning export: the manifest's base model (or
    `base_model` in its place) with the exported decoder U-Net or its LoRA adapters."""
    revision = None if base_model else manifest.get("base_revision")
    random = {} if base_model else random_base(manifest)
    parts = load_kandinsky(
        base_model or manifest["base_model"], manifest.get("prior_model"), revision, dtype=dtype, **random
    )
    if manifest["tuning"] == "full":
        parts.unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    else:
        parts.unet.load_lora_adapter(str(folder), prefix=None, weight_name=LORA_WEIGHTS)
    return combined_pipeline(parts)


def load_decoder_backbone(spec: BackboneSpec, prior_model: str | None = None) -> KandinskyParts:
    """The parts a decoder fine-tune holds: `spec` names the decoder, `prior_model` the prior (None:
    the one that goes with it); the decoder's training noise schedule follows the spec's
    prediction type if it sets one."""
    random = dict(random_init=spec.random_init, architecture_overrides=spec.architecture_overrides)
    parts = load_kandinsky(
        spec.name_or_path, prior_model, spec.revision, spec.variant, spec.torch_dtype, **random
    )
    if spec.prediction_type is not None:
        parts.sampler_config["prediction_type"] = spec.prediction_type
    parts.noise_scheduler = DDPMScheduler.from_config(parts.sampler_config)
    return parts


def decoder_folder_pipeline(path: str, revision: str | None, dtype: torch.dtype):
    """A Kandinsky 2.2 decoder folder alone renders image embeddings, not prompts: put its prior
    (kandinsky-2-2-prior) in front, as a decoder fine-tune's export does."""
    return combined_pipeline(load_kandinsky(path, None, revision, dtype=dtype))


def text_prompts(module, prompts: list[str]) -> dict:
    """The combined pipeline's prompt arguments: the texts, which its prior turns into image
    embeddings."""
    return {"prompt": list(prompts)}


FAMILY = Family(
    name="kandinsky",
    load=load_decoder_backbone,
    pipeline=combined_pipeline,
    tiny_models={TINY_KANDINSKY: build_tiny_kandinsky},
    autoencoder="movq",
    # Training conditions the decoder on CLIP image embeddings: no text encoder is in the way,
    # and the prior's must stay for the validation images.
    text_encoders=(),
    latents=VQ_LATENTS,
    block_classes=UNET_BLOCKS,
    pipeline_classes=("KandinskyV22CombinedPipeline", "KandinskyV22Pipeline"),
    native_size=native_size,
    pipeline_prompts=text_prompts,
    load_folder=decoder_folder_pipeline,
    load_export=pipeline_from_export,
    exports_apply_to_base=True,
)
