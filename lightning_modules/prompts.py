"""Turning prompt strings into token ids, the same way in data loading, validation and export."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from functools import cached_property

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Characters Python's str.split() takes for whitespace and tokenizers' \s does not: a text with one
# is counted whole (see PromptTokenizer.lengths).
SPLIT_ONLY_IN_PYTHON = re.compile("[\x1c-\x1f]")
CHECKED_TEXTS = 500  # texts counted both ways before counting by words is trusted


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
        if self.template == "{prompt}" and not self.replacements:
            return prompt  # not a copy of each of 218k prompts
        text = self.template.format(prompt=prompt)
        for word, expansion in self.replacements.items():
            text = text.replace(word, expansion)
        return text

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.encode([self.expand(p) for p in prompts])

    @cached_property
    def fingerprint(self) -> str:
        """A digest of all that decides prompt lengths: the tokenizer's rules and vocabulary (its
        whole serialisation where it has one), special tokens, template and replacements. Stored
        lengths (the record index's) are reused under the same fingerprint only."""
        tokenizer = self.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
        parts = [
            type(tokenizer).__name__,
            rules,
            tokenizer.all_special_tokens,
            self.template,
            self.replacements,
        ]
        return hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).hexdigest()

    def lengths(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt after the template, special tokens included, before truncation.

        Each distinct text is counted once. The tokenizers of the text encoders here (CLIP's BPE,
        BERT's WordPiece, T5's SentencePiece) cut text at whitespace before anything else, so a
        text's tokens are its words' plus the special tokens: ASCII texts are counted from their
        distinct words (MIMIC's 228k reports hold a few tens of thousands), ten times faster than
        tokenising each. That this holds is checked on CHECKED_TEXTS of the texts, counted both
        ways; any difference, and the texts are all tokenised whole (logged).
        """
        texts = [self.expand(p) for p in prompts]
        distinct = list(dict.fromkeys(texts))
        by_words = [t for t in distinct if t.isascii() and not SPLIT_ONLY_IN_PYTHON.search(t)]
        if len(by_words) >= CHECKED_TEXTS:
            counts = self._by_words(distinct, by_words)
        else:
            counts = dict(zip(distinct, self._whole(distinct), strict=True))
        return [counts[t] for t in texts]

    def _whole(self, texts: list[str]) -> list[int]:
        if not texts:
            return []  # the fast tokenizers fail on an empty batch
        return [len(row) for row in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]

    def _by_words(self, distinct: list[str], by_words: list[str]) -> dict[str, int]:
        words = list(dict.fromkeys(w for t in by_words for w in t.split()))
        special = self._whole([""])[0]
        tokens = dict(zip(words, (n - special for n in self._whole(words)), strict=True))
        counts = {t: special + sum(map(tokens.__getitem__, t.split())) for t in by_words}
        step = max(1, len(by_words) // CHECKED_TEXTS)
        checked = by_words[::step][:CHECKED_TEXTS]
        if [counts[t] for t in checked] != self._whole(checked):
            log.info(
                "%s: counting tokens by words differs from whole texts; tokenising each",
                type(self.tokenizer).__name__,
            )
            return dict(zip(distinct, self._whole(distinct), strict=True))
        rest = [t for t in distinct if t not in counts]
        counts.update(zip(rest, self._whole(rest), strict=True))
        return counts

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
