"""Leakage and duplicates: no image in two splits, no repeated ID or row, drops counted per image."""

import logging

import pytest
from PIL import Image

from datamodules import (
    CSVImageTextDataModule,
    MedVQAGIDataModule,
    MIMICCXRDataModule,
    Record,
    ROCOv2DataModule,
)
from datamodules.integrity import check_no_image_in_two_splits
from datamodules.report_sections import Sections, read_sectioned_csv
from tests.test_datamodules import write_png, write_text
from tests.test_medvqa_gi import POLYP, write_medvqa
from tests.test_mimic_cxr import D1, IMAGES, root, write_csv, write_metadata  # noqa: F401 (a fixture)
from tests.test_rocov2 import write_roco

# --- no image in two splits ---------------------------------------------------------------------


def test_an_image_in_two_splits_is_named_with_its_splits(tmp_path):
    a, b = write_png(tmp_path / "a.png"), write_png(tmp_path / "b.png")
    records = {"train": [Record(str(a), "x"), Record(str(b), "y")], "val": [], "test": [Record(str(a), "z")]}
    with pytest.raises(
        ValueError, match=rf"^1 image\(s\) are in more than one split: {a} in train and test;"
    ):
        check_no_image_in_two_splits(records)


def test_other_spellings_and_links_of_a_file_are_the_same_image(tmp_path):
    image = write_png(tmp_path / "images" / "a.png")
    link = tmp_path / "link.png"
    link.symlink_to(image)
    (tmp_path / "other").mkdir()
    dotted = f"{tmp_path}/other/../images/a.png"
    records = {"train": [Record(str(image), "x")], "val": [Record(dotted, "y")], "test": []}
    with pytest.raises(ValueError, match="1 image") as caught:
        check_no_image_in_two_splits(records)
    assert f"{image} in train = {dotted} in val" in str(caught.value)
    with pytest.raises(ValueError, match=f"{image} in train = {link} in test"):
        check_no_image_in_two_splits({"train": [Record(str(image), "x")], "test": [Record(str(link), "y")]})


def test_repeats_within_a_split_and_images_in_memory_pass(tmp_path):
    a = str(write_png(tmp_path / "a.png"))
    pixels = Image.new("L", (4, 4))
    records = {"train": [Record(a, "x"), Record(a, "y"), Record(pixels, "p")], "test": [Record(pixels, "p")]}
    check_no_image_in_two_splits(records)


def test_many_shared_images_are_counted_with_a_few_named(tmp_path):
    paths = [str(write_png(tmp_path / f"{i}.png")) for i in range(7)]
    records = {"train": [Record(p, "x") for p in paths], "test": [Record(p, "y") for p in paths]}
    with pytest.raises(ValueError, match=r"^7 image\(s\)") as caught:
        check_no_image_in_two_splits(records)
    message = str(caught.value)
    assert f"{paths[4]} in train and test" in message and paths[5] not in message and "(7 in all)" in message


def test_csv_with_an_image_in_train_and_test_is_refused(tmp_path):
    for name in "abc":
        write_png(tmp_path / f"{name}.png")
    (tmp_path / "sub").mkdir()
    rows = "a.png,one,train\nb.png,two,train\nc.png,three,test\nsub/../b.png,two again,test\n"
    csv = write_text(tmp_path / "data.csv", "image,prompt,split\n" + rows)
    # setup() runs the check on the records of every split.
    shared = f"{tmp_path / 'b.png'} in train = {tmp_path / 'sub' / '..' / 'b.png'} in test"
    with pytest.raises(ValueError, match=r"^1 image\(s\) are in more than one split") as caught:
        CSVImageTextDataModule(str(csv)).setup()
    assert shared in str(caught.value)


# --- repeated rows and IDs ----------------------------------------------------------------------


def repeated_csv(tmp_path):
    for name in "ab":
        write_png(tmp_path / f"{name}.png")
    (tmp_path / "sub").mkdir()
    # Line 4 repeats line 2 (another spelling of the path), line 5 line 3; line 6 only shares the image.
    rows = "a.png,one,train\nb.png,two,test\nsub/../a.png,one,train\nb.png,two,test\na.png,other,train\n"
    return write_text(tmp_path / "data.csv", "image,prompt,split\n" + rows)


def test_csv_rows_repeating_an_earlier_row_are_named_by_line(tmp_path):
    csv = repeated_csv(tmp_path)
    with pytest.raises(ValueError) as caught:
        CSVImageTextDataModule(str(csv)).setup()
    assert str(caught.value) == (
        "CSVImageTextDataModule: 2 record(s) with the image, prompt and split of an earlier row: "
        f"{csv} line 4, {csv} line 5; set duplicate_rows='drop' to leave them out"
    )


def test_csv_rows_repeating_an_earlier_row_can_be_dropped_and_counted(tmp_path, caplog):
    dm = CSVImageTextDataModule(str(repeated_csv(tmp_path)), duplicate_rows="drop")
    with caplog.at_level(logging.WARNING):
        assert [r.prompt for r in dm.records("train")] == ["one", "other"]
    assert [r.prompt for r in dm.records("test")] == ["two"]
    reason = "the image, prompt and split of an earlier row"
    assert dm.dropped["train"] == {reason: 1} and dm.dropped["test"] == {reason: 1}
    assert f"dropped 1 train record(s): {reason}" in caplog.text


def test_rocov2_id_on_two_caption_rows_is_refused(tmp_path):
    roco = write_roco(tmp_path)
    path = roco / "train_captions.csv"
    second = "ROCOv2_2023_train_000002"
    # The 4 images' captions and one of them again (as .jpg): 5 rows for 4 images.
    path.write_text(path.read_text() + f"{second}.jpg,Another caption.\n")
    with pytest.raises(ValueError, match=rf"{path}: 1 ID\(s\) repeated, on 2 rows: {second}; each ID"):
        ROCOv2DataModule(str(roco)).records("train")


def test_rocov2_id_on_two_concept_rows_is_refused(tmp_path):
    roco = write_roco(tmp_path)
    path = roco / "valid_concepts_manual.csv"
    path.write_text(path.read_text() + "ROCOv2_2023_valid_000001,C1306645\n")
    with pytest.raises(ValueError, match=rf"{path}: 1 ID\(s\) repeated, on 2 rows: ROCOv2_2023_valid_000001"):
        ROCOv2DataModule(str(roco)).records("val")


def test_mimic_repeated_dicom_id_and_sectioned_study_are_refused(root, tmp_path):  # noqa: F811
    write_metadata(root, [*IMAGES, IMAGES[0]])
    with pytest.raises(ValueError, match=rf"metadata\.csv: 1 dicom_id\(s\) repeated, on 2 rows: {D1}"):
        MIMICCXRDataModule(str(root)).records("train")

    rows = [["s50000001", "Effusion.", "", "", ""], ["s50000001", "Normal.", "", "", ""]]
    path = write_csv(tmp_path / "sectioned.csv", ["study", *Sections.__annotations__], rows)
    with pytest.raises(ValueError, match=r"1 study\(s\) repeated, on 2 rows: 50000001"):
        read_sectioned_csv(path)


# --- MedVQA-GI ----------------------------------------------------------------------------------


def test_medvqa_row_repeating_an_image_and_prompt_is_dropped_and_counted(tmp_path):
    gi = write_medvqa(tmp_path)
    path = gi / "prompt-gt.csv"
    path.write_text(path.read_text() + f"Generate an image containing a polyp.;{POLYP}\n")
    dm = MedVQAGIDataModule(str(gi), val_fraction=0, test_fraction=0)
    assert len(dm.records("train")) == 11
    assert dm.dropped["train"] == {"repeats an earlier row's image and prompt": 1}


# --- CSV image paths outside the dataset root ---------------------------------------------------


def csv_reaching_out(tmp_path):
    """A dataset folder whose CSV lists 5 images: 2 inside it and 3 that resolve outside."""
    data = tmp_path / "data"
    write_png(data / "a.png")
    (data / "sub").mkdir()
    elsewhere = write_png(tmp_path / "elsewhere" / "b.png")
    (data / "link.png").symlink_to(elsewhere)
    rows = [
        "a.png,inside",
        "sub/../a.png,inside through ..",
        "../elsewhere/b.png,outside through ..",
        f"{elsewhere},outside absolute",
        "link.png,outside through a symlink",
    ]
    return data, write_text(data / "data.csv", "image,prompt\n" + "\n".join(rows) + "\n"), elsewhere


def test_csv_images_outside_the_root_are_allowed_and_logged_once(tmp_path, caplog):
    data, csv, elsewhere = csv_reaching_out(tmp_path)
    with caplog.at_level(logging.WARNING):
        records = CSVImageTextDataModule(str(csv)).records("train")
    assert len(records) == 5
    warnings = [r.getMessage() for r in caplog.records if "outside the dataset root" in r.getMessage()]
    assert warnings == [
        f"CSVImageTextDataModule: 3 of 5 image path(s) in {csv} resolve outside the dataset root {data}, "
        f"e.g. {data / '..' / 'elsewhere' / 'b.png'} (allowed: images_outside_root='error' refuses them)"
    ]


def test_csv_images_outside_the_root_can_be_refused(tmp_path):
    data, csv, elsewhere = csv_reaching_out(tmp_path)
    with pytest.raises(ValueError) as caught:
        CSVImageTextDataModule(str(csv), images_outside_root="error").setup()
    assert str(caught.value) == (
        f"3 image path(s) in {csv} resolve outside the dataset root {data}: "
        f"{data / '..' / 'elsewhere' / 'b.png'}, {elsewhere}, {data / 'link.png'}; "
        "move them under it or set images_outside_root='allow'"
    )
    (data / "link.png").unlink()
    inside = write_text(data / "inside.csv", "image,prompt\na.png,x\nsub/../a.png,y\n")
    assert len(CSVImageTextDataModule(str(inside), images_outside_root="error").records("train")) == 2
