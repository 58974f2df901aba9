"""The prepared cache: resized images, VAE latents and text embeddings computed once.

Decoding a 2,500-px radiograph and running the frozen VAE and text encoder on it every epoch
costs more than the U-Net step it feeds. `medsd prepare` computes these once per split, and a
DataModule with `cache_dir` serves them instead. Layout of a cache folder:

    cache.json                      what was cached, from which records, model and transform
    <split>/images/00000000.png     the transformed image (uint8, exactly the training size)
    <split>/latent_mean.npy         VAE posterior mean and std [N, C, h, w]: training still
    <split>/latent_std.npy          draws a fresh latent sample every epoch, as without a cache
    <split>/text.<name>.npy         text conditioning, only for frozen text encoders: one array
                                    (prompt_embeds [N, L, D]) or several (SDXL, FLUX: token
                                    states and a pooled vector [N, D])

Rows whose image `medsd prepare` could not read (bad_images="skip") are listed in cache.json
under their split's "unreadable"; training skips them as it would skip the images themselves.

The arrays are memory-mapped, so workers read only the rows they serve. `cache.json` is written
last and the folder appears whole (see `atomic_directory`), so a half-written cache is never read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import SKIP_REASONS, Record, RecordDataset, SkippedImage, with_labels

MANIFEST = "cache.json"
TEXT = "text."  # file-name prefix of the text conditioning's arrays
VERSION = 2  # 2: text conditioning as named arrays (was one prompt_embeds array)
# A row whose image could not be read raises again what reading it raised, by its recorded reason.
REASON_ERRORS = {reason: kind for kind, reason in SKIP_REASONS.items()}


class CacheMismatchError(ValueError):
    """The cache was prepared from other records, another transform or another model."""


def records_fingerprint(records: list[Record]) -> str:
    """A digest of the records' images and prompts, in order: a cache is only valid for them."""
    digest = hashlib.sha256()
    for record in records:
        if isinstance(record.image, Image.Image):
            image_id = hashlib.sha1(record.image.tobytes()).hexdigest()
        else:
            image_id = str(record.image)
        digest.update(f"{image_id}\t{record.prompt}\n".encode())
    return digest.hexdigest()


def image_path(split_dir: Path, index: int) -> Path:
    return split_dir / "images" / f"{index:08d}.png"


def tensor_to_png(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> 8-bit RGB image (the inverse of `png_to_tensor` up to rounding)."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())


def png_to_tensor(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1)


class PreparedCache:
    """Read side of a cache folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"no prepared cache at {self.root} ({MANIFEST} missing): run "
                f"`medsd prepare --config <run config> --out {self.root}` first, or unset data.cache_dir"
            )
        self.manifest: dict[str, Any] = json.loads(path.read_text())
        if self.manifest.get("version") != VERSION:
            raise CacheMismatchError(
                f"{path} has cache version {self.manifest.get('version')}, not {VERSION}"
            )

    def dataset(
        self, split: str, records: list[Record], transform: dict[str, Any], bad_images: str = "error"
    ) -> CachedDataset:
        """The examples of `split`, checked against what the cache was made from; `bad_images` is
        the DataModule's setting, for the rows whose image could not be read."""
        where = f"the cache at {self.root}"
        if self.manifest["transform"] != transform:
            raise CacheMismatchError(
                f"{where} was prepared with image transform {self.manifest['transform']}, this run "
                f"uses {transform}: prepare it again"
            )
        entry = self.manifest["splits"].get(split)
        if entry is None:
            raise CacheMismatchError(
                f"{where} has no '{split}' split (it has {sorted(self.manifest['splits'])})"
            )
        if entry["n"] != len(records) or entry["fingerprint"] != records_fingerprint(records):
            raise CacheMismatchError(
                f"{where} was prepared from {entry['n']} '{split}' records that differ from this run's "
                f"{len(records)} (data or its filters changed): prepare it again"
            )
        unreadable = {int(index): row for index, row in entry.get("unreadable", {}).items()}
        return CachedDataset(
            self.root / split, records, entry["latents"], entry["text"], unreadable, bad_images, split
        )


class CachedDataset(RecordDataset):
    """Examples from a cache: latents in place of images when cached, else the resized images,
    and the text conditioning's arrays under `text` when cached.

    unreadable: index -> the manifest's entry for a row whose image could not be read: reading
        it raises what reading the image raised, for the bad_images policy to handle.
    """

    def __init__(
        self,
        split_dir: Path,
        records: list[Record],
        latents: bool,
        text: list[str],
        unreadable: dict[int, dict[str, str]] | None = None,
        bad_images: str = "error",
        split: str = "train",
    ):
        super().__init__(records, bad_images, split)
        self.split_dir = split_dir
        self.names = (["latent_mean", "latent_std"] if latents else []) + [f"{TEXT}{n}" for n in text]
        self.unreadable = unreadable or {}
        self._arrays: dict[str, np.ndarray] | None = None  # opened in each worker, not pickled

    def example(self, index: int) -> dict[str, Any]:
        if index in self.unreadable:
            row = self.unreadable[index]
            raise REASON_ERRORS[row["reason"]](row["error"])
        if self._arrays is None:
            self._arrays = {n: np.load(self.split_dir / f"{n}.npy", mmap_mode="r") for n in self.names}
        example: dict[str, Any] = {"prompt": self.records[index].prompt}
        for name, array in self._arrays.items():
            row = torch.from_numpy(np.array(array[index], dtype=np.float32))
            if name.startswith(TEXT):
                example.setdefault("text", {})[name.removeprefix(TEXT)] = row
            else:
                example[name] = row
        if "latent_mean" not in example:
            example["pixel_values"] = png_to_tensor(image_path(self.split_dir, index))
        return with_labels(example, self.records[index])


class CacheWriter:
    """Write side: one split at a time, rows in record order, manifest at the end."""

    def __init__(self, root: Path, transform: dict[str, Any], model: dict[str, Any], dtype: str):
        self.root = Path(root)
        self.dtype = np.dtype(dtype)
        self.manifest: dict[str, Any] = {
            "version": VERSION,
            "transform": transform,
            "model": model,
            "dtype": dtype,
            "splits": {},
        }
        self._arrays: dict[str, np.ndarray] = {}

    def note_unreadable(self, images: list[SkippedImage]) -> None:
        """Rows of the current split whose image could not be read (bad_images="skip"): they hold
        the next readable record's data, which is never served in their name."""
        rows = self.manifest["splits"][self.split].setdefault("unreadable", {})
        for image in images:
            rows[str(image.index)] = {"path": image.path, "reason": image.reason, "error": image.error}

    def start_split(self, split: str, records: list[Record]) -> None:
        self.split, self.n = split, len(records)
        (self.root / split / "images").mkdir(parents=True, exist_ok=True)
        self._arrays = {}
        self.manifest["splits"][split] = {
            "n": len(records),
            "fingerprint": records_fingerprint(records),
            "latents": False,
            "text": [],
        }

    def write(
        self,
        start: int,
        pixels: torch.Tensor,
        latents: tuple[torch.Tensor, torch.Tensor] | None = None,
        text: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Rows `start .. start + len(pixels)`: images, and the latent posterior (mean, std) and
        the text conditioning's named arrays when given."""
        for i, image in enumerate(pixels):
            tensor_to_png(image).save(image_path(self.root / self.split, start + i))
        arrays = dict(zip(("latent_mean", "latent_std"), latents or (), strict=False))
        arrays.update({f"{TEXT}{name}": values for name, values in (text or {}).items()})
        entry = self.manifest["splits"][self.split]
        for name, values in arrays.items():
            if name not in self._arrays:
                self._arrays[name] = np.lib.format.open_memmap(
                    self.root / self.split / f"{name}.npy",
                    mode="w+",
                    dtype=self.dtype,
                    shape=(self.n, *values.shape[1:]),
                )
                if name.startswith(TEXT):
                    entry["text"].append(name.removeprefix(TEXT))
                else:
                    entry["latents"] = True
            self._arrays[name][start : start + len(values)] = values.float().cpu().numpy()

    def finish(self) -> None:
        for array in self._arrays.values():
            array.flush()
        self._arrays = {}
        (self.root / MANIFEST).write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
