"""`medsd prepare`: compute a run's resized images, VAE latents and text embeddings once.

    medsd prepare --config run.yaml --out cache/ [--splits train val] [--dtype float16]
    medsd fit     --config run.yaml --data.init_args.cache_dir cache/

The run config is the one `medsd fit` uses, so the cache holds exactly the records, transform,
VAE and (for a frozen text encoder) text conditioning of that run; `fit` checks this and refuses
a cache made for something else. See `datamodules/cache.py` for the folder's layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datamodules.atomic import atomic_directory
from datamodules.base import SPLITS, ImageTextCollate, ImageTextDataModule, ImageTextDataset
from datamodules.cache import CacheWriter
from experiments.cli import command_parser, parse_with_config_args
from lightning_modules import DiffusionModule
from lightning_modules.conditioning import as_arrays

log = logging.getLogger(__name__)


@torch.no_grad()
def prepare_cache(
    datamodule: ImageTextDataModule,
    module: DiffusionModule,
    out: str | Path,
    splits: tuple[str, ...] = SPLITS,
    batch_size: int = 16,
    dtype: str = "float32",
) -> dict:
    """Write the cache of `splits` to `out` (replacing it whole at the end); return its manifest."""
    datamodule.tokenizer = module.prompt_tokenizer  # the same long-prompt policy as training
    identity = module.cache_identity()
    module.eval()
    with atomic_directory(out) as scratch:
        writer = CacheWriter(scratch, datamodule.transform_settings(), identity, dtype)
        for split in splits:
            records = datamodule.usable_records(split)
            if not records:
                continue
            writer.start_split(split, records)
            loader = DataLoader(
                ImageTextDataset(records, datamodule.transform, datamodule.bad_images, split),
                batch_size=batch_size,
                num_workers=datamodule.num_workers,
                collate_fn=ImageTextCollate(),
            )
            start = 0
            for batch in tqdm(loader, desc=f"prepare {split}", unit="batch"):
                # The DataModule's bad_images policy, as in training: counted, logged, stopped
                # past its share; the rows skipped are marked so that training skips them too.
                skipped = batch.get("skipped_images", [])
                datamodule.note_skipped(skipped)
                writer.note_unreadable(skipped)
                pixels = batch["pixel_values"]
                text = None
                if identity["text"] is not None:
                    text = as_arrays(module.cached_conditioning(batch))
                writer.write(start, pixels, module.latent_posterior(pixels), text)
                start += len(pixels)
        writer.finish()
        manifest = writer.manifest
    log.info("prepared %s in %s", {s: v["n"] for s, v in manifest["splits"].items()}, out)
    return manifest


def main(argv: list[str]) -> None:
    from experiments.lightning_cli import build_from_config  # imported here: it imports Lightning

    parser = command_parser(
        prog="medsd prepare",
        description="Cache a run's resized images, VAE latents and frozen text embeddings. "
        "Other arguments (--config FILE, --data.init_args.KEY VALUE, ...) are `medsd fit`'s.",
    )
    parser.add_argument("--out", required=True, help="the cache folder to write")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args, config_args = parse_with_config_args(parser, argv)
    module, datamodule = build_from_config(config_args)
    prepare_cache(
        datamodule, module.to(args.device), args.out, tuple(args.splits), args.batch_size, args.dtype
    )
