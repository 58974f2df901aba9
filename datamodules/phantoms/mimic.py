"""Chest phantoms in the MIMIC-CXR-JPG 2.0.0 layout, with reports and labels that match the images.

A reader written for the real dataset should run unchanged on this folder: same file paths, id
formats, CSV names, columns and value conventions (CheXpert labels 1.0 / 0.0 / -1.0 / blank),
and raw reports shaped like the real ones, so the official section splitter finds FINDINGS and
IMPRESSION (or CONCLUSION, or neither, as in the real data). Unlike the real labels, these are
exact: `phantom_truth.csv` (one row per image) records what was drawn, and the report and
labels are generated from the same findings.
"""

from __future__ import annotations

import datetime
import re
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._common import save_jpeg, split_counts, write_csv
from .chest import ChestFindings, draw_chest, sample_findings

LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)  # fmt: skip
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)  # fmt: skip
PROCEDURES = {
    ("PA", "LATERAL"): ("CHEST (PA AND LAT)", "Chest PA and lateral."),
    ("AP", "LATERAL"): ("CHEST (AP AND LAT)", "Chest AP and lateral."),
    ("AP",): ("CHEST (PORTABLE AP)", "Single portable AP view of the chest."),
    ("PA",): ("CHEST (SINGLE VIEW)", "Single frontal view of the chest."),
}
VIEW_MEANINGS = {
    "PA": ["postero-anterior"],
    "AP": ["antero-posterior"],
    "LATERAL": ["lateral", "left lateral"],
}
INDICATIONS = (
    "___-year-old woman with cough.  Evaluate for acute process.",
    "___-year-old man with shortness of breath.",
    "History: ___M with chest pain",
    "Preoperative evaluation.",
    "___F with fever and productive cough, evaluate for acute cardiopulmonary process",
)
NORMAL_IMPRESSIONS = ("No acute cardiopulmonary process.", "No acute intrathoracic abnormality.")
# Sentences that lengthen an impression without naming anything a labeler would pick up.
FILLER = (
    "Compared with the prior radiograph, the overall appearance is similar allowing for differences in "
    "patient positioning and technique.",
    "Recommend clinical correlation and a follow-up radiograph after treatment to document the expected "
    "evolution of these findings.",
    "These findings were communicated by Dr. ___ to Dr. ___ by telephone at 10:42 on ___, approximately "
    "15 minutes after discovery.",
    "The examination is somewhat limited by patient rotation and a shallow inspiration.",
)
DEVICE_SENTENCES = {  # findings sentence, impression sentence
    "endotracheal tube": (
        "An endotracheal tube terminates 4 cm above the carina.",
        "Endotracheal tube in place.",
    ),
    "enteric tube": (
        "An enteric tube courses below the diaphragm into the stomach.",
        "Enteric tube in the stomach.",
    ),
    "right PICC line": (
        "A right PICC line terminates in the mid SVC.",
        "Right PICC line tip in the mid SVC.",
    ),
    "pacemaker": (
        "A left-sided pacemaker has leads in the right atrium and ventricle.",
        "Pacemaker in place.",
    ),
}
LONG_PIECES = 80  # CLIP pre-tokenizer pieces that make an impression certainly longer than 77 tokens


@dataclass(frozen=True)
class ChestReport:
    """text: the raw report. labels: CheXpert column -> 1.0 / 0.0 / -1.0, unmentioned ones absent.
    style: "impression", "conclusion" or "none" (no section headers at all)."""

    text: str
    labels: dict[str, float]
    style: str
    long_impression: bool


def clip_pieces(text: str) -> int:
    """Pieces CLIP's pre-tokenizer splits `text` into (words, single digits, runs of symbols);
    each is at least one token, so pieces + 2 (start and end) is a lower bound on the length."""
    return len(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()))


def chest_report(findings: ChestFindings, views: tuple[str, ...], rng: np.random.Generator) -> ChestReport:
    """A radiology report of `findings` in MIMIC-CXR's style, and the labels a perfect labeler
    would read from it. Effusion, heart size and pneumothorax are always stated (present or
    absent), other negatives sometimes, so labels have positives, negatives and blanks."""
    body, summary, device_summary, labels = [], [], [], {}

    def state(label: float, column: str, sentence: str, impression: str | None = None) -> None:
        body.append(str(sentence))  # str(): numpy's choice returns np.str_
        labels[column] = label
        if impression:
            (device_summary if column == "Support Devices" else summary).append(impression)

    f = findings
    for device in f.devices:  # devices come first in the findings and last in the impression
        state(1.0, "Support Devices", *DEVICE_SENTENCES[device])
    if f.nodule:
        where = f"{f.nodule} {f.nodule_lobe} lobe"
        state(
            1.0,
            "Lung Lesion",
            f"There is a {f.nodule_mm} mm nodule in the {where}.",
            f"{f.nodule_mm} mm nodule in the {where}; recommend chest CT.",
        )
    if rng.random() < 0.7:
        state(0.0, "Consolidation", "There is no focal consolidation.")
    if rng.random() < 0.4:
        state(0.0, "Edema", "There is no pulmonary edema.")
    sizes = f.effusions
    if f.effusion_uncertain:
        (side,) = sizes
        hedges = [f"Possible small {side} effusion.", f"A small {side} effusion cannot be excluded."]
        state(-1.0, "Pleural Effusion", rng.choice(hedges), f"Possible small {side} effusion.")
    elif len(set(sizes.values())) == 1 and len(sizes) == 2:
        size = sizes["left"]
        state(
            1.0,
            "Pleural Effusion",
            f"There are {size} bilateral pleural effusions.",
            f"{size.capitalize()} bilateral pleural effusions.",
        )
    elif sizes:
        parts = [f"a {size} {side} pleural effusion" for side, size in sorted(sizes.items(), reverse=True)]
        text = " and ".join(parts)
        state(1.0, "Pleural Effusion", f"There is {text}.", text[2].upper() + text[3:] + ".")
    else:
        state(0.0, "Pleural Effusion", "There is no pleural effusion.")
    if f.pneumothorax:
        state(
            1.0,
            "Pneumothorax",
            f"There is a small {f.pneumothorax} apical pneumothorax with a visible pleural line.",
            f"Small {f.pneumothorax} apical pneumothorax.",
        )
    else:
        state(0.0, "Pneumothorax", rng.choice(["There is no pneumothorax.", "No pneumothorax is seen."]))
    if f.cardiomegaly:
        state(
            1.0,
            "Cardiomegaly",
            rng.choice(["The heart is enlarged, in keeping with cardiomegaly.", "There is cardiomegaly."]),
            "Cardiomegaly.",
        )
    else:
        state(0.0, "Cardiomegaly", "Heart size is normal.")
        if rng.random() < 0.5:
            state(0.0, "Enlarged Cardiomediastinum", "The mediastinal and hilar contours are normal.")
    if rng.random() < 0.3:
        state(0.0, "Fracture", "No acute fracture is seen.")
    if f.normal:
        labels["No Finding"] = 1.0
        summary.append(str(rng.choice(NORMAL_IMPRESSIONS)))
    summary += device_summary

    style = str(rng.choice(["impression", "conclusion", "none"], p=[0.75, 0.15, 0.1]))
    long_impression = style != "none" and rng.random() < 0.15 / 0.9
    if long_impression:
        summary = [f"{i}. {s}" for i, s in enumerate(summary, 1)]
        for sentence in rng.permutation(FILLER):
            if clip_pieces(" ".join(summary)) >= LONG_PIECES:
                break
            summary.append(f"{len(summary) + 1}. {sentence}")
    return ChestReport(_format(body, summary, views, style, rng), labels, style, long_impression)


def _format(body: list[str], summary: list[str], views: tuple[str, ...], style: str, rng) -> str:
    """Lay out the report as MIMIC's raw text files are: a centred title, every line indented by
    one space, sections headed "\\n NAME: " and separated by a line holding a single space."""

    def paragraph(sentences: list[str]) -> list[str]:
        return [" " + line for line in textwrap.wrap("  ".join(sentences), 76, break_on_hyphens=False)]

    # A numbered impression has one item per line, as radiologists dictate it.
    numbered = [line for item in summary for line in paragraph([item])]
    summary_lines = numbered if summary[0].startswith("1. ") else paragraph(summary)

    frontal = [v for v in views if v != "LATERAL"][0]
    lines = [" " * 33 + "FINAL REPORT"]
    if style == "none":
        lines += paragraph([f"{'PA' if frontal == 'PA' else 'Portable AP'} chest radiograph.", *body])
        return "\n".join([*lines, " ", *summary_lines, ""])
    exam, technique = PROCEDURES[views]
    lines += [f" EXAMINATION:  {exam}", " ", f" INDICATION:  {rng.choice(INDICATIONS)}", " "]
    lines += [f" TECHNIQUE:  {technique}", " ", f" COMPARISON:  {rng.choice(['None.', '___'])}", " "]
    lines += [" FINDINGS: ", " ", *paragraph(body), " ", f" {style.upper()}: ", " ", *summary_lines]
    return "\n".join([*lines, ""])


def _plan_views(findings: ChestFindings, rng: np.random.Generator) -> tuple[str, ...]:
    """The images of a study: patients with devices are mostly imaged portable (AP) in bed."""
    options = [("PA", "LATERAL"), ("AP",), ("PA",), ("AP", "LATERAL")]
    p = [0.2, 0.7, 0.0, 0.1] if findings.devices else [0.75, 0.12, 0.08, 0.05]
    return options[rng.choice(4, p=p)]


def write_mimic_cxr(out: Path, n: int, seed: int, image_size: int) -> None:
    """`n` chest images (frontal and lateral views of studies of patients) into `out`."""
    rng = np.random.default_rng(seed)
    used: set[int] = set()

    def unique(low: int) -> int:
        while (value := low + int(rng.integers(0, 10_000_000))) in used:
            pass
        used.add(value)
        return value

    meta, truth, studies, subjects = [], [], [], []
    while len(meta) < n:
        subject = unique(10_000_000)
        subjects.append(subject)
        date = datetime.date(2110, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 85 * 365)))
        for _ in range(rng.choice([1, 2, 3, 4], p=[0.6, 0.25, 0.1, 0.05])):
            if len(meta) == n:
                break
            study, findings = unique(50_000_000), sample_findings(rng)
            views = _plan_views(findings, rng)[: n - len(meta)]
            report = chest_report(findings, views, rng)
            folder = f"p{subject}"[:3] + f"/p{subject}"
            report_path = out / "reports" / "files" / folder / f"s{study}.txt"
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(report.text)
            studies.append({"subject_id": subject, "study_id": study, **report.labels})
            date += datetime.timedelta(days=int(rng.integers(1, 400)))
            # StudyTime is HHMMSS.fff read as a number (so 08:05:56 is 80556.0), as in the real file.
            ms = int(rng.integers(0, 86_400_000))
            clock = round(ms // 3_600_000 * 10_000 + ms // 60_000 % 60 * 100 + ms % 60_000 / 1000, 3)
            aspect = rng.choice([1.2, 1.0], p=[0.7, 0.3]) if "PA" in views else rng.choice([1.0, 0.83])
            procedure = PROCEDURES[views][0]
            for view in views:
                dicom = "-".join(f"{v:08x}" for v in rng.integers(0, 2**32, size=5))
                rows = round(image_size * aspect)
                path = f"files/{folder}/s{study}/{dicom}.jpg"
                image = draw_chest(findings, view, image_size, rows, seed=int(rng.integers(2**63)))
                save_jpeg(image, out / path)
                blank = rng.random() < 0.03  # a few real images have no view in their DICOM header
                orientation = "Erect" if view != "AP" else str(rng.choice(["Erect", "Recumbent", ""]))
                meta.append(
                    {
                        "dicom_id": dicom,
                        "subject_id": subject,
                        "study_id": study,
                        "PerformedProcedureStepDescription": procedure,
                        "ViewPosition": "" if blank else view,
                        "Rows": rows,
                        "Columns": image_size,
                        "StudyDate": int(date.strftime("%Y%m%d")),
                        "StudyTime": clock,
                        "ProcedureCodeSequence_CodeMeaning": procedure,
                        "ViewCodeSequence_CodeMeaning": "" if blank else str(rng.choice(VIEW_MEANINGS[view])),
                        "PatientOrientationCodeSequence_CodeMeaning": orientation,
                    }
                )
                truth.append(
                    {
                        "path": path,
                        "dicom_id": dicom,
                        "subject_id": subject,
                        "study_id": study,
                        "view": view,
                        "rows": rows,
                        "columns": image_size,
                        "report": str(report_path.relative_to(out)),
                        "report_style": report.style,
                        "long_impression": report.long_impression,
                        **_truth_columns(findings),
                    }
                )

    # Splits by patient, so no patient's images are on both sides of an evaluation.
    order = rng.permutation(len(subjects))
    n_train, n_val, _ = split_counts(len(subjects))
    split_of = {
        subjects[i]: "train" if k < n_train else "validate" if k < n_train + n_val else "test"
        for k, i in enumerate(order)
    }
    meta_df = pd.DataFrame(meta, columns=METADATA_COLUMNS).sort_values(["subject_id", "study_id", "dicom_id"])
    write_csv(meta_df, out / "mimic-cxr-2.0.0-metadata.csv.gz")
    split_df = meta_df[["dicom_id", "study_id", "subject_id"]].assign(split=meta_df.subject_id.map(split_of))
    write_csv(split_df, out / "mimic-cxr-2.0.0-split.csv.gz")
    labels = pd.DataFrame(studies, columns=["subject_id", "study_id", *LABELS]).sort_values(
        ["subject_id", "study_id"]
    )
    # The official labelers differ in places; these are exact, so both files hold the same labels.
    write_csv(labels, out / "mimic-cxr-2.0.0-chexpert.csv.gz")
    write_csv(labels, out / "mimic-cxr-2.0.0-negbio.csv.gz")
    truth_df = pd.DataFrame(truth).sort_values(["subject_id", "study_id", "dicom_id"])
    write_csv(truth_df.assign(split=truth_df.subject_id.map(split_of)), out / "phantom_truth.csv")


def _truth_columns(f: ChestFindings) -> dict:
    """Findings as flat CSV columns ("" for none); nodule details only when there is a nodule."""
    row = {key: ("" if value is None else value) for key, value in asdict(f).items()}
    row["devices"] = ";".join(f.devices)
    if not f.nodule:
        row["nodule_lobe"] = row["nodule_mm"] = ""
    return row
