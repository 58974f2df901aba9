"""LoRA adapters on the U-Net's attention projections, trained and exported through peft."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from .diffusion import DiffusionModule

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


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
        self.unet.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=alpha if alpha is not None else rank,
                lora_dropout=dropout,
                init_lora_weights="gaussian",
                target_modules=target_modules or ATTENTION_PROJECTIONS,
            )
        )  # add_adapter makes only the adapter weights trainable
        self.enable_gradient_checkpointing()

    def export(self, folder: Path) -> dict:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
        return {"format": "diffusers-lora", "rank": self.rank}
