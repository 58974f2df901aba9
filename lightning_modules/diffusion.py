"""The LightningModule every strategy builds on: the training loop, its loss, optimiser, EMA and
checkpoints. A strategy decides which parameters train, how a prompt becomes the denoiser's
conditioning, and what its export holds; its `family` (`families/`) brings the model's parts and
their roles. Precision, validation images, kept text conditioning and the export have their own
modules."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from diffusers.training_utils import EMAModel
from torch import nn

from datamodules.cache import PreparedCache

from .backbones import BackboneSpec
from .conditioning import Conditioning, from_arrays
from .export import export_at_fit_end
from .families import Family, registered
from .modes import log_modes, set_modes
from .objectives import ddpm_loss, drop_captions
from .optimization import adamw_with_schedule, checkpoint_trained_parts, trainable_parameters
from .precision import apply_precision_policy, refuse_half_trained_weights
from .prompts import PromptTokenizer
from .settings import Objective, Optimizer, Validation
from .sharding import is_sharded
from .text_conditioning import KeptConditioning, cached_text_fits, encode_tokenized, release_text_encoders
from .trained_weights import ema_weights, keep_trained
from .validation_images import log_grid, pipeline_images, render_rank_share

log = logging.getLogger(__name__)


class DiffusionModule(L.LightningModule):
    """Base of the strategies (not used on its own).

    Args:
        backbone: which pretrained model to adapt (of the strategy's `family`).
        objective: noise, timesteps and loss weighting.
        optimizer: AdamW and its learning-rate schedule.
        validation: the prompts rendered into the TensorBoard image grid.
        ema_decay: keep an exponential moving average of the trainable weights, used for
            validation images and the export (e.g. 0.9999); None disables it.
        gradient_checkpointing: trade compute for memory in the parts that train.
    """

    family: ClassVar[Family] = registered("stable-diffusion")
    # Attributes set before `__init__` that the family's loader takes as keyword arguments.
    part_options: ClassVar[tuple[str, ...]] = ()

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

        parts = self.family.load(self.backbone_spec, **{k: getattr(self, k) for k in self.part_options})
        for part in fields(parts):  # each part under its family's name: self.unet, self.vae, ...
            setattr(self, part.name, getattr(parts, part.name))
        if self.backbone_spec.dtype is not None:
            self.to(self.backbone_spec.torch_dtype)  # what loading gave, and the tiny models too
        self.requires_grad_(False)  # strategies switch on what they train
        # Checkpoints hold only what trains; frozen weights come from the backbone again.
        self.strict_loading = False
        self.ema: EMAModel | None = None
        self._vae_dtype = next(self.autoencoder.parameters()).dtype
        self._cached_text = False  # set in setup() when a prepared cache's embeddings fit this run
        self.kept_conditioning = KeptConditioning(self)
        self._validation_images: torch.Tensor | None = None

    @property
    def autoencoder(self) -> nn.Module:
        return getattr(self, self.family.autoencoder)

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer(self.tokenizer)

    def parameter_groups(self) -> list[dict]:
        """Optimiser parameter groups; a group may carry its own `lr`."""
        return [{"params": trainable_parameters(self)}]

    def text_encoders(self) -> list[nn.Module]:
        """The modules between a prompt and the conditioning: what a prepared cache replaces."""
        return [getattr(self, name) for name in self.family.text_encoders]

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

    def enable_gradient_checkpointing(self) -> None:
        if self.gradient_checkpointing:
            checkpoint_trained_parts([getattr(self, self.family.denoiser), *self.text_encoders()])

    def train(self, mode: bool = True):
        """What trains in train mode, the frozen parts in eval mode (see `modes.py`); `eval()` too
        comes here, with everything in eval mode."""
        set_modes(self, mode)
        return self

    def on_train_start(self) -> None:
        # Lightning keeps the modes the parts were loaded in (eval, from `from_pretrained`).
        self.train()
        log_modes(self)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "tokenizer", "absent") is None:
            datamodule.tokenizer = self.prompt_tokenizer  # tokenise in the DataLoader workers
        if getattr(datamodule, "cache_dir", None):
            self._cached_text = cached_text_fits(self, PreparedCache(datamodule.cache_dir))
        self._vae_dtype = apply_precision_policy(self, self.trainer)
        if self.ema_decay is not None and self.ema is None:
            self.ema = EMAModel(trainable_parameters(self), decay=self.ema_decay)

    def on_fit_start(self) -> None:
        refuse_half_trained_weights(str(self.trainer.precision))
        if self.ema is not None:
            self.ema.to(self.device)
        if self._cached_text and self.text_encoders() and not is_sharded(self.trainer):
            # (Sharded encoders hold 1/N of their weights and run only inside FSDP's forward.)
            release_text_encoders(self)

    @torch.no_grad()
    def latent_posterior(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> the autoencoder posterior's mean and std, fp32 (the autoencoder
        never sees autocast): what a prepared cache stores."""
        with torch.autocast(self.device.type, enabled=False):
            pixels = pixel_values.to(self.device, self._vae_dtype)
            return self.family.latents.posterior(self.autoencoder, pixels)

    def batch_latents(self, batch: dict, generator: torch.Generator | None) -> torch.Tensor:
        """Latents of a batch of images, or of a prepared cache's posteriors (`medsd prepare`)."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
        else:
            mean, std = self.latent_posterior(batch["pixel_values"])
        return self.family.latents.sample(self.autoencoder, mean, std, generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> images in [0, 1], fp32, outside autocast like `latent_posterior`."""
        with torch.autocast(self.device.type, enabled=False):
            images = self.family.latents.decode(self.autoencoder, latents.to(self._vae_dtype))
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def text_conditioning_is_frozen(self) -> bool:
        """True when nothing between the prompt and the U-Net trains, so text embeddings can be cached."""
        return not any(p.requires_grad for encoder in self.text_encoders() for p in encoder.parameters())

    def cache_identity(self) -> dict:
        """What a prepared cache's latents and text embeddings must come from to be reused here."""
        spec = self.backbone_spec
        text = self.prompt_tokenizer.identity if self.text_conditioning_is_frozen() else None
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
                embeds = drop_captions(
                    embeds, self.kept_conditioning.empty_prompt(), caption_dropout, generator
                )
            return embeds
        if "input_ids" not in batch:
            raise KeyError(
                "the batch has no 'input_ids': give the DataModule this module's "
                "prompt_tokenizer (medsd's Trainer setup does this automatically)"
            )
        tokens = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if caption_dropout > 0:
            # Ids and mask are dropped together (one draw): a BERT-like encoder reads the mask,
            # and must see the empty prompt's, as at sampling time.
            tokens = drop_captions(tokens, self.prompt_tokenizer.unconditional(), caption_dropout, generator)
        return self.encode_text(tokens["input_ids"], tokens["attention_mask"])

    def diffusion_step(
        self, batch: dict, generator: torch.Generator | None, caption_dropout: float
    ) -> torch.Tensor:
        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.denoise(noisy, timesteps, self.batch_conditioning(batch, generator, caption_dropout))

        return ddpm_loss(
            self.noise_scheduler, self.objective, self.batch_latents(batch, generator), generator, predict
        )

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

    def configure_optimizers(self):
        return adamw_with_schedule(self, self.parameter_groups(), self.optimizer_settings)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()
        if self.ema is not None:
            self.ema.step(trainable_parameters(self))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trained(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def build_pipeline(self, sampler: str | None = None):
        """The family's diffusers pipeline over this module's own parts (no copies)."""
        return self.family.pipeline(self, sampler)

    def encode_prompts(self, prompts: list[str], unconditional: bool = False) -> Conditioning:
        """Prompt texts (caption template applied) or, if `unconditional`, as many empty prompts ->
        the conditioning, on this module's device."""
        return encode_tokenized(self, prompts, unconditional)

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """One image per (prompt, seed) as [N, 3, H, W] in [0, 1]: the validation images."""
        return pipeline_images(self, prompts, seeds)

    def on_validation_start(self) -> None:
        self._ema_swap = ema_weights(self)
        self._ema_swap.__enter__()

    def on_validation_end(self) -> None:
        self._ema_swap.__exit__(None, None, None)

    def on_validation_epoch_end(self) -> None:
        images, self._validation_images = self._validation_images, None
        if images is not None:
            log_grid(self, images)

    def on_fit_end(self) -> None:
        export_at_fit_end(self)
