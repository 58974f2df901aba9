"""The raw-report sectioner against the official MIMIC-CXR sectioner's documented rules.

The expectations are the official script's (MIT-LCP mimic-cxr, txt/section_parser.py and
txt/create_section_files.py), written out here by hand as the reference: every header name of its
alias table grouped by the section it names, and some of its hand-sectioned studies.
"""

from __future__ import annotations

import pytest

from datamodules.report_sections import (
    HAND_PICKED_SECTION,
    HAND_PICKED_SPAN,
    SECTION_ALIASES,
    Sections,
    section_report,
    split_sections,
)

# The official alias table (normalize_section_names' frequent_sections), by the section each names.
OFFICIAL_HEADERS = {
    "impression": (
        "impression",
        "conclusion",
        "findings and impression",
        "findings/impression",
        "findings/ impression",
        "ndication",
        "impresson",
        "imprression",
        "imoression",
        "impressoin",
        "imprssion",
        "impresion",
        "imperssion",
        "mpression",
        "impession",
    ),
    "findings": (
        "findings",
        "finding",
        "chest, two views",
        "reference findings",
        "findins",
        "findindgs",
        "findgings",
        "findngs",
        "findnings",
        "finidngs",
    ),
    "comparison": (
        "comparison",
        "comparisons",
        "reference exam",
        "comparison exam",
        "comparison film",
        "comparision",
        "comparsion",
        "comparrison",
        "comparisions",
    ),
    "indication": (
        "indication",
        "reason for examination",
        "reason for exam",
        "clinical indication",
        "idication",
    ),
    "history": ("history", "clinical history", "clinical information", "patient history", "pfi"),
    "examination": ("examination", "exam", "type of examination"),
    "recommendations": ("recommendations", "recommendation(s)", "recommendation"),
    "wet read": ("wet read", "wetread"),
    "technique": ("technique",),
    "notification": ("notification",),
    "addendum": ("addendum",),
    "date": ("date",),
    "comment": ("comment",),
    "preamble": ("preamble",),
}
OFFICIAL_ALIASES = [(header, name) for name, headers in OFFICIAL_HEADERS.items() for header in headers]


def report_with(header: str) -> str:
    """A report in the distributed layout whose last section starts with `header`."""
    return (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  Chest radiograph.\n \n"
        f" {header}:  First paragraph.\n \n Second paragraph.\n"
    )


def test_the_alias_table_is_the_official_one():
    assert len(OFFICIAL_ALIASES) == 58
    assert SECTION_ALIASES == dict(OFFICIAL_ALIASES)


@pytest.mark.parametrize(("alias", "name"), OFFICIAL_ALIASES)
def test_every_official_header_lands_under_its_official_name(alias, name):
    report = report_with(alias.upper())
    assert split_sections(report)[-1] == (name, " First paragraph.\n \n Second paragraph.\n")
    sections = section_report(report)
    if name in ("impression", "findings"):
        assert getattr(sections, name) == "First paragraph. Second paragraph."
        assert sections.last_paragraph == ""
    else:
        # Neither findings nor impression: the last section keeps its first paragraph, the rest is
        # the last paragraph (only a comparison of those sections is a field of its own).
        expected = {"comparison": "First paragraph."} if name == "comparison" else {}
        assert sections == Sections(last_paragraph="Second paragraph.", **expected)


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (" IMPRESSON ", "impression"),  # spaces around the name are stripped before the lookup
        ("IMPRESSIONS", "impression"),  # not in the table: it contains "impression"
        ("FINAL IMPRESSION AND FINDINGS", "impression"),  # impression is looked for first
        ("HISTORY AND COMPARISON", "history"),  # history before comparison
        ("PA AND LATERAL VIEWS OF THE CHEST", "findings"),  # a description of the views
        ("CONCLUSIONS", "conclusions"),  # neither in the table nor holding a keyword: kept as is
        ("CONCUSION", "concusion"),
    ],
)
def test_headers_outside_the_table_follow_the_official_fallbacks(header, name):
    assert split_sections(report_with(header))[-1][0] == name


def test_misspelt_impression_and_findings_headers_keep_their_text():
    report = (
        "                                 FINAL REPORT\n"
        " INDICATION:  ___ with cough.\n \n"
        " FINDINDGS: \n \n Small left pleural effusion.\n \n"
        " IMPRESSON: \n \n Effusion, no pneumothorax.\n"
    )
    assert section_report(report) == Sections(
        impression="Effusion, no pneumothorax.", findings="Small left pleural effusion."
    )


def test_paragraphs_are_split_only_at_a_line_of_one_space():
    # The official sectioner splits at "\n \n" only: an empty line or one of two spaces is no break.
    assert section_report(" FINAL REPORT\n HISTORY: Cough.\n\n Clear.\n") == Sections()
    assert section_report(" FINAL REPORT\n HISTORY: Cough.\n  \n Clear.\n") == Sections()
    assert section_report(" FINAL REPORT\n HISTORY: Cough.\n \n Clear.\n") == Sections(
        last_paragraph="Clear."
    )


def test_windows_line_ends_section_as_the_official_script_reads_them():
    report = report_with("IMPRESSON")
    assert section_report(report.replace("\n", "\r\n")) == section_report(report)


# --- studies the official script sections by hand --------------------------------------------------


def test_the_hand_sectioned_studies_are_the_official_ones():
    assert len(HAND_PICKED_SECTION) == 23
    assert len(HAND_PICKED_SPAN) == 31
    assert sum(span == (0, 0) for span in HAND_PICKED_SPAN.values()) == 8
    assert not set(HAND_PICKED_SECTION) & set(HAND_PICKED_SPAN)
    assert HAND_PICKED_SECTION["50913680"] == "recommendations"
    assert HAND_PICKED_SECTION["56451190"] == "note"
    assert HAND_PICKED_SECTION["51491012"] == "history"
    assert HAND_PICKED_SPAN["50525523"] == (201, 349)
    assert HAND_PICKED_SPAN["56412866"] == (522, 822)
    assert HAND_PICKED_SPAN["52035334"] == (0, 0)


def test_a_study_with_a_hand_picked_section_has_that_section_as_its_impression():
    report = (
        " FINAL REPORT\n FINDINGS:  Lungs are clear.\n \n IMPRESSION: \n \n"
        " RECOMMENDATION(S):  Chest CT in three months.\n"
    )
    assert section_report(report) == Sections(findings="Lungs are clear.")
    assert section_report(report, "50913680") == Sections(impression="Chest CT in three months.")
    assert section_report(report, "s50913680") == Sections(impression="Chest CT in three months.")
    # The section is taken after the last-paragraph split, as the official script takes it.
    note = " FINAL REPORT\n INDICATION:  Cough.\n \n NOTE:  No pneumonia.\n \n Dr. ___ was told.\n"
    assert section_report(note) == Sections(last_paragraph="Dr. ___ was told.")
    assert section_report(note, "56451190") == Sections(impression="No pneumonia.")


def test_a_study_with_a_hand_picked_span_has_that_text_as_its_impression():
    before = " FINAL REPORT\n EXAMINATION:  Chest.\n IMPRESSION:  Not this.\n".ljust(200) + "\n"
    picked = " Hand-picked conclusion.".ljust(148)
    report = before + picked + "\n FINDINGS:  Lungs are clear.\n"
    assert (len(before), len(before + picked)) == (201, 349)
    assert section_report(report).findings == "Lungs are clear."
    assert section_report(report, "50525523") == Sections(impression="Hand-picked conclusion.")
    # The official spans count characters with "\n" line ends.
    assert section_report(report.replace("\n", "\r\n"), "50525523").impression == "Hand-picked conclusion."


def test_a_study_the_official_script_found_empty_has_no_sections():
    report = " FINAL REPORT\n FINDINGS:  Lungs are clear.\n \n IMPRESSION:  Normal.\n"
    assert section_report(report, "58235663") == Sections()
    assert section_report(report, "50000001") == Sections(impression="Normal.", findings="Lungs are clear.")
