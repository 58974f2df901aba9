"""ROCOv2 from the official files and from hub parquet / Arrow exports, on small hand-written fixtures."""

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

import datamodules.hub_files as hub_files
from datamodules import ROCOv2DataModule, ROCOv2ParquetDataModule

CT, XRAY, MRI = "C0040405", "C1306645", "C0024485"
HEAD, CHEST, BRAIN = "C0018670", "C0817096", "C0006104"

# ID -> (caption, manual concepts, all concepts); each image a flat grey of its own value.
TRAIN = {
    "ROCOv2_2023_train_000001": ("Head CT demonstrating left parotiditis.", f"{CT};{HEAD}", f"{CT};{HEAD}"),
    "ROCOv2_2023_train_000002": (
        "Chest X-ray: right pleural effusion, no pneumothorax.",
        f"{XRAY};{CHEST}",
        XRAY,
    ),
    # The automatic concepts mention CT although this is an MRI (its caption compares with a CT).
    "ROCOv2_2023_train_000003": (
        "Axial MRI of the brain, compared with the prior CT.",
        f"{MRI};{BRAIN}",
        f"{MRI};{CT}",
    ),
    "ROCOv2_2023_train_000004": ("Contrast-enhanced CT of the chest.", f"{CT};{CHEST}", f"{CT};{CHEST}"),
}
VALID = {"ROCOv2_2023_valid_000001": ("Abdominal CT with a liver lesion.", CT, CT)}
TEST = {"ROCOv2_2023_test_000001": ("Frontal chest radiograph.", f"{XRAY};{CHEST}", XRAY)}
NAMES = {
    CT: "X-Ray Computed Tomography",
    XRAY: "Plain x-ray",
    MRI: "Magnetic Resonance Imaging",
    HEAD: "Head",
    CHEST: "Chest",
    BRAIN: "Brain",
}


def jpeg_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buffer, "JPEG")
    return buffer.getvalue()


def grey_value(path: str) -> float:
    return float(np.asarray(Image.open(path)).mean())


def write_csv(path: Path, header: str, rows: list[tuple[str, str]]) -> None:
    frame = pd.DataFrame(rows, columns=header.split(","))
    frame.to_csv(path, index=False)


def write_roco(root: Path) -> Path:
    """The official layout: three image folders, the CSV files and the CUI names."""
    value = 40
    for prefix, rows in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        (root / prefix).mkdir(parents=True)
        for image_id in rows:
            (root / prefix / f"{image_id}.jpg").write_bytes(jpeg_bytes(value))
            value += 30
        write_csv(root / f"{prefix}_captions.csv", "ID,Caption", [(i, c) for i, (c, _, _) in rows.items()])
        write_csv(
            root / f"{prefix}_concepts_manual.csv", "ID,CUIs", [(i, m) for i, (_, m, _) in rows.items()]
        )
        write_csv(root / f"{prefix}_concepts.csv", "ID,CUIs", [(i, a) for i, (_, _, a) in rows.items()])
    write_csv(root / "cui_mapping.csv", "CUI,Canonical name", list(NAMES.items()))
    return root


def ids(records) -> list[str]:
    return [r.meta["id"] for r in records]


# --- official files -----------------------------------------------------------------------------


def test_reads_the_three_splits_with_captions_concepts_and_names(tmp_path):
    root = write_roco(tmp_path / "roco")
    dm = ROCOv2DataModule(str(root), image_size=16, batch_size=2)
    train, val, test = dm.records("train"), dm.records("val"), dm.records("test")
    assert (len(train), len(val), len(test)) == (4, 1, 1)
    assert ids(train) == list(TRAIN)
    assert [r.prompt for r in train] == [caption for caption, _, _ in TRAIN.values()]
    # The CSV IDs have no extension; the files are <ID>.jpg in the split's folder.
    assert train[0].image == str(root / "train" / "ROCOv2_2023_train_000001.jpg")
    assert val[0].image == str(root / "valid" / "ROCOv2_2023_valid_000001.jpg")
    assert test[0].meta == {
        "id": "ROCOv2_2023_test_000001",
        "cuis": f"{XRAY};{CHEST}",
        "concept_names": "Plain x-ray;Chest",
    }
    assert all(r.labels is None for r in train + val + test)
    assert sum(dm.dropped[split].total() for split in dm.dropped) == 0


def test_batches_decode_the_images(tmp_path):
    dm = ROCOv2DataModule(str(write_roco(tmp_path)), image_size=16, batch_size=3)
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (3, 3, 16, 16)
    batch = next(iter(dm.test_dataloader()))
    assert batch["prompts"] == ["Frontal chest radiograph."]
    assert batch["pixel_values"].shape == (1, 3, 16, 16)


def test_ids_with_an_extension_or_spaces_are_accepted(tmp_path):
    root = write_roco(tmp_path)
    rows = [(f" {i}.jpg ", c) for i, (c, _, _) in TRAIN.items()]
    write_csv(root / "train_captions.csv", "ID,Caption", rows)
    train = ROCOv2DataModule(str(root)).records("train")
    assert ids(train) == list(TRAIN)
    assert train[1].image == str(root / "train" / "ROCOv2_2023_train_000002.jpg")
    assert train[1].meta["cuis"] == f"{XRAY};{CHEST}"  # still joined with its concepts


def test_modality_filter_uses_the_manual_concepts_and_counts_what_it_leaves_out(tmp_path):
    dm = ROCOv2DataModule(str(write_roco(tmp_path)), modality_cuis=[CT])
    train = dm.records("train")
    assert ids(train) == ["ROCOv2_2023_train_000001", "ROCOv2_2023_train_000004"]
    assert {r.meta["modality"] for r in train} == {"X-Ray Computed Tomography"}
    assert len(dm.records("val")) == 1 and dm.records("test") == []
    assert dm.dropped["train"] == {"no matching modality CUI": 2}
    assert dm.dropped["test"] == {"no matching modality CUI": 1}


def test_all_concepts_can_be_chosen_instead(tmp_path):
    dm = ROCOv2DataModule(str(write_roco(tmp_path)), modality_cuis=[CT], concepts="all")
    assert ids(dm.records("train")) == [
        "ROCOv2_2023_train_000001",
        "ROCOv2_2023_train_000003",
        "ROCOv2_2023_train_000004",
    ]
    assert dm.records("train")[1].meta["cuis"] == f"{MRI};{CT}"


def test_several_modalities_and_required_cuis(tmp_path):
    root = write_roco(tmp_path)
    either = ROCOv2DataModule(str(root), modality_cuis=[CT, XRAY])
    assert ids(either.records("train")) == [f"ROCOv2_2023_train_00000{i}" for i in (1, 2, 4)]
    assert either.records("train")[1].meta["modality"] == "Plain x-ray"

    chest_ct = ROCOv2DataModule(str(root), modality_cuis=[CT], require_cuis=[CHEST])
    assert ids(chest_ct.records("train")) == ["ROCOv2_2023_train_000004"]
    assert chest_ct.dropped["train"] == {"no matching modality CUI": 2, "lacks a required CUI": 1}


def test_filtered_out_records_are_not_checked(tmp_path):
    root = write_roco(tmp_path)
    (root / "train" / "ROCOv2_2023_train_000003.jpg").unlink()  # an MRI, not wanted below
    assert len(ROCOv2DataModule(str(root), modality_cuis=[CT]).records("train")) == 2


def test_missing_concept_files_are_a_warning_without_filters_and_an_error_with_them(tmp_path, caplog):
    root = write_roco(tmp_path)
    (root / "train_concepts_manual.csv").unlink()
    with caplog.at_level(logging.WARNING):
        train = ROCOv2DataModule(str(root)).records("train")
    assert [r.meta["cuis"] for r in train] == ["", "", "", ""]
    assert "train_concepts_manual.csv does not exist" in caplog.text
    with pytest.raises(
        FileNotFoundError, match=r"train_concepts_manual\.csv does not exist; filtering by CUI"
    ):
        ROCOv2DataModule(str(root), require_cuis=[CHEST]).setup()


def test_without_cui_mapping_the_records_carry_cuis_only(tmp_path):
    root = write_roco(tmp_path)
    (root / "cui_mapping.csv").unlink()
    record = ROCOv2DataModule(str(root), modality_cuis=[CT]).records("train")[0]
    assert record.meta == {"id": "ROCOv2_2023_train_000001", "cuis": f"{CT};{HEAD}", "modality": CT}


def test_missing_captions_file_or_image_folder_are_named(tmp_path):
    root = write_roco(tmp_path)
    (root / "test_captions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_captions\.csv does not exist"):
        ROCOv2DataModule(str(root)).setup()

    root = write_roco(tmp_path / "again")
    for image in (root / "valid").iterdir():
        image.unlink()
    (root / "valid").rmdir()
    with pytest.raises(
        FileNotFoundError, match=r"image folder .*valid does not exist \(unzip valid_images\.zip"
    ):
        ROCOv2DataModule(str(root)).setup()


def test_missing_images_are_named_or_dropped_and_counted(tmp_path):
    root = write_roco(tmp_path)
    (root / "train" / "ROCOv2_2023_train_000002.jpg").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1 record\(s\) with image missing: .*ROCOv2_2023_train_000002\.jpg"
    ):
        ROCOv2DataModule(str(root)).setup()
    dm = ROCOv2DataModule(str(root), missing_images="drop")
    assert ids(dm.records("train")) == [f"ROCOv2_2023_train_00000{i}" for i in (1, 3, 4)]
    assert dm.dropped["train"] == {"image missing": 1}


def test_renamed_columns_name_the_file_the_column_and_the_columns_found(tmp_path):
    root = write_roco(tmp_path)
    write_csv(root / "valid_captions.csv", "ImageID,Caption", [("ROCOv2_2023_valid_000001", "CT.")])
    with pytest.raises(
        ValueError, match=r"valid_captions\.csv has no 'ID' column; columns found: \['ImageID', 'Caption'\]"
    ):
        ROCOv2DataModule(str(root)).setup()

    root = write_roco(tmp_path / "again")
    write_csv(root / "cui_mapping.csv", "CUI,Name", [(CT, "CT")])
    with pytest.raises(ValueError, match=r"cui_mapping\.csv has no 'Canonical name' column"):
        ROCOv2DataModule(str(root)).setup()


def test_empty_captions_are_named_or_dropped_and_counted(tmp_path):
    root = write_roco(tmp_path)
    rows = [(i, "  " if i.endswith("3") else c) for i, (c, _, _) in TRAIN.items()]
    write_csv(root / "train_captions.csv", "ID,Caption", rows)
    with pytest.raises(
        ValueError, match=r"1 record\(s\) with empty caption: ROCOv2_2023_train_000003 \(.*train_captions"
    ):
        ROCOv2DataModule(str(root)).setup()
    dm = ROCOv2DataModule(str(root), empty_prompts="drop")
    assert len(dm.records("train")) == 3
    assert dm.dropped["train"] == {"empty caption": 1}


def test_unknown_choices_are_rejected():
    with pytest.raises(ValueError, match=r"concepts must be one of 'manual', 'all'; got 'auto'"):
        ROCOv2DataModule("anywhere", concepts="auto")
    with pytest.raises(ValueError, match="missing_images"):
        ROCOv2DataModule("anywhere", missing_images="skip")


# --- hub export (parquet / Arrow) ---------------------------------------------------------------


def hub_frame(rows: dict, first_value: int) -> pd.DataFrame:
    """Rows as the hub export has them: the image embedded as {bytes, path}, concepts as a list."""
    return pd.DataFrame(
        {
            "image": [
                {"bytes": jpeg_bytes(first_value + 30 * k), "path": f"{i}.jpg"} for k, i in enumerate(rows)
            ],
            "image_id": list(rows),
            "caption": [caption for caption, _, _ in rows.values()],
            "cui": [automatic.split(";") for _, _, automatic in rows.values()],
        }
    )


def write_hub(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    train = hub_frame(TRAIN, 40)
    # Two files, the first with row groups of one row, as large exports have many.
    train.iloc[:3].to_parquet(data / "train-00000-of-00002.parquet", row_group_size=1)
    train.iloc[3:].to_parquet(data / "train-00001-of-00002.parquet")
    hub_frame(VALID, 160).to_parquet(data / "validation-00000-of-00001.parquet")
    hub_frame(TEST, 190).to_parquet(data / "test-00000-of-00001.parquet")
    return root


def test_parquet_export_writes_the_images_once_in_the_official_layout(tmp_path):
    root, image_dir = write_hub(tmp_path / "hub"), tmp_path / "images"
    dm = ROCOv2ParquetDataModule(str(root), str(image_dir), image_size=16, batch_size=4)
    train = dm.records("train")
    assert (len(train), len(dm.records("val")), len(dm.records("test"))) == (4, 1, 1)
    assert ids(train) == list(TRAIN)
    assert [r.prompt for r in train] == [caption for caption, _, _ in TRAIN.values()]
    assert train[2].image == str(image_dir / "train" / "ROCOv2_2023_train_000003.jpg")
    assert train[2].meta == {"id": "ROCOv2_2023_train_000003", "cuis": f"{MRI};{CT}"}
    assert [round(grey_value(r.image)) for r in train] == pytest.approx([40, 70, 100, 130], abs=2)
    assert dm.records("val")[0].image == str(image_dir / "valid" / "ROCOv2_2023_valid_000001.jpg")
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (4, 3, 16, 16)


def test_a_second_run_reads_no_image_bytes(tmp_path, monkeypatch):
    root, image_dir = write_hub(tmp_path / "hub"), tmp_path / "images"
    ROCOv2ParquetDataModule(str(root), str(image_dir)).setup()

    def fail(*args):
        raise AssertionError("image bytes read again")

    monkeypatch.setattr(hub_files, "iter_image_bytes", fail)
    assert len(ROCOv2ParquetDataModule(str(root), str(image_dir)).records("train")) == 4


def test_parquet_modality_filter_writes_only_the_images_kept(tmp_path):
    root, image_dir = write_hub(tmp_path / "hub"), tmp_path / "images"
    dm = ROCOv2ParquetDataModule(str(root), str(image_dir), modality_cuis=[XRAY])
    assert ids(dm.records("train")) == ["ROCOv2_2023_train_000002"]
    assert dm.records("train")[0].meta["modality"] == XRAY
    assert sorted(p.name for p in (image_dir / "train").iterdir()) == ["ROCOv2_2023_train_000002.jpg"]
    assert dm.dropped["train"] == {"no matching modality CUI": 3}
    assert dm.dropped["val"] == {"no matching modality CUI": 1}


def test_rows_without_image_bytes_are_named_or_dropped(tmp_path):
    root = write_hub(tmp_path / "hub")
    frame = hub_frame(TEST, 190)
    frame.at[0, "image"] = {"bytes": None, "path": None}
    frame.to_parquet(root / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(
        FileNotFoundError, match=r"ROCOv2_2023_test_000001 \(test-00000-of-00001\.parquet row 0\): no image"
    ):
        ROCOv2ParquetDataModule(str(root), str(tmp_path / "images")).setup()
    dm = ROCOv2ParquetDataModule(str(root), str(tmp_path / "images"), missing_images="drop")
    assert dm.records("test") == [] and dm.dropped["test"] == {"image missing": 1}


def test_parquet_files_missing_a_column_or_a_split_name_are_rejected(tmp_path):
    root = write_hub(tmp_path / "hub")
    hub_frame(TEST, 190).drop(columns="cui").to_parquet(root / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(
        ValueError, match=r"test-00000-of-00001\.parquet has no 'cui' column; columns found: \['image'"
    ):
        ROCOv2ParquetDataModule(str(root), str(tmp_path / "images")).setup()

    hub_frame(TEST, 190).to_parquet(root / "data" / "test-00000-of-00001.parquet")
    hub_frame(TEST, 190).to_parquet(root / "data" / "extra-00000.parquet")
    with pytest.raises(ValueError, match=r"cannot tell the split of .*extra-00000\.parquet"):
        ROCOv2ParquetDataModule(str(root), str(tmp_path / "images")).setup()


def test_a_folder_without_hub_files_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no parquet or Arrow files"):
        ROCOv2ParquetDataModule(str(tmp_path / "empty"), str(tmp_path / "images")).setup()
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        ROCOv2ParquetDataModule(str(tmp_path / "nowhere"), str(tmp_path / "images")).setup()


def test_arrow_files_saved_by_datasets_are_read_by_folder_name(tmp_path):
    # datasets.save_to_disk: <split>/data-00000-of-00001.arrow in the IPC stream format, plus
    # cache-*.arrow files that are not part of the data.
    root = tmp_path / "saved"
    for split, rows, value in (("train", TRAIN, 40), ("validation", VALID, 160), ("test", TEST, 190)):
        (root / split).mkdir(parents=True)
        table = pa.Table.from_pandas(hub_frame(rows, value), preserve_index=False)
        for name in ("data-00000-of-00001.arrow", "cache-0123456789abcdef.arrow"):
            with (
                pa.OSFile(str(root / split / name), "wb") as sink,
                pa.ipc.new_stream(sink, table.schema) as writer,
            ):
                writer.write_table(table)
    dm = ROCOv2ParquetDataModule(str(root), str(tmp_path / "images"))
    assert (len(dm.records("train")), len(dm.records("val")), len(dm.records("test"))) == (4, 1, 1)
    assert round(grey_value(dm.records("val")[0].image)) == pytest.approx(160, abs=2)
