"""The validation images: the validation prompts rendered at fixed seeds, shared out over the
ranks, and gathered into one TensorBoard grid."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import lightning as L
import torch
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger

from .modes import in_eval_mode


def rank_share(prompts: list[str], seed: int, world: int, rank: int) -> tuple[list[str], list[int]]:
    """This rank's prompts and their seeds (`seed` + the prompt's index, so an image does not
    depend on the number of ranks).

    Every rank gets the same number, so all take part in the same collectives; the last ranks
    repeat the last prompt where the prompts do not divide evenly.
    """
    per_rank = math.ceil(len(prompts) / world)
    indices = [min(rank * per_rank + i, len(prompts) - 1) for i in range(per_rank)]
    return [prompts[i] for i in indices], [seed + i for i in indices]


def render_rank_share(module: L.LightningModule) -> torch.Tensor | None:
    """This rank's share of `module.validation`'s prompts as images (None without prompts)."""
    prompts = module.validation.prompts
    if not prompts:
        return None
    trainer = module.trainer
    mine, seeds = rank_share(prompts, module.validation.seed, trainer.world_size, trainer.global_rank)
    return module.generate(mine, seeds)


def log_grid(module: L.LightningModule, images: torch.Tensor) -> None:
    """Gather every rank's `render_rank_share` images; rank 0 logs them as one grid to the
    TensorBoard loggers."""
    prompts = module.validation.prompts
    gathered = module.all_gather(images)
    if module.trainer.world_size > 1:
        gathered = gathered.flatten(0, 1)
    if not module.trainer.is_global_zero:
        return
    grid = torchvision.utils.make_grid(gathered[: len(prompts)].cpu(), nrow=min(4, len(prompts)))
    for logger in module.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image("val/images", grid, module.global_step)


def trainer_precision(module: L.LightningModule) -> AbstractContextManager:
    """The Trainer's autocast for a pipeline's denoising loop; none outside a Trainer."""
    trainer = module._trainer
    return trainer.precision_plugin.forward_context() if trainer else nullcontext()


@torch.no_grad()
@in_eval_mode
def pipeline_images(module: L.LightningModule, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """One image per (prompt, seed) as [N, 3, H, W] in [0, 1] by the module's diffusers pipeline;
    CPU generators, so the same seed gives the same starting noise on any device."""
    v = module.validation
    pipe = module.build_pipeline(v.sampler)
    pipe.set_progress_bar_config(disable=True)
    size = v.resolution or module.family.native_size(pipe)
    # The denoising loop runs in the Trainer's precision; decoding is done in fp32 (or the VAE's
    # bf16) by decode_latents, where the fp16 VAE's overflow cannot reach it.
    with trainer_precision(module):
        latents = pipe(
            **module.family.pipeline_prompts(module, prompts),
            num_inference_steps=v.num_inference_steps,
            guidance_scale=v.guidance_scale,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            height=size,
            width=size,
            output_type="latent",
        ).images
    return module.decode_latents(latents)
