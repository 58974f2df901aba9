"""Turning prompt strings into token ids, the same way in data loading, validation and export."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


class PromptTokenizer:
    """A picklable `list[str] -> {input_ids, attention_mask}` for DataLoader workers.

    template: every caption is written into it (`{prompt}` is the caption), e.g. to put a
        textual-inversion placeholder in front of each caption.
    replacements: word -> words substitutions applied after the template, e.g. a multi-vector
        placeholder `<x>` -> `<x> <x>_1 <x>_2` (what diffusers' pipelines do at sampling time).
    Prompts longer than `max_length` tokens are truncated (the CLIP limit is 77); the DataModules'
    `long_prompts` policy decides beforehand whether that is acceptable.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
        template: str = "{prompt}",
        replacements: dict[str, str] | None = None,
    ):
        if "{prompt}" not in template:
            raise ValueError(f"the caption template must contain '{{prompt}}', got {template!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length or tokenizer.model_max_length
        self.template = template
        self.replacements = dict(replacements or {})

    @property
    def identity(self) -> dict:
        """What makes two tokenizers' prompts encode alike (the tokenizer itself aside): a
        prepared cache's text embeddings are reused only under the same."""
        return {"template": self.template, "replacements": self.replacements, "max_length": self.max_length}

    def expand(self, prompt: str) -> str:
        text = self.template.format(prompt=prompt)
        for word, expansion in self.replacements.items():
            text = text.replace(word, expansion)
        return text

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.encode([self.expand(p) for p in prompts])

    def lengths(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt after the template, special tokens included, before truncation."""
        if not prompts:
            return []  # the fast tokenizers fail on an empty batch
        ids = self.tokenizer([self.expand(p) for p in prompts], truncation=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    def unconditional(self, n: int = 1) -> dict[str, torch.Tensor]:
        """The empty prompt, untouched by the template: what guidance contrasts against."""
        return self.encode([""] * n)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
