"""The metric registry: every metric `medsd evaluate` computes, in the order it runs them.

A metric is one module of this package holding a `METRIC`: its name, what it needs, the row
names it writes, and a function from the evaluation context (`context.EvaluationContext`) to
rows. A row is a dict with at least `metric` and `value`, plus what the number was computed on
(protocol, extractor, weights, preprocessing, N, the interval and its method). A metric that
runs once per feature source (FID per extractor) names the sources it takes with `sources`.
Adding a metric is one module and one line below; the sweep report reads `plotted` from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..features import MissingWeightsError
from .context import EvaluationContext


@dataclass(frozen=True)
class Metric:
    """name: how skips and logs name it. needs: what it reads, in words (shown by `medsd evaluate
    --list-metrics`). rows: the `metric` names of the rows it writes. plotted: those worth a bar
    chart per sweep cell. sources: for a metric computed per feature source, the names it takes
    from the context's sources (compute then receives the name); None runs it once."""

    name: str
    needs: str
    rows: tuple[str, ...]
    compute: Callable[..., list[dict]]
    plotted: tuple[str, ...] = ()
    sources: Callable[[EvaluationContext], list[str]] | None = None


def run_all(context: EvaluationContext, metrics: list[Metric] | None = None) -> list[dict]:
    """Every metric's rows; each that could not run is recorded in `context.skipped` with the
    reason (the others still run)."""
    rows: list[dict] = []

    def attempt(name: str, compute: Callable[[], list]) -> list:
        try:
            return compute()
        except (MissingWeightsError, ValueError) as error:
            context.skip(name, str(error))
            return []

    for metric in metrics if metrics is not None else registry():
        if metric.sources is None:
            rows += attempt(metric.name, lambda metric=metric: metric.compute(context))
            continue
        for source in attempt(metric.name, lambda metric=metric: metric.sources(context)):
            name = f"{metric.name} ({source})"
            rows += attempt(name, lambda metric=metric, source=source: metric.compute(context, source))
    return rows


def registry() -> list[Metric]:
    """The metrics, in the order they run (imported here so that each module can import this one)."""
    from . import (
        alignment,
        classifier_protocols,
        cmmd,
        copying,
        distances,
        diversity,
        fidelity,
        per_finding,
    )

    return [
        distances.METRIC,
        per_finding.METRIC,
        fidelity.METRIC,
        cmmd.METRIC,
        diversity.METRIC,
        alignment.METRIC,
        copying.METRIC,
        classifier_protocols.METRIC,
    ]
