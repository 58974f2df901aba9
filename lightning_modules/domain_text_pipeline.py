"""The export format of models conditioned on a domain text encoder (a BERT-like model, with or
without a projection onto the U-Net's width): diffusers has no pipeline for the pairing, so the
folder holds the parts and `load_domain_text_pipeline` makes a callable pipeline of them.
Written by `DomainTextEncoderFineTuning` and by `CompactDiffusion` with a BERT-like encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from .backbones import build_sampler
from .export import read_export_manifest
from .families.stable_diffusion import unet_pipeline
from .prompts import PromptTokenizer

PROJECTION_FILE = "text_projection.safetensors"
# The manifest's `loader` field of every export that `load_domain_text_pipeline` reads.
DOMAIN_TEXT_LOADER = "lightning_modules.load_domain_text_pipeline"


def save_domain_text_export(folder: Path, module, projection: nn.Linear | None, max_length: int):
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
    pipeline = unet_pipeline(
        AutoencoderKL.from_pretrained(folder / "vae"),
        UNet2DConditionModel.from_pretrained(folder / "unet"),
        dict(DDPMScheduler.load_config(folder / "scheduler")),
    )
    return DomainTextPipeline(
        pipeline,
        AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder,
        projection.eval(),
        manifest["max_length"],
    )
