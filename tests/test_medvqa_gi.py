"""MedVQA-GI from the official files, the 2025 captions file and hub exports, on hand-written fixtures."""

import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

import datamodules.hub_files as hub_files
from datamodules import MedVQAGIDataModule, MedVQAGIParquetDataModule
from datamodules.medvqa_gi import split_of_image

POLYP = "cl8k2u1pm1dw00831cvdh4e1g.jpg"
TWO_POLYPS = "cl8k2u1pq1e9k0831bexfmbet.jpg"
INSTRUMENT = "cla820gl0s9gl071u4eo9nkqm.jpg"
CECUM = "clb0kvxvm90y4074yf50vf5nq.jpg"
Z_LINE = "clb0lbwzadoyc086u0brshvx5.jpg"
PARIS = "cl8k2u1qf1ew0083175ykd57x.jpg"
IMAGES = [POLYP, TWO_POLYPS, INSTRUMENT, CECUM, Z_LINE, PARIS]

# As distributed: ';'-delimited, prompts with commas and the original kind of typos (doubled words).
PROMPT_GT = f"""Prompt;Filename
Generate an image containing a polyp.;{POLYP}
Generate an image with a polyp of size >20mm.;{POLYP}
Generate an image with with 1 polyp, located in the center.;{TWO_POLYPS}
Generate an an image containing a polyp of size 5 to 10mm.;{TWO_POLYPS}
Generate an image containing an instrument, and a green/black box artefact.;{INSTRUMENT}
Generate an image with no polyps.;{INSTRUMENT}
Generate an image containing text, of a cecum.;{CECUM}
Generate an image of the the z-line.;{Z_LINE}
Generate an image containing a polyp of type paris is.;{PARIS}
Generate an image with 2 polyps.;{PARIS}
Generate a polyp of type paris ip.;{POLYP}
"""
PROMPTS = {
    POLYP: [
        "Generate an image containing a polyp.",
        "Generate an image with a polyp of size >20mm.",
        "Generate a polyp of type paris ip.",
    ],
    TWO_POLYPS: [
        "Generate an image with with 1 polyp, located in the center.",
        "Generate an an image containing a polyp of size 5 to 10mm.",
    ],
    INSTRUMENT: [
        "Generate an image containing an instrument, and a green/black box artefact.",
        "Generate an image with no polyps.",
    ],
    CECUM: ["Generate an image containing text, of a cecum."],
    Z_LINE: ["Generate an image of the the z-line."],
    PARIS: ["Generate an image containing a polyp of type paris is.", "Generate an image with 2 polyps."],
}
# With these fractions and seed the six images fall in all three splits (see split_of_image).
SPLIT_ARGS = {"val_fraction": 0.2, "test_fraction": 0.2, "split_seed": 2}
# How a missing image is counted in `dropped`: once, however many prompts it has.
PER_IMAGE = "image missing (counted per image, each with all its records)"
EXPECTED_SPLITS = {"train": {POLYP, TWO_POLYPS, INSTRUMENT, CECUM}, "val": {Z_LINE}, "test": {PARIS}}

CAPTIONS = {
    Path(POLYP).stem: {
        "original": ["A colonoscopy image showing a single polyp."],
        "paraphrase": ["One polyp is seen in this colonoscopy frame.", "Colonoscopy, polyp."],
    },
    Path(Z_LINE).stem: {"original": ["The Z-line at the gastroesophageal junction."]},
}


def jpeg_bytes(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (20 + 35 * index, 200 - 25 * index, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_medvqa(root: Path, prompt_gt: str = PROMPT_GT) -> Path:
    (root / "images").mkdir(parents=True)
    for index, name in enumerate(IMAGES):
        (root / "images" / name).write_bytes(jpeg_bytes(index))
    (root / "prompt-gt.csv").write_text(prompt_gt, encoding="utf-8")
    return root


def write_captions(path: Path, captions: dict = CAPTIONS) -> str:
    path.write_text(json.dumps(captions), encoding="utf-8")
    return str(path)


def prompts_by_image(records) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for r in records:
        grouped.setdefault(Path(r.image).name, []).append(r.prompt)
    return grouped


def all_records(dm) -> list:
    return dm.records("train") + dm.records("val") + dm.records("test")


# --- official files -----------------------------------------------------------------------------


def test_every_row_is_a_record_with_its_prompt_kept_exactly(tmp_path):
    root = write_medvqa(tmp_path / "gi")
    dm = MedVQAGIDataModule(str(root), val_fraction=0, test_fraction=0)
    train = dm.records("train")
    assert len(train) == 11 and dm.records("val") == [] and dm.records("test") == []
    assert prompts_by_image(train) == PROMPTS  # file order within an image, typos and commas kept
    assert train[0].image == str(root / "images" / POLYP)
    assert train[0].meta == {"image_id": "cl8k2u1pm1dw00831cvdh4e1g", "source": "prompt-gt"}


def test_images_not_rows_are_split_so_no_image_is_in_two_splits(tmp_path):
    dm = MedVQAGIDataModule(str(write_medvqa(tmp_path)), **SPLIT_ARGS)
    images = {split: {Path(r.image).name for r in dm.records(split)} for split in ("train", "val", "test")}
    assert images == EXPECTED_SPLITS
    assert (len(dm.records("train")), len(dm.records("val")), len(dm.records("test"))) == (8, 1, 2)
    for split, names in images.items():
        assert {split_of_image(name, 0.2, 0.2, seed=2) for name in names} == {split}


def test_split_of_image_is_stable_and_meets_the_fractions_on_average():
    # Fixed values: a change here silently moves images between published train and test sets.
    assert [split_of_image(name, 0.1, 0.1) for name in IMAGES] == "train test train test test train".split()
    assert [
        split_of_image(name, 0.2, 0.2, seed=2) for name in IMAGES
    ] == "train train train train val test".split()
    rng = random.Random(0)
    names = [f"cl{rng.getrandbits(100):025x}.jpg" for _ in range(20000)]
    splits = [split_of_image(name, 0.1, 0.15) for name in names]
    assert splits.count("val") / len(names) == pytest.approx(0.1, abs=0.01)
    assert splits.count("test") / len(names) == pytest.approx(0.15, abs=0.01)
    # More validation only takes training images; the test images stay where they were.
    wider = [split_of_image(name, 0.3, 0.15) for name in names]
    assert all(w == s for w, s in zip(wider, splits, strict=True) if s != "train")
    assert wider.count("val") / len(names) == pytest.approx(0.3, abs=0.01)


def test_fractions_are_checked():
    with pytest.raises(ValueError, match="val_fraction and test_fraction must be >= 0 with a sum <= 1"):
        MedVQAGIDataModule("anywhere", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="got -0.1 and 0.1"):
        MedVQAGIDataModule("anywhere", val_fraction=-0.1)


def test_first_prompt_per_image_counts_the_others_as_dropped(tmp_path):
    dm = MedVQAGIDataModule(str(write_medvqa(tmp_path)), prompts_per_image="first", **SPLIT_ARGS)
    assert prompts_by_image(all_records(dm)) == {name: prompts[:1] for name, prompts in PROMPTS.items()}
    assert dm.dropped["train"] == {"not its image's first prompt": 4}
    assert dm.dropped["test"] == {"not its image's first prompt": 1}
    assert dm.dropped["val"] == {}


def test_batches_decode_the_images(tmp_path):
    dm = MedVQAGIDataModule(str(write_medvqa(tmp_path)), image_size=16, batch_size=2, **SPLIT_ARGS)
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (2, 3, 16, 16)
    batch = next(iter(dm.test_dataloader()))
    assert batch["prompts"] == PROMPTS[PARIS]
    assert batch["pixel_values"].shape == (2, 3, 16, 16)


def test_an_unquoted_semicolon_in_a_prompt_stays_in_the_prompt(tmp_path):
    text = PROMPT_GT + f"Generate an image; with a polyp;{CECUM}\n"
    train = MedVQAGIDataModule(str(write_medvqa(tmp_path, text)), val_fraction=0, test_fraction=0).records(
        "train"
    )
    assert len(train) == 12
    assert (train[-1].prompt, Path(train[-1].image).name) == ("Generate an image; with a polyp", CECUM)


def test_captions_json_alone_or_with_the_prompts(tmp_path):
    root = write_medvqa(tmp_path / "gi")
    captions = write_captions(tmp_path / "kvasir-captions.json")
    only = MedVQAGIDataModule(str(root), captions=captions, prompt_source="captions", **SPLIT_ARGS)
    assert prompts_by_image(all_records(only)) == {
        POLYP: [
            "A colonoscopy image showing a single polyp.",
            "One polyp is seen in this colonoscopy frame.",
            "Colonoscopy, polyp.",
        ],
        Z_LINE: ["The Z-line at the gastroesophageal junction."],
    }
    assert [r.meta["source"] for r in only.records("train")] == ["caption:original"] + [
        "caption:paraphrase"
    ] * 2
    assert [Path(r.image).name for r in only.records("val")] == [Z_LINE]  # the split of its prompts

    both = MedVQAGIDataModule(str(root), captions=captions, prompt_source="both", **SPLIT_ARGS)
    assert len(all_records(both)) == 11 + 4
    assert prompts_by_image(both.records("val")) == {
        Z_LINE: PROMPTS[Z_LINE] + CAPTIONS[Path(Z_LINE).stem]["original"]
    }


def test_prompt_source_and_captions_must_agree(tmp_path):
    with pytest.raises(ValueError, match="prompt_source='captions' needs captions"):
        MedVQAGIDataModule("anywhere", prompt_source="captions")
    with pytest.raises(ValueError, match="captions is set but prompt_source='prompts' leaves it unused"):
        MedVQAGIDataModule("anywhere", captions="kvasir-captions.json")
    with pytest.raises(ValueError, match="prompts_per_image must be one of 'all', 'first'; got 'random'"):
        MedVQAGIDataModule("anywhere", prompts_per_image="random")


def test_captions_json_of_another_shape_or_missing_is_named(tmp_path):
    root = write_medvqa(tmp_path / "gi")
    wrong = write_captions(tmp_path / "flat.json", {Path(POLYP).stem: ["A polyp."]})
    with pytest.raises(
        ValueError, match=r"flat\.json: 'cl8k2u1pm1dw00831cvdh4e1g' must map to \{key: \[caption"
    ):
        MedVQAGIDataModule(str(root), captions=wrong, prompt_source="captions").setup()
    with pytest.raises(FileNotFoundError, match=r"captions file .*nowhere\.json does not exist"):
        MedVQAGIDataModule(str(root), captions=str(tmp_path / "nowhere.json"), prompt_source="both").setup()


def test_a_comma_or_tab_delimited_copy_is_told_to_use_semicolons(tmp_path):
    comma = PROMPT_GT.replace(";", ",")
    with pytest.raises(ValueError, match=r"prompt-gt\.csv is delimited by ',' .* uses ';'"):
        MedVQAGIDataModule(str(write_medvqa(tmp_path / "comma", comma))).setup()
    tab = PROMPT_GT.replace(";", "\t")
    with pytest.raises(ValueError, match=r"delimited by '\\t' .*save it with ';' as the delimiter"):
        MedVQAGIDataModule(str(write_medvqa(tmp_path / "tab", tab))).setup()


def test_a_renamed_column_is_named_with_the_columns_found(tmp_path):
    text = PROMPT_GT.replace("Prompt;Filename", "Prompt;Image")
    with pytest.raises(
        ValueError, match=r"prompt-gt\.csv has no 'Filename' column; columns found .*\['Prompt', 'Image'\]"
    ):
        MedVQAGIDataModule(str(write_medvqa(tmp_path, text))).setup()


def test_missing_csv_or_image_folder_are_named(tmp_path):
    root = write_medvqa(tmp_path)
    (root / "prompt-gt.csv").rename(root / "prompts.csv")
    with pytest.raises(FileNotFoundError, match=r"prompt-gt\.csv does not exist"):
        MedVQAGIDataModule(str(root)).setup()
    (root / "prompts.csv").rename(root / "prompt-gt.csv")
    (root / "images").rename(root / "imgs")
    with pytest.raises(FileNotFoundError, match=r"MedVQA-GI image folder .*images does not exist"):
        MedVQAGIDataModule(str(root)).setup()


def test_a_missing_image_is_named_and_counted_once_or_its_rows_dropped(tmp_path, caplog):
    root = write_medvqa(tmp_path)
    (root / "images" / POLYP).unlink()  # the image of 3 of the 11 prompts: one image, counted once
    with pytest.raises(
        FileNotFoundError,
        match=rf"1 image\(s\) \(3 records\) with image missing: \S*{POLYP}; set missing_images",
    ):
        MedVQAGIDataModule(str(root)).setup()
    dm = MedVQAGIDataModule(str(root), missing_images="drop", **SPLIT_ARGS)
    with caplog.at_level(logging.WARNING):
        assert len(all_records(dm)) == 8
    assert dm.dropped["train"] == {PER_IMAGE: 1}
    assert (
        f"dropped 1 train record(s): {PER_IMAGE} (e.g. {root / 'images' / POLYP}; 3 records in all)"
        in caplog.text
    )


def test_empty_prompts_or_file_names_are_named_by_line(tmp_path, caplog):
    text = PROMPT_GT.replace("Generate an image with no polyps.", "   ")
    with pytest.raises(ValueError, match=r"1 record\(s\) with empty prompt: \S*prompt-gt\.csv line 7;"):
        MedVQAGIDataModule(str(write_medvqa(tmp_path / "a", text))).setup()
    with caplog.at_level(logging.WARNING):
        dm = MedVQAGIDataModule(str(write_medvqa(tmp_path / "b", text)), empty_prompts="drop", **SPLIT_ARGS)
        assert len(all_records(dm)) == 10
    assert dm.dropped["train"] == {"empty prompt": 1}
    assert "dropped 1 train record(s): empty prompt" in caplog.text

    text = PROMPT_GT + "Generate an image with a polyp.;\n"
    with pytest.raises(FileNotFoundError, match=r"no file name at \S*prompt-gt\.csv line 13"):
        MedVQAGIDataModule(str(write_medvqa(tmp_path / "c", text))).setup()


# --- hub export (Arrow / parquet) ---------------------------------------------------------------


def hub_table(paths: bool = True) -> pd.DataFrame:
    """The prompts as the hub export has them: one row per prompt, each embedding its image."""
    rows = [(prompt, name) for name, prompts in PROMPTS.items() for prompt in prompts]
    return pd.DataFrame(
        {
            "image": [
                {"bytes": jpeg_bytes(IMAGES.index(name)), "path": name if paths else None} for _, name in rows
            ],
            "caption": [prompt for prompt, _ in rows],
            "type": ["prompt"] * len(rows),
        }
    )


def write_arrow_stream(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def test_hub_arrow_files_give_the_official_splits_and_write_each_image_once(tmp_path):
    # The repository holds datasets' Arrow files (IPC stream format) in several parts.
    root, image_dir = tmp_path / "hub", tmp_path / "images"
    frame = hub_table()
    write_arrow_stream(root / "image_clef_captions-train-00000-of-00002.arrow", frame.iloc[:6])
    write_arrow_stream(root / "image_clef_captions-train-00001-of-00002.arrow", frame.iloc[6:])
    dm = MedVQAGIParquetDataModule(str(root), str(image_dir), image_size=16, batch_size=2, **SPLIT_ARGS)
    images = {split: {Path(r.image).name for r in dm.records(split)} for split in ("train", "val", "test")}
    assert images == EXPECTED_SPLITS
    assert prompts_by_image(all_records(dm)) == PROMPTS
    assert sorted(p.name for p in image_dir.iterdir()) == sorted(IMAGES)
    assert dm.records("val")[0].meta == {"image_id": Path(Z_LINE).stem, "source": "prompt"}
    pixels = np.asarray(Image.open(image_dir / PARIS)).astype(float).mean(axis=(0, 1))
    assert pixels == pytest.approx([20 + 35 * 5, 200 - 25 * 5, 90], abs=3)
    assert next(iter(dm.test_dataloader()))["prompts"] == PROMPTS[PARIS]


def test_hub_parquet_without_paths_groups_rows_by_image_content(tmp_path, monkeypatch):
    root, image_dir = tmp_path / "hub", tmp_path / "images"
    root.mkdir()
    hub_table(paths=False).drop(columns="type").to_parquet(
        root / "train-00000-of-00001.parquet", row_group_size=4
    )
    dm = MedVQAGIParquetDataModule(str(root), str(image_dir), val_fraction=0.4, test_fraction=0.4)
    grouped = prompts_by_image(all_records(dm))
    assert sorted(grouped.values()) == sorted(PROMPTS.values())  # rows of one image stay together
    assert len(list(image_dir.iterdir())) == 6
    for split in ("train", "val", "test"):
        assert all(split_of_image(Path(r.image).name, 0.4, 0.4) == split for r in dm.records(split))
    assert {r.meta["source"] for r in all_records(dm)} == {""}

    # Later runs still read the bytes to know the images, but write nothing.
    monkeypatch.setattr(hub_files, "write_atomically", lambda *args: pytest.fail("image written again"))
    assert len(all_records(MedVQAGIParquetDataModule(str(root), str(image_dir)))) == 11


def test_hub_rows_without_image_bytes_are_named_or_dropped(tmp_path):
    root = tmp_path / "hub"
    frame = hub_table()
    frame.at[7, "image"] = {"bytes": None, "path": None}  # Z_LINE's only prompt
    write_arrow_stream(root / "data-00000-of-00001.arrow", frame)
    with pytest.raises(FileNotFoundError, match=r"data-00000-of-00001\.arrow row 7: no image bytes"):
        MedVQAGIParquetDataModule(str(root), str(tmp_path / "images")).setup()
    dm = MedVQAGIParquetDataModule(str(root), str(tmp_path / "images"), missing_images="drop")
    assert len(all_records(dm)) == 10
    assert sum(dm.dropped[split][PER_IMAGE] for split in dm.dropped) == 1


def test_hub_files_missing_the_caption_column_are_named(tmp_path):
    root = tmp_path / "hub"
    write_arrow_stream(root / "data-00000-of-00001.arrow", hub_table().rename(columns={"caption": "prompt"}))
    with pytest.raises(
        ValueError,
        match=r"00001\.arrow has no 'caption' column; columns found: \['image', 'prompt', 'type'\]",
    ):
        MedVQAGIParquetDataModule(str(root), str(tmp_path / "images")).setup()
