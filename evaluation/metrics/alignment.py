"""CLIP score: prompt alignment in the CLIP source's embedding space, as torchmetrics computes it."""

from __future__ import annotations

import numpy as np
import torch

from ..bootstrap import bootstrap_ci, interval_method
from . import Metric
from .context import EvaluationContext, NotApplicable


def clip_score(image_features: np.ndarray, text_features: torch.Tensor, rows: list[int]) -> np.ndarray:
    """100 x cos(image, its prompt) per image (unclamped). image_features: normalised image
    embeddings [N, D]; text_features: normalised embeddings of the distinct prompts; rows: each
    image's prompt row."""
    return 100 * (torch.as_tensor(image_features) * text_features[torch.as_tensor(rows)]).sum(dim=1).numpy()


def score_of(cosines: np.ndarray) -> float:
    """torchmetrics' CLIPScore: max(mean of 100 x cosine, 0), the clamp applied to the mean."""
    return float(max(cosines.mean(), 0.0))


def compute(context: EvaluationContext) -> list[dict]:
    clip = context.clip
    if clip is None:
        raise NotApplicable("needs CLIP weights (--clip-weights)")
    prompts = context.generated.prompts
    unique = list(dict.fromkeys(prompts))
    text, at_limit = clip.text_features(unique)
    cosines = clip_score(context.clip_features("generated"), text, [unique.index(p) for p in prompts])
    groups, resamples = context.prompt_groups(), context.args.bootstrap
    low, high = (
        bootstrap_ci(
            lambda i: score_of(cosines[i]), len(cosines), resamples, seed=context.args.seed, groups=groups
        )
        if resamples
        else (None, None)
    )
    return [
        {
            "metric": "clip_score",
            "value": score_of(cosines),
            "ci_low": low,
            "ci_high": high,
            "ci_method": interval_method("images", groups, resamples) if resamples else None,
            "protocol": "CLIPScore as torchmetrics: max(mean over images of 100 cos(image, prompt), 0)",
            "prompts": len(unique),
            "prompts_at_context_limit": at_limit,
            **context.clip.label,
            "n_generated": len(cosines),
        }
    ]


METRIC = Metric(
    name="clip score",
    needs="the CLIP feature source (--clip-weights) and its tokenizer",
    rows=("clip_score",),
    plotted=("clip_score",),
    compute=compute,
)
