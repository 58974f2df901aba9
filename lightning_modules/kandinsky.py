"""Kandinsky 2.2: its parts, its combined text-to-image pipeline, and fine-tuning its decoder.

Kandinsky 2.2 is two diffusion models. The prior turns a prompt (CLIP text encoder) into a CLIP
image embedding; the decoder, a U-Net conditioned on that embedding alone, denoises MoVQ latents.
The decoder never sees text, so it is trained on the CLIP image embedding of each training image
(from the frozen image encoder) and the prompts of a batch go unused; the prior stays frozen and is
only run to sample. The parts come from `kandinsky-community/kandinsky-2-2-decoder` and
`kandinsky-community/kandinsky-2-2-prior` (or local copies), or from `medsd/tiny-kandinsky`, built
from config with random weights for tests and demos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
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

from .backbones import BackboneSpec, _not_found, build_clip_tokenizer, build_sampler, tiny_clip_text_config
from .diffusion import DiffusionModule
from .lora import add_lora
from .objectives import (
    diffusion_loss,
    drop_captions,
    min_snr_weights,
    prediction_target,
    sample_noise,
    sample_timesteps,
)
from .precision import HALF_PRECISIONS, cast_frozen_parameters

TINY_KANDINSKY = "medsd/tiny-kandinsky"
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
# Every attention projection of the decoder's SimpleCrossAttn blocks: add_k_proj / add_v_proj are
# where the image embedding's tokens enter, so adapters there reach the conditioning path too.
DECODER_ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


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


def load_kandinsky(
    decoder: str,
    prior: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
) -> KandinskyParts:
    """Every part of Kandinsky 2.2. `prior` None means the one that goes with `decoder`: the tiny
    model's own, else kandinsky-2-2-prior. `revision` applies to the decoder."""
    if decoder == TINY_KANDINSKY:
        if prior not in (None, TINY_KANDINSKY):
            raise ValueError(f"{TINY_KANDINSKY} has its own prior; got prior {prior!r}")
        return build_tiny_kandinsky()
    prior = prior or KANDINSKY_PRIOR
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
    parts = load_kandinsky(
        base_model or manifest["base_model"], manifest.get("prior_model"), revision, dtype=dtype
    )
    if manifest["tuning"] == "full":
        parts.unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    else:
        parts.unet.load_lora_adapter(str(folder), prefix=None, weight_name=LORA_WEIGHTS)
    return combined_pipeline(parts)


class KandinskyDecoderTuning(DiffusionModule):
    """Fine-tune the Kandinsky 2.2 decoder U-Net, fully or with LoRA; everything else frozen.

    The decoder learns to denoise the MoVQ latents of a training image given that image's CLIP
    image embedding; at sampling the frozen prior supplies the embedding from the prompt.

    Args:
        lora_rank: None trains the whole U-Net; a rank adds LoRA adapters on its attention
            projections (`lora_target_modules`, default DECODER_ATTENTION_PROJECTIONS) instead.
        lora_alpha: LoRA scale numerator (default: the rank).
        prior_model: the prior (hub id or folder); None: the one that goes with the backbone.
        backbone: the decoder (default `medsd/tiny-kandinsky`); the rest as in DiffusionModule.
    The objective's caption_dropout replaces the image embedding by the embedding of an all-zero
    image: what the pipeline uses as the unconditional embedding for classifier-free guidance.
    Export: LoRA -> LORA_WEIGHTS, which a Kandinsky 2.2 decoder pipeline's U-Net loads with
    `load_lora_adapter(folder, prefix=None, weight_name=LORA_WEIGHTS)`; full -> `unet/`, a
    diffusers U-Net folder. `medsd sample` builds the combined pipeline from either.
    """

    def __init__(
        self,
        lora_rank: int | None = 8,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        prior_model: str | None = None,
        backbone: BackboneSpec | None = None,
        **kwargs,
    ):
        self.prior_model = prior_model  # read by load_parts, which the base __init__ calls
        super().__init__(backbone=backbone or BackboneSpec(TINY_KANDINSKY), **kwargs)
        self.lora_rank = lora_rank
        if lora_rank is None:
            self.unet.requires_grad_(True)
        else:
            targets = lora_target_modules or DECODER_ATTENTION_PROJECTIONS
            add_lora(self.unet, lora_rank, lora_alpha, lora_dropout, targets)
        self.enable_gradient_checkpointing()

    def load_parts(self) -> None:
        spec = self.backbone_spec
        parts = load_kandinsky(
            spec.name_or_path, self.prior_model, spec.revision, spec.variant, spec.torch_dtype
        )
        if spec.prediction_type is not None:
            parts.sampler_config["prediction_type"] = spec.prediction_type
        # The prior's tokenizer and text encoder take the base class's names: the DataModule then
        # applies the prior's 77-token limit to the prompts, the one they meet at sampling.
        self.tokenizer = parts.tokenizer
        self.text_encoder = parts.text_encoder
        self.prior = parts.prior
        self.prior_scheduler = parts.prior_scheduler
        self.image_encoder = parts.image_encoder
        self.image_processor = parts.image_processor
        self.unet = parts.unet
        self.vae = parts.movq  # the name the base class's precision handling uses
        self.sampler_config = parts.sampler_config
        self.noise_scheduler = DDPMScheduler.from_config(parts.sampler_config)

    def on_fit_start(self) -> None:
        super().on_fit_start()  # U-Net, text encoder and MoVQ
        precision = str(self.trainer.precision)
        if self.device.type == "cuda" and precision in HALF_PRECISIONS:
            cast_frozen_parameters(self.prior, HALF_PRECISIONS[precision])
            cast_frozen_parameters(self.image_encoder, HALF_PRECISIONS[precision])

    # --- loss ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode_latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> MoVQ latents, fp32. Unquantised and unscaled: the pipeline decodes
        them with `movq.decode(latents, force_not_quantize=True)`."""
        with torch.autocast(self.device.type, enabled=False):
            latents = self.vae.encode(pixel_values.to(self.device, self._vae_dtype)).latents
        return latents.float()

    @torch.no_grad()
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> CLIP image embeddings, preprocessed in torch as the prior's
        CLIPImageProcessor does (bicubic resize of the shorter side, centre crop, normalise)."""
        processor = self.image_processor
        crop = processor.crop_size
        images = (pixel_values.to(self.device).float() + 1) / 2
        images = TF.resize(
            images, processor.size["shortest_edge"], TF.InterpolationMode.BICUBIC, antialias=True
        )
        images = TF.center_crop(images, [crop["height"], crop["width"]]).clamp(0, 1)
        images = TF.normalize(images, processor.image_mean, processor.image_std)
        return self.image_encoder(images.to(self.image_encoder.dtype)).image_embeds

    @torch.no_grad()
    def unconditional_embedding(self) -> torch.Tensor:
        """The embedding of an all-zero (normalised) image, [1, D]: the pipeline's negative image
        embedding (KandinskyV22PriorPipeline.get_zero_embed)."""
        size = self.image_encoder.config.image_size
        zeros = torch.zeros(1, 3, size, size, device=self.device, dtype=self.image_encoder.dtype)
        return self.image_encoder(zeros).image_embeds

    def denoising_loss(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """The decoder's loss for given latents, noise, timesteps and conditioning.

        The U-Net outputs the prediction and a learned variance stacked on the channels; the
        variance serves the sampler only, so the loss sees the first half.
        """
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        output = self.unet(noisy, timesteps, None, added_cond_kwargs={"image_embeds": image_embeds}).sample
        prediction = output[:, : latents.shape[1]]
        target = prediction_target(self.noise_scheduler, latents, noise, timesteps)
        weights = None
        if self.objective.snr_gamma is not None:
            weights = min_snr_weights(self.noise_scheduler, timesteps, self.objective.snr_gamma)
        return diffusion_loss(prediction, target, weights, self.objective.loss)

    # --- the prepared cache: MoVQ latents and CLIP image embeddings, both fixed per image ---

    def cache_identity(self) -> dict:
        spec = self.backbone_spec
        prior = self.prior_model or self._default_prior()
        return {"backbone": f"{spec.name_or_path}@{spec.revision}", "text": {"image_embeds": prior}}

    def latent_posterior(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MoVQ encodes deterministically: its latents, with no spread, so that a cache gives
        them back exactly."""
        latents = self.encode_latents(pixel_values)
        return latents, torch.zeros_like(latents)

    def cached_conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each image's CLIP image embedding: what conditions the decoder in training."""
        return {"image_embeds": self.image_embeddings(batch["pixel_values"])}

    def release_text_encoders(self) -> None:
        """Nothing leaves the GPU: the validation images need the prior's encoders."""

    def diffusion_step(
        self, batch: dict, generator: torch.Generator | None, caption_dropout: float
    ) -> torch.Tensor:
        cached = "text" in batch and self._cached_text
        if "pixel_values" not in batch and not ("latent_mean" in batch and cached):
            raise KeyError(
                "KandinskyDecoderTuning needs the batch's pixel_values, or a prepared cache's MoVQ "
                "latents and image embeddings"
            )
        if "latent_mean" in batch:
            latents = batch["latent_mean"].float()
        else:
            latents = self.encode_latents(batch["pixel_values"])
        if cached:
            image_embeds = batch["text"]["image_embeds"]
        else:
            image_embeds = self.image_embeddings(batch["pixel_values"])
        if caption_dropout > 0:
            image_embeds = drop_captions(
                image_embeds, self.unconditional_embedding(), caption_dropout, generator
            )
        noise = sample_noise(latents, self.objective.noise_offset, generator)
        timesteps = sample_timesteps(
            latents.shape[0],
            self.noise_scheduler.config.num_train_timesteps,
            self.device,
            self.objective.min_timestep,
            self.objective.max_timestep,
            generator,
        )
        return self.denoising_loss(latents, noise, timesteps, image_embeds)

    # --- validation images --------------------------------------------------------------

    def build_pipeline(self, sampler: str | None = None) -> KandinskyV22CombinedPipeline:
        """Prior and decoder over this module's own parts (no copies)."""
        parts = KandinskyParts(
            self.tokenizer,
            self.text_encoder,
            self.prior,
            self.prior_scheduler,
            self.image_encoder,
            self.image_processor,
            self.unet,
            self.vae,
            self.sampler_config,
        )
        return combined_pipeline(parts, sampler)

    def pipeline_prompts(self, prompts: list[str]) -> dict:
        """The prompt texts: the combined pipeline's prior turns them into image embeddings."""
        return {"prompt": list(prompts)}

    def native_resolution(self, pipe: KandinskyV22CombinedPipeline) -> int:
        return native_size(pipe)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """MoVQ latents -> images in [0, 1], fp32, outside autocast (see `encode_latents`)."""
        with torch.autocast(self.device.type, enabled=False):
            images = self.vae.decode(latents.to(self._vae_dtype), force_not_quantize=True).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # --- export -------------------------------------------------------------------------

    def export(self, folder: Path) -> dict:
        fields = {"prior_model": self.prior_model or self._default_prior(), "tuning": "full"}
        if self.lora_rank is None:
            self.unet.save_pretrained(folder / "unet", safe_serialization=True)
            return {**fields, "format": "diffusers-unet"}
        self.unet.save_lora_adapter(folder, weight_name=LORA_WEIGHTS)
        # The decoder U-Net's own adapter file (`load_lora_adapter`): these pipelines have no
        # `load_lora_weights`, so it is not a pipeline-level "diffusers-lora" export.
        return {**fields, "tuning": "lora", "format": "diffusers-unet-lora", "rank": self.lora_rank}

    def _default_prior(self) -> str:
        return TINY_KANDINSKY if self.backbone_spec.name_or_path == TINY_KANDINSKY else KANDINSKY_PRIOR
