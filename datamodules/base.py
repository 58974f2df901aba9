"""What every image-text DataModule shares: records, the dataset, collation and the loaders."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

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
        return {"pixel_values": self.transform(img), "prompt": record.prompt}


class ImageTextCollate:
    """Stacks examples into a batch and, given a tokenizer, tokenises the prompts.

    A top-level class rather than a closure so that DataLoader workers can pickle it; tokenising
    here runs in the workers instead of the training loop.
    """

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [e["prompt"] for e in examples]
        batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]), "prompts": prompts}
        if self.tokenizer is not None:
            tokens = self.tokenizer(prompts)
            batch["input_ids"] = tokens["input_ids"]
            batch["attention_mask"] = tokens["attention_mask"]
        return batch


class ImageTextDataModule(L.LightningDataModule, ABC):
    """Base of the DataModules: a subclass only says which records make up each split.

    Batches are dicts with `pixel_values` (float [B, 3, H, W] in [-1, 1]), `prompts` (list of
    str) and, once a tokenizer is set, `input_ids` and `attention_mask` ([B, L]).

    tokenizer: a picklable `list[str] -> {"input_ids", "attention_mask"}`. Usually left None
        here and attached by the training module (`datamodule.tokenizer = ...`), which knows
        its text encoder's tokenizer; it is read when the loaders are built.
    An empty "val" split validates on the training records (with a warning); an empty "test"
    split is an error, since testing on training images would report a meaningless score.
    """

    def __init__(
        self,
        image_size: int = 512,
        batch_size: int = 4,
        num_workers: int = 0,
        center_crop: bool = True,
        random_flip: bool = False,
        tokenizer: Any = None,
    ):
        super().__init__()
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = ImageTransform(image_size, center_crop=center_crop, random_flip=random_flip)
        self.tokenizer = tokenizer
        self._records: dict[str, list[Record]] | None = None
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

    def train_dataloader(self) -> DataLoader:
        records = self.records("train")
        if not records:
            raise ValueError(f"{type(self).__name__} has no training records")
        return self._loader(records, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        records = self.records("val")
        if not records:
            records = self.records("train")
            if not records:
                raise ValueError(f"{type(self).__name__} has neither validation nor training records")
            log.warning(
                "%s has no validation records: validating on the %d training records instead, "
                "so validation scores measure fit, not generalisation",
                type(self).__name__,
                len(records),
            )
        return self._loader(records, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        records = self.records("test")
        if not records:
            raise ValueError(f"{type(self).__name__} has no test records (in a CSV: rows with split 'test')")
        return self._loader(records, shuffle=False)

    def _loader(self, records: list[Record], shuffle: bool) -> DataLoader:
        return DataLoader(
            ImageTextDataset(records, self.transform),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=ImageTextCollate(self.tokenizer),
        )
