"""Benchmark: what `medsd fit`'s FLOP count costs, on the tiny demo base and on a mid-size model.

    python -m experiments.benchmarks.accounting [--resolution 256]

The count (lightning_modules/cost.py: one training step at batch 1, after training has ended)
is timed on U-Net fine-tuning of two backbones read from diffusers folders, as a run reads them:
the shipped demo base (32 px) and a mid-size Stable Diffusion-shaped model built here from config
(a 4-level U-Net of about 23 M parameters, a VAE with 8x downsampling, a 4-layer CLIP text
encoder; `--resolution` px). The aim: under a second for each on a CPU, against the 15 s a full
training step plus a 25-step guided generation used to cost at the start of every fit.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lightning_modules import BackboneSpec, FineTuning
from lightning_modules.backbones import DEMO_BASE_DIR, build_sampler
from lightning_modules.cost import parameter_counts, training_flops
from lightning_modules.families.stable_diffusion import build_tiny_backbone


def save_mid_size_model(folder: Path, resolution: int) -> None:
    """A mid-size SD-shaped model with random weights, saved as a diffusers pipeline folder."""
    torch.manual_seed(0)
    width = 256
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=1,
        cross_attention_dim=width,
        attention_head_dim=8,
        sample_size=resolution // 8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=resolution,
    )
    text = CLIPTextConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4, num_attention_heads=4
    )
    tokenizer = CLIPTokenizer.from_pretrained(DEMO_BASE_DIR, subfolder="tokenizer")
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_sampler(build_tiny_backbone().sampler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def example(module: FineTuning, resolution: int) -> dict:
    """One training example as the DataModule gives it: an image in [-1, 1] and its tokens."""
    tokens = module.prompt_tokenizer(["chest x-ray with pleural effusion"])
    return {
        "pixel_values": torch.rand(1, 3, resolution, resolution) * 2 - 1,
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "prompts": ["chest x-ray with pleural effusion"],
    }


def measure(name: str, folder: Path, resolution: int) -> str:
    module = FineTuning(backbone=BackboneSpec(str(folder)), train_unet=True)
    batch = example(module, resolution)
    start = time.perf_counter()
    flops = training_flops(module, batch)
    seconds = time.perf_counter() - start
    unet = parameter_counts(module.unet)["total"]
    return f"{name:10s} | {resolution:4d} | {unet / 1e6:7.1f} | {flops / 1e9:9.2f} | {seconds:6.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256, help="the mid-size model's image side")
    args = parser.parse_args(argv)
    print(f"FLOP count of one training step at batch 1 (CPU, {torch.get_num_threads()} threads)")
    print("model      | px   | U-Net M | GFLOPs    | seconds")
    print(measure("demo base", DEMO_BASE_DIR, 32))
    with tempfile.TemporaryDirectory() as tmp:
        save_mid_size_model(Path(tmp), args.resolution)
        print(measure("mid-size", Path(tmp), args.resolution))


if __name__ == "__main__":
    main()
