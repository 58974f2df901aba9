"""Sections of MIMIC-CXR free-text reports (impression, findings, ...), as prompts need them.

The rules are those of the MIMIC-CXR project's own sectioner (MIT-LCP mimic-cxr, `txt/section_parser.py`
and `txt/create_section_files.py`, which writes `mimic_cxr_sectioned.csv`), so that prompts taken from
raw reports and prompts taken from that CSV agree: the same header pattern, the same table of header
names (misspellings such as "IMPRESSON" included), the last section of a name winning, and the same
`last_paragraph` for reports with neither findings nor impression.

The official script also sections 54 studies by hand (`HAND_PICKED_SECTION`, `HAND_PICKED_SPAN`). It
writes no row of `mimic_cxr_sectioned.csv` for them, only the hand-picked text in its per-study
conclusion files (which the CheXpert / NegBio labels were computed from); here that text is the study's
impression, and its other sections are empty. From the CSV those 54 studies have no report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

from .tables import check_unique
from .text_files import DEFAULT_TEXT_ENCODING, read_csv

# A header is a capitalised name and a colon at the start of a line; report lines start with a space.
HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")
# Paragraphs are separated by a line holding one space: exactly this, as the official sectioner splits.
PARAGRAPH_BREAK = "\n \n"

# The official sectioner's table of header names (lower case, outer spaces stripped) -> the section the
# header starts, misspellings and all ("ndication" is an impression there). Data carried over from
# `frequent_sections` in `normalize_section_names`, MIT-LCP mimic-cxr `txt/section_parser.py` (read in
# the copy indexed as MIT-LCP/mimic-code txt/section_parser.py @ 58b29874; the copies in
# MoMarky/radiology-report-extraction and mudabek/encoding-cxr-report-gen hold the same 58 entries).
SECTION_ALIASES = {
    "preamble": "preamble",
    "impression": "impression",
    "comparison": "comparison",
    "indication": "indication",
    "findings": "findings",
    "examination": "examination",
    "technique": "technique",
    "history": "history",
    "comparisons": "comparison",
    "clinical history": "history",
    "reason for examination": "indication",
    "notification": "notification",
    "reason for exam": "indication",
    "clinical information": "history",
    "exam": "examination",
    "clinical indication": "indication",
    "conclusion": "impression",
    "chest, two views": "findings",
    "recommendation(s)": "recommendations",
    "type of examination": "examination",
    "reference exam": "comparison",
    "patient history": "history",
    "addendum": "addendum",
    "comparison exam": "comparison",
    "date": "date",
    "comment": "comment",
    "findings and impression": "impression",
    "wet read": "wet read",
    "comparison film": "comparison",
    "recommendations": "recommendations",
    "findings/impression": "impression",
    "pfi": "history",
    "recommendation": "recommendations",
    "wetread": "wet read",
    "ndication": "impression",
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "findings/ impression": "impression",
    "finding": "findings",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "idication": "indication",
    "reference findings": "findings",
    "comparision": "comparison",
    "comparsion": "comparison",
    "comparrison": "comparison",
    "comparisions": "comparison",
}
# A header not in that table and containing one of these words is that section, the first match in
# this order winning, so "FINDINGS AND IMPRESSION" is an impression and "HISTORY AND COMPARISON" a history.
SECTION_KEYWORDS = ("impression", "findings", "history", "comparison", "addendum")
# Any other header that describes the views taken ("CHEST, PA AND LATERAL:") introduces the findings.
VIEW_HEADER = re.compile(
    r"chest|portable|pa and lat|lateral and pa|ap and lateral|lateral and ap|frontal and|two views"
    r"|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright"
    r"|frontal semi-upright|ribs"
)
# Sections that an empty body does not count as, so an empty repeated header loses to a filled one.
NEED_TEXT = ("impression", "findings")

# The official script's studies sectioned by hand (`custom_mimic_cxr_rules` in the same file, same
# copies), keyed by study id as the image metadata spells it (no leading "s"); the comment is the
# subject. Here: the study whose conclusion is the last section of this (normalised) name.
HAND_PICKED_SECTION = {
    "50913680": "recommendations",  # p11851243
    "59363654": "examination",  # p12128253
    "59279892": "technique",  # p13150370
    "59768032": "recommendations",  # p13249077
    "57936451": "indication",  # p14325424
    "50058765": "indication",  # p14731346
    "53356173": "examination",  # p15898350
    "53202765": "technique",  # p16076182
    "50808053": "technique",  # p16631485
    "51966317": "indication",  # p10817099
    "50743547": "examination",  # p11388341
    "56451190": "note",  # p11842879
    "59067458": "recommendations",  # p11984647
    "59215320": "examination",  # p12408912
    "55124749": "indication",  # p12428492
    "54365831": "indication",  # p13876470
    "59087630": "recommendations",  # p14267880
    "58157373": "recommendations",  # p15032392
    "56482935": "recommendations",  # p15388421
    "58375018": "recommendations",  # p15505556
    "54654948": "indication",  # p17090359
    "55157853": "examination",  # p18975498
    "51491012": "history",  # p19314266
}
# And the studies whose conclusion is the report's text[start:end] (characters, newlines as "\n");
# (0, 0): the official script found nothing usable in the report.
HAND_PICKED_SPAN = {
    "50525523": (201, 349),  # p10602608
    "57564132": (233, 554),  # p10637168
    "59982525": (313, 717),  # p11989982
    "53488209": (149, 475),  # p12458657
    "54875119": (234, 988),  # p13687044
    "50196495": (59, 399),  # p13894879
    "56579911": (59, 218),  # p15394326
    "52648681": (292, 631),  # p15666238
    "59889364": (172, 453),  # p15835529
    "53514462": (73, 377),  # p16297706
    "59505494": (59, 450),  # p16730991
    "53182247": (59, 412),  # p16770442
    "51410602": (47, 320),  # p17069955
    "56412866": (522, 822),  # p17612000
    "54986978": (59, 306),  # p17912487
    "59003148": (262, 505),  # p17916384
    "57150433": (61, 394),  # p18335791
    "56760320": (219, 457),  # p18418794
    "59562049": (158, 348),  # p18502016
    "52674888": (145, 296),  # p19381919
    "55258338": (192, 568),  # p13719117
    "59330497": (140, 655),  # p15479218
    "52119491": (179, 454),  # p17959278
    "58235663": (0, 0),  # p11573679
    "50798377": (0, 0),  # p12632853
    "54168089": (0, 0),  # p14463099
    "53071062": (0, 0),  # p15774521
    "56724958": (0, 0),  # p16175671
    "54231141": (0, 0),  # p16312859
    "53607029": (0, 0),  # p17603668
    "52035334": (0, 0),  # p19349312
}


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


def universal_newlines(text: str) -> str:
    """Line ends as "\\n", as the official script reads reports (text mode): "\\r\\n" and "\\r" too."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


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


def _kept_sections(text: str) -> list[tuple[str, str]]:
    """The sections the official sectioner ends with: empty impressions and findings left out and,
    where neither remains, the last section's paragraphs after its first split off as "last_paragraph"."""
    sections = [(name, body) for name, body in split_sections(text) if body.strip() or name not in NEED_TEXT]
    if not any(name in NEED_TEXT for name, _ in sections):
        last_name, last_body = sections[-1]
        first, found, rest = last_body.partition(PARAGRAPH_BREAK)
        if found:
            sections[-1:] = [(last_name, first), ("last_paragraph", rest)]
    return sections


def section_report(text: str, study: str | None = None) -> Sections:
    """The impression, findings, last paragraph and comparison of a raw report, whitespace normalised.

    study: the report's study id ("50414267"; a leading "s" is ignored), for the studies the official
        script sections by hand (see the module's docstring); without it, every report is sectioned
        by its headers.
    """
    text = universal_newlines(text)
    study = None if study is None else study.removeprefix("s")
    if study in HAND_PICKED_SPAN:
        start, end = HAND_PICKED_SPAN[study]
        return Sections(impression=normalise_whitespace(text[start:end]))
    last_of_name = dict(_kept_sections(text))  # a later section of the same name overwrites an earlier one
    if study in HAND_PICKED_SECTION:
        return Sections(impression=normalise_whitespace(last_of_name.get(HAND_PICKED_SECTION[study], "")))
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
