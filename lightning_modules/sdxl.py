"""Stable Diffusion XL for the Stable Diffusion strategies: two text encoders and size conditioning.

SDXL conditions its U-Net on the penultimate hidden states of two CLIP text encoders side by side
(CLIP ViT-L and OpenCLIP ViT-bigG), and through an added embedding on the second encoder's
pooled, projected text embedding plus six "micro-conditioning" numbers: the image's original
size, the top-left corner of its crop and the target size. `SDXLMixin` makes a strategy an SDXL
one (its parts and pipeline: `families/sdxl.py`); `SDXLFineTuning` and `SDXLLoRAFineTuning` are
the U-Net / first text encoder fine-tuning and LoRA strategies on an SDXL backbone (the second
encoder always stays frozen).

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

import torch
from torch import nn
from transformers import CLIPTokenizer

from .families import registered
from .fine_tuning import FineTuning
from .lora import LoRAFineTuning


def second_encoder_ids(input_ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """The first tokenizer's ids as the second tokenizer gives them: both share CLIP's vocabulary
    and differ only in the padding token after the end of the text."""
    is_eos = input_ids == eos_id
    after_first_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return input_ids.masked_fill(after_first_eos, pad_id)


class SDXLMixin:
    """The SDXL parts of a Stable Diffusion strategy (put it before the strategy in the bases)."""

    family = registered("sdxl")
    tokenizer_2: CLIPTokenizer
    text_encoder_2: nn.Module

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


class SDXLFineTuning(SDXLMixin, FineTuning):
    """`FineTuning` (U-Net and/or the first text encoder) on an SDXL backbone; exports a diffusers
    SDXL pipeline folder."""


class SDXLLoRAFineTuning(SDXLMixin, LoRAFineTuning):
    """`LoRAFineTuning` on an SDXL backbone's U-Net; the LoRA file loads with the SDXL pipeline's
    `load_lora_weights`."""
