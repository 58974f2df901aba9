"""A domain language model (e.g. a biomedical BERT) in place of CLIP, through a learned projection.

Chambon 2022's "textual projection" (PubMedBERT) and RoentGen's frozen RadBERT / SapBERT runs.
The U-Net's cross-attention expects CLIP's width, so a linear projection maps the encoder's
hidden states onto it. Diffusers has no pipeline for this pairing, so the export is a medsd
folder that `load_domain_text_pipeline` turns into a callable pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from .backbones import TINY_BERT, build_sampler, load_text_encoder
from .diffusion import DiffusionModule, trainable_parameters
from .export import read_export_manifest
from .prompts import PromptTokenizer

PROJECTION_FILE = "text_projection.safetensors"
# The manifest's `loader` field of every export that `load_domain_text_pipeline` reads.
DOMAIN_TEXT_LOADER = "lightning_modules.load_domain_text_pipeline"


class DomainTextEncoderFineTuning(DiffusionModule):
    """Condition the U-Net on a transformers encoder through a trained projection.

    Args:
        text_model: hub id or folder of any transformers encoder (`medsd/tiny-bert` for tests).
        train_text_encoder: fine-tune the encoder too (False: frozen, as in RoentGen).
        train_unet: fine-tune the U-Net too (False: only the projection learns, as in Chambon's
            textual projection).
        max_length: tokens per prompt (prompts are padded to it, as CLIP's are to 77).
    """

    def __init__(
        self,
        text_model: str = TINY_BERT,
        text_model_revision: str | None = None,
        train_text_encoder: bool = False,
        train_unet: bool = True,
        text_encoder_lr: float | None = None,
        max_length: int = 128,
        **kwargs,
    ):
        super().__init__(**kwargs)  # backbone, objective, optimizer, ...: see DiffusionModule
        self.tokenizer, self.text_encoder = load_text_encoder(text_model, text_model_revision)
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

    def build_pipeline(self, sampler: str | None = None) -> StableDiffusionPipeline:
        # No CLIP here: the pipeline is only ever called with prompt embeddings.
        return _pipeline(self.vae, self.unet, build_sampler(self.sampler_config, sampler))

    def export(self, folder: Path) -> dict:
        return save_domain_text_export(folder, self, self.projection, self.max_length)


def save_domain_text_export(
    folder: Path, module: DiffusionModule, projection: nn.Linear | None, max_length: int
):
    """Write `module`'s U-Net, VAE, sampler, text encoder and tokenizer, and the projection (None:
    the encoder's states condition the U-Net as they are) for `load_domain_text_pipeline`; returns
    the manifest fields that loader needs."""
    module.unet.save_pretrained(folder / "unet", safe_serialization=True)
    module.vae.save_pretrained(folder / "vae", safe_serialization=True)
    build_sampler(module.sampler_config).save_pretrained(folder / "scheduler")
    module.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    module.tokenizer.save_pretrained(folder / "tokenizer")
    if projection is not None:
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in projection.state_dict().items()},
            folder / PROJECTION_FILE,
        )
    return {"max_length": max_length, "loader": DOMAIN_TEXT_LOADER}


def project(
    encoder: nn.Module, projection: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return projection(hidden)


def _pipeline(vae, unet, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class DomainTextPipeline:
    """Text-to-image with a domain text encoder: encodes prompts, then runs diffusers' pipeline.

    `pipe(["left pleural effusion"], num_inference_steps=50, guidance_scale=4.0)` accepts the
    keyword arguments of `StableDiffusionPipeline.__call__` and returns its output.
    """

    def __init__(self, pipeline, tokenizer, text_encoder, projection, max_length: int):
        self.pipeline = pipeline
        self.prompt_tokenizer = PromptTokenizer(tokenizer, max_length=max_length)
        self.text_encoder = text_encoder
        self.projection = projection

    def to(self, device) -> DomainTextPipeline:
        self.pipeline.to(device)
        self.text_encoder.to(device)
        self.projection.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str], unconditional: bool = False) -> torch.Tensor:
        tokens = (
            self.prompt_tokenizer.unconditional(len(prompts))
            if unconditional
            else self.prompt_tokenizer(prompts)
        )
        device = self.pipeline.device
        return project(
            self.text_encoder,
            self.projection,
            tokens["input_ids"].to(device),
            tokens["attention_mask"].to(device),
        )

    def __call__(self, prompt: str | list[str], **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self.pipeline(
            prompt_embeds=self.encode(prompts),
            negative_prompt_embeds=self.encode(prompts, unconditional=True),
            **kwargs,
        )


def load_domain_text_pipeline(folder: str | Path) -> DomainTextPipeline:
    """Load an export written by `save_domain_text_export` (a `DomainTextEncoderFineTuning` run, or a
    `CompactDiffusion` one with a BERT-like encoder)."""
    folder = Path(folder)
    manifest = read_export_manifest(folder)
    if manifest.get("loader") != DOMAIN_TEXT_LOADER:
        raise ValueError(f"{folder} holds a {manifest.get('strategy')} export, not a domain text one")
    text_encoder = AutoModel.from_pretrained(folder / "text_encoder").eval()
    projection = nn.Identity()
    if (folder / PROJECTION_FILE).is_file():
        weights = load_file(folder / PROJECTION_FILE)
        projection = nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
        projection.load_state_dict(weights)
    pipeline = _pipeline(
        AutoencoderKL.from_pretrained(folder / "vae"),
        UNet2DConditionModel.from_pretrained(folder / "unet"),
        build_sampler(dict(DDPMScheduler.load_config(folder / "scheduler"))),
    )
    return DomainTextPipeline(
        pipeline,
        AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder,
        projection.eval(),
        manifest["max_length"],
    )
