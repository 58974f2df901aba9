"""The published architecture configs (no weights) of the models the paper configs name, so that
`backbone.random_init: true` builds the real architecture with random weights and no download.

Each folder mirrors its hub repository's subfolders (`unet/config.json`, `vae/config.json`,
`scheduler/scheduler_config.json`, `tokenizer/tokenizer_config.json`, ...); `NAMES` says which
hub ids a folder stands for. The values are the published ones (README.md in this folder lists
the few not checked against the published file, and the stand-ins: tokenizers whose vocabulary
files are not shipped). Random weights are deterministic: every part is built under a fixed seed,
so the base an export of a random-init run applies to is built again bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

FOLDER = Path(__file__).resolve().parent

# Hub id -> the folder holding its architecture.
NAMES = {
    "CompVis/stable-diffusion-v1-4": "stable-diffusion-v1",
    # v1-5 publishes the same unet / vae / text_encoder configs as v1-4 (it is v1-2 trained on).
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "stable-diffusion-v1",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1",
    "stabilityai/stable-diffusion-2-1": "stable-diffusion-2-1",
    "stabilityai/stable-diffusion-xl-base-1.0": "stable-diffusion-xl-base-1.0",
    "black-forest-labs/FLUX.1-dev": "flux.1-dev",
    "kandinsky-community/kandinsky-2-2-decoder": "kandinsky-2-2-decoder",
    "kandinsky-community/kandinsky-2-2-prior": "kandinsky-2-2-prior",
    "openai/clip-vit-large-patch14": "clip-vit-large-patch14",
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext": "pubmedbert-abstract-fulltext",
    "cambridgeltl/SapBERT-from-PubMedBERT-fulltext": "sapbert-from-pubmedbert-fulltext",
    "StanfordAIMI/RadBERT": "radbert",
}
SEED = 0


class UnknownArchitectureError(ValueError):
    """random_init was asked for a model whose architecture is not shipped."""


@dataclass(frozen=True)
class Architecture:
    """One shipped model: its parts' configs, and parts built from them with random weights.

    overrides: part -> settings that replace the published ones (e.g. `{"transformer":
        {"num_layers": 1}}`: fewer blocks where the full model does not fit; widths, head sizes
        and sequence lengths should stay as published).
    """

    name: str
    folder: Path
    overrides: dict = field(default_factory=dict)

    def config(self, part: str, file: str = "config.json") -> dict:
        config = json.loads((self.folder / part / file).read_text())
        return {**config, **self.overrides.get(part, {})}

    def build(self, part: str, cls, dtype: torch.dtype | None = None):
        """`part` as `cls` (a diffusers model, or a transformers model, whose config class takes
        the file's settings; None: the transformers model its `model_type` names) with random
        weights, deterministic in the part's name; cast to `dtype` as soon as built, so that
        only one part is ever held in fp32 at a time."""
        config = self.config(part)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED + sum(map(ord, part)))
            if cls is None:  # any transformers model, by the config's model_type
                model = AutoModel.from_config(AutoConfig.for_model(**config))
            elif hasattr(cls, "from_config"):
                model = cls.from_config(config)
            else:
                model = cls(cls.config_class(**config))
        return model.to(dtype) if dtype is not None else model

    def sampler_config(self, part: str = "scheduler") -> dict:
        return self.config(part, "scheduler_config.json")

    def tokenizer_settings(self, part: str = "tokenizer") -> dict:
        return self.config(part, "tokenizer_config.json")

    def clip_tokenizer(self, part: str = "tokenizer"):
        """CLIP's real tokenizer (built offline) with the part's length and padding token."""
        from ..backbones import build_clip_tokenizer

        settings = self.tokenizer_settings(part)
        tokenizer = build_clip_tokenizer(settings["model_max_length"])
        tokenizer.pad_token = settings["pad_token"]
        return tokenizer


def shipped_names() -> list[str]:
    return sorted(NAMES)


def architecture(name: str, overrides: dict | None = None) -> Architecture:
    """The shipped architecture of hub id `name`; an error listing the shipped ones if none is."""
    if name not in NAMES:
        raise UnknownArchitectureError(
            f"random_init: no architecture config is shipped for {name!r}. Shipped (in "
            f"{FOLDER}): {', '.join(shipped_names())}. Add its configs there, or load the weights."
        )
    return Architecture(name, FOLDER / NAMES[name], dict(overrides or {}))
