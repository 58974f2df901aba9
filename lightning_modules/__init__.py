"""Fine-tuning strategies as LightningModules, and the parts they share."""

from datamodules.lazy import lazy_attributes

from . import _library_logs  # noqa: F401  (first: it quiets a library before peft imports it)

# Public name -> the submodule that defines it, imported when the name is first used: a run of
# one strategy imports neither the other families nor their libraries (peft for a full fine-tune).
_WHERE = {
    "TINY_BERT": ".backbones",
    "TINY_SD": ".backbones",
    "TINY_SD2": ".backbones",
    "TINY_SDXL": ".backbones",
    "Backbone": ".families.stable_diffusion",
    "BackboneNotFoundError": ".backbones",
    "BackboneSpec": ".backbones",
    "load_backbone": ".families.stable_diffusion",
    "CompactDiffusion": ".compact",
    "VAETraining": ".compact",
    "DiffusionModule": ".diffusion",
    "DomainTextEncoderFineTuning": ".domain_text_encoder",
    "load_domain_text_pipeline": ".domain_text_pipeline",
    "FineTuning": ".fine_tuning",
    "TINY_FLUX": ".backbones",
    "FluxLoRA": ".flux",
    "TINY_KANDINSKY": ".backbones",
    "KandinskyDecoderTuning": ".kandinsky",
    "LoRAFineTuning": ".lora",
    "SDXLFineTuning": ".sdxl",
    "SDXLLoRAFineTuning": ".sdxl",
    "Objective": ".settings",
    "Optimizer": ".settings",
    "Validation": ".settings",
    "TextualInversion": ".textual_inversion",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
