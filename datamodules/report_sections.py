"""Sections of MIMIC-CXR free-text reports (impression, findings, ...), as prompts need them.

The rules follow the MIMIC-CXR project's own sectioner (`create_section_files.py`, which writes
`mimic_cxr_sectioned.csv`), so that prompts taken from raw reports and prompts taken from that CSV
agree: the same header pattern, the same reading of CONCLUSION as the impression, the last section
of a name winning, and the same `last_paragraph` for reports with neither findings nor impression.
Known differences: the official script also maps a few dozen misspelt headers ("IMPRESSON") and
fixes a handful of studies by hand; those reports may section differently here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

from .tables import check_unique
from .text_files import DEFAULT_TEXT_ENCODING, read_csv

# A header is a capitalised name and a colon at the start of a line; report lines start with a space.
HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")
# A blank line (spaces allowed) separates paragraphs.
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")

# Whole header names that mean a section this module keeps under another name.
SECTION_ALIASES = {
    "conclusion": "impression",
    "conclusions": "impression",
    "reference exam": "comparison",
    "finding": "findings",
}
# A header containing one of these words is that section, the first match in this order winning, so
# "FINDINGS AND IMPRESSION" is an impression and "HISTORY AND COMPARISON" neither.
SECTION_KEYWORDS = ("impression", "findings", "history", "comparison", "addendum")
# Headers that describe the views taken ("CHEST, PA AND LATERAL:") introduce the findings.
VIEW_HEADER = re.compile(
    r"chest|portable|pa and lat|lateral and pa|ap and lateral|lateral and ap|frontal and|two views"
    r"|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright"
    r"|frontal semi-upright|ribs"
)
# Sections that an empty body does not count as, so an empty repeated header loses to a filled one.
NEED_TEXT = ("impression", "findings")


@dataclass(frozen=True)
class Sections:
    """The parts of one report that prompts are made of; "" where the report has none.

    last_paragraph: only for reports with neither findings nor impression: the text after the first
        paragraph of the report's last section (the official sectioner's definition; for the usual
        report of a header line and one paragraph of text, that paragraph).
    """

    impression: str = ""
    findings: str = ""
    last_paragraph: str = ""
    comparison: str = ""


SECTION_FIELDS = tuple(f.name for f in fields(Sections))


def normalise_whitespace(text: str) -> str:
    """One space between words: reports wrap lines at fixed widths, which means nothing in a prompt."""
    return " ".join(text.split())


def section_name(header: str) -> str:
    """The normalised (lower-case) name of a header such as "CONCLUSION" (-> "impression")."""
    name = header.strip().lower()
    if name in SECTION_ALIASES:
        return SECTION_ALIASES[name]
    for keyword in SECTION_KEYWORDS:
        if keyword in name:
            return keyword
    return "findings" if VIEW_HEADER.search(name) else name


def split_sections(text: str) -> list[tuple[str, str]]:
    """(name, raw text) of each section in order; the text before the first header is the "preamble".

    A report without any header is one section, "full report". After a header, the search for the
    next one starts at the end of the header's line, as the official sectioner's does: a header
    directly followed by another on the next line therefore swallows it instead of yielding an
    empty section.
    """
    match = HEADER.search(text)
    if match is None:
        return [("full report", text)]
    sections = [("preamble", text[: match.start(1)])]
    while match is not None:
        name, start = section_name(match.group(1)), match.end()
        line_end = text.find("\n", start)
        match = HEADER.search(text, start if line_end == -1 else line_end)
        sections.append((name, text[start : len(text) if match is None else match.start()]))
    return sections


def section_report(text: str) -> Sections:
    """The impression, findings, last paragraph and comparison of a raw report, whitespace normalised."""
    sections = [(name, body) for name, body in split_sections(text) if body.strip() or name not in NEED_TEXT]
    if not any(name in NEED_TEXT for name, _ in sections):
        last_name, last_body = sections[-1]
        parts = PARAGRAPH_BREAK.split(last_body, maxsplit=1)
        if len(parts) == 2:
            sections[-1:] = [(last_name, parts[0]), ("last_paragraph", parts[1])]
    last_of_name = dict(sections)  # a later section of the same name overwrites an earlier one
    return Sections(**{name: normalise_whitespace(last_of_name.get(name, "")) for name in SECTION_FIELDS})


def read_sectioned_csv(path: str | Path, encoding: str = DEFAULT_TEXT_ENCODING) -> dict[str, Sections]:
    """The sections of each study in the official `mimic_cxr_sectioned.csv` (or .csv.gz), keyed by the
    study id without its leading "s" ("50414267"), as the image metadata spells it.

    Blank cells become "", and text is whitespace normalised as `section_report` does, so either
    source gives the same prompts. A study on two rows is an error: which report would it be?
    """
    path = Path(path)
    columns = ("study", *SECTION_FIELDS)
    # Read as text: blank cells are "", and a section reading "None" stays that text.
    table = read_csv(path, encoding)
    table.columns = table.columns.str.strip()
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; columns found: {list(table.columns)}")
    studies = table["study"].str.strip().str.removeprefix("s")
    check_unique(studies, "study", path)
    texts = [table[name].str.split().str.join(" ") for name in SECTION_FIELDS]
    return {study: Sections(*values) for study, *values in zip(studies, *texts, strict=True)}
