"""MIMIC-CXR-JPG chest X-rays with prompts from their reports (or from their CheXpert / NegBio labels)."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .base import SPLITS, ImageTextDataModule, Record
from .report_sections import Sections, read_sectioned_csv, section_report
from .tables import SPLIT_NAMES, check_choice, check_columns, check_unique, some_items
from .text_files import DEFAULT_TEXT_ENCODING, check_text_encoding, decode, read_csv

log = logging.getLogger(__name__)

LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
NO_FINDING = "No Finding"
# Which report sections make the prompt for each prompt_source, in the order they are joined.
REPORT_SECTIONS = {
    "impression": ("impression",),
    "findings": ("findings",),
    "findings+impression": ("findings", "impression"),
}
PROMPT_SOURCES = (*REPORT_SECTIONS, "labels")
SECTIONED_CSV = "mimic_cxr_sectioned.csv"
# What each official file is for, to say so when it is missing: stem -> contents.
CSV_CONTENTS = {
    "metadata": "one row per image: dicom_id, subject_id, study_id, ViewPosition, ...",
    "split": "one row per image: dicom_id, study_id, subject_id, split (train / validate / test)",
    "chexpert": "one row per study: subject_id, study_id and the 14 CheXpert labels",
    "negbio": "one row per study: subject_id, study_id and the 14 NegBio labels",
}

ReportLookup = Callable[[str, str], Sections | None]
READ_THREADS = 16
READ_AHEAD = 1024


class MIMICCXRDataModule(ImageTextDataModule):
    """MIMIC-CXR-JPG in its distributed layout, with the official train / validate / test split.

    root: the mimic-cxr-jpg folder (`files/p10/...`, `mimic-cxr-2.0.0-{metadata,split,chexpert,negbio}
        .csv` or `.csv.gz`).
    reports: the official `mimic_cxr_sectioned.csv`, or the folder holding the reports' `files/p10/
        p10000032/s50414267.txt`. Default: `<root>/mimic_cxr_sectioned.csv(.gz)`, else
        `<root>/reports/files`, else report files next to the images in `<root>/files`. Not read when
        prompt_source is "labels".
    labeler: whose labels travel with the records (and make "labels" prompts): "chexpert" or "negbio".
        A study without a row in that file is dropped, so every record has the labels of its study.
    views: ViewPosition values to keep; images with another or a blank ViewPosition are dropped.
    prompt_source: the report's "impression" (RoentGen), its "findings", both ("findings+impression",
        findings first; either alone when the other is missing) or "labels": `template` filled with
        the positive (1.0) labels, lower-cased, in the labeler's column order, or `no_finding_prompt`
        for studies whose only positive is No Finding. Uncertain (-1.0) labels are not positives.
        Records whose prompt would be empty are dropped.
    last_paragraph_fallback: prompt reports that have neither findings nor impression with their last
        paragraph (see `report_sections.Sections`) instead of dropping them.
    one_image_per_study: keep one image of each study: the first by the order of `views`, then by
        dicom_id.
    subset, subset_seed: keep `subset` training records drawn at random with `subset_seed`. Records
        are visited in one seeded order and the first that are usable are kept, so a larger subset
        with the same seed contains the smaller one (RoentGen's nested 1.1k .. 5.5k sets).
    subset_balance: a label name: the subset is half studies with that label 1.0 and half with No
        Finding 1.0 (Chambon et al.'s 5 + 5 pleural effusion / normal images); `subset` must be even.
    missing_images: a listed image whose file is missing is an "error", or "drop" it (counted).
    text_encoding: the encoding of the CSVs and reports ("utf-8", as distributed, a byte-order mark
        allowed; "latin-1" for a copy re-saved by an older tool). A file that does not decode is an
        error naming it, its line and the byte offset.
    Other keyword arguments go to ImageTextDataModule (image_size, batch_size, ...).

    Records carry the 14 labels (1.0 / 0.0 / -1.0, None where blank) and meta with dicom_id,
    subject_id, study_id and view. Every record left out is counted in `dropped` with its reason.
    The record index (see ImageTextDataModule) watches the CSVs and every report file read.
    """

    indexed = True

    def __init__(
        self,
        root: str,
        reports: str | None = None,
        labeler: Literal["chexpert", "negbio"] = "chexpert",
        views: Sequence[str] = ("PA", "AP"),
        prompt_source: Literal["impression", "findings", "findings+impression", "labels"] = "impression",
        last_paragraph_fallback: bool = False,
        template: str = "chest x-ray with {findings}",
        no_finding_prompt: str = "normal chest x-ray",
        one_image_per_study: bool = False,
        subset: int | None = None,
        subset_seed: int = 0,
        subset_balance: str | None = None,
        missing_images: Literal["error", "drop"] = "error",
        text_encoding: str = DEFAULT_TEXT_ENCODING,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_choice("labeler", labeler, ("chexpert", "negbio"))
        check_choice("prompt_source", prompt_source, PROMPT_SOURCES)
        check_choice("missing_images", missing_images, ("error", "drop"))
        _check_subset(subset, subset_balance)
        if not views:
            raise ValueError("views must name at least one ViewPosition, e.g. ['PA', 'AP']")
        if "{findings}" not in template:
            raise ValueError(f"template must contain '{{findings}}', got {template!r}")
        self.root = Path(root)
        self.reports = None if reports is None else Path(reports)
        self.labeler = labeler
        self.views = [view.strip().upper() for view in views]
        self.prompt_source = prompt_source
        self.last_paragraph_fallback = last_paragraph_fallback
        self.template = template
        self.no_finding_prompt = no_finding_prompt
        self.one_image_per_study = one_image_per_study
        self.subset = subset
        self.subset_seed = subset_seed
        self.subset_balance = subset_balance
        self.missing_images = missing_images
        self.text_encoding = check_text_encoding(text_encoding)

    def load_records(self, split: str) -> list[Record]:
        return self._records_by_split[split]

    @cached_property
    def _records_by_split(self) -> dict[str, list[Record]]:
        # The CSVs are read once for all three splits.
        table = self._filter_views(self._image_table())
        table = self._join_labels(table)
        if self.one_image_per_study:
            table = self._first_image_per_study(table)
        lookup = None if self.prompt_source == "labels" else self._report_lookup()
        records = {}
        for split in SPLITS:
            rows = table[table["split"] == split]
            if split == "train" and self.subset is not None:
                records[split] = self._take(split, self._subset_order(rows), lookup, self._subset_quotas())
            else:
                records[split] = self._take(split, rows, lookup, None)
        if (
            lookup is not None
            and not any(records.values())
            and any(self.dropped[s]["no report"] for s in SPLITS)
        ):
            raise FileNotFoundError(
                f"no report found for any study; looked in {self._reports_location()} "
                "(set reports to the mimic_cxr_sectioned.csv file or the folder holding the reports' files/)"
            )
        return records

    # --- reading and joining the official CSVs --------------------------------------------------

    def _image_table(self) -> pd.DataFrame:
        """One row per image: dicom_id, subject_id, study_id, view, split and the image's relative path.

        metadata and split are joined on dicom_id; both list every image, so an image in one file
        only, or whose subject or study differs between them, means a wrong or truncated file.
        """
        ids = ["dicom_id", "subject_id", "study_id"]
        metadata, metadata_path = self._read_csv("metadata", [*ids, "ViewPosition"])
        splits, split_path = self._read_csv("split", [*ids, "split"])
        for table, path in ((metadata, metadata_path), (splits, split_path)):
            check_unique(table["dicom_id"], "dicom_id", path)
        both = metadata.merge(splits, on="dicom_id", how="outer", suffixes=("", "_split"), indicator=True)
        for side, path, other in (
            ("left_only", metadata_path, split_path),
            ("right_only", split_path, metadata_path),
        ):
            alone = both.loc[both["_merge"] == side, "dicom_id"]
            if len(alone):
                raise ValueError(
                    f"{len(alone)} image(s) of {path} are missing from {other}: {some_items(alone)}"
                )
        for column in ("subject_id", "study_id"):
            differ = both.loc[both[column] != both[f"{column}_split"], "dicom_id"]
            if len(differ):
                raise ValueError(
                    f"{column} differs between {metadata_path} and {split_path} for {len(differ)} image(s): "
                    f"{some_items(differ)}"
                )
        split = both["split"].str.lower().map(SPLIT_NAMES)
        if split.isna().any():
            raise ValueError(
                f"{split_path}: unknown split value(s) {sorted(set(both.loc[split.isna(), 'split']))}; "
                "expected train, validate or test"
            )
        folder = "files/p" + both["subject_id"].str[:2] + "/p" + both["subject_id"] + "/s" + both["study_id"]
        return pd.DataFrame(
            {
                **{column: both[column] for column in ids},
                "view": both["ViewPosition"].str.upper(),
                "split": split,
                "image": folder + "/" + both["dicom_id"] + ".jpg",
            }
        )

    def _filter_views(self, table: pd.DataFrame) -> pd.DataFrame:
        table = self._drop(table, table["view"] == "", "blank ViewPosition")
        for view in sorted(set(table["view"]) - set(self.views)):
            table = self._drop(table, table["view"] == view, f"view {view} not in {self.views}")
        return table

    def _join_labels(self, table: pd.DataFrame) -> pd.DataFrame:
        """Adds each study's labels as float columns named after them (1.0 / 0.0 / -1.0, NaN for blank)."""
        keys = ["subject_id", "study_id"]
        labels, path = self._read_csv(self.labeler, [*keys, *LABELS])
        check_unique(labels["subject_id"] + "/" + labels["study_id"], "subject_id/study_id", path)
        values = labels[keys].assign(**{name: _label_values(labels[name], name, path) for name in LABELS})
        table = table.merge(values, on=keys, how="left", indicator="labelled")
        table = self._drop(table, table["labelled"] == "left_only", f"no label row in {path.name}")
        return table.drop(columns="labelled")

    def _first_image_per_study(self, table: pd.DataFrame) -> pd.DataFrame:
        """The first image of each study by the order of `views`, then by dicom_id: the same every run."""
        rank = table["view"].map({view: i for i, view in enumerate(self.views)})
        order = table.assign(rank=rank).sort_values(["rank", "dicom_id"])
        kept = order.drop_duplicates("study_id").index
        return self._drop(
            table, ~table.index.isin(kept), "another image of the study kept (one_image_per_study)"
        )

    def _read_csv(self, stem: str, columns: list[str]) -> tuple[pd.DataFrame, Path]:
        """The named columns (values as stripped text) of `mimic-cxr-2.0.0-{stem}.csv` or `.csv.gz`."""
        path = self._find_file(self.root, f"mimic-cxr-2.0.0-{stem}.csv")
        if path is None:
            raise FileNotFoundError(
                f"{self.root} has no mimic-cxr-2.0.0-{stem}.csv(.gz); it should hold {CSV_CONTENTS[stem]} "
                "(from the MIMIC-CXR-JPG release on PhysioNet)"
            )
        header = read_csv(path, self.text_encoding, nrows=0).columns
        check_columns(path, columns, [c.strip() for c in header])
        # Values as text: ids keep their digits, and a blank cell is "".
        table = read_csv(path, self.text_encoding, usecols=lambda c: c.strip() in columns)
        table.columns = table.columns.str.strip()
        return table.apply(lambda column: column.str.strip()), path

    def _find_file(self, folder: Path, name: str) -> Path | None:
        """`folder/name`, or its gzipped copy `name.gz`, whichever exists (both watched by the index)."""
        candidates = (folder / name, folder / f"{name}.gz")
        found = next((p for p in candidates if p.is_file()), None)
        for path in candidates:
            self.note_source(path, table=path == found)
        return found

    # --- prompts --------------------------------------------------------------------------------

    def _reports_location(self) -> Path:
        """The sectioned CSV or the folder the reports' `files/` lies in (see `reports`)."""
        if self.reports is not None:
            if not self.reports.exists():
                raise FileNotFoundError(f"reports {self.reports} does not exist")
            return self.reports
        sectioned = self._find_file(self.root, SECTIONED_CSV)
        if sectioned is not None:
            return sectioned
        self.note_source(self.root / "reports" / "files")
        return self.root / "reports" if (self.root / "reports" / "files").is_dir() else self.root

    def _report_lookup(self) -> ReportLookup:
        """(subject_id, study_id) -> the study's report sections, or None when it has no report.

        Report files are read on demand, so only the studies of records being kept are read.
        """
        location = self._reports_location()
        if location.is_file():
            self.note_source(location, table=True)
            table = read_sectioned_csv(location, self.text_encoding)
            log.info("%s: report sections of %d studies from %s", type(self).__name__, len(table), location)
            return lambda subject_id, study_id: table.get(study_id)
        folder = location / "files" if (location / "files").is_dir() else location
        return ReportFiles(folder, self.text_encoding, self.note_source)

    def _prompt(
        self, subject_id: str, study_id: str, labels: dict, lookup: ReportLookup | None
    ) -> tuple[str, str]:
        """(prompt, "") or ("", why there is none)."""
        if lookup is None:
            return self._label_prompt(labels)
        return self._report_prompt(lookup(subject_id, study_id))

    def _report_prompt(self, sections: Sections | None) -> tuple[str, str]:
        if sections is None:
            return "", "no report"
        wanted = REPORT_SECTIONS[self.prompt_source]
        prompt = " ".join(text for text in (getattr(sections, name) for name in wanted) if text)
        if not prompt and self.last_paragraph_fallback:
            prompt = sections.last_paragraph
        fallback = " or last paragraph" if self.last_paragraph_fallback else ""
        return (prompt, "") if prompt else ("", f"no {' or '.join(wanted)} section{fallback}")

    def _label_prompt(self, labels: dict) -> tuple[str, str]:
        positives = [name.lower() for name in LABELS if name != NO_FINDING and labels[name] == 1.0]
        if positives:
            return self.template.format(findings=", ".join(positives)), ""
        if labels[NO_FINDING] == 1.0:
            return self.no_finding_prompt, ""
        return "", "no positive label"

    # --- subsets and records --------------------------------------------------------------------

    def _subset_order(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The training rows in the seed's order, with the quota each counts towards in `group`.

        The order depends only on the seed and the candidate images (sorted first, so not on the row
        order of the files). With subset_balance, images in neither class get group "" (no quota).
        """
        rows = rows.sort_values("dicom_id")
        rows = rows.iloc[np.random.default_rng(self.subset_seed).permutation(len(rows))]
        if self.subset_balance is None:
            return rows.assign(group="all")
        classes = [rows[self.subset_balance] == 1.0, rows[NO_FINDING] == 1.0]
        return rows.assign(group=np.select(classes, [self.subset_balance, NO_FINDING], default=""))

    def _subset_quotas(self) -> dict[str, int]:
        if self.subset_balance is None:
            return {"all": self.subset}
        return {self.subset_balance: self.subset // 2, NO_FINDING: self.subset // 2}

    def _take(
        self, split: str, rows: pd.DataFrame, lookup: ReportLookup | None, quotas: dict[str, int] | None
    ) -> list[Record]:
        """The records of `rows`, visited in order, counting every row left out and why.

        quotas: for subsets, group -> how many records to keep; rows of a group without quota left
            (or after every quota is filled) are "not in subset". None keeps every usable row.
        A missing image counts towards its quota under missing_images="error", so the error lists
        the missing images of exactly the subset.
        """
        records: list[Record] = []
        prompts: dict[str, tuple[str, str]] = {}
        patterns: dict[tuple, dict[str, float | None]] = {}  # records with equal labels share a dict
        dropped: Counter = Counter()
        examples: dict[str, str] = {}
        missing: list[str] = []
        left = dict(quotas or {})
        if isinstance(lookup, ReportFiles) and quotas is None:  # every study's report: read ahead
            studies = list(dict.fromkeys(zip(rows["subject_id"], rows["study_id"], strict=True)))
            prompts.update((study, self._report_prompt(sections)) for study, sections in lookup.many(studies))
        groups = rows["group"] if quotas is not None else [None] * len(rows)
        columns = ["dicom_id", "subject_id", "study_id", "view", "image", *LABELS]
        for group, (dicom_id, subject_id, study_id, view, image, *values) in zip(
            groups, rows[columns].itertuples(index=False, name=None), strict=True
        ):
            if quotas is not None:
                if not any(left.values()):
                    break
                if not left.get(group):
                    continue
            labels = patterns.setdefault(key := _label_key(values), dict(zip(LABELS, key, strict=True)))
            if study_id not in prompts:  # a study's images share its report and labels, read once
                prompts[study_id] = self._prompt(subject_id, study_id, labels, lookup)
            prompt, reason = prompts[study_id]
            path = os.path.join(self.root, image)  # os.path: 250k pathlib joins would take seconds
            if not reason and not os.path.isfile(path):
                self.note_source(path)  # its arrival rebuilds the index
                missing.append(path)
                reason = "image file missing" if self.missing_images == "drop" else ""
            if reason:
                dropped[reason] += 1
                examples.setdefault(reason, image)
                continue
            meta = {"dicom_id": dicom_id, "subject_id": subject_id, "study_id": study_id, "view": view}
            records.append(Record(path, prompt, labels=labels, meta=meta))
            if quotas is not None:
                left[group] -= 1
        if missing and self.missing_images == "error":
            raise FileNotFoundError(
                f"{len(missing)} {split} image(s) listed in the MIMIC-CXR-JPG metadata do not exist: "
                f"{some_items(missing)}; set missing_images='drop' to leave them out"
            )
        for reason, count in dropped.items():
            self.note_dropped(split, reason, count, examples[reason])
        if quotas is not None:
            self._note_subset(split, rows, records, dropped, quotas)
        return records

    def _note_subset(
        self, split: str, rows: pd.DataFrame, records: list[Record], dropped: Counter, quotas: dict[str, int]
    ) -> None:
        """Counts the candidates the subset did not take, and warns when it came out short."""
        self.note_dropped(split, "not in subset", len(rows) - len(records) - sum(dropped.values()))
        if len(records) < self.subset:
            halves = (
                f" ({', '.join(f'{n} {group}' for group, n in quotas.items())})"
                if self.subset_balance
                else ""
            )
            log.warning(
                "%s: a subset of %d%s was asked for but only %d usable %s record(s) were found",
                type(self).__name__,
                self.subset,
                halves,
                len(records),
                split,
            )

    def _drop(self, table: pd.DataFrame, mask: pd.Series, reason: str) -> pd.DataFrame:
        """`table` without the rows in `mask`, counted per split under `reason`."""
        for split, group in table[mask].groupby("split"):
            self.note_dropped(split, reason, len(group), group["image"].iloc[0])
        return table[~mask]


class ReportFiles:
    """The raw report files: (subject_id, study_id) -> the study's sections (None without a file).

    `many` reads the files READ_THREADS at a time, READ_AHEAD ahead of the sectioning: at the
    release's size a first start reads 228k small files, and on a cold cache or a network file
    system each read waits on the disk, while sectioning them needs the CPU. Every file read or
    looked for is reported to `note_source` (the record index's sources)."""

    def __init__(self, folder: Path, encoding: str, note_source: Callable[[str], None]):
        self.folder, self.encoding, self.note_source = folder, encoding, note_source

    def path(self, subject_id: str, study_id: str) -> str:
        # os.path, not pathlib: 228k joins
        return os.path.join(self.folder, f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}.txt")

    def __call__(self, subject_id: str, study_id: str) -> Sections | None:
        path = self.path(subject_id, study_id)
        return self._sections(study_id, path, _read_bytes(path))

    def many(self, studies: list[tuple[str, str]]) -> Iterator[tuple[str, Sections | None]]:
        """(study_id, sections) of each (subject_id, study_id), in order."""
        paths = iter([self.path(*study) for study in studies])
        with ThreadPoolExecutor(READ_THREADS) as pool:
            ahead = deque((path, pool.submit(_read_bytes, path)) for path in islice(paths, READ_AHEAD))
            for _, study_id in studies:
                path, data = ahead.popleft()
                for following in islice(paths, 1):
                    ahead.append((following, pool.submit(_read_bytes, following)))
                yield study_id, self._sections(study_id, path, data.result())

    def _sections(self, study_id: str, path: str, data: bytes | None) -> Sections | None:
        self.note_source(path)
        return None if data is None else section_report(decode(data, path, self.encoding), study_id)


def _read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None where there is no file."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _label_values(column: pd.Series, name: str, path: Path) -> pd.Series:
    """A label column as floats, NaN where blank; any other value than 1, 0, -1 is an error."""
    values = pd.to_numeric(column.where(column != ""), errors="coerce")
    bad = (column != "") & ~values.isin([1.0, 0.0, -1.0])
    if bad.any():
        raise ValueError(
            f"{path}: column '{name}' holds {sorted(set(column[bad]))[:5]}; expected 1.0, 0.0, -1.0 or blank"
        )
    return values


def _label_key(values: Sequence[float]) -> tuple[float | None, ...]:
    """The label values of one record, a blank (NaN) becoming None, so it stays distinct from 0.0."""
    return tuple(None if math.isnan(value) else float(value) for value in values)


def _check_subset(subset: int | None, balance: str | None) -> None:
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be a positive number of records or None, got {subset}")
    if balance is None:
        return
    if subset is None or subset % 2:
        raise ValueError(
            f"subset_balance needs an even subset (half {balance}, half No Finding), got {subset}"
        )
    if balance not in LABELS or balance == NO_FINDING:
        raise ValueError(f"subset_balance must be one of the labels other than No Finding, got {balance!r}")
