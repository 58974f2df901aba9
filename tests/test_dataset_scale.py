"""The scale benchmark's MIMIC-CXR-JPG-sized layout, and the benchmark itself at a small size."""

import gzip
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from datamodules import MIMICCXRDataModule
from datamodules.report_sections import section_report
from experiments.benchmarks.mimic_scale_layout import (
    LINKS_PER_FILE,
    MISSPELLINGS,
    scaled_counts,
    write_scale_layout,
)

ROOT = Path(__file__).resolve().parents[1]


def test_counts_follow_the_release():
    assert scaled_counts(377_110) == {"images": 377_110, "studies": 227_835, "subjects": 65_379}
    # 3,771.1 images are one hundredth of the release: 2,278.35 studies and 653.79 subjects.
    assert scaled_counts(3_771) == {"images": 3_771, "studies": 2_278, "subjects": 654}


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale") / "mimic-cxr-jpg"
    write_scale_layout(root, 1_200, seed=3)
    return root


def test_layout_is_the_official_one(layout):
    meta = pd.read_csv(layout / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str, keep_default_na=False)
    split = pd.read_csv(layout / "mimic-cxr-2.0.0-split.csv.gz", dtype=str)
    labels = pd.read_csv(layout / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str)
    counts = scaled_counts(1_200)
    assert len(meta) == len(split) == 1_200
    assert meta["study_id"].nunique() == len(labels) == counts["studies"]
    assert meta["subject_id"].nunique() == counts["subjects"]
    assert set(split["split"]) <= {"train", "validate", "test"}
    for row in meta.itertuples():
        folder = layout / "files" / f"p{row.subject_id[:2]}" / f"p{row.subject_id}"
        assert (folder / f"s{row.study_id}" / f"{row.dicom_id}.jpg").is_file()
        assert (folder / f"s{row.study_id}.txt").is_file()
    # No file outside files/ but the four tables.
    assert sorted(p.name for p in layout.iterdir()) == sorted(
        ["files", *(f"mimic-cxr-2.0.0-{s}.csv.gz" for s in ("metadata", "split", "chexpert", "negbio"))]
    )
    with gzip.open(layout / "mimic-cxr-2.0.0-negbio.csv.gz") as negbio:
        assert len(pd.read_csv(negbio)) == counts["studies"]


def test_images_are_hard_links_each_split_its_own(layout):
    meta = pd.read_csv(layout / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
    split = pd.read_csv(layout / "mimic-cxr-2.0.0-split.csv.gz", dtype=str).set_index("dicom_id")["split"]
    inodes: dict[int, set[str]] = {}
    for row in meta.itertuples():
        path = layout / "files" / f"p{row.subject_id[:2]}" / f"p{row.subject_id}" / f"s{row.study_id}"
        stat = os.stat(path / f"{row.dicom_id}.jpg")
        assert stat.st_nlink <= LINKS_PER_FILE
        inodes.setdefault(stat.st_ino, set()).add(split[row.dicom_id])
    assert all(len(splits) == 1 for splits in inodes.values())  # no image in two splits
    assert len(inodes) == len(set(split))  # 1,200 images: one file per split


def test_reports_are_study_specific_and_some_headers_misspelled(tmp_path):
    root = tmp_path / "data"
    write_scale_layout(root, 3_000, seed=0)
    reports = [p.read_text() for p in sorted(root.glob("files/p*/p*/s*.txt"))]
    impressions = [section_report(text).impression for text in reports]
    dated = [i for i in impressions if i.startswith("Compared with the study of ")]
    assert len(set(dated)) == len(dated) > 0.8 * len(reports)  # no two the same
    headers = Counter(h for text in reports for h in text.split("\n") if h.strip().endswith(":"))
    # (CONCLUSION is not one: the phantom reports head 15% of impressions so.)
    misspelled = {f" {m}: " for names in MISSPELLINGS.values() for m in names} - {" CONCLUSION: "}
    seen = sum(n for header, n in headers.items() if header in misspelled)
    assert 3 <= seen <= 50  # 1% of 1,812 reports
    # A misspelled impression header still makes an impression (the official alias table).
    misspelled_impressions = [t for t in reports if any(f" {m}: " in t for m in MISSPELLINGS["impression"])]
    assert misspelled_impressions
    assert all(section_report(text).impression for text in misspelled_impressions)


def test_the_datamodule_reads_the_layout(layout, tmp_path):
    data = MIMICCXRDataModule(root=str(layout), reports=str(layout), record_index_dir=str(tmp_path))
    meta = pd.read_csv(layout / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str, keep_default_na=False)
    frontal = meta["ViewPosition"].isin(["PA", "AP"]).sum()
    kept = sum(len(data.records(s)) for s in ("train", "val", "test"))
    no_impression = sum(data.dropped[s]["no impression section"] for s in ("train", "val", "test"))
    assert kept + no_impression == frontal


@pytest.mark.slow
def test_benchmark_runs_and_prints_its_targets(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.dataset_scale", "--images", "300", "--ranks", "2"]
        + ["--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("first start", "second start", "inspect-data", "2 ranks, first", "2 ranks, second"):
        assert row in done.stdout
    assert done.stdout.count("first start <= 60 s") == 1
    # The two ranks built one index between them.
    builds = [p for p in (tmp_path / "index-ranks").glob("*/*") if p.is_dir()]
    assert len(builds) == 1
