"""A MIMIC-CXR-JPG-sized folder in the official layout, for measuring start-up at the size users run.

The counts follow the release (377,110 images, 227,835 studies, 65,379 patients; about 98% of the
images in the official train split) scaled to the number of images asked for; view positions in
roughly the release's proportions, blank ones included. Reports are the phantom writer's
(datamodules/phantoms/mimic.py): raw text shaped like MIMIC's, headers and all, with each
impression made study-specific by a comparison date, and 1% of headers misspelled as the official
sectioner's alias table lists them. Images are placeholders: a few small JPEG files, each hard-
linked at most LINKS_PER_FILE times (ext4 allows 65,000 links per file), so the folder costs
inodes and directory entries like the real one, not 570 GB. Each split links its own files: medsd
knows an image by its inode, and an image in two splits is refused as leakage.
"""

from __future__ import annotations

import datetime
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from datamodules.phantoms._common import write_csv
from datamodules.phantoms.chest import sample_findings
from datamodules.phantoms.mimic import LABELS, chest_report
from datamodules.report_sections import SECTION_ALIASES

RELEASE = {"images": 377_110, "studies": 227_835, "subjects": 65_379}
LINKS_PER_FILE = 60_000
# ViewPosition shares in the release's metadata (AP, PA, LATERAL, LL, blank, the rare others).
VIEWS = {"AP": 0.39, "PA": 0.255, "LATERAL": 0.22, "LL": 0.093, "": 0.04, "AP AXIAL": 0.001, "PA LLD": 0.001}
SPLIT_SHARES = {"train": 0.978, "validate": 0.008, "test": 0.014}  # of the subjects
MISSPELLED_SHARE = 0.01
MISSPELLINGS = {
    section: [
        alias.upper() for alias, name in SECTION_ALIASES.items() if name == section and alias != section
    ]
    for section in ("impression", "findings")
}


def scaled_counts(images: int) -> dict[str, int]:
    """Studies and subjects in the release's proportions to `images` (at least one of each)."""
    scale = images / RELEASE["images"]
    studies = max(1, min(images, round(RELEASE["studies"] * scale)))
    return {
        "images": images,
        "studies": studies,
        "subjects": max(1, min(studies, round(RELEASE["subjects"] * scale))),
    }


def write_scale_layout(out: str | os.PathLike, images: int, seed: int = 0) -> dict[str, int]:
    """Write the folder (which must not exist yet); return the counts written."""
    out = Path(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    counts = scaled_counts(images)
    subjects = rng.choice(np.arange(10_000_000, 20_000_000), counts["subjects"], replace=False)
    study_ids = rng.choice(np.arange(50_000_000, 60_000_000), counts["studies"], replace=False)
    # Every subject has a study and every study an image; the rest fall at random.
    subject_of = np.concatenate([subjects, rng.choice(subjects, counts["studies"] - len(subjects))])
    study_of = np.concatenate(
        [np.arange(counts["studies"]), rng.integers(0, counts["studies"], images - counts["studies"])]
    )
    split_of = dict(
        zip(
            subjects,
            rng.choice(list(SPLIT_SHARES), len(subjects), p=list(SPLIT_SHARES.values())),
            strict=True,
        )
    )
    views = rng.choice(list(VIEWS), images, p=np.array(list(VIEWS.values())) / sum(VIEWS.values()))
    image_split = np.array([split_of[subject_of[s]] for s in study_of])
    placeholders = {
        split: _placeholders(out, split, -(-int((image_split == split).sum()) // LINKS_PER_FILE))
        for split in SPLIT_SHARES
    }
    linked = dict.fromkeys(SPLIT_SHARES, 0)

    label_rows, meta_rows = [], []
    for k, (subject, study) in enumerate(zip(subject_of, study_ids, strict=True)):
        folder = out / "files" / f"p{str(subject)[:2]}" / f"p{subject}"
        (folder / f"s{study}").mkdir(parents=True, exist_ok=True)
        findings = sample_findings(rng)
        report = chest_report(findings, ("PA", "LATERAL"), rng)
        (folder / f"s{study}.txt").write_text(_vary(report.text, k, rng))
        label_rows.append({"subject_id": subject, "study_id": study, **report.labels})
    order = np.argsort(study_of, kind="stable")
    for i in order:
        subject, study = subject_of[study_of[i]], study_ids[study_of[i]]
        dicom = "-".join(f"{v:08x}" for v in rng.integers(0, 2**32, size=5))
        path = out / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        split = image_split[i]
        os.link(placeholders[split][linked[split] // LINKS_PER_FILE], path)
        linked[split] += 1
        meta_rows.append((dicom, subject, study, views[i]))

    meta = pd.DataFrame(meta_rows, columns=["dicom_id", "subject_id", "study_id", "ViewPosition"])
    write_csv(meta, out / "mimic-cxr-2.0.0-metadata.csv.gz")
    split = meta[["dicom_id", "study_id", "subject_id"]].assign(split=meta["subject_id"].map(split_of))
    write_csv(split, out / "mimic-cxr-2.0.0-split.csv.gz")
    labels = pd.DataFrame(label_rows, columns=["subject_id", "study_id", *LABELS])
    for labeler in ("chexpert", "negbio"):
        write_csv(labels, out / f"mimic-cxr-2.0.0-{labeler}.csv.gz")
    for placeholder in (path for paths in placeholders.values() for path in paths):
        placeholder.unlink()  # the links keep the data; nothing outside files/ is an image
    return counts


def _placeholders(out: Path, split: str, n: int) -> list[Path]:
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "JPEG")
    paths = [out / f"placeholder-{split}-{i}.jpg" for i in range(n)]
    for path in paths:
        path.write_bytes(buffer.getvalue())
    return paths


def _vary(text: str, k: int, rng: np.random.Generator) -> str:
    """The report made study-specific (a comparison date in the impression) and, for 1% of the
    reports, with a header misspelled as radiologists' dictations have it."""
    date = datetime.date(2110, 1, 1) + datetime.timedelta(days=k % 30_000)
    for section in ("IMPRESSION", "CONCLUSION"):
        text = text.replace(f" {section}: \n \n", f" {section}: \n \n Compared with the study of {date}. ", 1)
    if rng.random() < MISSPELLED_SHARE:
        section = str(rng.choice(list(MISSPELLINGS)))
        text = text.replace(f" {section.upper()}: ", f" {rng.choice(MISSPELLINGS[section])}: ", 1)
    return text
