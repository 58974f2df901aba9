"""Each dataset's DataModule reads its phantoms, checked against the generator's truth file."""

import json
import re

import pandas as pd
import pytest

from datamodules import MedVQAGIDataModule, MIMICCXRDataModule, ROCOv2DataModule
from datamodules.phantoms import write_phantoms
from experiments.inspect_data import summarize
from lightning_modules.backbones import build_clip_tokenizer
from lightning_modules.prompts import PromptTokenizer

SPLITS = {"train": "train", "validate": "val", "valid": "val", "test": "test"}


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    return write_phantoms("mimic-cxr", 60, tmp_path_factory.mktemp("mimic"), seed=5, image_size=64)


def test_mimic_cxr_phantoms(mimic):
    truth = pd.read_csv(mimic / "phantom_truth.csv", dtype=str, keep_default_na=False)
    dm = MIMICCXRDataModule(str(mimic), image_size=32)
    # Kept: frontal views as the metadata states them (some ViewPosition cells are blank, as in
    # the real files) whose report has an impression, or a conclusion standing for one.
    metadata = pd.read_csv(mimic / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str, keep_default_na=False)
    view = truth.dicom_id.map(dict(zip(metadata.dicom_id, metadata.ViewPosition, strict=True)))
    kept = truth[view.isin(["PA", "AP"]) & truth.report_style.isin(["impression", "conclusion"])]
    labels = pd.read_csv(mimic / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str, keep_default_na=False)
    labels = labels.set_index("study_id")
    for split in ("train", "val", "test"):
        expected = kept[kept.split.map(SPLITS) == split]
        records = dm.records(split)
        assert sorted(r.meta["dicom_id"] for r in records) == sorted(expected.dicom_id)
        for record in records:
            row = truth.set_index("dicom_id").loc[record.meta["dicom_id"]]
            report = flat((mimic / row.report).read_text())
            header = "IMPRESSION" if row.report_style == "impression" else "CONCLUSION"
            assert report.endswith(f"{header}: {record.prompt}")
            study = labels.loc[row.study_id]
            for name, value in record.labels.items():
                assert value == (None if study[name] == "" else float(study[name]))
    # What was left out is counted, reason by reason.
    dropped = sum(sum(dm.dropped[s].values()) for s in ("train", "val", "test"))
    assert dropped == len(truth) - len(kept)


def test_inspect_data_on_mimic_phantoms(mimic):
    truth = pd.read_csv(mimic / "phantom_truth.csv", dtype=str, keep_default_na=False)
    clip = PromptTokenizer(build_clip_tokenizer(), max_length=77)
    summary = json.loads(json.dumps(summarize(MIMICCXRDataModule(str(mimic), long_prompts="drop"), clip)))
    train = summary["splits"]["train"]
    lateral = int(((truth.view == "LATERAL") & (truth.split == "train")).sum())
    assert train["dropped"]["view LATERAL not in ['PA', 'AP']"] == lateral
    assert set(train["meta"]["view"]) <= {"PA", "AP"}
    assert train["prompt_tokens"]["max"] > 77  # the generator writes some long impressions
    assert train["dropped"]["prompt longer than the text encoder's 77 tokens"] >= 1
    assert set(train["labels"]["Pleural Effusion"]) <= {"positive", "negative", "uncertain", "blank"}


def test_rocov2_phantoms(tmp_path):
    root = write_phantoms("rocov2", 40, tmp_path, seed=2, image_size=48)
    truth = pd.read_csv(root / "phantom_truth.csv", dtype=str, keep_default_na=False)
    captions = pd.concat([pd.read_csv(root / f"{s}_captions.csv") for s in ("train", "valid", "test")])
    caption = dict(zip(captions.ID, captions.Caption, strict=True))
    dm = ROCOv2DataModule(str(root), image_size=32)
    for split in ("train", "val", "test"):
        records = dm.records(split)
        assert sorted(r.meta["id"] for r in records) == sorted(truth.ID[truth.split.map(SPLITS) == split])
        assert all(r.prompt == caption[r.meta["id"]] for r in records)
    ct = ROCOv2DataModule(str(root), modality_cuis=["C0040405"], image_size=32)
    got = sorted(r.meta["id"] for s in ("train", "val", "test") for r in ct.records(s))
    assert got == sorted(truth.ID[truth.scan.str.endswith(" ct")])


def test_medvqa_gi_phantoms(tmp_path):
    root = write_phantoms("medvqa-gi", 30, tmp_path, seed=4, image_size=64)
    rows = pd.read_csv(root / "prompt-gt.csv", sep=";", dtype=str, keep_default_na=False)
    dm = MedVQAGIDataModule(str(root), image_size=32)
    pairs, split_of = [], {}
    for split in ("train", "val", "test"):
        for record in dm.records(split):
            name = record.image.rsplit("/", 1)[-1]
            assert split_of.setdefault(name, split) == split  # no image in two splits
            pairs.append((record.prompt, name))
    assert sorted(pairs) == sorted(zip(rows.Prompt, rows.Filename, strict=True))
