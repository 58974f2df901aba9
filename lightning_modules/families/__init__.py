"""The model families medsd adapts, one file each, and the table that names them.

A family file holds what is particular to a model family outside training: how its parts load
(from a hub id or folder, or built tiny from config for tests and demos), which part does what,
how a diffusers pipeline is built over its parts, and how its own exports load. Its `FAMILY`
record says so; the training core (`diffusion.py`), `pipelines.py` and `sharding.py` look families
up here instead of knowing them. Adding a family is one file here and one line in REGISTRY.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from ..latents import KL_LATENTS, LatentCodec

# Family name -> the module (in this package) whose FAMILY describes it.
REGISTRY = {
    "stable-diffusion": ".stable_diffusion",
    "sdxl": ".sdxl",
    "flux": ".flux",
    "kandinsky": ".kandinsky",
    "compact": ".compact",
}


def sample_size_times_scale(pipe) -> int:
    """The image side of a U-Net pipeline by default: the U-Net's sample size in pixels."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def embedding_prompts(module, prompts: list[str]) -> dict:
    """A pipeline's prompt arguments for a strategy module's validation images: its own
    conditioning (caption template and learned tokens applied) against the empty prompt's."""
    return {
        "prompt_embeds": module.kept_conditioning(prompts),
        "negative_prompt_embeds": module.kept_conditioning(prompts, unconditional=True),
    }


@dataclass(frozen=True)
class Family:
    """What the rest of medsd needs to know about one model family.

    load: `(spec, **options) -> parts`, a dataclass whose fields are the parts under the names a
        strategy module then holds them by (tiny models included, by their `medsd/...` names).
    pipeline: `(parts, sampler=None) -> pipeline`, a diffusers pipeline over the parts of anything
        with those attributes (a parts object or a strategy module), no copies; `sampler` names
        another diffusers scheduler class for the model's own sampler config.
    tiny_models: `medsd/...` name -> builder of those parts (random weights, no download).
    denoiser, autoencoder, text_encoders: the parts' roles, by attribute name. `text_encoders`
        are what sits between a prompt and the denoiser's conditioning in training: what a prepared
        cache replaces and what leaves the GPU then (none when training conditions on images).
    latents: how the autoencoder maps images to the denoiser's latents and back.
    block_classes: class names of the repeated blocks FSDP shards as units.
    precisions: the only Trainer precisions the family trains under (None: any medsd allows),
        with `precision_reason` saying why.
    pipeline_classes: diffusers pipeline class names (a folder's model_index `_class_name`, or a
        built pipeline's class) that belong to this family.
    native_size: the image side a built pipeline of this family samples at by default.
    pipeline_prompts: `(module, prompts) -> dict`, the prompt arguments of the family's pipeline
        for a strategy module's validation images.
    load_folder: `(path, revision, dtype) -> pipeline` for a pipeline folder of this family that
        `DiffusionPipeline.from_pretrained` alone cannot make text-to-image; None: it can.
    load_export: `(folder, manifest, base_model, dtype) -> pipeline` for this family's exports;
        None: the export's `format` says how it loads.
    exports_apply_to_base: whether every export of the family is a delta on its manifest's base
        model (whose sampler it keeps), whatever its format.
    """

    name: str
    load: Callable[..., Any]
    pipeline: Callable[..., Any]
    tiny_models: Mapping[str, Callable[[], Any]] = field(default_factory=dict)
    denoiser: str = "unet"
    autoencoder: str = "vae"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    latents: LatentCodec = KL_LATENTS
    block_classes: frozenset[str] = frozenset()
    precisions: tuple[str, ...] | None = None
    precision_reason: str = ""
    pipeline_classes: tuple[str, ...] = ()
    native_size: Callable[[Any], int] = sample_size_times_scale
    pipeline_prompts: Callable[[Any, list[str]], dict] = embedding_prompts
    load_folder: Callable[..., Any] | None = None
    load_export: Callable[..., Any] | None = None
    exports_apply_to_base: bool = False

    def tiny_pipeline(self, name: str):
        """The tiny model `name` as a pipeline: the same weights every training run starts from."""
        return self.pipeline(self.tiny_models[name]())


@cache
def registered(name: str) -> Family:
    """The family registered as `name`."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model family {name!r}: registered are {sorted(REGISTRY)}")
    return importlib.import_module(REGISTRY[name], __name__).FAMILY


def all_families() -> list[Family]:
    return [registered(name) for name in REGISTRY]


def tiny_model_family(name: str) -> Family | None:
    """The family whose tiny model is called `name` (e.g. `medsd/tiny-flux`), if any."""
    return next((f for f in all_families() if name in f.tiny_models), None)


def pipeline_family(class_name: str) -> Family | None:
    """The family a diffusers pipeline class (by name) belongs to, if any registered one claims it."""
    return next((f for f in all_families() if class_name in f.pipeline_classes), None)
