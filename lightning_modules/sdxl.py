"""Stable Diffusion XL for the Stable Diffusion strategies: two text encoders and size conditioning.

SDXL conditions its U-Net on the penultimate hidden states of two CLIP text encoders side by side
(CLIP ViT-L and OpenCLIP ViT-bigG), and through an added embedding on the second encoder's
pooled, projected text embedding plus six "micro-conditioning" numbers: the image's original
size, the top-left corner of its crop and the target size. `SDXLMixin` supplies those parts to
the strategies; `SDXLFineTuning` and `SDXLLoRAFineTuning` are the U-Net / first text encoder
fine-tuning and LoRA strategies on an SDXL backbone (the second encoder always stays frozen).

Choices a user should know:
- Micro-conditioning: original size = target size = the training resolution and the crop at
  (0, 0), which is what the pipeline uses by default at sampling time, so training and sampling
  agree. (The DataModules resize before the model sees an image; the original size is not kept.)
- Unconditional prompt: caption dropout trains on the embedding of "" (as for SD 1.x), and the
  exported pipeline sets `force_zeros_for_empty_prompt=False` so that guidance contrasts against
  that same embedding rather than the zeros the base SDXL pipeline defaults to.
- Prepared text conditioning (`medsd prepare`) holds both parts (the side-by-side states and the
  pooled embedding) and is used when both encoders are frozen (LoRA, U-Net-only fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import nn
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from .backbones import (
    SD_SCHEDULE,
    TINY_SDXL,
    BackboneSpec,
    _not_found,
    build_clip_tokenizer,
    build_sampler,
    build_tiny_vae,
    tiny_clip_text_config,
)
from .fine_tuning import FineTuning
from .lora import LoRAFineTuning
from .precision import HALF_PRECISIONS, cast_frozen_parameters


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
    parts = build_tiny_sdxl() if spec.name_or_path == TINY_SDXL else _load_pretrained(spec)
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


def sdxl_pipeline(parts, scheduler) -> StableDiffusionXLPipeline:
    """A pipeline over existing parts (a module's or `SDXLParts`), no copies."""
    return StableDiffusionXLPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer,
        tokenizer_2=parts.tokenizer_2,
        unet=parts.unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
    )


def tiny_sdxl_pipeline() -> StableDiffusionXLPipeline:
    """`medsd/tiny-sdxl` as a pipeline: the same weights every training run starts from."""
    parts = build_tiny_sdxl()
    return sdxl_pipeline(parts, build_sampler(parts.sampler_config))


def second_encoder_ids(input_ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """The first tokenizer's ids as the second tokenizer gives them: both share CLIP's vocabulary
    and differ only in the padding token after the end of the text."""
    is_eos = input_ids == eos_id
    after_first_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return input_ids.masked_fill(after_first_eos, pad_id)


class SDXLMixin:
    """The SDXL parts of a Stable Diffusion strategy (put it before the strategy in the bases)."""

    tokenizer_2: CLIPTokenizer
    text_encoder_2: nn.Module

    def load_parts(self) -> None:
        parts = load_sdxl(self.backbone_spec)
        self.tokenizer, self.tokenizer_2 = parts.tokenizer, parts.tokenizer_2
        self.text_encoder, self.text_encoder_2 = parts.text_encoder, parts.text_encoder_2
        self.vae, self.unet = parts.vae, parts.unet
        self.noise_scheduler, self.sampler_config = parts.noise_scheduler, parts.sampler_config

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Both encoders' penultimate hidden states side by side, and the second's pooled embedding."""
        ids_2 = second_encoder_ids(input_ids, self.tokenizer.eos_token_id, self.tokenizer_2.pad_token_id)
        first = self.text_encoder(input_ids, output_hidden_states=True)
        second = self.text_encoder_2(ids_2, output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return {"prompt_embeds": embeds, "pooled": second.text_embeds}

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        height, width = (side * self.vae_scale_factor for side in noisy.shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=noisy.device)
        added = {"text_embeds": conditioning["pooled"], "time_ids": time_ids.expand(len(noisy), 6).to(noisy)}
        return self.unet(noisy, timesteps, conditioning["prompt_embeds"], added_cond_kwargs=added).sample

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        precision = str(self.trainer.precision)
        if self.device.type == "cuda" and precision in HALF_PRECISIONS:
            cast_frozen_parameters(self.text_encoder_2, HALF_PRECISIONS[precision])

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def build_pipeline(self, sampler: str | None = None) -> StableDiffusionXLPipeline:
        return sdxl_pipeline(self, build_sampler(self.sampler_config, sampler))

    def pipeline_prompts(self, prompts: list[str]) -> dict:
        positive = self.prompt_conditioning(prompts)
        negative = self.prompt_conditioning(prompts, unconditional=True)
        return {
            "prompt_embeds": positive["prompt_embeds"],
            "pooled_prompt_embeds": positive["pooled"],
            "negative_prompt_embeds": negative["prompt_embeds"],
            "negative_pooled_prompt_embeds": negative["pooled"],
        }


class SDXLFineTuning(SDXLMixin, FineTuning):
    """`FineTuning` (U-Net and/or the first text encoder) on an SDXL backbone; exports a diffusers
    SDXL pipeline folder."""


class SDXLLoRAFineTuning(SDXLMixin, LoRAFineTuning):
    """`LoRAFineTuning` on an SDXL backbone's U-Net; the LoRA file loads with the SDXL pipeline's
    `load_lora_weights`."""
