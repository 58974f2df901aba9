"""A compact domain model trained from scratch (MSDM, "Prompt to Polyp"): first a VAE on the domain's
images, then a U-Net on its latents, conditioned on a frozen text encoder.

    medsd fit --config experiments/configs/tiny/compact_vae.yaml   # 1. VAETraining -> runs/.../export
    medsd fit --config experiments/configs/tiny/compact.yaml       # 2. CompactDiffusion on that VAE

Nothing is pretrained but the text encoder: a CLIP text model (MSDM uses CLIP ViT-L/14 with 64
tokens) or any transformers encoder such as a biomedical BERT, whose hidden states condition the
U-Net directly (the U-Net is new, so its cross-attention is simply built at the encoder's width).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from diffusers import AutoencoderKL

from .backbones import TINY_CLIP, BackboneSpec
from .diffusion import DiffusionModule
from .domain_text_pipeline import save_domain_text_export
from .export import write_export_folder
from .families import registered
from .optimization import adamw_with_schedule
from .pipelines import resolve_source
from .settings import Objective, Optimizer, Validation

log = logging.getLogger(__name__)


class VAETraining(L.LightningModule):
    """Train a diffusers `AutoencoderKL` from scratch on the DataModule's images ([-1, 1]).

    The loss is Stable Diffusion's `LPIPSWithDiscriminator` formula (also MSDM's): a reconstruction
    term `l1_weight * |x - x'| + mse_weight * (x - x')^2` SUMMED over channels and pixels of each
    image, plus `kl_weight` times the KL divergence of the posterior from N(0, I) SUMMED over the
    latent of each image, both averaged over the batch. The default `kl_weight` 1e-6 is SD's and
    MSDM's, and it only means what it means there against a reconstruction on their scale: a
    per-pixel mean would make the same weight C*H*W times stronger (about 2e5 at 256 px). The KL
    term only keeps the latent space smooth and bounded; with a large weight the VAE would blur.

    SD divides the reconstruction by a learnable `exp(logvar)` and adds `logvar`, with `logvar`
    starting at 0, so at initialisation its loss is exactly this one; medsd keeps `logvar` fixed at
    0. There is no perceptual (LPIPS) or adversarial term either, so reconstructions are a little
    softer than Stable Diffusion's; that is the price of needing no pretrained network.

    At the end of fit the VAE is exported to `<default_root_dir>/export` (diffusers
    `save_pretrained`), with `scaling_factor` set to 1 / the std of its latents over
    `scale_batches` training batches: the diffusion model's noise is unit Gaussian, so its latents
    must have unit variance for the noise schedule to destroy and rebuild them as designed.

    Args:
        block_out_channels: widths per level; the image shrinks 2x per level after the first
            (MSDM: [64, 128, 256, 512], 8x).
        latent_channels: channels of the latent (MSDM: 8).
        image_size: the training resolution, recorded as the VAE's `sample_size`.
    """

    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (16, 32),
        latent_channels: int = 4,
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        image_size: int = 32,
        l1_weight: float = 1.0,
        mse_weight: float = 0.0,
        kl_weight: float = 1e-6,
        scale_batches: int = 16,
        optimizer: Optimizer | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        n = len(block_out_channels)
        self.vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=image_size,
        )
        self.l1_weight, self.mse_weight, self.kl_weight = l1_weight, mse_weight, kl_weight
        self.scale_batches = scale_batches
        self.optimizer_settings = optimizer or Optimizer(lr=1e-4, schedule="constant")

    def losses(self, pixel_values: torch.Tensor, sample: bool) -> dict[str, torch.Tensor]:
        posterior = self.vae.encode(pixel_values).latent_dist
        latents = posterior.sample() if sample else posterior.mode()
        error = self.vae.decode(latents).sample - pixel_values
        batch_size = len(pixel_values)
        # Sums per image, means over the batch: the scale SD's kl_weight was chosen against (see
        # the class docstring). diffusers' kl() already sums over the latent's C, H, W per image.
        per_pixel = self.l1_weight * error.abs() + self.mse_weight * error.pow(2)
        terms = {
            "reconstruction": per_pixel.sum() / batch_size,
            "kl": posterior.kl().sum() / batch_size,
        }
        terms["loss"] = terms["reconstruction"] + self.kl_weight * terms["kl"]
        return terms

    def loss_of_batch(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """One training loss: what cost accounting counts FLOPs on."""
        return self.losses(batch["pixel_values"], sample=True)["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.losses(batch["pixel_values"], sample=True)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=len(batch["pixel_values"]))
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # The mode: comparable across epochs. val/loss is the reconstruction alone (summed over the
        # pixels of an image, batch mean), what the checkpoint keeps the best of.
        terms = self.losses(batch["pixel_values"], sample=False)
        self.log("val/loss", terms["reconstruction"], sync_dist=True, batch_size=len(batch["pixel_values"]))
        return terms["loss"]

    def configure_optimizers(self):
        return adamw_with_schedule(self, [{"params": list(self.parameters())}], self.optimizer_settings)

    @torch.no_grad()
    def latent_std(self, batches) -> float:
        """The std of the latents the diffusion model will train on, over `batches` of images.

        Those latents are posterior draws mean + std * eps, whose variance over all elements is
        Var(mean) + E[std^2]: computed exactly, so no noise is drawn.
        """
        total = square = variance = count = 0.0
        for batch in batches:
            posterior = self.vae.encode(batch["pixel_values"].to(self.device)).latent_dist
            mean = posterior.mean.double()
            total += mean.sum().item()
            square += mean.pow(2).sum().item()
            variance += posterior.var.double().sum().item()
            count += mean.numel()
        mean_of_means = total / count
        return math.sqrt(square / count - mean_of_means**2 + variance / count)

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            self.vae.eval()
            loader = self.trainer.datamodule.train_dataloader()
            batches = (batch for i, batch in zip(range(self.scale_batches), loader, strict=False))
            std = self.latent_std(batches)
            self.vae.register_to_config(scaling_factor=1.0 / std)
            folder = Path(self.trainer.default_root_dir) / "export"

            def write(scratch: Path) -> dict:
                self.vae.save_pretrained(scratch, safe_serialization=True)
                return {"format": "diffusers-autoencoder", "scaling_factor": 1.0 / std}

            write_export_folder(self, folder, write, global_step=self.global_step)
            log.info("exported the VAE (latent std %.4g) to %s", std, folder)
        self.trainer.strategy.barrier("medsd-export")


class CompactDiffusion(DiffusionModule):
    """A new U-Net trained on the latents of a `VAETraining` VAE, conditioned on a frozen text encoder.

    Everything in the U-Net trains; the VAE and the text encoder stay frozen. The noise schedule is
    Stable Diffusion's (1,000 steps, scaled-linear betas, epsilon prediction) and the sampler DDIM,
    as in MSDM; its L1 loss and 0.2 conditioning dropout are `objective.loss` and
    `objective.caption_dropout`.

    Args:
        vae: a VAETraining run folder or its export (any local diffusers AutoencoderKL folder
            works). A local folder only: a path that does not exist is the VAE step not run yet,
            and is said so rather than looked up on the hub.
        text_model: `medsd/tiny-clip`, a transformers CLIP folder or hub id (MSDM:
            `openai/clip-vit-large-patch14`), or any other transformers encoder (`medsd/tiny-bert`,
            a biomedical BERT); its hidden size sets the U-Net's cross-attention width.
        text_model_random_init: build the text encoder from its shipped architecture config with
            random weights, no download (see BackboneSpec.random_init).
        max_length: tokens per prompt (MSDM: 64); at most the encoder's position limit.
        image_size: training resolution; the U-Net's sample size is this over the VAE's factor.
        block_out_channels: U-Net widths per level (MSDM: [256, 256, 512, 1024]); every level but
            the deepest has cross-attention, as in Stable Diffusion.
        time_embedding_dim: None: 4x the first width (1,024 for MSDM's widths).
        dropout: in the U-Net's ResNet blocks (MSDM: 0.1).
        objective, optimizer, validation, ema_decay, gradient_checkpointing: see DiffusionModule.

    The export is a diffusers StableDiffusionPipeline folder for a CLIP encoder, and
    `load_domain_text_pipeline`'s folder for any other; `medsd sample` reads either.
    """

    family = registered("compact")
    part_options = ("text_model", "text_model_revision", "max_length", "unet_settings")
    part_options += ("text_model_random_init",)

    def __init__(
        self,
        vae: str,
        text_model: str = TINY_CLIP,
        text_model_revision: str | None = None,
        text_model_random_init: bool = False,
        max_length: int = 64,
        image_size: int = 32,
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        norm_num_groups: int = 32,
        time_embedding_dim: int | None = None,
        dropout: float = 0.0,
        objective: Objective | None = None,
        optimizer: Optimizer | None = None,
        validation: Validation | None = None,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
    ):
        # The family's loader, which the base __init__ calls, builds the parts from these.
        self.vae_source = resolve_source(vae)
        if not isinstance(self.vae_source, Path):
            raise FileNotFoundError(
                f"the compact model's VAE folder {vae} does not exist ({Path(vae).absolute()}): it is "
                "made by the VAE step, a `medsd fit` of a VAETraining config (e.g. experiments/configs/"
                f"tiny/compact_vae.yaml) with --trainer.default_root_dir {vae}; run that first, or pass a "
                "diffusers AutoencoderKL folder"
            )
        self.text_model, self.text_model_revision = text_model, text_model_revision
        self.text_model_random_init = text_model_random_init
        self.max_length = max_length
        self.unet_settings = dict(
            image_size=image_size,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            time_embedding_dim=time_embedding_dim,
            dropout=dropout,
        )
        super().__init__(
            # Stands for "where the frozen parts come from" in caches and the export's manifest.
            backbone=BackboneSpec(name_or_path=str(self.vae_source)),
            objective=objective,
            optimizer=optimizer,
            validation=validation,
            ema_decay=ema_decay,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.unet.requires_grad_(True)
        self.enable_gradient_checkpointing()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.uses_clip:
            return super().encode_text(input_ids, attention_mask)  # unmasked, as diffusers' pipeline does
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def export(self, folder: Path) -> dict:
        if self.uses_clip:
            self.build_pipeline().save_pretrained(folder, safe_serialization=True)
            return {"format": "diffusers-pipeline"}
        return save_domain_text_export(folder, self, None, self.max_length)
