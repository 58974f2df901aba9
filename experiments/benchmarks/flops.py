"""FLOPs of Stable Diffusion 1.5's parts, counted from their configs without weights.

    python -m experiments.benchmarks.flops [--resolution 512]

The models are built on PyTorch's meta device (shapes only, no memory, no weights) and run
under `torch.utils.flop_counter`, the counter `medsd fit` uses for every run's cost. Published
figures to compare with (batch 1, FLOPs = 2 x MACs): U-Net forward at 512 px about 803 G; forward +
backward about 2.41 T; CLIP text encoder about 13 G.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lightning_modules.cost import count_flops

# Stable Diffusion 1.5's published part configurations (stable-diffusion-v1-5, subfolders unet,
# vae, text_encoder): only what differs from the diffusers / transformers defaults.
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768}
SD15_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
TOKENS = 77


def unet_flops(resolution: int = 512, backward: bool = False) -> int:
    """The SD 1.5 U-Net at `resolution` px (latents 8x smaller), batch 1, 77 text tokens."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        latents = torch.randn(1, 4, resolution // 8, resolution // 8)
        text = torch.randn(1, TOKENS, SD15_UNET["cross_attention_dim"])
    timestep = torch.tensor([500], device="meta")
    if backward:
        return count_flops(lambda: unet(latents, timestep, text).sample.sum().backward())
    with torch.no_grad():
        return count_flops(lambda: unet(latents, timestep, text))


def vae_flops(resolution: int = 512) -> tuple[int, int]:
    """(encoder, decoder) FLOPs of the SD 1.5 VAE for one image."""
    with torch.device("meta"), torch.no_grad():
        vae = AutoencoderKL(**SD15_VAE)
        image = torch.randn(1, 3, resolution, resolution)
        latents = torch.randn(1, 4, resolution // 8, resolution // 8)
        return count_flops(lambda: vae.encode(image)), count_flops(lambda: vae.decode(latents))


def text_encoder_flops() -> int:
    with torch.device("meta"), torch.no_grad():
        model = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        ids = torch.zeros(1, TOKENS, dtype=torch.long)
        return count_flops(lambda: model(ids))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args(argv)
    encoder, decoder = vae_flops(args.resolution)
    rows = [
        ("U-Net forward", unet_flops(args.resolution)),
        ("U-Net forward + backward", unet_flops(args.resolution, backward=True)),
        ("VAE encoder", encoder),
        ("VAE decoder", decoder),
        ("CLIP text encoder (77 tokens)", text_encoder_flops()),
    ]
    print(f"Stable Diffusion 1.5 at {args.resolution} px, batch 1 (GFLOPs):")
    for name, flops in rows:
        print(f"  {name:32s} {flops / 1e9:10.1f}")


if __name__ == "__main__":
    main()
