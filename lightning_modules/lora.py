"""LoRA adapters on the U-Net's attention projections, trained and exported through peft."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from .diffusion import DiffusionModule

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_lora(model, rank: int, alpha: float | None, dropout: float, target_modules: list[str]) -> None:
    """Gaussian-initialised LoRA adapters (alpha defaults to the rank) on a diffusers model's
    `target_modules`; `add_adapter` leaves only the adapter weights trainable."""
    model.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=target_modules,
        )
    )


class LoRAFineTuning(DiffusionModule):
    """Low-rank adapters on the U-Net; everything else frozen.

    The export, `pytorch_lora_weights.safetensors`, loads into the base model's pipeline with
    diffusers' `pipe.load_lora_weights(folder)`.
    """

    def __init__(
        self,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)  # backbone, objective, optimizer, ...: see DiffusionModule
        self.rank = rank
        add_lora(self.unet, rank, alpha, dropout, target_modules or ATTENTION_PROJECTIONS)
        self.enable_gradient_checkpointing()

    def export(self, folder: Path) -> dict:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
        return {"format": "diffusers-lora", "rank": self.rank}
