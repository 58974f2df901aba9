"""bad_images: "skip" trains on past unreadable images, counting and reporting each, and stops past
max_bad_image_share; "error" stops at the first, naming it."""

import csv
import json
import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules import CSVImageTextDataModule, ImageLoadError
from datamodules.base import SKIPPED_IMAGES, TooManyBadImagesError
from experiments.prepare import prepare_cache
from lightning_modules import FineTuning
from lightning_modules.backbones import BackboneSpec
from tests.helpers.fit import tiny_fit

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def write_dataset(root: Path, splits: dict[str, int], corrupt: set[int] = frozenset()) -> Path:
    """A metadata.csv over 32-px PNGs, rows numbered 0, 1, ... through `splits` in order (e.g.
    {"train": 20, "val": 10}: rows 0-19 train, 20-29 val); the rows in `corrupt` are junk bytes
    with a .png ending. Returns the CSV's path."""
    (root / "images").mkdir(parents=True)
    lines = ["image,prompt,split"]
    for i, split in enumerate(split for split, n in splits.items() for _ in range(n)):
        path = root / "images" / f"{i:02d}.png"
        if i in corrupt:
            path.write_bytes(b"\x00junk, not an image\xff" * 8)
        else:
            Image.new("RGB", (32, 32), (4 * i, 128, 255 - 4 * i)).save(path)
        lines.append(f"images/{i:02d}.png,image {i},{split}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root / "metadata.csv"


def image(csv_path: Path, i: int) -> str:
    """The path the DataModule reports for row `i`'s image."""
    return str(csv_path.parent / "images" / f"{i:02d}.png")


def skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if re.search(r"skipped \w+ image ", r.getMessage())]


def report(root: Path) -> dict:
    return json.loads((root / SKIPPED_IMAGES).read_text())


# --- through `medsd fit` of the tiny U-Net config ----------------------------------------------


def fit_on(tmp_path: Path, corrupt: set[int]) -> Path:
    """`medsd fit` of tiny/unet.yaml on 50 train images (no val split: validation uses the training
    images), skipping bad ones up to 5%: 13 steps of 4 = one epoch, every image read."""
    source = write_dataset(tmp_path / "data", {"train": 50}, corrupt)
    data = tmp_path / "data.yaml"
    data.write_text(
        "class_path: datamodules.CSVImageTextDataModule\n"
        f"init_args: {{source: {source}, image_size: 32, batch_size: 4, bad_images: skip, "
        "max_bad_image_share: 0.05}\n"
    )
    tiny_fit(tmp_path / "run", "--data", str(data), "--trainer.max_steps", "13")
    return source


def test_one_corrupt_image_in_50_is_skipped_the_run_finishes_and_reports_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        source = fit_on(tmp_path, corrupt={17})
    run = tmp_path / "run"
    assert (run / "export").is_dir()  # the run ended normally
    (entry,) = report(run)["splits"]["train"]["images"]
    assert entry["path"] == image(source, 17) and entry["reason"] == "cannot be decoded"
    assert entry["error"].startswith(f"cannot read image {image(source, 17)}: ")
    summary = report(run)["splits"]["train"]
    assert (summary["skipped"], summary["share"], summary["reasons"]) == (1, 0.02, {"cannot be decoded": 1})
    skipped = f"skipped train image {image(source, 17)} (cannot be decoded): {entry['error']}"
    assert skip_lines(caplog) == [f"CSVImageTextDataModule: {skipped}"]
    events = EventAccumulator(str(run))
    events.Reload()
    assert [s.value for s in events.Scalars("data/skipped_images/train")] == [1.0]


def test_five_corrupt_images_in_50_stop_the_run_with_the_count_share_and_paths(tmp_path):
    # 5% of 50 is 2.5 images: the third one met stops the run, at 3 / 50 = 6%.
    corrupt = {7, 17, 27, 37, 47}
    with pytest.raises(TooManyBadImagesError) as stopped:
        fit_on(tmp_path, corrupt)
    message = str(stopped.value)
    assert message.startswith(
        "CSVImageTextDataModule: 3 of 50 train images could not be read (6.0%), more than "
        "max_bad_image_share=0.05 allows with bad_images='skip': "
    )
    named = re.findall(r"images/(\d\d)\.png \(cannot be decoded\)", message)
    assert len(named) == 3 and {int(i) for i in named} < corrupt
    assert report(tmp_path / "run")["splits"]["train"]["skipped"] == 3
    assert not (tmp_path / "run" / "export").exists()


# --- a minimal Trainer on the DataModule's loaders ----------------------------------------------


class Probe(L.LightningModule):
    """The smallest module a Trainer fits; it keeps what each batch held."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.batches: list[tuple[int, list[str]]] = []

    def training_step(self, batch, batch_idx):
        self.batches.append((len(batch["prompts"]), sorted(batch)))
        return self.weight * batch["pixel_values"].mean()

    def validation_step(self, batch, batch_idx):
        self.batches.append((len(batch["prompts"]), sorted(batch)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def probe_fit(root: Path, dm: CSVImageTextDataModule, epochs: int = 1) -> Probe:
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=CSVLogger(root, name="", version=""),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root,
    )  # fmt: skip
    trainer.fit(probe, dm)
    return probe


def data(source: Path, **kwargs) -> CSVImageTextDataModule:
    return CSVImageTextDataModule(str(source), image_size=32, batch_size=4, **kwargs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_counts_are_per_image_per_split_and_reason_with_or_without_workers(tmp_path, caplog, num_workers):
    # Train: rows 0-19, 3 and 11 corrupt, 5 deleted after the records were listed; val: rows
    # 20-29, 24 corrupt. Two epochs: each image is still counted and logged once.
    source = write_dataset(tmp_path / "data", {"train": 20, "val": 10}, corrupt={3, 11, 24})
    dm = data(source, bad_images="skip", max_bad_image_share=0.2, num_workers=num_workers)
    dm.setup()
    Path(image(source, 5)).unlink()
    with caplog.at_level(logging.WARNING):
        probe = probe_fit(tmp_path / "run", dm, epochs=2)

    splits = report(tmp_path / "run")["splits"]
    assert {split: s["reasons"] for split, s in splits.items()} == {
        "train": {"cannot be decoded": 2, "file missing": 1},
        "val": {"cannot be decoded": 1},
    }
    assert (splits["train"]["skipped"], splits["train"]["share"]) == (3, 3 / 20)
    assert (splits["val"]["skipped"], splits["val"]["share"]) == (1, 1 / 10)
    assert sorted(i["path"] for i in splits["train"]["images"]) == [image(source, i) for i in (3, 5, 11)]
    assert len(skip_lines(caplog)) == 4
    # Every batch full (20 / 4, 10 / 4 rounded up: the last val batch holds 2), none carrying the skips.
    # Lightning's sanity check adds two val batches before training.
    sizes = [size for size, _ in probe.batches]
    assert sizes == [4, 4] + 2 * ([4] * 5 + [4, 4, 2])
    assert all("skipped_images" not in keys for _, keys in probe.batches)
    with open(tmp_path / "run" / "metrics.csv") as file:
        logged = [row for row in csv.DictReader(file) if row["data/skipped_images/train"]]
    assert max(float(row["data/skipped_images/train"]) for row in logged) == 3


def test_under_the_default_share_one_bad_image_in_50_stops(tmp_path):
    source = write_dataset(tmp_path / "data", {"train": 50}, corrupt={30})
    with pytest.raises(
        TooManyBadImagesError, match=re.escape("1 of 50 train images could not be read (2.0%)")
    ):
        probe_fit(tmp_path / "run", data(source, bad_images="skip"))


def test_error_stops_at_the_first_bad_image_naming_it(tmp_path):
    source = write_dataset(tmp_path / "data", {"train": 8}, corrupt={6})
    with pytest.raises(ImageLoadError, match=f"^cannot read image {re.escape(image(source, 6))}: "):
        probe_fit(tmp_path / "run", data(source))
    assert not (tmp_path / "run" / SKIPPED_IMAGES).exists()


def test_a_batch_of_unreadable_images_is_filled_with_the_next_readable_one(tmp_path):
    source = write_dataset(tmp_path / "data", {"val": 10}, corrupt={0, 1, 2, 3})
    dm = data(source, bad_images="skip", max_bad_image_share=0.5)
    batch = dm.on_before_batch_transfer(next(iter(dm.val_dataloader())))
    assert batch["prompts"] == ["image 4"] * 4 and "skipped_images" not in batch
    assert sorted(dm.skipped["val"]) == [image(source, i) for i in range(4)]
    assert dm.skipped_share("val") == 0.4


def test_a_resumed_datamodule_logs_no_image_twice(tmp_path, caplog):
    source = write_dataset(tmp_path / "data", {"train": 8}, corrupt={2})
    first = data(source, bad_images="skip", max_bad_image_share=0.2)
    for batch in first.train_dataloader():
        first.on_before_batch_transfer(batch)
    state = first.state_dict()
    resumed = data(source, bad_images="skip", max_bad_image_share=0.2)
    resumed.load_state_dict(state)
    assert resumed.skipped == first.skipped and len(resumed.skipped["train"]) == 1
    caplog.clear()  # the first DataModule's line
    with caplog.at_level(logging.WARNING):
        for batch in resumed.train_dataloader():
            resumed.on_before_batch_transfer(batch)
    assert skip_lines(caplog) == []
    assert data(source).state_dict() == {}  # nothing skipped: nothing added to a checkpoint


def test_prepare_marks_the_rows_it_skipped_and_training_on_the_cache_skips_them(tmp_path):
    source = write_dataset(tmp_path / "data", {"train": 6}, corrupt={1})
    out = tmp_path / "cache"
    manifest = prepare_cache(
        data(source, bad_images="skip", max_bad_image_share=0.2),
        FineTuning(backbone=BackboneSpec("medsd/tiny-sd")),
        out,
    )
    (row,) = manifest["splits"]["train"]["unreadable"].items()
    assert row[0] == "1" and row[1]["path"] == image(source, 1) and row[1]["reason"] == "cannot be decoded"

    cached = data(source, bad_images="skip", max_bad_image_share=0.2, cache_dir=str(out))
    loader = cached._loader(cached.usable_records("train"), shuffle=False, split="train")
    batch = next(iter(loader))
    assert batch["prompts"] == ["image 0", "image 2", "image 2", "image 3"]
    assert torch.equal(batch["latent_mean"][1], batch["latent_mean"][2])
    assert [s.path for s in batch["skipped_images"]] == [image(source, 1)]
    strict = data(source, cache_dir=str(out))
    with pytest.raises(ImageLoadError, match=f"^cannot read image {re.escape(image(source, 1))}: "):
        next(iter(strict._loader(strict.usable_records("train"), shuffle=False, split="train")))


def test_a_split_without_one_readable_image_is_an_error(tmp_path):
    source = write_dataset(tmp_path / "data", {"val": 4}, corrupt={0, 1, 2, 3})
    dm = data(source, bad_images="skip", max_bad_image_share=1.0)
    with pytest.raises(ImageLoadError, match=r"^none of the 4 val images can be read \(bad_images='skip'\)"):
        next(iter(dm.val_dataloader()))
