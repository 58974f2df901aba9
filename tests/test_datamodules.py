"""The data package: image decoding, transforms, CSV / folder / generated DataModules, batches."""

import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import (
    CSVImageTextDataModule,
    ImageLoadError,
    ImageTextDataModule,
    ImageTransform,
    Record,
    SyntheticShapesDataModule,
    load_image,
    write_synthetic_folder,
)
from datamodules.synthetic import make_shape_image, synthetic_records


class FakeTokenizer:
    """Token id = word length, padded with 0 (and mask 0) or truncated to 6 tokens."""

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        input_ids = torch.zeros(len(prompts), 6, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), 6, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            lengths = [len(word) for word in prompt.split()[:6]]
            input_ids[i, : len(lengths)] = torch.tensor(lengths)
            attention_mask[i, : len(lengths)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class GrayRecords(ImageTextDataModule):
    """In-memory grayscale images of value 51, five for training and nothing else."""

    def load_records(self, split: str) -> list[Record]:
        if split != "train":
            return []
        return [Record(Image.new("L", (12, 10), 51), f"image {i}") for i in range(5)]


def write_png(path: Path, value: int = 128, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def prompts_of(records: list[Record]) -> list[str]:
    return [r.prompt for r in records]


def logged(caplog, level: int) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == level)


# --- images -------------------------------------------------------------------------------------


def test_transform_gives_a_square_tensor_in_range_and_keeps_left_on_the_left():
    # 64x32, white on the left half: the shorter side goes 32 -> 16 (width 32), the centre crop
    # keeps columns 8..24, i.e. 8 white columns then 8 black ones.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = 255
    transform = ImageTransform(16)
    for _ in range(10):  # no random flip by default, whatever the draw
        out = transform(Image.fromarray(pixels))
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
        assert out.min() >= -1 and out.max() <= 1
        assert torch.allclose(out[:, :, :6], torch.tensor(1.0), atol=1e-3)
        assert torch.allclose(out[:, :, 10:], torch.tensor(-1.0), atol=1e-3)


def test_transform_maps_byte_values_linearly_to_minus_one_one():
    out = ImageTransform(5)(Image.new("RGB", (9, 7), (0, 255, 51)))
    assert out.shape == (3, 5, 5)
    assert torch.allclose(out[0], torch.tensor(-1.0))
    assert torch.allclose(out[1], torch.tensor(1.0))
    assert torch.allclose(out[2], torch.tensor(51 / 127.5 - 1))  # -0.6


def test_random_flip_and_random_crop_are_opt_in_augmentations():
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, :4] = 255
    flip = ImageTransform(8, random_flip=True)
    torch.manual_seed(0)
    left_values = {round(flip(Image.fromarray(pixels))[0, 0, 0].item()) for _ in range(20)}
    assert left_values == {-1, 1}  # both orientations occur over 20 draws (chance 2 * 0.5**20 not to)

    # 12 wide, 8 high, one white column at x=0: a random 8x8 crop keeps it only when it starts at 0.
    stripe = np.zeros((8, 12, 3), dtype=np.uint8)
    stripe[:, 0] = 255
    crop = ImageTransform(8, center_crop=False)
    kept = {crop(Image.fromarray(stripe)).max().item() == 1.0 for _ in range(40)}
    assert kept == {True, False}
    assert ImageTransform(8)(Image.fromarray(stripe)).max() == -1  # the centre crop starts at 2


def test_grayscale_files_become_three_identical_channels(tmp_path):
    path = write_png(tmp_path / "gray.png", value=51, size=(6, 4))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (6, 4)
    assert img.getpixel((0, 0)) == (51, 51, 51)
    assert torch.allclose(ImageTransform(4)(img), torch.tensor(51 / 127.5 - 1))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    # Top half 65535 (white), bottom half 25700 = 100 * 257 (8-bit 100); Pillow's own conversion
    # would clip both to 255.
    values = np.full((8, 8), 25700, dtype=np.uint16)
    values[:4] = 65535
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"  # really a 16-bit file
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((0, 7)) == (100, 100, 100)
    out = ImageTransform(8)(img)
    assert torch.allclose(out[:, :2], torch.tensor(1.0))
    assert torch.allclose(out[:, 6:], torch.tensor(100 / 127.5 - 1))


@pytest.mark.parametrize("mode", ["LA", "P", "1", "CMYK", "RGBA"])
def test_other_modes_are_read_as_rgb(tmp_path, mode):
    path = tmp_path / "img.tiff"  # TIFF stores all of these modes
    Image.new(mode, (3, 3)).save(path)
    assert load_image(path).mode == "RGB"


def test_large_jpegs_are_decoded_at_a_reduced_scale(tmp_path):
    pixels = np.zeros((1600, 2000, 3), dtype=np.uint8)
    pixels[:, :1000] = 200
    path = tmp_path / "large.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    assert load_image(path).size == (2000, 1600)
    small = load_image(path, draft_size=300)
    # 1/4 scale (500x400) is the smallest of 1/2, 1/4, 1/8 with both sides >= 300.
    assert min(small.size) >= 300
    assert small.size[0] <= 1000 and small.size[0] * 1600 == small.size[1] * 2000
    assert small.mode == "RGB"


def test_truncated_and_non_image_files_raise_image_load_error_naming_them(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(pixels).save(whole, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ImageLoadError, match=re.escape(str(truncated))) as caught:
        load_image(truncated)
    assert "truncated" in str(caught.value).replace(str(truncated), "")  # the reason, not the name
    assert isinstance(caught.value, ValueError)

    not_an_image = write_text(tmp_path / "notes.png", "not pixels")
    with pytest.raises(ImageLoadError, match=re.escape(str(not_an_image))):
        load_image(not_an_image)


# --- CSV and folders ----------------------------------------------------------------------------


def test_csv_splits_are_read_by_name_with_val_synonyms(tmp_path):
    for name in "abcdef":
        write_png(tmp_path / "img" / f"{name}.png")
    csv = write_text(
        tmp_path / "data.csv",
        # Columns in an unusual order, plus one the module does not use.
        "split,notes,prompt,image\n"
        "train,x,  small left effusion ,img/a.png\n"
        "train,,normal chest,img/b.png\n"
        "validate,,cardiomegaly,img/c.png\n"
        "Val,,None,img/d.png\n"
        "test,,NA,img/e.png\n"
        "validation,,pneumothorax,img/f.png\n",
    )
    dm = CSVImageTextDataModule(str(csv), image_size=8)
    dm.setup("fit")
    assert prompts_of(dm.records("train")) == ["small left effusion", "normal chest"]
    # "None" and "NA" are captions, not missing values.
    assert prompts_of(dm.records("val")) == ["cardiomegaly", "None", "pneumothorax"]
    assert prompts_of(dm.records("test")) == ["NA"]
    assert dm.records("train")[0].image == str(tmp_path / "img" / "a.png")


def test_image_root_and_absolute_paths(tmp_path):
    write_png(tmp_path / "pool" / "a.png")
    absolute = write_png(tmp_path / "elsewhere" / "b.png")
    csv = write_text(tmp_path / "lists" / "data.csv", f"image,prompt\na.png,one\n{absolute},two\n")
    dm = CSVImageTextDataModule(str(csv), image_root=str(tmp_path / "pool"))
    assert [r.image for r in dm.records("train")] == [str(tmp_path / "pool" / "a.png"), str(absolute)]


def test_missing_column_names_the_column_the_file_and_the_columns_found(tmp_path):
    csv = write_text(tmp_path / "data.csv", "image,caption\na.png,hello\n")
    with pytest.raises(ValueError, match="'prompt'") as caught:
        CSVImageTextDataModule(str(csv)).setup("fit")
    assert str(csv) in str(caught.value) and "caption" in str(caught.value)


def test_missing_images_are_named(tmp_path):
    write_png(tmp_path / "here.png")
    csv = write_text(tmp_path / "data.csv", "image,prompt\nhere.png,a\ngone.png,b\n")
    with pytest.raises(FileNotFoundError, match="gone.png") as caught:
        CSVImageTextDataModule(str(csv)).setup("fit")
    assert str(csv) in str(caught.value) and "here.png" not in str(caught.value)

    rows = "".join(f"gone{i}.png,p\n" for i in range(7))
    csv = write_text(tmp_path / "many.csv", "image,prompt\n" + rows)
    with pytest.raises(FileNotFoundError) as caught:
        CSVImageTextDataModule(str(csv)).setup("fit")
    message = str(caught.value)
    assert "gone4.png" in message and "gone5.png" not in message and "7 in all" in message


def empty_prompt_csv(tmp_path: Path) -> Path:
    for name in "abcd":
        write_png(tmp_path / f"{name}.png")
    # Data lines 2..5 of the file; lines 3 (empty) and 5 (blank) have no prompt.
    return write_text(tmp_path / "data.csv", "image,prompt\na.png,one\nb.png,\nc.png,three\nd.png,   \n")


def test_empty_prompts_are_an_error_naming_the_lines(tmp_path):
    csv = empty_prompt_csv(tmp_path)
    with pytest.raises(ValueError, match=r"line\(s\) 3, 5"):
        CSVImageTextDataModule(str(csv)).setup("fit")


def test_empty_prompts_can_be_dropped_with_a_warning(tmp_path, caplog):
    csv = empty_prompt_csv(tmp_path)
    dm = CSVImageTextDataModule(str(csv), empty_prompts="drop")
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert prompts_of(dm.records("train")) == ["one", "three"]
    assert "dropped 2 train record(s): empty prompt" in logged(caplog, logging.WARNING)
    assert dm.dropped["train"] == {"empty prompt": 2}


def test_unknown_split_values_are_named_with_their_lines(tmp_path):
    write_png(tmp_path / "a.png")
    rows = "a.png,x,train\na.png,y,holdout\na.png,z,holdout\n"
    csv = write_text(tmp_path / "data.csv", "image,prompt,split\n" + rows)
    with pytest.raises(ValueError, match=r"'holdout'.*line\(s\) 3, 4"):
        CSVImageTextDataModule(str(csv)).setup("fit")


def test_folder_of_images_with_caption_files(tmp_path):
    write_png(tmp_path / "b.png")
    write_text(tmp_path / "b.txt", "  right effusion\n")
    write_png(tmp_path / "sub" / "a.PNG")
    write_text(tmp_path / "sub" / "a.txt", "left effusion")
    write_text(tmp_path / "readme.md", "not data")
    dm = CSVImageTextDataModule(str(tmp_path))
    # Sorted by path: tmp/b.png < tmp/sub/a.PNG.
    assert prompts_of(dm.records("train")) == ["right effusion", "left effusion"]
    assert dm.records("val") == [] and dm.records("test") == []

    write_png(tmp_path / "sub" / "uncaptioned.jpg")
    with pytest.raises(FileNotFoundError, match="uncaptioned.jpg"):
        CSVImageTextDataModule(str(tmp_path)).setup("fit")


def test_folder_with_metadata_csv_reads_the_csv(tmp_path):
    write_png(tmp_path / "images" / "a.png")
    write_png(tmp_path / "images" / "b.png")  # no caption file needed: the CSV has the prompts
    rows = "images/a.png,first,train\nimages/b.png,second,val\n"
    write_text(tmp_path / "metadata.csv", "image,prompt,split\n" + rows)
    dm = CSVImageTextDataModule(str(tmp_path))
    assert prompts_of(dm.records("train")) == ["first"]
    assert prompts_of(dm.records("val")) == ["second"]


def test_without_a_split_column_validation_falls_back_to_training_with_a_warning(tmp_path, caplog):
    for name in "abc":
        write_png(tmp_path / f"{name}.png")
    csv = write_text(tmp_path / "data.csv", "image,prompt\na.png,one\nb.png,two\nc.png,three\n")
    dm = CSVImageTextDataModule(str(csv), image_size=8, batch_size=2)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
        loader = dm.val_dataloader()
    assert "3 train, 0 val, 0 test records" in logged(caplog, logging.INFO)
    assert "no validation records" in logged(caplog, logging.WARNING)
    assert [p for batch in loader for p in batch["prompts"]] == ["one", "two", "three"]  # in order
    with pytest.raises(ValueError, match="no test records"):
        dm.test_dataloader()


# --- batches ------------------------------------------------------------------------------------


def test_batches_have_stacked_images_prompts_and_tokens_once_a_tokenizer_is_attached():
    dm = SyntheticShapesDataModule(n_train=5, n_val=4, image_size=16, batch_size=3)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert [len(b["prompts"]) for b in train] == [3, 2]  # drop_last=False
    assert set(train[0]) == {"pixel_values", "prompts"}
    assert train[0]["pixel_values"].shape == (3, 3, 16, 16)
    assert train[0]["pixel_values"].dtype == torch.float32
    # Five images cycle through the four captions: the first caption comes twice.
    assert sorted(p for b in train for p in b["prompts"]) == sorted(
        ["a bright circle on the left"] * 2
        + ["a bright circle on the right", "a bright square on the left", "a bright square on the right"]
    )

    dm.tokenizer = FakeTokenizer()  # attached after construction, as the training module does
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"pixel_values", "prompts", "input_ids", "attention_mask"}
    assert batch["prompts"][0] == "a bright circle on the left"
    assert batch["input_ids"][0].tolist() == [1, 6, 6, 2, 3, 4]  # word lengths
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 6)
    assert batch["attention_mask"].dtype == torch.long and bool(batch["attention_mask"].all())


def test_in_memory_grayscale_records_become_rgb_batches():
    dm = GrayRecords(image_size=8, batch_size=5)
    batch = next(iter(dm.train_dataloader()))  # the loader loads the records itself
    assert batch["pixel_values"].shape == (5, 3, 8, 8)
    assert torch.allclose(batch["pixel_values"], torch.tensor(51 / 127.5 - 1))


def test_loaders_work_in_worker_processes(tmp_path):
    csv = write_synthetic_folder(tmp_path, n=4, size=16, val_fraction=0.5)
    dm = CSVImageTextDataModule(
        str(csv), image_size=16, batch_size=2, num_workers=1, tokenizer=FakeTokenizer()
    )
    loader = dm.val_dataloader()
    assert loader.persistent_workers
    # Workers under the spawn start method (macOS, Windows) receive these pickled.
    pickle.loads(pickle.dumps((loader.dataset, loader.collate_fn)))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["input_ids"].shape == (2, 6)


# --- generated shapes ---------------------------------------------------------------------------


def test_write_synthetic_folder_round_trips_through_the_csv_module(tmp_path):
    csv = write_synthetic_folder(tmp_path / "out", n=8, size=16, seed=3, val_fraction=0.25)
    assert csv == tmp_path / "out" / "metadata.csv"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images", "metadata.csv"]  # no temp file
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 8
    dm = CSVImageTextDataModule(str(tmp_path / "out"), image_size=16)
    captions = [f"a bright {k} on the {s}" for k in ("circle", "square") for s in ("left", "right")]
    assert prompts_of(dm.records("train")) == captions + captions[:2]  # 8 - round(8 * 0.25) = 6
    assert prompts_of(dm.records("val")) == captions[2:]
    # PNG is lossless: the file holds exactly the generated image.
    generated = synthetic_records(8, 16, seed=3)[1].image
    assert np.array_equal(np.asarray(load_image(dm.records("train")[1].image)), np.asarray(generated))


def test_shape_images_are_deterministic_and_on_the_named_side():
    a = np.asarray(make_shape_image("circle", "left", 32, seed=7))
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, np.asarray(make_shape_image("circle", "left", 32, seed=7)))
    assert not np.array_equal(a, np.asarray(make_shape_image("circle", "left", 32, seed=8)))
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])
    for kind in ("circle", "square"):
        left = np.asarray(make_shape_image(kind, "left", 32, seed=1), dtype=float)
        right = np.asarray(make_shape_image(kind, "right", 32, seed=1), dtype=float)
        assert left[:, :16].mean() > 2 * left[:, 16:].mean()
        assert right[:, 16:].mean() > 2 * right[:, :16].mean()
    with pytest.raises(ValueError, match="triangle"):
        make_shape_image("triangle", "left", 32, seed=0)


def test_synthetic_datamodule_is_deterministic_with_distinct_validation_images():
    first = SyntheticShapesDataModule(n_train=4, n_val=4, seed=5, image_size=16)
    second = SyntheticShapesDataModule(n_train=4, n_val=4, seed=5, image_size=16)
    first.setup("fit")
    second.setup("fit")
    train = [np.asarray(r.image) for r in first.records("train")]
    again = [np.asarray(r.image) for r in second.records("train")]
    assert all(np.array_equal(x, y) for x, y in zip(train, again, strict=True))
    val = [np.asarray(r.image) for r in first.records("val")]
    assert prompts_of(first.records("val")) == prompts_of(first.records("train"))
    assert not any(np.array_equal(t, v) for t, v in zip(train, val, strict=True))
    assert prompts_of(first.records("test")) == prompts_of(first.records("val"))
    assert first.records("train")[0].image.size == (16, 16)
