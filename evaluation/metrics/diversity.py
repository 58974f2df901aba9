"""MS-SSIM within prompts (RoentGen's diversity protocol) and across prompts (its floor)."""

from __future__ import annotations

from ..ms_ssim import cross_prompt_diversity, intra_prompt_diversity
from . import Metric
from .context import EvaluationContext


def compute(context: EvaluationContext) -> list[dict]:
    images = context.images("generated").uint8()
    groups = context.prompt_groups()
    label = {
        "protocol": "MS-SSIM (pytorch-msssim), grayscale [0, 1], data_range 1",
        "extractor": "pixels (no network)",
        "weights": "none",
        "preprocessing": f"common resize to {images.shape[-1]} px",
        "n_generated": len(images),
    }
    rows = []
    pairs = [images[rows_] for rows_ in groups if len(rows_) >= 2]
    if pairs:
        intra = intra_prompt_diversity(pairs)
        rows.append({"metric": "ms_ssim_intra_prompt", "value": intra.pop("ms_ssim"), **intra, **label})
    if len(groups) >= 2:
        args = context.args
        every_prompt = [images[rows_] for rows_ in groups]
        cross = cross_prompt_diversity(every_prompt, pairs=args.cross_prompt_pairs, seed=args.seed)
        rows.append({"metric": "ms_ssim_cross_prompt", "value": cross.pop("ms_ssim"), **cross, **label})
    return rows


METRIC = Metric(
    name="ms-ssim",
    needs="the generated images, 2+ per prompt for the within-prompt score",
    rows=("ms_ssim_intra_prompt", "ms_ssim_cross_prompt"),
    plotted=("ms_ssim_intra_prompt",),
    compute=compute,
)
