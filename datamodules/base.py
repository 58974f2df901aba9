"""What every image-text DataModule shares: records, the dataset, collation and the loaders."""

from __future__ import annotations

import ctypes
import gc
import inspect
import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import pyarrow
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .atomic import write_atomically
from .images import ImageLoadError, ImageTransform, load_image, to_rgb
from .integrity import check_no_image_in_two_splits
from .record_index import Built, RecordIndex, code_digest, default_index_dir, digest, token_lengths

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Why an image was skipped (bad_images="skip"), by the error reading it raised: what the counts
# are grouped by.
SKIP_REASONS: dict[type[Exception], str] = {
    ImageLoadError: "cannot be decoded",
    FileNotFoundError: "file missing",
}
# The run folder's record of the skipped images (rank 0's; other ranks add `.rank<N>`).
SKIPPED_IMAGES = "skipped_images.json"
# The settings of ImageTextDataModule that shape batches, not records: left out of the record index's key.
BATCH_SETTINGS = frozenset(
    {
        "image_size", "batch_size", "num_workers", "center_crop", "pad_to_square", "random_flip",
        "long_prompts", "cache_dir", "tokenizer", "bad_images", "max_bad_image_share", "record_index",
        "record_index_dir",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Record:
    """One example: an image (a file path, or an image already in memory) and its caption.

    labels: finding name -> value, as the dataset states it: for MIMIC-CXR's CheXpert labels
        1.0 positive, 0.0 negative, -1.0 uncertain and None for "not mentioned" (a blank cell),
        kept distinct because papers treat them differently.
    meta: anything else worth reporting or grouping by (view position, study id, modality, ...).
    Read-only, dicts included: records with equal labels may share one dict (MIMIC-CXR's 218k
    frontal images have a few thousand label patterns, and a dict each would cost 100 MB).
    """

    image: str | Image.Image
    prompt: str
    labels: dict[str, float | None] | None = None
    meta: dict[str, str] | None = None


@dataclass(frozen=True)
class SkippedImage:
    """An image left out under bad_images="skip": its split, its record's index there, its file,
    why (a SKIP_REASONS value) and the error reading it raised."""

    split: str
    index: int
    path: str
    reason: str
    error: str


class TooManyBadImagesError(ValueError):
    """More of a split's images could not be read than max_bad_image_share allows."""


class RecordDataset(Dataset, ABC):
    """The examples of a split's records, one per index (`example`).

    bad_images: "error" raises what reading an image raised (ImageLoadError naming the file, or
        FileNotFoundError). "skip" serves the next readable record in its place (index + 1, + 2,
        ..., round to the start), with the images skipped on the way under "skipped_images" for
        the DataModule to count. Replacing rather than dropping keeps every batch full, so a
        batch whose images are all unreadable never reaches a training step empty, and each
        step's seeded noise keeps its shape. The replacement follows from the index alone: the
        same in every worker, every run and after a resume. Its cost: the record after a skipped
        one is seen twice in that epoch.
    """

    def __init__(self, records: list[Record], bad_images: str = "error", split: str = "train"):
        self.records = records
        self.bad_images = bad_images
        self.split = split

    def __len__(self) -> int:
        return len(self.records)

    @abstractmethod
    def example(self, index: int) -> dict[str, Any]:
        """Record `index`'s example; raises a SKIP_REASONS error when its image cannot be read."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.bad_images == "error":
            return self.example(index)
        skipped = []
        for offset in range(len(self)):
            at = (index + offset) % len(self)
            try:
                example = self.example(at)
            except tuple(SKIP_REASONS) as error:
                skipped.append(self._skipped(at, error))
                continue
            if skipped:
                example["skipped_images"] = skipped
            return example
        raise ImageLoadError(
            f"none of the {len(self)} {self.split} images can be read (bad_images='skip'), e.g. "
            f"{skipped[0].error}"
        )

    def _skipped(self, index: int, error: Exception) -> SkippedImage:
        reason = next(reason for kind, reason in SKIP_REASONS.items() if isinstance(error, kind))
        return SkippedImage(self.split, index, str(self.records[index].image), reason, str(error))


class ImageTextDataset(RecordDataset):
    def __init__(
        self,
        records: list[Record],
        transform: ImageTransform,
        bad_images: str = "error",
        split: str = "train",
    ):
        super().__init__(records, bad_images, split)
        self.transform = transform

    def example(self, index: int) -> dict[str, Any]:
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
        # Counted by the DataModule in the main process: a worker's own counts would stay there.
        skipped = [image for e in examples for image in e.get("skipped_images", ())]
        if skipped:
            batch["skipped_images"] = skipped
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
        bad_images: an image that cannot be read during training (corrupt, truncated, not an
            image, or gone since the records were listed): "error" (default) stops with
            ImageLoadError naming the file (FileNotFoundError for a missing one); "skip" serves
            the next readable record in its place (see RecordDataset), logs each skipped image
            once with its path and reason, counts them per split and reason, and writes the
            counts to the run's loggers (`data/skipped_images/<split>`) and everything to
            `skipped_images.json` in the run folder. `medsd prepare` follows the same setting and
            marks the rows it skipped in the cache, which training then skips in the same way.
        max_bad_image_share: with "skip", the run stops anyway (TooManyBadImagesError, naming a
            few of the images) as soon as the images skipped in a split are more than this share
            of its images (each DDP rank: of the images it reads). The default, 1%, is issue 14's:
            a dataset with more bad images than that wants repairing, not training around. So 1
            bad image in 50 (2%) stops under the default; 0.05 lets it train (5 in 50 still stop).
        record_index: store the records built on the first start in the record index
            (datamodules/record_index.py) and read them from there on later starts, in every rank;
            rebuilt when a file they were built from or a setting changes. DataModules whose
            records are made in memory have none.
        record_index_dir: the index's folder (default: $MEDSD_CACHE_DIR/record-index, else
            ~/.cache/medsd/record-index).
    """

    # Whether the records come from files the record index can watch (set by the subclasses that read a
    # dataset's files; a build that noted no source file is not stored).
    indexed: ClassVar[bool] = False

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
        bad_images: Literal["error", "skip"] = "error",
        max_bad_image_share: float = 0.01,
        record_index: bool = True,
        record_index_dir: str | None = None,
    ):
        super().__init__()
        self._record_settings = _init_arguments(self, skip=BATCH_SETTINGS)
        if long_prompts not in ("truncate", "drop", "error"):
            raise ValueError(f"long_prompts must be 'truncate', 'drop' or 'error', got {long_prompts!r}")
        if bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images must be 'error' or 'skip', got {bad_images!r}")
        if not 0 <= max_bad_image_share <= 1:
            raise ValueError(f"max_bad_image_share must be in [0, 1], got {max_bad_image_share}")
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = ImageTransform(
            image_size, center_crop=center_crop, random_flip=random_flip, pad_to_square=pad_to_square
        )
        self.long_prompts = long_prompts
        self.cache_dir = cache_dir
        self.tokenizer = tokenizer
        self.bad_images = bad_images
        self.max_bad_image_share = max_bad_image_share
        self._records: dict[str, list[Record]] | None = None
        self._usable: dict[str, list[Record]] = {}
        # split -> prompts the text encoder sees only the beginning of (long_prompts="truncate").
        self.truncated: Counter = Counter()
        # split -> reason -> records left out, for the logs and `medsd inspect-data`.
        self.dropped: dict[str, Counter] = {split: Counter() for split in SPLITS}
        # split -> image file -> why it was skipped (bad_images="skip"): each image once, however
        # many epochs, workers or records (an image can have several prompts) meet it.
        self.skipped: dict[str, dict[str, SkippedImage]] = {split: {} for split in SPLITS}
        self._image_counts: dict[str, int] = {}
        self.record_index = record_index
        self.record_index_dir = record_index_dir
        # What the records were built from: file -> compared by content (a table) or by stat.
        self._sources: dict[str, bool] = {}
        self._drop_examples: dict[tuple[str, str], str] = {}
        self._index_build: Path | None = None
        # tokenizer fingerprint -> split -> each record's prompt length in tokens.
        self._lengths: dict[str, dict[str, list[int]]] = {}

    @abstractmethod
    def load_records(self, split: str) -> list[Record]:
        """The records of `split` ("train", "val" or "test"); an empty list when it has none."""

    def prepare_data(self) -> None:
        # Lightning calls this on each node's rank 0 before any rank's setup: the record index is
        # built (or found current) here, once, and the other ranks read it in their setup.
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup once per stage (fit, validate, test); the records load once.
        if self._records is None:
            self._records = self._indexed_records() if self.indexed and self.record_index else self._build()
            release_freed_memory()  # the tables the records were built from
            counts = ", ".join(f"{len(self._records.get(split, []))} {split}" for split in SPLITS)
            log.info("%s: %s records", type(self).__name__, counts)

    def _build(self) -> dict[str, list[Record]]:
        records = {split: self.load_records(split) for split in SPLITS}
        check_no_image_in_two_splits(records)  # no score on a training image
        return records

    def _indexed_records(self) -> dict[str, list[Record]]:
        key = digest(
            json.dumps(
                {
                    "class": f"{type(self).__module__}.{type(self).__qualname__}",
                    "settings": self._record_settings,
                    "cwd": os.getcwd(),
                    "code": code_digest(type(self)),
                },
                sort_keys=True,
                default=str,
            )
        )[:16]
        index = RecordIndex(self.record_index_dir or default_index_dir(), type(self).__name__, key)
        try:
            index.folder.mkdir(parents=True, exist_ok=True)
            writable = os.access(index.folder, os.W_OK)
        except OSError:
            writable = False
        if not writable:  # a read-only home or cache: the records are built as without an index
            log.warning(
                "record index folder %s cannot be written; building the records without it", index.folder
            )
            return self._build()
        built, mine = index.read_or_build(Record, lambda: self._build_index(index))
        if not mine:  # counted and logged as when they were built
            for drop in built.drops:
                self.note_dropped(**drop)
        self._index_build = built.folder
        return {split: built.records.get(split, []) for split in SPLITS}

    def _build_index(self, index: RecordIndex) -> Built:
        records = self._build()
        drops = [
            {
                "split": split,
                "reason": reason,
                "count": count,
                "example": self._drop_examples.get((split, reason), ""),
            }
            for split, reasons in self.dropped.items()
            for reason, count in reasons.items()
        ]
        if not self._sources or any(not isinstance(r.image, str) for rs in records.values() for r in rs):
            log.info(
                "%s: records not read from files only; not stored in the record index", type(self).__name__
            )
            return Built(records, drops, None)
        return Built(records, drops, index.write(records, drops, self._sources, self._record_settings))

    def note_source(self, path: str | os.PathLike, table: bool = False) -> None:
        """Record that the records are built from `path` (a file read, or one looked for and absent;
        a folder whose listing was read): the record index is rebuilt when it changes. `table`: a
        table file, compared by content; per-record files (reports) are compared by size and time."""
        self._sources[os.fspath(path)] = table

    def note_dropped(self, split: str, reason: str, count: int, example: str = "") -> None:
        """Record (and log) that `count` records of `split` were left out, and why.

        Every policy that drops records goes through here, so no record disappears silently.
        """
        if count <= 0:
            return
        self.dropped[split][reason] += count
        self._drop_examples.setdefault((split, reason), example)
        log.warning(
            "%s: dropped %d %s record(s): %s%s",
            type(self).__name__,
            count,
            split,
            reason,
            f" (e.g. {example})" if example else "",
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        # The Trainer calls this in the main process for every batch of every loader, so the
        # images skipped in the workers are counted here, and the training modules never see them.
        if isinstance(batch, dict) and "skipped_images" in batch:
            self.note_skipped(batch.pop("skipped_images"))
        return batch

    def note_skipped(self, images: list[SkippedImage]) -> None:
        """Count and log images skipped under bad_images="skip", each once, and report them; stop
        (TooManyBadImagesError) as soon as a split's share of them is past max_bad_image_share."""
        fresh = False
        for image in images:
            if image.path in self.skipped[image.split]:
                continue
            self.skipped[image.split][image.path] = image
            fresh = True
            log.warning(
                "%s: skipped %s image %s (%s): %s",
                type(self).__name__,
                image.split,
                image.path,
                image.reason,
                image.error,
            )
            if self.skipped_share(image.split) > self.max_bad_image_share:
                self.report_skipped()
                raise TooManyBadImagesError(self._too_many_bad_images(image.split))
        if fresh:
            self.report_skipped()

    def skipped_share(self, split: str) -> float:
        """The images of `split` skipped so far, as a share of those this process reads."""
        return len(self.skipped[split]) / self._images_read(split)

    def _images_read(self, split: str) -> float:
        if split not in self._image_counts:
            records = self.usable_records(split)
            # In-memory images are told apart by identity (they never fail to read).
            self._image_counts[split] = len(
                {r.image if isinstance(r.image, str) else id(r.image) for r in records}
            )
        # Under DDP each rank reads its part of the split and counts only what it meets there.
        world = self.trainer.world_size if self.trainer is not None else 1
        return self._image_counts[split] / world

    def _too_many_bad_images(self, split: str) -> str:
        from .tables import some_items  # tables builds on this module

        skipped = self.skipped[split].values()
        return (
            f"{type(self).__name__}: {len(skipped)} of {self._images_read(split):g} {split} images could not "
            f"be read ({self.skipped_share(split):.1%}), more than max_bad_image_share="
            f"{self.max_bad_image_share} allows with bad_images='skip': "
            f"{some_items((f'{i.path} ({i.reason})' for i in skipped), limit=3)}; repair or remove them, "
            "or raise max_bad_image_share"
        )

    def skipped_summary(self) -> dict[str, Any]:
        """What skipped_images.json holds: the settings and, per split with skipped images, their
        count, share and counts per reason, and each image with its reason and error."""
        splits = {
            split: {
                "skipped": len(images),
                "share": self.skipped_share(split),
                "reasons": dict(Counter(i.reason for i in images.values())),
                "images": [{"path": i.path, "reason": i.reason, "error": i.error} for i in images.values()],
            }
            for split, images in self.skipped.items()
            if images
        }
        return {
            "bad_images": self.bad_images,
            "max_bad_image_share": self.max_bad_image_share,
            "splits": splits,
        }

    def report_skipped(self) -> None:
        """The counts to the run's loggers and the summary to skipped_images.json in the run folder.
        Without a Trainer (`medsd prepare`), the log lines and the cache's manifest record them."""
        trainer = self.trainer
        if trainer is None:
            return
        counts = {
            f"data/skipped_images/{split}": len(images) for split, images in self.skipped.items() if images
        }
        for logger in trainer.loggers:
            logger.log_metrics(counts, step=trainer.global_step)
        rank = trainer.global_rank
        name = SKIPPED_IMAGES if rank == 0 else SKIPPED_IMAGES.replace(".json", f".rank{rank}.json")
        text = json.dumps(self.skipped_summary(), indent=2) + "\n"
        write_atomically(Path(trainer.default_root_dir) / name, lambda tmp: tmp.write_text(text))

    def state_dict(self) -> dict[str, Any]:
        # In the checkpoint, so that a resumed run reports (and logs) each image once, as an
        # uninterrupted one does; empty, and so left out of the checkpoint, while nothing is skipped.
        images = [asdict(i) for split in self.skipped.values() for i in split.values()]
        return {"skipped_images": images} if images else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for entry in state_dict.get("skipped_images", []):
            image = SkippedImage(**entry)
            self.skipped[image.split][image.path] = image

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

    def prompt_lengths(self, split: str) -> list[int]:
        """Each record's prompt length in the attached tokenizer's tokens (its template applied),
        counted once: for every split at once, and with a record index, stored there per tokenizer
        (its `fingerprint`), so later starts and the other ranks read it."""
        key = getattr(self.tokenizer, "fingerprint", None)
        if key is None:
            return self.tokenizer.lengths([r.prompt for r in self.records(split)])
        if key not in self._lengths:
            records = [self.records(s) for s in SPLITS]
            prompts = [r.prompt for rs in records for r in rs]
            if self._index_build is not None:
                flat = token_lengths(
                    self._index_build, self.tokenizer, prompts, self.tokenizer.lengths
                ).tolist()
            else:
                flat = self.tokenizer.lengths(prompts)
            ends = np.cumsum([len(rs) for rs in records]).tolist()
            self._lengths[key] = {
                s: flat[end - len(rs) : end] for s, rs, end in zip(SPLITS, records, ends, strict=True)
            }
        return self._lengths[key][split]

    def _apply_prompt_policy(self, split: str, records: list[Record]) -> list[Record]:
        limit = self.tokenizer.max_length
        lengths = self.prompt_lengths(split)
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
            return ImageTextDataset(records, self.transform, self.bad_images, split)
        from .cache import PreparedCache  # the cache module needs nothing unless a cache is used

        return PreparedCache(self.cache_dir).dataset(
            split, records, self.transform_settings(), self.bad_images
        )

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


def release_freed_memory() -> None:
    """Hand the memory Python has freed back to the system (glibc keeps it otherwise): building
    MIMIC-CXR's records frees some 300 MB of tables, which would stay in the process for the run."""
    gc.collect()
    pyarrow.default_memory_pool().release_unused()  # pandas' text columns live in Arrow's pool
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused within the process
        pass


def _init_arguments(obj: object, skip: frozenset[str]) -> dict[str, Any]:
    """The arguments the `__init__`s of `obj`'s classes were called with (each by the innermost
    `__init__` that names it: the value a subclass passes on), but those in `skip`. Read from the
    calling frames, so a subclass need not list its settings for the record index's key."""
    settings: dict[str, Any] = {}
    frame = inspect.currentframe().f_back
    while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is obj:
        arguments = inspect.getargvalues(frame)
        for name in arguments.args[1:]:
            settings.setdefault(name, arguments.locals[name])
        frame = frame.f_back
    return {name: value for name, value in settings.items() if name not in skip}
