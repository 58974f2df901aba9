"""Any trained model or pretrained pipeline as one callable text-to-image pipeline.

`load_pipeline(source)` accepts what a user has at hand after training, without asking which
strategy made it: a run folder (its `export/` is used), an export folder (its
`medsd_export.json` says how to load it), a diffusers pipeline folder or hub id, or
`medsd/tiny-sd`. Exports that only hold a delta (textual inversion, LoRA) are applied to the base
model their manifest names. The result is called like diffusers' `StableDiffusionPipeline`
(`pipe(prompts, num_inference_steps=..., guidance_scale=..., generator=...)`); `render` does that
with one seeded CPU generator per image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, SchedulerMixin, StableDiffusionPipeline
from PIL import Image

from datamodules.atomic import recover_interrupted

from .backbones import BackboneSpec, _not_found, build_sampler, local_name, random_base
from .domain_text_pipeline import DOMAIN_TEXT_LOADER, DomainTextPipeline, load_domain_text_pipeline
from .export import EMBEDDINGS_FILE, MANIFEST, read_export_manifest
from .families import pipeline_family, registered, tiny_model_family

log = logging.getLogger(__name__)

# Strategies whose export is a diffusers LoRA file, loaded onto the base model by load_lora_weights.
# Export formats (the manifest's `format`) applied to the base model the manifest names.
LORA = "diffusers-lora"  # loaded by the pipeline's load_lora_weights
TEXTUAL_INVERSION = "diffusers-textual-inversion"

# Short names for the samplers papers use; any diffusers scheduler class name works too.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


class IncompatibleSamplerError(ValueError):
    """A sampler that cannot run the model's noise schedule (e.g. DDIM on a flow-matching model)."""


def resolve_source(source: str | Path) -> Path | str:
    """A run folder becomes its `export/`, any other local folder its absolute path; a string that
    names no local folder is returned as is (a hub id or `medsd/tiny-sd`)."""
    path = Path(source)
    if path.is_dir():
        recover_interrupted(path / "export")  # a run killed while replacing its export
    if (path / "export" / MANIFEST).is_file():
        return (path / "export").resolve()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ValueError(f"{source} is a file: pass a run, export or diffusers pipeline folder")
    return str(source)


def export_manifest(source: Path | str) -> dict | None:
    """The `medsd_export.json` of a resolved source, or None when it is not a medsd export."""
    if isinstance(source, Path) and (source / MANIFEST).is_file():
        return read_export_manifest(source)
    return None


def load_pipeline(
    source: str | Path,
    base_model: str | None = None,
    textual_inversion: Sequence[str | Path] = (),
    lora: Sequence[str | Path] = (),
    scheduler: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline | DomainTextPipeline:
    """Load `source` (see the module docstring) ready to sample from.

    base_model: the model a textual-inversion or LoRA export is applied to, in place of the one
        its manifest names (e.g. a local copy of a hub model on an offline machine).
    textual_inversion, lora: extra embeddings files / LoRA weights loaded on top, in order.
    scheduler: a name of SCHEDULERS or a diffusers scheduler class; None keeps the model's own.
    """
    resolved = resolve_source(source)
    manifest = export_manifest(resolved)
    if manifest is None:
        pipe, loras = base_pipeline(str(resolved), dtype=dtype), list(lora)
    else:
        pipe = _from_export(resolved, manifest, base_model, dtype)
        # A LoRA export loads with the extra LoRAs, which gives every one its own adapter name.
        loras = [resolved, *lora] if manifest.get("format") == LORA else list(lora)
    for path in textual_inversion:
        if isinstance(pipe, DomainTextPipeline):
            raise ValueError(
                "a domain text encoder export has no CLIP embeddings to add a textual inversion to"
            )
        pipe.load_textual_inversion(str(path))
    _load_loras(diffusers_pipeline(pipe), loras)
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    diffusers_pipeline(pipe).set_progress_bar_config(disable=True)
    return _to(pipe, device, dtype)


def base_pipeline(name_or_path: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """A pretrained diffusers pipeline, or a tiny one built from config (fp32; load_pipeline casts).

    The safety checker is left out: on medical images its NSFW classifier fires on anatomy and
    silently replaces images with black ones, which would corrupt a synthetic data set.
    """
    tiny = tiny_model_family(name_or_path)
    if tiny is not None:
        return tiny.tiny_pipeline(name_or_path)
    name_or_path = local_name(name_or_path)  # the shipped demo base
    try:
        components = DiffusionPipeline.load_config(name_or_path, revision=revision)
    except (OSError, ValueError) as error:
        raise _not_found("the pipeline", name_or_path, error) from error
    family = pipeline_family(components.get("_class_name", ""))
    if family is not None and family.load_folder is not None:
        return family.load_folder(name_or_path, revision, dtype)
    no_checker = {"safety_checker": None, "requires_safety_checker": False}
    extra = no_checker if "safety_checker" in components else {}
    return DiffusionPipeline.from_pretrained(name_or_path, revision=revision, dtype=dtype, **extra)


def model_sampler(source: str | Path, base_model: str | None = None) -> SchedulerMixin:
    """The sampler `source` ships with (see `load_pipeline`), read from its scheduler config
    without loading any weights (a tiny model is built: a fraction of a second), so that a
    sampler request can be checked before anything is written or rendered."""
    resolved = resolve_source(source)
    manifest = export_manifest(resolved)
    name, revision = str(resolved), None
    if manifest is not None and _applies_to_base(manifest):
        name = base_model or manifest["base_model"]
        revision = None if base_model else manifest.get("base_revision")
    tiny = tiny_model_family(name)
    if tiny is not None:
        return tiny.tiny_pipeline(name).scheduler
    if manifest is not None and not base_model and random_base(manifest):
        return build_sampler(BackboneSpec(name, random_init=True).architecture().sampler_config())
    try:  # any scheduler class reads the file; its `_class_name` names the model's
        config = DDPMScheduler.load_config(local_name(name), subfolder="scheduler", revision=revision)
    except (OSError, ValueError) as error:
        raise _not_found("the sampler config of", name, error) from error
    return build_sampler(dict(config))


def _family_of(manifest: dict):
    """The family an export's manifest names; for one written before manifests named it, the
    family of the strategy class that wrote it (None for a class without one, VAETraining)."""
    if "family" in manifest:
        return registered(manifest["family"])
    import lightning_modules  # here: only such old exports need the strategy classes

    return getattr(getattr(lightning_modules, manifest.get("strategy", ""), None), "family", None)


def _applies_to_base(manifest: dict) -> bool:
    """Whether an export holds a delta on its manifest's base model, whose sampler it keeps."""
    family = _family_of(manifest)
    return (family is not None and family.exports_apply_to_base) or manifest.get("format") in (
        LORA,
        TEXTUAL_INVERSION,
    )


def _from_export(folder: Path, manifest: dict, base_model: str | None, dtype: torch.dtype):
    """The pipeline an export describes: by its loader or family first, then by its format."""
    kind, family = manifest.get("format"), _family_of(manifest)
    if manifest.get("loader") == DOMAIN_TEXT_LOADER:  # DomainTextEncoderFineTuning, CompactDiffusion
        return load_domain_text_pipeline(folder)
    if family is not None and family.load_export is not None:
        return family.load_export(folder, manifest, base_model, dtype)
    if kind == "diffusers-pipeline":  # a complete pipeline folder (SD, SDXL, compact with CLIP)
        return base_pipeline(str(folder), dtype=dtype)
    if kind not in (LORA, TEXTUAL_INVERSION):
        raise ValueError(f"{folder}: don't know how to sample from a {manifest.get('strategy')} export")
    # The manifest's revision belongs to the manifest's base model, not to an override.
    revision = None if base_model else manifest.get("base_revision")
    random = {} if base_model else random_base(manifest)
    if random:  # a random-init run's base: its shipped architecture, the same random weights
        spec = BackboneSpec(manifest["base_model"], **random)
        pipe = family.pipeline(family.load(spec))
    else:
        pipe = base_pipeline(base_model or manifest["base_model"], revision, dtype)
    if kind == TEXTUAL_INVERSION:
        pipe.load_textual_inversion(str(folder / EMBEDDINGS_FILE))
    return pipe  # a LoRA export's weights are loaded by load_pipeline


def _load_loras(pipe: StableDiffusionPipeline, paths: Sequence[str | Path]) -> None:
    """Load each LoRA under its own adapter name and activate them all at full weight."""
    if paths and not hasattr(pipe, "load_lora_weights"):
        raise ValueError(
            f"{type(pipe).__name__} takes no --lora files (a model's own adapters come with its export)"
        )
    names = [f"lora_{i}" for i in range(len(paths))]
    for name, path in zip(names, paths, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if names:
        pipe.set_adapters(names)


def diffusers_pipeline(pipe: StableDiffusionPipeline | DomainTextPipeline) -> StableDiffusionPipeline:
    """The diffusers pipeline that holds the U-Net and the scheduler."""
    return pipe.pipeline if isinstance(pipe, DomainTextPipeline) else pipe


def set_scheduler(pipe: StableDiffusionPipeline | DomainTextPipeline, name: str) -> None:
    """Swap the sampler, keeping the model's noise schedule (betas, offsets, prediction type)."""
    inner = diffusers_pipeline(pipe)
    old, inner.scheduler = inner.scheduler, swapped_sampler(inner.scheduler, name)
    for part in vars(inner).values():  # a combined pipeline's stages hold their own reference
        if isinstance(part, DiffusionPipeline) and getattr(part, "scheduler", None) is old:
            part.scheduler = inner.scheduler


def swapped_sampler(sampler: SchedulerMixin, name: str) -> SchedulerMixin:
    """The sampler `name` (a SCHEDULERS short name or a diffusers class name) over the schedule of
    the model's `sampler`; refused unless diffusers lists it as able to run that schedule (its
    `compatibles`): DDIM, PNDM and the other DDPM samplers step through betas that a
    flow-matching model such as FLUX does not have (its pipeline fails on them)."""
    class_name = SCHEDULERS.get(name.lower(), name)
    if not class_name.endswith("Scheduler") or not hasattr(diffusers, class_name):
        raise ValueError(
            f"unknown scheduler {name!r}: use one of {sorted(SCHEDULERS)} or a diffusers class name"
        )
    own = type(sampler).__name__
    if getattr(diffusers, class_name) not in sampler.compatibles:
        if is_flow_matching(sampler):
            why = (
                f"its sampler, {own}, is a flow-matching one: the model predicts a velocity along a "
                f"straight path between image and noise and has no DDPM noise schedule (betas; "
                f"epsilon or v-prediction) for {class_name} to step through"
            )
        else:
            compatible = sorted(c.__name__ for c in sampler.compatibles)
            why = f"diffusers lists only {compatible} as able to run the schedule of its sampler, {own}"
        raise IncompatibleSamplerError(
            f"scheduler {name!r} ({class_name}) cannot sample this model: {why}. Leave the "
            f"scheduler unset to sample with the model's own {own}."
        )
    return build_sampler(dict(sampler.config), class_name)


def is_flow_matching(sampler: SchedulerMixin) -> bool:
    """Whether a sampler runs a flow-matching sigma schedule (FLUX, SD3) rather than a DDPM one:
    diffusers' flow-matching samplers are its FlowMatch* classes, and its multistep solvers run
    one when their config sets `use_flow_sigmas`."""
    return type(sampler).__name__.startswith("FlowMatch") or bool(sampler.config.get("use_flow_sigmas"))


def _to(pipe, device, dtype: torch.dtype):
    modules = [pipe.text_encoder, pipe.projection] if isinstance(pipe, DomainTextPipeline) else []
    inner = diffusers_pipeline(pipe)
    # Cast only when needed: diffusers warns about every cast, even to the dtype a model has.
    if inner.dtype == dtype:
        inner.to(device=device)
    else:
        inner.to(device=device, dtype=dtype)
    for module in modules:
        module.to(device=device, dtype=dtype)
    return pipe


def render(
    pipe: StableDiffusionPipeline | DomainTextPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image]:
    """One image per (prompt, seed).

    Each image's starting noise (and any noise a stochastic sampler adds) comes from its own CPU
    generator, so the noise depends on its seed only: not on the device, nor on the other images
    in the batch.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    inner = diffusers_pipeline(pipe)
    family = pipeline_family(type(inner).__name__)
    if family is not None:  # some pipelines take no None size (Kandinsky's): give the native one
        height, width = height or family.native_size(inner), width or family.native_size(inner)
    return pipe(
        list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        height=height,
        width=width,
        output_type="pil",
    ).images
