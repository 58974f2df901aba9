"""Full fine-tuning of the U-Net and/or the CLIP text encoder (Chambon 2022, RoentGen)."""

from __future__ import annotations

from pathlib import Path

from .diffusion import DiffusionModule, trainable_parameters


class FineTuning(DiffusionModule):
    """Train the U-Net, the CLIP text encoder, or both; the VAE always stays frozen.

    U-Net only is Chambon's best configuration and RoentGen's baseline; U-Net + text encoder is
    RoentGen's best. text_encoder_lr gives the text encoder its own learning rate (default: the
    optimiser's). The export is a complete diffusers pipeline folder.
    """

    def __init__(
        self,
        train_unet: bool = True,
        train_text_encoder: bool = False,
        text_encoder_lr: float | None = None,
        **kwargs,
    ):
        if not (train_unet or train_text_encoder):
            raise ValueError("FineTuning needs train_unet or train_text_encoder (or both)")
        super().__init__(**kwargs)  # backbone, objective, optimizer, ...: see DiffusionModule
        self.text_encoder_lr = text_encoder_lr
        self.unet.requires_grad_(train_unet)
        self.text_encoder.requires_grad_(train_text_encoder)
        self.enable_gradient_checkpointing()

    def parameter_groups(self) -> list[dict]:
        text_group = {"params": trainable_parameters(self.text_encoder)}
        if self.text_encoder_lr is not None:
            text_group["lr"] = self.text_encoder_lr
        return [{"params": trainable_parameters(self.unet)}, text_group]

    def export(self, folder: Path) -> dict:
        self.build_pipeline().save_pretrained(folder, safe_serialization=True)
        return {"format": "diffusers-pipeline"}
