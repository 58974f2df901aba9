"""The data-copying test (`evaluation.copying`) in each feature source's features: training split
against the held-out real split the generated images are compared with.

Writes, next to metrics.json, `copying/<source>-nearest.csv` (every generated image's nearest
training and held-out image) and `copying/<source>-closest-pairs.png` (the most copy-like
generated / training pairs, for a person to look at).

Not in the classifier's features: that network was trained on the training split, so its
features treat training and held-out images differently, and the test's premise (the two are
exchangeable for everything but the generator) would not hold.
"""

from __future__ import annotations

from ..copying import closest_pairs, data_copying, write_closest_pairs
from ..suite import save_csv
from . import Metric
from .context import EvaluationContext, NotApplicable

PAIRS = 8


def compute(context: EvaluationContext, source: str) -> list[dict]:
    train = context.images("train")
    report, table = data_copying(
        context.features(source, "train"),
        context.features(source, "real"),
        context.features(source, "generated"),
        groups=context.generated.prompt_index,
        seed=context.args.seed,
    )
    files = {}
    if context.artefacts is not None:
        folder = context.artefacts / "copying"
        table_path = save_csv(folder / f"{source}-nearest.csv", table)
        grid = write_closest_pairs(
            closest_pairs(table, PAIRS),
            context.generated.paths,
            train.paths,
            folder / f"{source}-closest-pairs.png",
        )
        files = {
            "nearest_table": str(table_path.relative_to(context.artefacts)),
            "closest_pairs": str(grid.relative_to(context.artefacts)),
        }
    statistic = report.pop("statistic")
    report["distance"] = report.pop("metric")  # "metric" names the row
    return [
        {
            "metric": "copying_nearest_is_train",
            "value": statistic,
            "protocol": report.pop("method"),
            **report,
            **files,
            **context.sources[source].label,
            "n_train": len(train),
            "n_real": len(context.images("real")),
        }
    ]


def sources(context: EvaluationContext) -> list[str]:
    chosen = [name for name in context.sources if name != "classifier"]
    if not context.args.train_split:
        return []
    if not chosen:
        raise NotApplicable("needs the features of an extractor with weights (not the trained classifier's)")
    return chosen


METRIC = Metric(
    name="copying test",
    needs="the training split and a feature source other than the trained classifier",
    rows=("copying_nearest_is_train",),
    compute=compute,
    sources=sources,
)
