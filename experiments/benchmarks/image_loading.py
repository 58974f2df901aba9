"""Benchmark: images per second from ~2,500-px chest X-ray JPEGs to 512-px training tensors.

    python -m experiments.benchmarks.image_loading [--n 48] [--size 2500] [--target 512]

Four ways to get the same training input, timed in one run on one core (no workers, so the
figures compare the work per image, not the parallelism):
  naive      full JPEG decode, then resize + centre crop (what a plain torchvision pipeline does);
  datamodule the DataModules' path: JPEG draft decoding at a reduced scale, then the same transform;
  cache-png  the resized images of a `medsd prepare` cache (8-bit PNG at the training size);
  cache-npy  the VAE latents a `medsd prepare` cache serves in place of images (SD's 4x64x64).
Phantom radiographs (`medsd phantoms --layout mimic-cxr`) stand in for MIMIC-CXR's images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from datamodules.base import ImageTextDataset, Record
from datamodules.cache import CacheWriter, PreparedCache
from datamodules.images import ImageTransform
from datamodules.phantoms import write_phantoms


def images_per_second(dataset, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):  # the best of a few passes: the least disturbed by other processes
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        best = min(best, time.perf_counter() - start)
    return len(dataset) / best


class NaiveDataset(ImageTextDataset):
    def __getitem__(self, index: int):
        with Image.open(self.records[index].image) as img:
            return {"pixel_values": self.transform(img.convert("RGB"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="images")
    parser.add_argument("--size", type=int, default=2500, help="phantom side in pixels")
    parser.add_argument("--target", type=int, default=512, help="training resolution")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = write_phantoms("mimic-cxr", args.n, Path(tmp) / "mimic", image_size=args.size)
        paths = sorted(str(p) for p in (root / "files").rglob("*.jpg"))
        records = [Record(p, "phantom") for p in paths]
        with Image.open(paths[0]) as img:
            print(f"{len(paths)} JPEGs of {img.size[0]}x{img.size[1]} px ({img.mode}) -> {args.target} px")
        transform = ImageTransform(args.target)

        writer = CacheWriter(Path(tmp) / "cache", {"bench": True}, {}, "float16")
        writer.start_split("train", records)
        latent = args.target // 8
        for i, record in enumerate(records):
            pixels = ImageTextDataset([record], transform)[0]["pixel_values"][None]
            fake = torch.randn(1, 4, latent, latent)  # reading cost depends on the shape only
            writer.write(i, pixels, latent_mean=fake, latent_std=fake)
        writer.finish()
        with_latents = PreparedCache(Path(tmp) / "cache").dataset("train", records, {"bench": True})
        pngs = PreparedCache(Path(tmp) / "cache").dataset("train", records, {"bench": True})
        pngs.names = []  # serve the cached images, as a cache prepared without latents does

        rates = {
            "naive": images_per_second(NaiveDataset(records, transform)),
            "datamodule": images_per_second(ImageTextDataset(records, transform)),
            "cache-png": images_per_second(pngs),
            "cache-npy": images_per_second(with_latents),
        }
    for name, rate in rates.items():
        print(f"{name:>11}: {rate:9.1f} images/s  ({rate / rates['naive']:6.1f}x naive)")


if __name__ == "__main__":
    main()
