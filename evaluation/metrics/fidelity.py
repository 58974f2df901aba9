"""Precision, recall, density and coverage (Naeem et al. 2020, k = 5) of the generated images
against the real split, in each feature source's features (`evaluation.prdc`)."""

from __future__ import annotations

from ..prdc import precision_recall_density_coverage
from . import Metric
from .context import EvaluationContext

K = 5


def compute(context: EvaluationContext, source: str) -> list[dict]:
    real, fake = context.features(source, "real"), context.features(source, "generated")
    scores = precision_recall_density_coverage(real, fake, k=K)
    label = {**context.sources[source].label, "k": K, **context.counts()}
    return [{"metric": name, "value": value, **label} for name, value in scores.items()]


METRIC = Metric(
    name="precision/recall/density/coverage",
    needs="features of a feature source (generated and real split)",
    rows=("precision", "recall", "density", "coverage"),
    plotted=("precision", "recall", "density", "coverage"),
    compute=compute,
    sources=lambda context: list(context.sources),
)
