"""FID and KID per finding: the generated images whose prompt states a finding against the real
images that have it (CheXGenBench reports its metrics per pathology). A finding with fewer than
MIN_IMAGES images on either side gets no row, and is named in the skip list."""

from __future__ import annotations

from . import Metric
from .context import EvaluationContext, NotApplicable
from .distances import fid_kid_rows

MIN_IMAGES = 10


def compute(context: EvaluationContext, source: str) -> list[dict]:
    names, stated, _, _ = context.generated.stated_labels()
    real = context.data.labelled(context.args.real_split)
    real_features, fake_features = context.features(source, "real"), context.features(source, "generated")
    rows, too_few = [], []
    for finding in [n for n in names if n in real.label_names]:
        fake_rows = (stated[:, names.index(finding)] == 1).nonzero().flatten().tolist()
        real_rows = (real.labels[:, real.label_names.index(finding)] == 1).nonzero().flatten().tolist()
        if min(len(fake_rows), len(real_rows)) < MIN_IMAGES:
            if fake_rows:
                too_few.append(f"{finding} ({len(fake_rows)} generated, {len(real_rows)} real)")
            continue
        label = {**context.sources[source].label, "label": finding}
        groups = context.generated.groups(fake_rows)
        pairs = fid_kid_rows(
            real_features[real_rows],
            fake_features[fake_rows],
            context.args.bootstrap,
            context.args.seed,
            groups,
            label,
        )
        rows += [{**row, "metric": f"{row['metric']}_per_finding"} for row in pairs]
    if not rows:
        raise NotApplicable(
            f"no finding with {MIN_IMAGES}+ images on both sides; too few: {too_few or 'none stated'}"
        )
    return rows


def labelled_sources(context: EvaluationContext) -> list[str]:
    """Every source, when the generated prompts carry labels and the real split is a config's."""
    if context.data.folder or not any(context.generated.labels):
        return []
    return list(context.sources)


METRIC = Metric(
    name="per-finding fid/kid",
    needs="labelled generated prompts and a labelled real split; features of a feature source",
    rows=("fid_per_finding", "kid_per_finding"),
    compute=compute,
    sources=labelled_sources,
)
