"""A domain language model (e.g. a biomedical BERT) in place of CLIP, through a learned projection.

Chambon 2022's "textual projection" (PubMedBERT) and RoentGen's frozen RadBERT / SapBERT runs.
The U-Net's cross-attention expects CLIP's width, so a linear projection maps the encoder's
hidden states onto it. Diffusers has no pipeline for this pairing, so the export is a medsd
folder that `load_domain_text_pipeline` turns into a callable pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .backbones import TINY_BERT, load_text_encoder
from .diffusion import DiffusionModule
from .domain_text_pipeline import project, save_domain_text_export
from .optimization import trainable_parameters
from .prompts import PromptTokenizer


class DomainTextEncoderFineTuning(DiffusionModule):
    """Condition the U-Net on a transformers encoder through a trained projection.

    Args:
        text_model: hub id or folder of any transformers encoder (`medsd/tiny-bert` for tests).
        train_text_encoder: fine-tune the encoder too (False: frozen, as in RoentGen).
        train_unet: fine-tune the U-Net too (False: only the projection learns, as in Chambon's
            textual projection).
        max_length: tokens per prompt (prompts are padded to it, as CLIP's are to 77).
        text_model_random_init: build the encoder from its shipped architecture config with random
            weights (and a stand-in character tokenizer), no download; None: as the backbone's
            `random_init`, so that one flag builds the whole model.
    """

    def __init__(
        self,
        text_model: str = TINY_BERT,
        text_model_revision: str | None = None,
        train_text_encoder: bool = False,
        train_unet: bool = True,
        text_encoder_lr: float | None = None,
        max_length: int = 128,
        text_model_random_init: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)  # backbone, objective, optimizer, ...: see DiffusionModule
        if text_model_random_init is None:
            text_model_random_init = self.backbone_spec.random_init
        self.tokenizer, self.text_encoder = load_text_encoder(
            text_model, text_model_revision, text_model_random_init
        )
        self.max_length = max_length
        self.text_encoder_lr = text_encoder_lr
        self.projection = nn.Linear(
            self.text_encoder.config.hidden_size, self.unet.config.cross_attention_dim
        )
        self.text_encoder.requires_grad_(train_text_encoder)
        if getattr(self.text_encoder, "pooler", None) is not None:
            # Only the hidden states condition the U-Net; a pooler that never receives a gradient
            # would make DDP fail on unused parameters.
            self.text_encoder.pooler.requires_grad_(False)
        self.unet.requires_grad_(train_unet)
        self.enable_gradient_checkpointing()

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer(self.tokenizer, max_length=self.max_length)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return project(self.text_encoder, self.projection, input_ids, attention_mask)

    def text_conditioning_is_frozen(self) -> bool:
        return False  # the projection always trains

    def parameter_groups(self) -> list[dict]:
        text_group = {"params": trainable_parameters(self.text_encoder)}
        if self.text_encoder_lr is not None:
            text_group["lr"] = self.text_encoder_lr
        rest = trainable_parameters(self.unet) + trainable_parameters(self.projection)
        return [{"params": rest}, text_group]

    def export(self, folder: Path) -> dict:
        return save_domain_text_export(folder, self, self.projection, self.max_length)
