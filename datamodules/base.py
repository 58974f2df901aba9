"""What every image-text DataModule shares: records, the dataset, collation and the loaders."""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .images import ImageTransform, load_image, to_rgb

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One example: an image (a file path, or an image already in memory) and its caption.

    labels: finding name -> value, as the dataset states it: for MIMIC-CXR's CheXpert labels
        1.0 positive, 0.0 negative, -1.0 uncertain and None for "not mentioned" (a blank cell),
        kept distinct because papers treat them differently.
    meta: anything else worth reporting or grouping by (view position, study id, modality, ...).
    """

    image: str | Image.Image
    prompt: str
    labels: dict[str, float | None] | None = None
    meta: dict[str, str] | None = None


class ImageTextDataset(Dataset):
    def __init__(self, records: list[Record], transform: ImageTransform):
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        if isinstance(record.image, Image.Image):
            img = to_rgb(record.image)
        else:
            img = load_image(record.image, draft_size=self.transform.size)
        return with_labels({"pixel_values": self.transform(img), "prompt": record.prompt}, record)


def with_labels(example: dict[str, Any], record: Record) -> dict[str, Any]:
    if record.labels is not None:
        example["labels"] = record.labels
    return example


def run_seed() -> int:
    """The seed `seed_everything` set for this run (0 if none)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochShuffle(RandomSampler):
    """A random order per epoch that follows from the run's seed and the epoch alone (Lightning
    calls `set_epoch` before every epoch, a resumed one included), so a resumed run sees the
    batches the uninterrupted one saw. Under DDP, Lightning puts its DistributedSampler, seeded
    the same way, in its place."""

    def __init__(self, data_source):
        super().__init__(data_source, generator=torch.Generator())
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(run_seed() * 1_000_003 + epoch)


class ImageTextCollate:
    """Stacks examples into a batch and, given a tokenizer, tokenises the prompts.

    A top-level class rather than a closure so that DataLoader workers can pickle it; tokenising
    here runs in the workers instead of the training loop.
    """

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [e["prompt"] for e in examples]
        batch: dict[str, Any] = {"prompts": prompts}
        # Images, or what a prepared cache holds in their place (latents, text embeddings).
        for key in ("pixel_values", "latent_mean", "latent_std"):
            if key in examples[0]:
                batch[key] = torch.stack([e[key] for e in examples])
        if "text" in examples[0]:
            batch["text"] = {
                name: torch.stack([e["text"][name] for e in examples]) for name in examples[0]["text"]
            }
        if "labels" in examples[0]:
            batch["label_names"], batch["labels"] = stack_labels([e["labels"] for e in examples])
        if self.tokenizer is not None:
            tokens = self.tokenizer(prompts)
            batch["input_ids"] = tokens["input_ids"]
            batch["attention_mask"] = tokens["attention_mask"]
        return batch


def stack_labels(labels: list[dict[str, float | None]]) -> tuple[list[str], torch.Tensor]:
    """Label dicts -> (names, float tensor [B, L]); "not mentioned" (None) becomes NaN, so it
    stays distinct from 0 (negative) and -1 (uncertain)."""
    names = list(labels[0])
    if any(list(row) != names for row in labels):
        raise ValueError(f"examples in one batch carry different label names: {names} vs others")
    values = [[math.nan if row[n] is None else float(row[n]) for n in names] for row in labels]
    return names, torch.tensor(values, dtype=torch.float32)


class ImageTextDataModule(L.LightningDataModule, ABC):
    """Base of the DataModules: a subclass only says which records make up each split.

    Batches are dicts with `pixel_values` (float [B, 3, H, W] in [-1, 1]), `prompts` (list of
    str) and, once a tokenizer is set, `input_ids` and `attention_mask` ([B, L]).

    tokenizer: a picklable `list[str] -> {"input_ids", "attention_mask"}`. Usually left None
        here and attached by the training module (`datamodule.tokenizer = ...`), which knows
        its text encoder's tokenizer; it is read when the loaders are built.
    An empty "val" split validates on the training records (with a warning); an empty "test"
    split is an error, since testing on training images would report a meaningless score.

    Args:
        image_size: side of the square training images.
        center_crop: resize the shorter side and crop the centre (False: a random crop).
        pad_to_square: resize the longer side and pad with black instead of cropping.
        random_flip: horizontal flips as augmentation. Off by default: wrong for chest X-rays.
        long_prompts: prompts longer than the text encoder's limit (CLIP: 77 tokens) are
            "truncate"d (the encoder sees their beginning), "drop"ped, or an "error"; counted
            and logged either way. Applied once a tokenizer is attached.
        cache_dir: a folder written by `medsd prepare`: training then reads resized images,
            VAE latents and (for a frozen text encoder) text embeddings from it.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        image_size: int = 512,
        batch_size: int = 4,
        num_workers: int = 0,
        center_crop: bool = True,
        pad_to_square: bool = False,
        random_flip: bool = False,
        long_prompts: Literal["truncate", "drop", "error"] = "truncate",
        cache_dir: str | None = None,
        tokenizer: Any = None,
    ):
        super().__init__()
        if long_prompts not in ("truncate", "drop", "error"):
            raise ValueError(f"long_prompts must be 'truncate', 'drop' or 'error', got {long_prompts!r}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = ImageTransform(
            image_size, center_crop=center_crop, random_flip=random_flip, pad_to_square=pad_to_square
        )
        self.long_prompts = long_prompts
        self.cache_dir = cache_dir
        self.tokenizer = tokenizer
        self._records: dict[str, list[Record]] | None = None
        self._usable: dict[str, list[Record]] = {}
        # split -> prompts the text encoder sees only the beginning of (long_prompts="truncate").
        self.truncated: Counter = Counter()
        # split -> reason -> records left out, for the logs and `medsd inspect-data`.
        self.dropped: dict[str, Counter] = {split: Counter() for split in SPLITS}

    @abstractmethod
    def load_records(self, split: str) -> list[Record]:
        """The records of `split` ("train", "val" or "test"); an empty list when it has none."""

    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup once per stage (fit, validate, test); the records load once.
        if self._records is None:
            self._records = {split: self.load_records(split) for split in SPLITS}
            counts = ", ".join(f"{len(records)} {split}" for split, records in self._records.items())
            log.info("%s: %s records", type(self).__name__, counts)

    def note_dropped(self, split: str, reason: str, count: int, example: str = "") -> None:
        """Record (and log) that `count` records of `split` were left out, and why.

        Every policy that drops records goes through here, so no record disappears silently.
        """
        if count <= 0:
            return
        self.dropped[split][reason] += count
        log.warning(
            "%s: dropped %d %s record(s): %s%s",
            type(self).__name__,
            count,
            split,
            reason,
            f" (e.g. {example})" if example else "",
        )

    def records(self, split: str) -> list[Record]:
        self.setup()
        return self._records[split]

    def usable_records(self, split: str) -> list[Record]:
        """The records of `split` after the long-prompt policy: what the loaders serve.

        Without a tokenizer, prompt lengths are unknown and the records are returned as they are.
        """
        if self.tokenizer is None or not hasattr(self.tokenizer, "lengths"):
            return self.records(split)
        if split not in self._usable:
            self._usable[split] = self._apply_prompt_policy(split, self.records(split))
        return self._usable[split]

    def _apply_prompt_policy(self, split: str, records: list[Record]) -> list[Record]:
        limit = self.tokenizer.max_length
        lengths = self.tokenizer.lengths([r.prompt for r in records])
        too_long = [i for i, n in enumerate(lengths) if n > limit]
        if not too_long:
            return records
        first = records[too_long[0]].prompt
        example = f"{first[:60]!r}... ({lengths[too_long[0]]} tokens)"
        reason = f"prompt longer than the text encoder's {limit} tokens"
        if self.long_prompts == "error":
            raise ValueError(
                f"{type(self).__name__}: {len(too_long)} of {len(records)} {split} prompts are longer than "
                f"the text encoder's {limit} tokens, e.g. {example}; set long_prompts to 'truncate' or 'drop'"
            )
        if self.long_prompts == "drop":
            self.note_dropped(split, reason, len(too_long), example)
            skip = set(too_long)
            return [r for i, r in enumerate(records) if i not in skip]
        self.truncated[split] = len(too_long)
        log.warning(
            "%s: %d of %d %s prompts are truncated to the text encoder's %d tokens, e.g. %s",
            type(self).__name__,
            len(too_long),
            len(records),
            split,
            limit,
            example,
        )
        return records

    def train_dataloader(self) -> DataLoader:
        records = self.usable_records("train")
        if not records:
            raise ValueError(f"{type(self).__name__} has no training records")
        return self._loader(records, shuffle=True, split="train")

    def val_dataloader(self) -> DataLoader:
        split = "val"
        records = self.usable_records(split)
        if not records:
            split = "train"
            records = self.usable_records(split)
            if not records:
                raise ValueError(f"{type(self).__name__} has neither validation nor training records")
            log.warning(
                "%s has no validation records: validating on the %d training records instead, "
                "so validation scores measure fit, not generalisation",
                type(self).__name__,
                len(records),
            )
        return self._loader(records, shuffle=False, split=split)

    def test_dataloader(self) -> DataLoader:
        records = self.usable_records("test")
        if not records:
            raise ValueError(f"{type(self).__name__} has no test records (in a CSV: rows with split 'test')")
        return self._loader(records, shuffle=False, split="test")

    def dataset(self, records: list[Record], split: str) -> Dataset:
        """The examples of `records`: decoded and transformed images, or the prepared cache's."""
        if self.cache_dir is None:
            return ImageTextDataset(records, self.transform)
        from .cache import PreparedCache  # the cache module needs nothing unless a cache is used

        return PreparedCache(self.cache_dir).dataset(split, records, self.transform_settings())

    def transform_settings(self) -> dict[str, Any]:
        """What the images of a prepared cache must have been made with to be reused."""
        if not self.transform.deterministic:
            raise ValueError(
                "a prepared cache holds one fixed version of every image: it cannot be used with random "
                "crops or flips (set center_crop true and random_flip false)"
            )
        return {"image_size": self.image_size, "steps": repr(self.transform.steps)}

    def _loader(self, records: list[Record], shuffle: bool, split: str) -> DataLoader:
        dataset = self.dataset(records, split)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(dataset) if shuffle else None,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=ImageTextCollate(self.tokenizer),
        )
