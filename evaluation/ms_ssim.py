"""MS-SSIM between generated images as a measure of diversity (RoentGen's protocol).

A model that collapses onto one image per prompt can still reach a good FID, so RoentGen also
reports how alike the images generated from the same prompt are: 4 images per prompt, MS-SSIM
over all 6 pairs, in grayscale scaled to [0, 1] with data_range 1, averaged per prompt and then
over prompts. Lower means more diverse. The same score over pairs drawn from different prompts
gives the floor to read it against: intra-prompt MS-SSIM near the cross-prompt value means the
prompt barely constrains the image.

MS-SSIM itself comes from pytorch-msssim (standard weights (0.0448, 0.2856, 0.3001, 0.2363,
0.1333), 11-px Gaussian window, sigma 1.5). Its five scales halve the image four times, so the
shorter side must exceed 160 px.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from pytorch_msssim import ms_ssim

MIN_SIDE = 161  # 4 halvings must leave more than the 11-px window: (11 - 1) * 2**4 = 160 < side

# ITU-R 601-2 luma, the weights of PIL's convert("L") that image-file pipelines use.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """[N, 1 or 3, H, W] uint8 or float in [0, 1] -> float32 [N, 1, H, W] in [0, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255
    else:
        images = images.float()
        low, high = images.min().item(), images.max().item()
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"float images must be in [0, 1], got values in [{low:.3g}, {high:.3g}]"
                " (map [-1, 1] outputs with (x + 1) / 2)"
            )
    if images.shape[1] == 3:
        weights = images.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
        images = (images * weights).sum(dim=1, keepdim=True)
    return images.clamp(0, 1)


def ms_ssim_pairs(
    images_a: torch.Tensor, images_b: torch.Tensor, data_range: float = 1.0, batch_size: int = 64
) -> torch.Tensor:
    """MS-SSIM of each pair (images_a[i], images_b[i]) of [N, C, H, W] images: a tensor [N].

    Computed as given (several channels are averaged, as pytorch-msssim does); the diversity
    functions below convert to grayscale first. Runs on the images' device, `batch_size` pairs
    at a time to bound memory.
    """
    if images_a.shape != images_b.shape:
        raise ValueError(f"image shapes differ: {tuple(images_a.shape)} and {tuple(images_b.shape)}")
    if images_a.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images_a.shape)}")
    height, width = images_a.shape[-2:]
    if min(height, width) < MIN_SIDE:
        raise ValueError(
            f"MS-SSIM needs images whose shorter side is at least {MIN_SIDE} px (its 5 scales halve"
            f" the image 4 times and the 11-px window must still fit), got {height}x{width};"
            " evaluate at 256 or 512 px"
        )
    scores = [
        ms_ssim(a.float(), b.float(), data_range=data_range, size_average=False)
        for a, b in zip(images_a.split(batch_size), images_b.split(batch_size), strict=True)
    ]
    return torch.cat(scores)


def intra_prompt_diversity(groups: list[torch.Tensor]) -> dict[str, float | int]:
    """RoentGen's diversity score: mean MS-SSIM over all pairs within each prompt's images.

    `groups` holds one [K, C, H, W] tensor per prompt (K = 4 in RoentGen, so 6 pairs), uint8 or
    float in [0, 1]. Returns the mean over prompts of each prompt's mean over its pairs
    (`ms_ssim`, lower = more diverse), its standard deviation over prompts, and the counts.
    """
    if not groups:
        raise ValueError("no prompts given")
    per_prompt = []
    pairs = 0
    for index, group in enumerate(groups):
        if len(group) < 2:
            raise ValueError(f"prompt {index} has {len(group)} image(s); pairs need at least 2")
        gray = to_grayscale(group)
        first, second = zip(*itertools.combinations(range(len(gray)), 2), strict=True)
        scores = ms_ssim_pairs(gray[list(first)], gray[list(second)])
        per_prompt.append(scores.double().mean().item())
        pairs += len(scores)
    return {
        "ms_ssim": float(np.mean(per_prompt)),
        "ms_ssim_std": float(np.std(per_prompt)),
        "prompts": len(groups),
        "pairs": pairs,
    }


def cross_prompt_diversity(
    groups: list[torch.Tensor], pairs: int = 1000, seed: int = 0, batch_size: int = 64
) -> dict[str, float | int]:
    """Mean MS-SSIM over random pairs of images generated from two different prompts.

    Each pair draws two distinct prompts uniformly, then one image of each, from `seed`; the
    images are prepared as in `intra_prompt_diversity`. The reference point for the intra-prompt
    score: what two unrelated images of this model share.
    """
    if len(groups) < 2:
        raise ValueError(f"cross-prompt pairs need at least 2 prompts, got {len(groups)}")
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")
    if any(len(group) == 0 for group in groups):
        raise ValueError("every prompt needs at least one image")
    rng = np.random.default_rng(seed)
    prompt_a = rng.integers(len(groups), size=pairs)
    prompt_b = (prompt_a + rng.integers(1, len(groups), size=pairs)) % len(groups)
    image_a = [rng.integers(len(groups[p])) for p in prompt_a]
    image_b = [rng.integers(len(groups[p])) for p in prompt_b]

    def gather(prompts: np.ndarray, images: list[int]) -> torch.Tensor:
        return to_grayscale(torch.stack([groups[p][i] for p, i in zip(prompts, images, strict=True)]))

    scores = []
    for start in range(0, pairs, batch_size):
        chunk = slice(start, start + batch_size)
        a, b = gather(prompt_a[chunk], image_a[chunk]), gather(prompt_b[chunk], image_b[chunk])
        scores.append(ms_ssim_pairs(a, b, batch_size=batch_size))
    return {"ms_ssim": torch.cat(scores).double().mean().item(), "pairs": pairs, "prompts": len(groups)}
