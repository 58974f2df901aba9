"""Fine-tuning strategies as LightningModules, and the parts they share."""

from .backbones import (
    TINY_BERT,
    TINY_SD,
    Backbone,
    BackboneNotFoundError,
    BackboneSpec,
    load_backbone,
)
from .diffusion import DiffusionModule
from .domain_text_encoder import DomainTextEncoderFineTuning, load_domain_text_pipeline
from .fine_tuning import FineTuning
from .lora import LoRAFineTuning
from .settings import Objective, Optimizer, Validation
from .textual_inversion import TextualInversion

__all__ = [
    "TINY_BERT",
    "TINY_SD",
    "Backbone",
    "BackboneNotFoundError",
    "BackboneSpec",
    "DiffusionModule",
    "DomainTextEncoderFineTuning",
    "FineTuning",
    "LoRAFineTuning",
    "Objective",
    "Optimizer",
    "TextualInversion",
    "Validation",
    "load_backbone",
    "load_domain_text_pipeline",
]
