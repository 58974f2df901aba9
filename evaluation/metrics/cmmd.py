"""CMMD (Jayasumana et al. 2024): MMD with a Gaussian kernel between the L2-normalised CLIP image
embeddings of the generated and the real images (`evaluation.cmmd`), in the CLIP model given. The
authors use CLIP ViT-L/14 at 336 px: pass that model as --clip-model / --clip-weights to report
their CMMD; the row names the model it was computed with."""

from __future__ import annotations

from ..cmmd import cmmd
from . import Metric
from .context import EvaluationContext


def compute(context: EvaluationContext) -> list[dict]:
    value = cmmd(context.clip_features("real"), context.clip_features("generated"))
    return [
        {
            "metric": "cmmd",
            "value": value,
            "sigma": 10.0,
            "scale": 1000.0,
            "protocol": "CMMD (Jayasumana et al. 2024): biased MMD^2 x 1000, Gaussian kernel sigma 10",
            **context.clip.label,
            **context.counts(),
        }
    ]


METRIC = Metric(
    name="cmmd",
    needs="the CLIP feature source (--clip-weights)",
    rows=("cmmd",),
    plotted=("cmmd",),
    compute=compute,
)
