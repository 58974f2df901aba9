"""Textual inversion: learn the embedding of new placeholder tokens, nothing else."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .diffusion import DiffusionModule
from .export import EMBEDDINGS_FILE
from .prompts import PromptTokenizer


class TextualInversion(DiffusionModule):
    """One placeholder (e.g. `<lungxray>`) of `num_vectors` new tokens, initialised from a word.

    Captions are written into `caption_template` (default: the placeholder before each caption)
    and a multi-vector placeholder is expanded to `<x> <x>_1 ...`, the names diffusers'
    `load_textual_inversion` gives the extra vectors, so the export loads there unchanged.
    Only the placeholder rows change: every other row of the embedding matrix is put back after
    each optimiser step (weight decay would otherwise move them).
    """

    def __init__(
        self,
        placeholder_token: str = "<medsd>",
        initializer_token: str = "xray",
        num_vectors: int = 1,
        caption_template: str = "{placeholder} {prompt}",
        **kwargs,
    ):
        super().__init__(**kwargs)  # backbone, objective, optimizer, ...: see DiffusionModule
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be at least 1, got {num_vectors}")
        self.placeholder_token = placeholder_token
        self.placeholder_tokens = [placeholder_token] + [
            f"{placeholder_token}_{i}" for i in range(1, num_vectors)
        ]
        self.caption_template = caption_template.replace("{placeholder}", placeholder_token)

        if self.tokenizer.add_tokens(self.placeholder_tokens) != num_vectors:
            raise ValueError(f"'{placeholder_token}' is already a token: choose another")
        init_ids = self.tokenizer.encode(initializer_token, add_special_tokens=False)
        if not init_ids:
            raise ValueError(f"initializer_token {initializer_token!r} tokenises to nothing")
        self.placeholder_ids = self.tokenizer.convert_tokens_to_ids(self.placeholder_tokens)

        self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        embeddings = self.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            # A multi-token word starts every vector at the mean of its tokens' embeddings.
            embeddings[self.placeholder_ids] = embeddings[init_ids].mean(dim=0)
        self.register_buffer("frozen_rows", embeddings.detach().clone(), persistent=False)
        embeddings.requires_grad_(True)

    @property
    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer(
            self.tokenizer,
            template=self.caption_template,
            replacements={self.placeholder_token: " ".join(self.placeholder_tokens)},
        )

    def after_optimizer_step(self) -> None:
        embeddings = self.text_encoder.get_input_embeddings().weight
        keep = torch.ones(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
        keep[self.placeholder_ids] = False
        with torch.no_grad():
            embeddings[keep] = self.frozen_rows[keep].to(embeddings)

    def learned_parameter_count(self) -> int:
        """Only the placeholder's rows of the embedding matrix change (the others are restored
        after every step), although the whole matrix is a trainable tensor."""
        return len(self.placeholder_ids) * self.text_encoder.get_input_embeddings().weight.shape[1]

    def learned_embeddings(self) -> torch.Tensor:
        """The placeholder's vectors, [num_vectors, hidden]."""
        weight = self.text_encoder.get_input_embeddings().weight
        return weight[self.placeholder_ids].detach().float().cpu().clone()

    def export(self, folder: Path) -> dict:
        """The embeddings file, and manifest fields that say how prompts must be written to reach
        the token: the caption template it was trained in (`medsd sample`'s default template) and
        the multi-vector expansion, which diffusers' pipelines redo by themselves at sampling."""
        # diffusers' format: one key, the placeholder, holding all of its vectors.
        save_file({self.placeholder_token: self.learned_embeddings()}, folder / EMBEDDINGS_FILE)
        captions = self.prompt_tokenizer
        return {
            "format": "diffusers-textual-inversion",
            "token": self.placeholder_token,
            "prompt_template": captions.template,
            "replacements": captions.replacements,
        }
