"""Fine-tuning strategies as LightningModules, and the parts they share."""

from . import _library_logs  # noqa: F401  (first: it quiets a library before peft imports it)
from .backbones import (
    TINY_BERT,
    TINY_SD,
    TINY_SD2,
    TINY_SDXL,
    Backbone,
    BackboneNotFoundError,
    BackboneSpec,
    load_backbone,
)
from .compact import CompactDiffusion, VAETraining
from .diffusion import DiffusionModule
from .domain_text_encoder import DomainTextEncoderFineTuning, load_domain_text_pipeline
from .fine_tuning import FineTuning
from .flux import TINY_FLUX, FluxLoRA
from .kandinsky import TINY_KANDINSKY, KandinskyDecoderTuning
from .lora import LoRAFineTuning
from .sdxl import SDXLFineTuning, SDXLLoRAFineTuning
from .settings import Objective, Optimizer, Validation
from .textual_inversion import TextualInversion

__all__ = [
    "TINY_BERT",
    "TINY_FLUX",
    "TINY_KANDINSKY",
    "TINY_SD",
    "TINY_SD2",
    "TINY_SDXL",
    "Backbone",
    "BackboneNotFoundError",
    "BackboneSpec",
    "CompactDiffusion",
    "DiffusionModule",
    "DomainTextEncoderFineTuning",
    "FineTuning",
    "FluxLoRA",
    "KandinskyDecoderTuning",
    "LoRAFineTuning",
    "Objective",
    "Optimizer",
    "SDXLFineTuning",
    "SDXLLoRAFineTuning",
    "TextualInversion",
    "VAETraining",
    "Validation",
    "load_backbone",
    "load_domain_text_pipeline",
]
