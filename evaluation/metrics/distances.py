"""FID and KID between the generated images and the real split, in each feature source's features.

FID's interval is by half-sampling both sets (`evaluation.bootstrap.fid_interval`), KID's by a
bootstrap over prompts; both keep a prompt's images together. FIDs from different protocols,
extractors, resolutions or N do not compare: every row says which it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..bootstrap import FID_INTERVAL_METHOD, interval_method
from ..bootstrap import fid_interval as half_sample_interval
from ..fid_protocols import roentgen_selection
from ..kid import kernel_inception_distance, kid_bootstrap_ci
from ..statistics import frechet_distance_of_samples
from . import Metric
from .context import EvaluationContext


def fid_kid_rows(
    real: np.ndarray,
    fake: np.ndarray,
    resamples: int,
    seed: int,
    fake_groups: Sequence[Sequence[int]] | None,
    label: dict,
) -> list[dict]:
    """The FID and KID rows of two feature sets, with intervals when `resamples` > 0."""
    fid = frechet_distance_of_samples(real, fake)
    kid, kid_std = kernel_inception_distance(real, fake, seed=seed)
    fid_ci = kid_ci = (None, None)
    fid_method = FID_INTERVAL_METHOD if resamples else None
    if resamples:
        try:
            fid_ci = half_sample_interval(real, fake, resamples, seed=seed, fake_groups=fake_groups)
        except ValueError as error:  # too few prompts to halve: the point estimate still stands
            fid_method = f"none: {error}"
        kid_ci = kid_bootstrap_ci(real, fake, resamples=resamples, seed=seed, groups=fake_groups)
    counts = {"n_real": len(real), "n_generated": len(fake)}
    return [
        {
            "metric": "fid",
            "value": fid,
            "ci_low": fid_ci[0],
            "ci_high": fid_ci[1],
            "ci_method": fid_method,
            **label,
            **counts,
        },
        {
            "metric": "kid",
            "value": kid,
            "std": kid_std,
            "ci_low": kid_ci[0],
            "ci_high": kid_ci[1],
            "ci_method": interval_method("generated images", fake_groups, resamples) if resamples else None,
            **label,
            **counts,
        },
    ]


def compute(context: EvaluationContext, source: str) -> list[dict]:
    real, fake = context.features(source, "real"), context.features(source, "generated")
    args = context.args
    fake_rows, real_rows = fid_selection(context)
    label = {
        **context.sources[source].label,
        **({"selection": SELECTION} if args.fid_first_per_prompt else {}),
    }
    groups = context.generated.groups(fake_rows)
    return fid_kid_rows(real[real_rows], fake[fake_rows], args.bootstrap, args.seed, groups, label)


SELECTION = "RoentGen's: the first image of each prompt, the first 5,000 per side"


def fid_selection(context: EvaluationContext) -> tuple[list[int], list[int]]:
    """Rows of the generated and real sets FID and KID compare: all, or under `--fid-preset roentgen`
    the first image of each prompt and at most `fid_images` per side (`roentgen_selection`)."""
    n_fake, n_real = len(context.generated.paths), len(context.images("real"))
    if not context.args.fid_first_per_prompt:
        return list(range(n_fake)), list(range(n_real))
    limit = context.args.fid_images
    fake = roentgen_selection(list(range(n_fake)), context.generated.prompt_index, limit)
    return fake, roentgen_selection(list(range(n_real)), None, limit)


METRIC = Metric(
    name="fid/kid",
    needs="features of a feature source (generated and real split)",
    rows=("fid", "kid"),
    plotted=("fid", "kid"),
    compute=compute,
    sources=lambda context: list(context.sources),
)
