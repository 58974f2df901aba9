"""The LightningModule every strategy builds on: loss, EMA, optimiser, validation images, export.

A strategy (textual inversion, fine-tuning, LoRA, ...) only decides which parameters train, how
a prompt becomes the U-Net's conditioning, and what its export looks like.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn

from datamodules.cache import CacheMismatchError, PreparedCache

from .backbones import BackboneSpec, build_sampler, load_backbone
from .conditioning import Conditioning, as_arrays, concat_rows, from_arrays, repeat_rows
from .export import export_at_fit_end
from .modes import set_modes
from .objectives import (
    diffusion_loss,
    drop_captions,
    min_snr_weights,
    prediction_target,
    sample_noise,
    sample_timesteps,
)
from .precision import place_frozen_weights, refuse_half_trained_weights, train_in_fp32
from .prompts import PromptTokenizer
from .settings import Objective, Optimizer, Validation
from .sharding import check_sharding_settings, is_sharded, unwrapped_name
from .validation_images import log_grid, pipeline_images, render_rank_share

log = logging.getLogger(__name__)


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def adamw_with_schedule(module: L.LightningModule, groups: list[dict], settings: Optimizer) -> dict:
    """`configure_optimizers`' answer: AdamW over the non-empty `groups`, stepped per batch by the
    learning-rate schedule `settings` names."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(module).__name__} has nothing to train with these settings")
    hyper = dict(
        lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay
    )
    if settings.kind == "adamw8bit":
        import bitsandbytes  # imported here: loading its native kernels takes a while

        optimizer = bitsandbytes.optim.AdamW8bit(groups, **hyper)
    else:
        fused = settings.fused if settings.fused is not None else module.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, **hyper, fused=fused)
    schedule = get_scheduler(
        settings.schedule,
        optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=int(module.trainer.estimated_stepping_batches),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class DiffusionModule(L.LightningModule):
    """Base of the Stable Diffusion-family strategies (not used on its own).

    Args:
        backbone: which pretrained model to adapt.
        objective: noise, timesteps and loss weighting.
        optimizer: AdamW and its learning-rate schedule.
        validation: the prompts rendered into the TensorBoard image grid.
        ema_decay: keep an exponential moving average of the trainable weights, used for
            validation images and the export (e.g. 0.9999); None disables it.
        gradient_checkpointing: trade compute for memory in the parts that train.
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        objective: Objective | None = None,
        optimizer: Optimizer | None = None,
        validation: Validation | None = None,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.backbone_spec = backbone or BackboneSpec()
        self.objective = objective or Objective()
        self.optimizer_settings = optimizer or Optimizer()
        self.validation = validation or Validation()
        self.ema_decay = ema_decay
        self.gradient_checkpointing = gradient_checkpointing
        self.save_hyperparameters()

        self.load_parts()
        if self.backbone_spec.dtype is not None:
            self.to(self.backbone_spec.torch_dtype)  # what loading gave, and the tiny models too
        self.requires_grad_(False)  # strategies switch on what they train
        # Checkpoints hold only what trains; frozen weights come from the backbone again.
        self.strict_loading = False
        self.ema: EMAModel | None = None
        self._vae_dtype = next(self.vae.parameters()).dtype
        self._cached_text = False  # set in setup() when a prepared cache's embeddings fit this run
        self._empty_embedding: Conditioning | None = None
        # Validation prompts' conditioning, kept when the text encoders leave the GPU.
        self._kept_text: dict[str, Conditioning] = {}
        self._validation_images: torch.Tensor | None = None

    # --- what strategies define ---------------------------------------------------------

    def load_parts(self) -> None:
        """Set the backbone's parts as attributes; other model families (FLUX, Kandinsky) override
        this with their own parts."""
        parts = load_backbone(self.backbone_spec)
        self.tokenizer = parts.tokenizer
        self.text_encoder = parts.text_encoder
        self.vae = parts.vae
        self.unet = parts.unet
        self.noise_scheduler = parts.noise_scheduler
        self.sampler_config = parts.sampler_config

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer(self.tokenizer)

    def parameter_groups(self) -> list[dict]:
        """Optimiser parameter groups; a group may carry its own `lr`."""
        return [{"params": trainable_parameters(self)}]

    def text_encoders(self) -> list[nn.Module]:
        """The modules between a prompt and the conditioning: what a prepared cache replaces."""
        return [self.text_encoder]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Conditioning:
        """Token ids -> the U-Net's cross-attention conditioning [B, L, D]."""
        return self.text_encoder(input_ids)[0]

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning) -> torch.Tensor:
        """The U-Net's prediction for noisy latents under `encode_text`'s conditioning."""
        return self.unet(noisy, timesteps, conditioning).sample

    def export(self, folder: Path) -> dict:
        """Write the trained model into `folder`; return extra fields for its manifest."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step, before the EMA update."""

    # --- shared machinery ---------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        if not self.gradient_checkpointing:
            return
        if any(p.requires_grad for p in self.unet.parameters()):
            self.unet.enable_gradient_checkpointing()
        if any(p.requires_grad for p in self.text_encoder.parameters()):
            self.text_encoder.gradient_checkpointing_enable()

    def train(self, mode: bool = True):
        """What trains in train mode, the frozen parts in eval mode (see `modes.py`); `eval()` too
        comes here, with everything in eval mode."""
        set_modes(self, mode)
        return self

    def on_train_start(self) -> None:
        # Lightning keeps the modes the parts were loaded in (eval, from `from_pretrained`).
        self.train()
        modules = list(self.modules())
        log.info(
            "%d modules in train mode (the trained parts), %d frozen ones in eval mode",
            sum(m.training for m in modules),
            sum(not m.training for m in modules),
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "tokenizer", "absent") is None:
            datamodule.tokenizer = self.prompt_tokenizer  # tokenise in the DataLoader workers
        if getattr(datamodule, "cache_dir", None):
            self._check_cache(PreparedCache(datamodule.cache_dir))
        if is_sharded(self.trainer):
            check_sharding_settings(self, str(self.trainer.precision))
        train_in_fp32(self, str(self.trainer.precision))
        if self.ema_decay is not None and self.ema is None:
            self.ema = EMAModel(trainable_parameters(self), decay=self.ema_decay)

    def _check_cache(self, cache: PreparedCache) -> None:
        prepared, here = cache.manifest["model"], self.cache_identity()
        has_latents = any(split["latents"] for split in cache.manifest["splits"].values())
        if has_latents and prepared.get("backbone") != here["backbone"]:
            raise CacheMismatchError(
                f"the latents in {cache.root} come from {prepared.get('backbone')}, this run's model is "
                f"{here['backbone']}: prepare the cache again with this run's config"
            )
        self._cached_text = here["text"] is not None and prepared.get("text") == here["text"]
        if prepared.get("text") and not self._cached_text:
            log.info(
                "ignoring the cached text embeddings in %s: this run's text conditioning differs", cache.root
            )

    def on_fit_start(self) -> None:
        precision = str(self.trainer.precision)
        refuse_half_trained_weights(precision)
        self._vae_dtype = place_frozen_weights(self, precision, is_sharded(self.trainer))
        if self.ema is not None:
            self.ema.to(self.device)
        if self._cached_text and not is_sharded(self.trainer):
            # (Sharded encoders hold 1/N of their weights and run only inside FSDP's forward.)
            self.release_text_encoders()

    def release_text_encoders(self) -> None:
        """Move the frozen text encoders off the GPU for the rest of the fit.

        The prepared cache holds every training prompt's conditioning; the encoders are otherwise
        needed only for the empty prompt and the validation prompts, encoded once here.
        """
        self.empty_prompt_embedding()
        prompts = list(dict.fromkeys(self.validation.prompts))
        if prompts:
            encoded = as_arrays(self.encode_prompts(prompts))
            for i, prompt in enumerate(prompts):
                self._kept_text[prompt] = from_arrays({k: v[i : i + 1] for k, v in encoded.items()})
        for encoder in self.text_encoders():
            encoder.to("cpu")
        log.info(
            "text conditioning comes from the prepared cache: the empty and %d validation prompts "
            "encoded once, %d text encoder(s) moved to the CPU",
            len(prompts),
            len(self.text_encoders()),
        )

    # --- loss ---------------------------------------------------------------------------

    @torch.no_grad()
    def latent_posterior(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> the VAE posterior's mean and std, fp32 (the VAE never sees autocast)."""
        with torch.autocast(self.device.type, enabled=False):
            posterior = self.vae.encode(pixel_values.to(self.device, self._vae_dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def sample_latents(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A draw from the posterior, shifted and scaled into the U-Net's latent space."""
        eps = torch.randn(mean.shape, generator=generator).to(mean)
        return (mean + std * eps - self._latent_shift) * self.vae.config.scaling_factor

    def batch_latents(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
        """Latents of a batch of images, or of a prepared cache's posteriors (`medsd prepare`)."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        else:
            mean, std = self.latent_posterior(batch["pixel_values"])
        return self.sample_latents(mean, std, generator)

    def text_conditioning_is_frozen(self) -> bool:
        """True when nothing between the prompt and the U-Net trains, so text embeddings can be cached."""
        return not any(p.requires_grad for encoder in self.text_encoders() for p in encoder.parameters())

    def cache_identity(self) -> dict:
        """What a prepared cache's latents and text embeddings must come from to be reused here."""
        spec = self.backbone_spec
        text = None
        if self.text_conditioning_is_frozen():
            tokenizer = self.prompt_tokenizer
            text = {
                "template": tokenizer.template,
                "replacements": tokenizer.replacements,
                "max_length": tokenizer.max_length,
            }
        return {"backbone": f"{spec.name_or_path}@{spec.revision}", "text": text}

    def cached_conditioning(self, batch: dict) -> Conditioning:
        """What `medsd prepare` stores for a batch when `cache_identity()["text"]` is set: the
        frozen text conditioning of its prompts."""
        return self.encode_prompts(batch["prompts"])

    def batch_conditioning(
        self, batch: dict, generator: torch.Generator | None, caption_dropout: float
    ) -> Conditioning:
        if "text" in batch and self._cached_text:
            embeds = from_arrays(batch["text"])
            if caption_dropout > 0:
                embeds = drop_captions(embeds, self.empty_prompt_embedding(), caption_dropout, generator)
            return embeds
        if "input_ids" not in batch:
            raise KeyError(
                "the batch has no 'input_ids': give the DataModule this module's "
                "prompt_tokenizer (medsd's Trainer setup does this automatically)"
            )
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if caption_dropout > 0:
            # Ids and mask are dropped together (one draw): a BERT-like encoder reads the mask,
            # and must see the empty prompt's, as at sampling time.
            uncond = self.prompt_tokenizer.unconditional()
            both = torch.stack([input_ids, attention_mask.to(input_ids)], dim=1)
            empty = torch.stack([uncond["input_ids"][0], uncond["attention_mask"][0].to(input_ids)])
            input_ids, attention_mask = drop_captions(both, empty, caption_dropout, generator).unbind(1)
        return self.encode_text(input_ids, attention_mask)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1], fp32, outside autocast like `encode_images`."""
        with torch.autocast(self.device.type, enabled=False):
            z = latents.to(self._vae_dtype) / self.vae.config.scaling_factor + self._latent_shift
            images = self.vae.decode(z).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @property
    def _latent_shift(self) -> float:
        return getattr(self.vae.config, "shift_factor", None) or 0.0

    def diffusion_step(
        self, batch: dict, generator: torch.Generator | None, caption_dropout: float
    ) -> torch.Tensor:
        obj = self.objective
        latents = self.batch_latents(batch, generator)
        noise = sample_noise(latents, obj.noise_offset, generator)
        timesteps = sample_timesteps(
            latents.shape[0],
            self.noise_scheduler.config.num_train_timesteps,
            self.device,
            obj.min_timestep,
            obj.max_timestep,
            generator,
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        conditioning = self.batch_conditioning(batch, generator, caption_dropout)
        prediction = self.denoise(noisy, timesteps, conditioning)
        target = prediction_target(self.noise_scheduler, latents, noise, timesteps)
        weights = None
        if obj.snr_gamma is not None:
            weights = min_snr_weights(self.noise_scheduler, timesteps, obj.snr_gamma)
        return diffusion_loss(prediction, target, weights, obj.loss)

    def loss_of_batch(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """One training loss without caption dropout: what cost accounting counts FLOPs on."""
        return self.diffusion_step(batch, generator, caption_dropout=0.0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_step(batch, None, self.objective.caption_dropout)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompts"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        if batch_idx == 0 and dataloader_idx == 0 and not self.trainer.sanity_checking:
            # Rendered here rather than at the epoch's end: inside a step, FSDP has gathered the
            # weights outside its units (a no-op without FSDP). Not in the sanity check before
            # training, where it would only delay the first step with the base model's images.
            self._validation_images = render_rank_share(self)
        return self._evaluation_loss(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._evaluation_loss(batch, batch_idx, "test")

    def _evaluation_loss(self, batch: dict, batch_idx: int, stage: str) -> torch.Tensor:
        # Fixed noise and timesteps per batch, so evaluation losses compare across epochs.
        generator = torch.Generator().manual_seed(self.validation.seed + batch_idx)
        loss = self.diffusion_step(batch, generator, caption_dropout=0.0)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(batch["prompts"]))
        return loss

    # --- optimiser and EMA --------------------------------------------------------------

    def configure_optimizers(self):
        return adamw_with_schedule(self, self.parameter_groups(), self.optimizer_settings)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()
        if self.ema is not None:
            self.ema.step(trainable_parameters(self))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {unwrapped_name(name) for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    @contextmanager
    def use_ema_weights(self) -> Iterator[None]:
        """Inside the block the EMA weights replace the live ones (if EMA is on)."""
        if self.ema is None:
            yield
            return
        params = trainable_parameters(self)
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    # --- validation images ------------------------------------------------------------

    def build_pipeline(self, sampler: str | None = None) -> StableDiffusionPipeline:
        """A diffusers pipeline over this module's own parts (no copies)."""
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=build_sampler(self.sampler_config, sampler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], unconditional: bool = False) -> Conditioning:
        """Prompt texts (caption template applied) or, if `unconditional`, as many empty prompts ->
        the conditioning, on this module's device."""
        tokenizer = self.prompt_tokenizer
        tokens = tokenizer.unconditional(len(prompts)) if unconditional else tokenizer(prompts)
        device = next(self.text_encoder.parameters()).device  # the CPU once a cache replaced it
        embeds = self.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return from_arrays({k: v.to(self.device) for k, v in as_arrays(embeds).items()})

    def prompt_conditioning(self, prompts: list[str], unconditional: bool = False) -> Conditioning:
        """`encode_prompts`, served from what `release_text_encoders` kept where it can be."""
        if unconditional and self._empty_embedding is not None:
            return repeat_rows(self._empty_embedding, len(prompts))
        if not unconditional and prompts and all(p in self._kept_text for p in prompts):
            return concat_rows([self._kept_text[p] for p in prompts])
        return self.encode_prompts(prompts, unconditional)

    def empty_prompt_embedding(self) -> Conditioning:
        """The empty prompt's conditioning (batch of one), computed once: it is constant while the
        text conditioning is frozen, which is when prepared embeddings (and this) are used."""
        if self._empty_embedding is None:
            self._empty_embedding = self.encode_prompts([""], unconditional=True)
        return self._empty_embedding

    def pipeline_prompts(self, prompts: list[str]) -> dict:
        """The validation pipeline's prompt arguments: this module's own conditioning (caption
        template and learned tokens applied) against the empty prompt's."""
        return {
            "prompt_embeds": self.prompt_conditioning(prompts),
            "negative_prompt_embeds": self.prompt_conditioning(prompts, unconditional=True),
        }

    def native_resolution(self, pipe) -> int:
        """The image side the model generates by default."""
        return self.unet.config.sample_size * pipe.vae_scale_factor

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """One image per (prompt, seed) as [N, 3, H, W] in [0, 1]: the validation images."""
        return pipeline_images(self, prompts, seeds)

    def on_validation_start(self) -> None:
        self._ema_swap = self.use_ema_weights()
        self._ema_swap.__enter__()

    def on_validation_end(self) -> None:
        self._ema_swap.__exit__(None, None, None)

    def on_validation_epoch_end(self) -> None:
        images, self._validation_images = self._validation_images, None
        if images is not None:
            log_grid(self, images)

    # --- export -------------------------------------------------------------------------

    def on_fit_end(self) -> None:
        export_at_fit_end(self)

    def load_trained(self, checkpoint: dict) -> None:
        """The trained weights (and EMA, if kept) of a checkpoint dict; every trained weight must
        be there. The frozen ones are the backbone's already."""
        trainable = {unwrapped_name(name) for name, p in self.named_parameters() if p.requires_grad}
        state_dict = checkpoint["state_dict"]
        missing = trainable - state_dict.keys()
        if missing:
            raise KeyError(f"the state dict lacks trained weights, e.g. {sorted(missing)[:3]}")
        self.load_state_dict({k: v for k, v in state_dict.items() if k in trainable}, strict=False)
        if self.ema_decay is not None and "ema" in checkpoint:
            self.ema = EMAModel(trainable_parameters(self), decay=self.ema_decay)
            self.ema.load_state_dict(checkpoint["ema"])
