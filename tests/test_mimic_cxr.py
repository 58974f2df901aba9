"""MIMIC-CXR-JPG: report sectioning, the official CSVs joined by name, prompt policies, subsets, bad input.

Every fixture is a tiny hand-written copy of the distributed layout (16 px JPEGs, a few CSV rows).
"""

import csv
import gzip
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from datamodules import MIMICCXRDataModule
from datamodules.mimic_cxr import LABELS
from datamodules.report_sections import Sections, read_sectioned_csv, section_report

# --- a small MIMIC-CXR-JPG ----------------------------------------------------------------------

D1 = "00000001-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"  # s50000001 PA, train
D2 = "00000002-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"  # s50000001 LATERAL, train
D3 = "00000003-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"  # s50000002 AP, validate
D4 = "00000004-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"  # s50000002 blank ViewPosition, validate
D5 = "00000005-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"  # s50000003 PA, test
D6 = "00000006-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"  # s50000004 PA, train
D7 = "00000007-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"  # s50000004 AP, train
D8 = "00000008-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"  # s50000005 PA, train, no report
D9 = "00000009-aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"  # s50000006 PA, validate, no label row

# dicom_id, subject_id, study_id, ViewPosition, split
IMAGES = [
    (D1, "10000032", "50000001", "PA", "train"),
    (D2, "10000032", "50000001", "LATERAL", "train"),
    (D3, "10000032", "50000002", "AP", "validate"),
    (D4, "10000032", "50000002", "", "validate"),
    (D5, "11000011", "50000003", "PA", "test"),
    (D6, "11000011", "50000004", "PA", "train"),
    (D7, "11000011", "50000004", "AP", "train"),
    (D8, "12000005", "50000005", "PA", "train"),
    (D9, "12000005", "50000006", "PA", "validate"),
]

# Reports as distributed: a centred title, lines starting with a space, blank lines " ".
REPORTS = {
    ("10000032", "50000001"): (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PA AND LAT)\n \n"
        " INDICATION:  ___ with cough.\n \n"
        " FINDINGS: \n \n Small left pleural effusion.  No\n pneumothorax.\n \n"
        " IMPRESSION: \n \n Small left pleural effusion.\n"
    ),
    # CONCLUSION and no IMPRESSION: the conclusion is the impression.
    ("10000032", "50000002"): (
        "                                 FINAL REPORT\n"
        " COMPARISON:  ___.\n \n"
        " FINDINGS: \n \n Heart size is normal.\n \n"
        " CONCLUSION: \n \n No acute cardiopulmonary\n process.\n"
    ),
    # Neither findings nor impression: only a last paragraph.
    ("11000011", "50000003"): (
        "                                 FINAL REPORT\n"
        " CHEST RADIOGRAPH PERFORMED ON ___\n \n Lungs are clear.  No effusion.\n"
    ),
    # IMPRESSION twice: the last one wins.
    ("11000011", "50000004"): (
        "                                 FINAL REPORT\n"
        " IMPRESSION: \n \n Preliminary read, no pneumothorax.\n \n"
        " FINDINGS: \n \n Right chest tube in place.\n \n"
        " IMPRESSION: \n \n Right chest tube in place, no pneumothorax.\n"
    ),
    ("12000005", "50000006"): " FINAL REPORT\n IMPRESSION: Never read: this study has no label row.\n",
}

# What the official create_section_files.py writes for those reports (stripped, newlines kept).
SECTIONED_ROWS = [
    ("s50000001", "Small left pleural effusion.", "Small left pleural effusion.  No\n pneumothorax.", "", ""),
    ("s50000002", "No acute cardiopulmonary\n process.", "Heart size is normal.", "", "___."),
    ("s50000003", "", "", "Lungs are clear.  No effusion.", ""),
    ("s50000004", "Right chest tube in place, no pneumothorax.", "Right chest tube in place.", "", ""),
    ("s50000006", "Never read: this study has no label row.", "", "", ""),
]

# subject_id, study_id -> labels that are not blank.
CHEXPERT = {
    ("10000032", "50000001"): {"Pleural Effusion": "1.0", "Edema": "-1.0", "Lung Opacity": "0.0"},
    ("10000032", "50000002"): {"No Finding": "1.0"},
    ("11000011", "50000003"): {"No Finding": "1.0"},
    ("11000011", "50000004"): {"Support Devices": "1.0", "Pneumothorax": "0.0"},
    ("12000005", "50000005"): {"Cardiomegaly": "1.0", "Edema": "1.0"},
}
NEGBIO = {**CHEXPERT, ("10000032", "50000001"): {"Pleural Effusion": "1.0", "Edema": "0.0"}}

METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
    "ExtraColumnOfSomeCopy",
]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def image_path(root: Path, dicom_id: str, subject_id: str, study_id: str) -> Path:
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"


def write_metadata(root: Path, images, suffix: str = ".csv") -> None:
    write_csv(
        root / f"mimic-cxr-2.0.0-metadata{suffix}",
        METADATA_COLUMNS,
        [
            [
                d,
                subject,
                study,
                "CHEST (PA AND LAT)",
                view,
                "16",
                "16",
                "21800506",
                "213014.531",
                "",
                "",
                "",
                "x",
            ]
            for d, subject, study, view, _ in images
        ],
    )


def write_split(root: Path, images) -> None:
    # Columns deliberately in another order than the release's.
    write_csv(
        root / "mimic-cxr-2.0.0-split.csv",
        ["split", "subject_id", "dicom_id", "study_id"],
        [[split, subject, d, study] for d, subject, study, _, split in images],
    )


def write_labels(root: Path, labeler: str, labels: dict) -> None:
    write_csv(
        root / f"mimic-cxr-2.0.0-{labeler}.csv",
        ["subject_id", "study_id", *LABELS],
        [
            [subject, study, *(values.get(name, "") for name in LABELS)]
            for (subject, study), values in labels.items()
        ],
    )


def write_reports(folder: Path, reports: dict) -> None:
    for (subject, study), text in reports.items():
        path = folder / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def write_images(root: Path, images) -> None:
    for d, subject, study, _, _ in images:
        path = image_path(root, d, subject, study)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (16, 16), 100).save(path)


@pytest.fixture
def root(tmp_path) -> Path:
    """The small MIMIC-CXR-JPG above, reports in <root>/reports/files."""
    root = tmp_path / "mimic-cxr-jpg"
    write_images(root, IMAGES)
    write_metadata(root, IMAGES)
    write_split(root, IMAGES)
    write_labels(root, "chexpert", CHEXPERT)
    write_labels(root, "negbio", NEGBIO)
    write_reports(root / "reports", REPORTS)
    return root


def by_split(dm: MIMICCXRDataModule) -> dict[str, list[tuple[str, str]]]:
    """split -> (dicom_id, prompt) of each record."""
    return {
        split: [(r.meta["dicom_id"], r.prompt) for r in dm.records(split)]
        for split in ("train", "val", "test")
    }


def dropped(dm: MIMICCXRDataModule) -> dict[str, dict[str, int]]:
    return {split: dict(counts) for split, counts in dm.dropped.items() if counts}


IMPRESSIONS = {
    "train": [
        (D1, "Small left pleural effusion."),
        (D6, "Right chest tube in place, no pneumothorax."),
        (D7, "Right chest tube in place, no pneumothorax."),
    ],
    "val": [(D3, "No acute cardiopulmonary process.")],
    "test": [],
}
VIEW_DROPS = {"view LATERAL not in ['PA', 'AP']": 1}


# --- report sections ----------------------------------------------------------------------------


def test_sections_of_a_plain_report():
    assert section_report(REPORTS["10000032", "50000001"]) == Sections(
        impression="Small left pleural effusion.",
        findings="Small left pleural effusion. No pneumothorax.",
    )


# Not "CONCLUSIONS": the official sectioner keeps that as a section of its own (see test_report_sections).
@pytest.mark.parametrize("header", ["CONCLUSION", "IMPRESSIONS", "FINDINGS AND IMPRESSION", "IMPRESSON"])
def test_conclusion_and_similar_headers_are_the_impression(header):
    sections = section_report(f" FINAL REPORT\n COMPARISON:  None.\n \n {header}: \n \n No acute process.\n")
    assert sections == Sections(impression="No acute process.", comparison="None.")


def test_view_description_headers_introduce_the_findings():
    sections = section_report(
        " FINAL REPORT\n CHEST, PA AND LATERAL: \n Clear lungs.\n \n IMPRESSION: Normal.\n"
    )
    assert sections == Sections(impression="Normal.", findings="Clear lungs.")


def test_the_last_section_of_a_name_wins_unless_it_is_empty():
    assert (
        section_report(REPORTS["11000011", "50000004"]).impression
        == "Right chest tube in place, no pneumothorax."
    )
    # An empty repeated IMPRESSION does not erase the filled one (as in the official sectioner).
    text = " FINAL REPORT\n IMPRESSION: Effusion.\n \n NOTIFICATION: Called.\n IMPRESSION: \n \n"
    assert section_report(text).impression == "Effusion."


def test_without_findings_or_impression_the_last_paragraph_is_what_follows_the_first():
    assert section_report(REPORTS["11000011", "50000003"]) == Sections(
        last_paragraph="Lungs are clear. No effusion."
    )
    # The official definition: everything after the first paragraph of the last section.
    three = " FINAL REPORT\n HISTORY: Cough.\n \n First.\n \n Second.\n"
    assert section_report(three) == Sections(last_paragraph="First. Second.")
    assert section_report(" FINAL REPORT\n One paragraph only.\n") == Sections()
    # With a findings section there is no last paragraph.
    assert section_report(" FINAL REPORT\n FINDINGS: Clear.\n \n Also clear.\n").last_paragraph == ""


def test_read_sectioned_csv_keys_by_study_id_and_normalises_whitespace(tmp_path):
    path = write_csv(
        tmp_path / "mimic_cxr_sectioned.csv", ["study", *Sections.__annotations__], SECTIONED_ROWS
    )
    sections = read_sectioned_csv(path)
    assert sections["50000002"] == Sections(
        impression="No acute cardiopulmonary process.", findings="Heart size is normal.", comparison="___."
    )
    assert sections["50000003"] == Sections(last_paragraph="Lungs are clear. No effusion.")
    for (_, study), text in REPORTS.items():
        assert sections[study] == section_report(text, study)


def test_read_sectioned_csv_names_a_missing_column(tmp_path):
    path = write_csv(tmp_path / "sectioned.csv", ["study", "impression"], [["s50000001", "x"]])
    with pytest.raises(ValueError, match=r"no column\(s\) \['findings', 'last_paragraph', 'comparison'\]"):
        read_sectioned_csv(path)


# --- records, splits and labels -----------------------------------------------------------------


def test_impression_prompts_official_splits_and_every_drop_counted(root, caplog):
    dm = MIMICCXRDataModule(str(root))
    with caplog.at_level(logging.WARNING):
        assert by_split(dm) == IMPRESSIONS
    assert dropped(dm) == {
        "train": {**VIEW_DROPS, "no report": 1},
        "val": {"blank ViewPosition": 1, "no label row in mimic-cxr-2.0.0-chexpert.csv": 1},
        "test": {"no impression section": 1},
    }
    assert "dropped 1 train record(s): no report (e.g. files/p12/p12000005/s50000005/" in caplog.text


def test_records_carry_path_labels_and_meta(root):
    (record, *_) = MIMICCXRDataModule(str(root)).records("train")
    assert record.image == str(image_path(root, D1, "10000032", "50000001"))
    assert record.meta == {"dicom_id": D1, "subject_id": "10000032", "study_id": "50000001", "view": "PA"}
    assert set(record.labels) == set(LABELS)
    # 1, -1 and 0 as stated; blank ("not mentioned") stays None, distinct from 0.
    assert record.labels["Pleural Effusion"] == 1.0
    assert record.labels["Edema"] == -1.0
    assert record.labels["Lung Opacity"] == 0.0
    assert record.labels["Cardiomegaly"] is None
    negbio = MIMICCXRDataModule(str(root), labeler="negbio").records("train")[0]
    assert negbio.labels["Edema"] == 0.0 and negbio.labels["Lung Opacity"] is None


def test_findings_and_combined_prompts(root):
    findings = by_split(MIMICCXRDataModule(str(root), prompt_source="findings"))
    assert findings == {
        "train": [
            (D1, "Small left pleural effusion. No pneumothorax."),
            (D6, "Right chest tube in place."),
            (D7, "Right chest tube in place."),
        ],
        "val": [(D3, "Heart size is normal.")],
        "test": [],
    }
    dm = MIMICCXRDataModule(str(root), prompt_source="findings+impression")
    assert (
        dm.records("train")[0].prompt
        == "Small left pleural effusion. No pneumothorax. Small left pleural effusion."
    )
    assert dm.dropped["test"] == {"no findings or impression section": 1}


def test_last_paragraph_fallback_is_opt_in(root):
    dm = MIMICCXRDataModule(str(root), last_paragraph_fallback=True)
    assert by_split(dm)["test"] == [(D5, "Lungs are clear. No effusion.")]
    assert not dm.dropped["test"]


def test_label_prompts_need_no_reports(root):
    dm = MIMICCXRDataModule(str(root), prompt_source="labels", reports=str(root / "nowhere"))
    assert by_split(dm) == {
        "train": [
            (D1, "chest x-ray with pleural effusion"),
            (D6, "chest x-ray with support devices"),
            (D7, "chest x-ray with support devices"),
            (D8, "chest x-ray with cardiomegaly, edema"),
        ],
        "val": [(D3, "normal chest x-ray")],
        "test": [(D5, "normal chest x-ray")],
    }
    custom = MIMICCXRDataModule(str(root), prompt_source="labels", template="CXR: {findings}.")
    assert custom.records("train")[-1].prompt == "CXR: cardiomegaly, edema."


def test_study_with_only_uncertain_labels_has_no_label_prompt(root):
    write_labels(root, "chexpert", {**CHEXPERT, ("10000032", "50000001"): {"Edema": "-1.0"}})
    dm = MIMICCXRDataModule(str(root), prompt_source="labels")
    assert [r.meta["dicom_id"] for r in dm.records("train")] == [D6, D7, D8]
    assert dm.dropped["train"]["no positive label"] == 1


def test_sectioned_csv_gives_the_same_prompts_as_raw_reports(root):
    write_csv(root / "mimic_cxr_sectioned.csv", ["study", *Sections.__annotations__], SECTIONED_ROWS)
    found_by_default = MIMICCXRDataModule(str(root))
    assert by_split(found_by_default) == IMPRESSIONS
    assert dropped(found_by_default)["train"] == {**VIEW_DROPS, "no report": 1}
    for source in ("findings", "findings+impression"):
        from_csv = MIMICCXRDataModule(str(root), prompt_source=source)
        from_reports = MIMICCXRDataModule(str(root), prompt_source=source, reports=str(root / "reports"))
        assert by_split(from_csv) == by_split(from_reports)


def test_misspelt_headers_of_the_official_table_keep_the_study(root):
    # IMPRESSON and FINDINDGS are in the official sectioner's table: the study keeps both sections.
    text = (
        REPORTS["10000032", "50000001"]
        .replace("IMPRESSION:", "IMPRESSON:")
        .replace("FINDINGS:", "FINDINDGS:")
    )
    write_reports(root / "reports", {("10000032", "50000001"): text})
    assert by_split(MIMICCXRDataModule(str(root))) == IMPRESSIONS
    findings = MIMICCXRDataModule(str(root), prompt_source="findings").records("train")[0]
    assert findings.prompt == "Small left pleural effusion. No pneumothorax."


def test_a_study_the_official_script_sections_by_hand_gets_its_hand_picked_impression(tmp_path):
    # s50913680's conclusion is its RECOMMENDATION(S) section (the official custom rules); the same
    # report under another study id has no impression.
    images = [(D1, "11851243", "50913680", "PA", "train"), (D2, "11851243", "50000007", "PA", "train")]
    report = (
        " FINAL REPORT\n FINDINGS:  Lungs are clear.\n \n RECOMMENDATION(S):  Chest CT in three months.\n"
    )
    root = tmp_path / "mimic-cxr-jpg"
    write_images(root, images)
    write_metadata(root, images)
    write_split(root, images)
    write_labels(
        root, "chexpert", {(subject, study): {"No Finding": "1.0"} for _, subject, study, _, _ in images}
    )
    write_reports(root / "reports", {(subject, study): report for _, subject, study, _, _ in images})
    dm = MIMICCXRDataModule(str(root))
    assert by_split(dm)["train"] == [(D1, "Chest CT in three months.")]
    assert dm.dropped["train"] == {"no impression section": 1}


def test_reports_next_to_the_images_or_anywhere_given(root, tmp_path):
    (root / "reports").rename(tmp_path / "elsewhere")
    assert by_split(MIMICCXRDataModule(str(root), reports=str(tmp_path / "elsewhere"))) == IMPRESSIONS
    assert (
        by_split(MIMICCXRDataModule(str(root), reports=str(tmp_path / "elsewhere" / "files"))) == IMPRESSIONS
    )
    write_reports(root, REPORTS)  # files/p10/p10000032/s50000001.txt beside the image folders
    assert by_split(MIMICCXRDataModule(str(root))) == IMPRESSIONS


def test_no_report_anywhere_is_an_error_not_an_empty_dataset(root):
    with pytest.raises(FileNotFoundError, match="no report found for any study; looked in .*mimic-cxr-jpg"):
        MIMICCXRDataModule(str(root), reports=str(root / "files")).records("train")


def test_views_and_one_image_per_study(root):
    dm = MIMICCXRDataModule(str(root), one_image_per_study=True)
    assert [r.meta["dicom_id"] for r in dm.records("train")] == [D1, D6]
    assert dm.dropped["train"]["another image of the study kept (one_image_per_study)"] == 1
    ap_first = MIMICCXRDataModule(str(root), views=["AP", "PA"], one_image_per_study=True)
    assert [r.meta["dicom_id"] for r in ap_first.records("train")] == [D1, D7]
    lateral = MIMICCXRDataModule(str(root), views=["lateral"])
    assert [r.meta["dicom_id"] for r in lateral.records("train")] == [D2]
    assert lateral.dropped["train"] == {"view PA not in ['LATERAL']": 3, "view AP not in ['LATERAL']": 1}


def test_gzipped_csvs_are_read(root):
    (root / "mimic-cxr-2.0.0-metadata.csv").unlink()
    write_metadata(root, IMAGES, suffix=".csv.gz")
    assert by_split(MIMICCXRDataModule(str(root))) == IMPRESSIONS


def test_batches_come_out_of_the_loader(root):
    dm = MIMICCXRDataModule(str(root), image_size=8, batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert sorted(batch["prompts"]) == sorted(p for _, p in IMPRESSIONS["train"])


# --- subsets ------------------------------------------------------------------------------------


@pytest.fixture
def many(tmp_path) -> Path:
    """40 one-image training studies: 10 pleural effusion, 10 no finding, 20 edema; and one test study."""
    kinds = ["Pleural Effusion"] * 10 + ["No Finding"] * 10 + ["Edema"] * 20
    train = [
        (f"{i:08x}-00000000-00000000-00000000-00000000", "10000001", str(50000100 + i), "PA", "train")
        for i in range(len(kinds))
    ]
    images = [*train, ("ffffffff-00000000-00000000-00000000-00000000", "10000001", "50009999", "PA", "test")]
    labels = {
        ("10000001", study): {kind: "1.0"} for (_, _, study, _, _), kind in zip(train, kinds, strict=True)
    }
    labels["10000001", "50009999"] = {"No Finding": "1.0"}
    root = tmp_path / "many"
    write_images(root, images)
    write_metadata(root, images)
    write_split(root, images)
    write_labels(root, "chexpert", labels)
    return root


def subset_ids(root: Path, **kwargs) -> list[str]:
    dm = MIMICCXRDataModule(str(root), prompt_source="labels", **kwargs)
    ids = [r.meta["dicom_id"] for r in dm.records("train")]
    assert len(ids) == kwargs["subset"]
    assert dm.dropped["train"] == {"not in subset": 40 - kwargs["subset"]}
    assert len(dm.records("test")) == 1  # subsets are of the training split only
    return ids


def test_subsets_are_reproducible_and_nested(many):
    small = subset_ids(many, subset=5, subset_seed=3)
    assert len(set(small)) == 5
    assert subset_ids(many, subset=5, subset_seed=3) == small
    assert set(small) < set(subset_ids(many, subset=12, subset_seed=3))
    assert set(subset_ids(many, subset=5, subset_seed=4)) != set(small)


def test_balanced_subset_is_half_the_label_half_no_finding(many):
    dm = MIMICCXRDataModule(str(many), prompt_source="labels", subset=10, subset_balance="Pleural Effusion")
    prompts = sorted(r.prompt for r in dm.records("train"))
    assert prompts == ["chest x-ray with pleural effusion"] * 5 + ["normal chest x-ray"] * 5
    assert dm.dropped["train"] == {"not in subset": 30}
    smaller = MIMICCXRDataModule(
        str(many), prompt_source="labels", subset=4, subset_balance="Pleural Effusion"
    )
    assert {r.image for r in smaller.records("train")} < {r.image for r in dm.records("train")}


def test_a_subset_larger_than_the_data_warns(many, caplog):
    dm = MIMICCXRDataModule(str(many), prompt_source="labels", subset=30, subset_balance="Pleural Effusion")
    with caplog.at_level(logging.WARNING):
        assert len(dm.records("train")) == 20
    assert (
        "a subset of 30 (15 Pleural Effusion, 15 No Finding) was asked for but only 20 usable train"
        in caplog.text
    )
    assert dm.dropped["train"] == {"not in subset": 20}


def test_subset_arguments_are_checked():
    with pytest.raises(ValueError, match="even subset"):
        MIMICCXRDataModule("x", subset=5, subset_balance="Pleural Effusion")
    with pytest.raises(ValueError, match="other than No Finding"):
        MIMICCXRDataModule("x", subset=4, subset_balance="Effusion")


# --- bad input ----------------------------------------------------------------------------------


def test_missing_csv_names_the_file_and_its_contents(root):
    (root / "mimic-cxr-2.0.0-split.csv").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"no mimic-cxr-2\.0\.0-split\.csv\(\.gz\).*train / validate / test"
    ):
        MIMICCXRDataModule(str(root)).records("train")


def test_renamed_column_names_file_column_and_columns_found(root):
    path = root / "mimic-cxr-2.0.0-metadata.csv"
    path.write_text(path.read_text().replace("ViewPosition", "View Position", 1))
    message = re.escape(f"{path} has no 'ViewPosition' column; columns found: ") + r".*'View Position'"
    with pytest.raises(ValueError, match=message):
        MIMICCXRDataModule(str(root)).records("train")


def test_ids_that_disagree_between_metadata_and_split_are_an_error(root):
    write_split(root, [(D1, "10000032", "50000099", "PA", "train"), *IMAGES[1:]])
    with pytest.raises(ValueError, match=f"study_id differs between .* for 1 image\\(s\\): {D1}"):
        MIMICCXRDataModule(str(root)).records("train")


def test_missing_image_is_an_error_naming_it_by_default(root):
    missing = image_path(root, D6, "11000011", "50000004")
    missing.unlink()
    with pytest.raises(
        FileNotFoundError, match=f"1 train image\\(s\\) .* do not exist: {re.escape(str(missing))}"
    ):
        MIMICCXRDataModule(str(root)).records("train")


def test_missing_image_can_be_dropped_and_counted(root, caplog):
    image_path(root, D6, "11000011", "50000004").unlink()
    dm = MIMICCXRDataModule(str(root), missing_images="drop")
    with caplog.at_level(logging.WARNING):
        assert [r.meta["dicom_id"] for r in dm.records("train")] == [D1, D7]
    assert dm.dropped["train"] == {**VIEW_DROPS, "no report": 1, "image file missing": 1}
    assert f"image file missing (e.g. files/p11/p11000011/s50000004/{D6}.jpg)" in caplog.text


def test_malformed_label_value_is_an_error(root):
    write_labels(root, "chexpert", {**CHEXPERT, ("10000032", "50000001"): {"Edema": "yes"}})
    with pytest.raises(ValueError, match=r"column 'Edema' holds \['yes'\]"):
        MIMICCXRDataModule(str(root)).records("train")
