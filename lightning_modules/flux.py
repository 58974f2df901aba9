"""FLUX.1 with LoRA adapters on its transformer, trained with FLUX's rectified-flow objective.

FLUX differs from the Stable Diffusion family in every part the training loop touches: a
transformer over 2x2 patches of 16-channel latents instead of a U-Net, two text encoders (CLIP
gives a pooled vector, T5 the token sequence), a velocity target on a straight path between image
and noise instead of epsilon on a DDPM schedule, and a guidance-distilled model that takes the
guidance scale as an input. So `FluxLoRA` brings its own parts, loss, sampling and export, and
keeps the rest of `DiffusionModule` (optimiser, EMA, checkpoints, validation grid, export folder).

`medsd/tiny-flux` is a FLUX-shaped model built from config (random weights, no download) for
tests and demos, like `medsd/tiny-sd`.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from peft.utils import get_peft_model_state_dict
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .backbones import (
    BackboneSpec,
    _not_found,
    build_clip_tokenizer,
    build_sampler,
    build_tiny_vae,
    tiny_clip_text_config,
)
from .diffusion import DiffusionModule
from .lora import add_lora
from .modes import in_eval_mode
from .objectives import diffusion_loss, drop_captions, sample_noise
from .precision import cast_frozen_parameters
from .prompts import PromptTokenizer
from .sharding import is_sharded
from .validation_images import trainer_precision

TINY_FLUX = "medsd/tiny-flux"

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


def tiny_flux_pipeline() -> FluxPipeline:
    """`medsd/tiny-flux` as a pipeline: the same weights every training run starts from."""
    return flux_pipeline(build_tiny_flux())


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

    def load_parts(self) -> None:
        parts = load_flux(self.backbone_spec)
        self.tokenizer = parts.tokenizer
        self.text_encoder = parts.text_encoder
        self.tokenizer_2 = parts.tokenizer_2
        self.text_encoder_2 = parts.text_encoder_2
        self.vae = parts.vae
        self.transformer = parts.transformer
        self.sampler_config = parts.sampler_config

    def enable_gradient_checkpointing(self) -> None:
        if self.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        """T5's, so that the DataModule's long-prompt policy measures prompts against the encoder
        that carries their content. The ids it adds to batches go unused: the training step encodes
        the prompt texts with both tokenizers, exactly as FluxPipeline does when sampling."""
        return PromptTokenizer(self.tokenizer_2, self.max_sequence_length)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        precision = str(self.trainer.precision)
        if precision not in ("32-true", "bf16-mixed"):
            raise ValueError(
                f"FluxLoRA runs under precision '32-true' or 'bf16-mixed', not '{precision}': FLUX is "
                "released in bf16, and it and its T5 encoder overflow in fp16"
            )
        if is_sharded(self.trainer):
            # FSDP keeps fp32 shards and gathers them in bf16, the VAE's too (see sharding.py).
            self._vae_dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
        elif precision == "bf16-mixed" and self.trainer.strategy.root_device.type == "cuda":
            # Frozen weights (all but the adapters, which stay fp32) in bf16 halve the memory. Cast
            # here, before Lightning moves the model to the GPU: FLUX.1-dev in fp32 is about 67 GB.
            self._vae_dtype = torch.bfloat16
            cast_frozen_parameters(self, torch.bfloat16)

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)
        if self._cached_text and not is_sharded(self.trainer):
            self.release_text_encoders()  # T5-XXL alone is about 9.5 GB in bf16

    # --- loss ---------------------------------------------------------------------------

    def build_pipeline(self, sampler: str | None = None) -> FluxPipeline:
        return flux_pipeline(self, sampler)

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
            latents, noise, sigmas, self.batch_conditioning(batch, generator, caption_dropout)
        )

    def batch_conditioning(
        self, batch: dict, generator: torch.Generator | None, caption_dropout: float
    ) -> dict:
        """The prepared cache's conditioning, else the prompt texts encoded here (FLUX's encoders
        take texts, not the DataModule's ids); dropped captions become the empty prompt's."""
        if "text" in batch and self._cached_text:
            return super().batch_conditioning(batch, generator, caption_dropout)
        text = self.encode_prompts(batch["prompts"])
        if caption_dropout > 0:
            text = drop_captions(text, self.empty_prompt_embedding(), caption_dropout, generator)
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
        text = self.prompt_conditioning(list(prompts))
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
