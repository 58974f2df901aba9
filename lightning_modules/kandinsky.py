"""Fine-tuning the Kandinsky 2.2 decoder (its parts and pipelines: `families/kandinsky.py`).

Kandinsky 2.2 is two diffusion models. The prior turns a prompt (CLIP text encoder) into a CLIP
image embedding; the decoder, a U-Net conditioned on that embedding alone, denoises MoVQ latents.
The decoder never sees text, so it is trained on the CLIP image embedding of each training image
(from the frozen image encoder) and the prompts of a batch go unused; the prior stays frozen and is
only run to sample.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.functional as TF

from .backbones import TINY_KANDINSKY, BackboneSpec
from .diffusion import DiffusionModule
from .families import registered
from .families.kandinsky import KANDINSKY_PRIOR, LORA_WEIGHTS
from .lora import add_lora
from .objectives import drop_captions

# Every attention projection of the decoder's SimpleCrossAttn blocks: add_k_proj / add_v_proj are
# where the image embedding's tokens enter, so adapters there reach the conditioning path too.
DECODER_ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


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

    family = registered("kandinsky")
    part_options = ("prior_model",)

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
        self.prior_model = prior_model  # read by the family's loader, which the base __init__ calls
        super().__init__(backbone=backbone or BackboneSpec(TINY_KANDINSKY), **kwargs)
        self.lora_rank = lora_rank
        if lora_rank is None:
            self.unet.requires_grad_(True)
        else:
            targets = lora_target_modules or DECODER_ATTENTION_PROJECTIONS
            add_lora(self.unet, lora_rank, lora_alpha, lora_dropout, targets)
        self.enable_gradient_checkpointing()

    # --- loss ---------------------------------------------------------------------------

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

    def denoise(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """The decoder's prediction under image embeddings. The U-Net outputs the prediction and a
        learned variance stacked on the channels; the variance serves the sampler only."""
        output = self.unet(noisy, timesteps, None, added_cond_kwargs={"image_embeds": image_embeds}).sample
        return output[:, : noisy.shape[1]]

    # --- the prepared cache: MoVQ latents and CLIP image embeddings, both fixed per image ---

    def cache_identity(self) -> dict:
        spec = self.backbone_spec
        prior = self.prior_model or self._default_prior()
        return {"backbone": f"{spec.name_or_path}@{spec.revision}", "text": {"image_embeds": prior}}

    def cached_conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each image's CLIP image embedding: what conditions the decoder in training."""
        return {"image_embeds": self.image_embeddings(batch["pixel_values"])}

    def batch_conditioning(
        self, batch: dict, generator: torch.Generator | None, caption_dropout: float
    ) -> torch.Tensor:
        """Each training image's CLIP image embedding (the prepared cache's, or computed here); a
        dropped one becomes the all-zero image's, the pipeline's unconditional embedding."""
        if "text" in batch and self._cached_text:
            image_embeds = batch["text"]["image_embeds"]
        elif "pixel_values" in batch:
            image_embeds = self.image_embeddings(batch["pixel_values"])
        else:
            raise KeyError(
                "KandinskyDecoderTuning needs the batch's pixel_values, or a prepared cache's MoVQ "
                "latents and image embeddings"
            )
        if caption_dropout > 0:
            image_embeds = drop_captions(
                image_embeds, self.unconditional_embedding(), caption_dropout, generator
            )
        return image_embeds

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
