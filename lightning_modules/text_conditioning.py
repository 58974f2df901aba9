"""Prompt conditioning outside the training batches: the empty prompt's (caption dropout, guidance)
and the validation prompts', kept once a prepared cache lets the text encoders leave the GPU."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from datamodules.cache import CacheMismatchError, PreparedCache

from .conditioning import Conditioning, as_arrays, concat_rows, from_arrays, repeat_rows

if TYPE_CHECKING:
    from .diffusion import DiffusionModule

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_tokenized(module: DiffusionModule, prompts: list[str], unconditional: bool) -> Conditioning:
    """`module.encode_prompts` of a family whose text encoder reads its tokenizer's ids: the ids
    through `module.encode_text`, on the encoder's device (the CPU once a cache replaced it)."""
    tokenizer = module.prompt_tokenizer
    tokens = tokenizer.unconditional(len(prompts)) if unconditional else tokenizer(prompts)
    device = next(module.text_encoder.parameters()).device
    embeds = module.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    return from_arrays({k: v.to(module.device) for k, v in as_arrays(embeds).items()})


class KeptConditioning:
    """`module.encode_prompts`, served from what was encoded once where it can be: the empty
    prompt's conditioning always (constant while the text conditioning is frozen, which is when
    it is reused), the validation prompts' once `keep` ran."""

    def __init__(self, module: DiffusionModule):
        self.module = module
        self.empty: Conditioning | None = None
        self.prompts: dict[str, Conditioning] = {}

    def empty_prompt(self) -> Conditioning:
        """The empty prompt's conditioning (a batch of one)."""
        if self.empty is None:
            self.empty = self.module.encode_prompts([""], unconditional=True)
        return self.empty

    def __call__(self, prompts: list[str], unconditional: bool = False) -> Conditioning:
        if unconditional and self.empty is not None:
            return repeat_rows(self.empty, len(prompts))
        if not unconditional and prompts and all(p in self.prompts for p in prompts):
            return concat_rows([self.prompts[p] for p in prompts])
        return self.module.encode_prompts(prompts, unconditional)

    def keep(self, prompts: list[str]) -> None:
        """Encode the empty prompt and `prompts` now, for use after the encoders have gone."""
        self.empty_prompt()
        if prompts:
            encoded = as_arrays(self.module.encode_prompts(prompts))
            for i, prompt in enumerate(prompts):
                self.prompts[prompt] = from_arrays({k: v[i : i + 1] for k, v in encoded.items()})


def release_text_encoders(module: DiffusionModule) -> None:
    """Move the frozen text encoders off the GPU for the rest of the fit.

    The prepared cache holds every training prompt's conditioning; the encoders are otherwise
    needed only for the empty prompt and the validation prompts, encoded once here.
    """
    prompts = list(dict.fromkeys(module.validation.prompts))
    module.kept_conditioning.keep(prompts)
    encoders = module.text_encoders()
    for encoder in encoders:
        encoder.to("cpu")
    log.info(
        "text conditioning comes from the prepared cache: the empty and %d validation prompts "
        "encoded once, %d text encoder(s) moved to the CPU",
        len(prompts),
        len(encoders),
    )


def cached_text_fits(module: DiffusionModule, cache: PreparedCache) -> bool:
    """Whether a prepared cache's text conditioning is this run's (so batches may use it); refuses
    a cache whose latents come from another model."""
    prepared, here = cache.manifest["model"], module.cache_identity()
    has_latents = any(split["latents"] for split in cache.manifest["splits"].values())
    if has_latents and prepared.get("backbone") != here["backbone"]:
        raise CacheMismatchError(
            f"the latents in {cache.root} come from {prepared.get('backbone')}, this run's model is "
            f"{here['backbone']}: prepare the cache again with this run's config"
        )
    fits = here["text"] is not None and prepared.get("text") == here["text"]
    if prepared.get("text") and not fits:
        log.info(
            "ignoring the cached text embeddings in %s: this run's text conditioning differs", cache.root
        )
    return fits
