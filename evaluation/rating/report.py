"""The numbers of a rating study, from its answers (unblinded here, and only here).

- Turing test, per rater and pooled: accuracy (a real image called real, a generated one called
  synthetic), sensitivity for "synthetic" (generated images called synthetic) and specificity
  (real images called real), each with its exact binomial interval. The pooled figures count
  every answer as one trial; the raters saw the same images, so the pooled interval is narrower
  than the images alone would justify: read the per-rater rows for inference.
- Per source ("cell": the real images, each sample folder or sweep cell): how often its images
  were called synthetic, realism (mean, SD, median, the count of each score) and finding
  agreement: of the answers "yes" / "no" about the finding asked, the share matching what the
  prompt states (unsure answers and findings the prompt leaves uncertain counted apart).
- Inter-rater agreement on each question, over the images every rater answered: Cohen's kappa
  for two raters (for realism also with quadratic weights, as an ordinal scale), Fleiss' kappa
  for more (realism as five unordered categories).

- Intra-rater agreement, where the design repeats images: each rater's second answer to an
  image against their first (Cohen's kappa, quadratic weights for realism). Everything else counts
  first answers only.

`write_report` writes report.json, turing.csv, cells.csv, agreement.csv, intra_rater.csv,
answers.csv and report.md (the markdown section `rating_section` returns), each atomically.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd

from datamodules.atomic import write_atomically

from .agreement import INTERVAL_METHOD, category_counts, clopper_pearson, cohen_kappa, fleiss_kappa
from .study import REAL, Study

LEVEL = 0.95
REALISM_SCALE = (1, 2, 3, 4, 5)


def proportion(successes: int, n: int) -> dict:
    """k of n, its share and interval (None without answers)."""
    low, high = clopper_pearson(successes, n, LEVEL) if n else (None, None)
    return {"k": successes, "n": n, "value": successes / n if n else None, "ci_low": low, "ci_high": high}


def turing_row(rater: str, answers: list[dict]) -> dict:
    answered = [a for a in answers if a["turing"] is not None]
    real = [a for a in answered if a["kind"] == REAL]
    generated = [a for a in answered if a["kind"] != REAL]
    called_real = sum(a["turing"] == REAL for a in real)
    called_synthetic = sum(a["turing"] != REAL for a in generated)
    return {
        "rater": rater,
        "accuracy": proportion(called_real + called_synthetic, len(answered)),
        "sensitivity": proportion(called_synthetic, len(generated)),
        "specificity": proportion(called_real, len(real)),
    }


def cell_row(source: str, kind: str, answers: list[dict]) -> dict:
    turing = [a["turing"] for a in answers if a["turing"] is not None]
    scores = [a["realism"] for a in answers if a["realism"] is not None]
    asked = [a for a in answers if a["finding"] is not None]
    decided = [a for a in asked if a["finding"] != "unsure" and a["finding_truth"] is not None]
    matching = sum((a["finding"] == "yes") == bool(a["finding_truth"]) for a in decided)
    return {
        "source": source,
        "kind": kind,
        "answers": len(answers),
        "called_synthetic": proportion(sum(t != REAL for t in turing), len(turing)),
        "realism": {
            "n": len(scores),
            "mean": statistics.fmean(scores) if scores else None,
            "sd": statistics.stdev(scores) if len(scores) > 1 else None,
            "median": statistics.median(scores) if scores else None,
            "counts": {str(s): scores.count(s) for s in range(1, 6)},
        },
        "finding": {
            "asked": len(asked),
            "unsure": sum(a["finding"] == "unsure" for a in asked),
            "uncertain_truth": sum(a["finding_truth"] is None for a in asked),
            "agreement": proportion(matching, len(decided)),
        },
    }


def agreement_rows(answers: list[dict], raters: list[str]) -> list[dict]:
    """Kappa of each question over the items that every rater answered it for."""
    if len(raters) < 2:
        return []
    rows = []
    for question in ("turing", "realism", "finding"):
        by_item: dict[int, dict[str, object]] = {}
        for a in answers:
            if a[question] is not None:
                by_item.setdefault(a["item"], {})[a["rater"]] = a[question]
        common = [by_item[i] for i in sorted(by_item) if len(by_item[i]) == len(raters)]
        if not common:
            continue
        if len(raters) == 2:
            pairs = [row[raters[0]] for row in common], [row[raters[1]] for row in common]
            kappas = {"Cohen's kappa": cohen_kappa(*pairs)}
            if question == "realism":
                kappas["Cohen's kappa, quadratic weights"] = cohen_kappa(*pairs, scale=REALISM_SCALE)
        else:
            table = category_counts([[row[r] for r in raters] for row in common])
            kappas = {"Fleiss' kappa": fleiss_kappa(table)}
        for method, kappa in kappas.items():
            kappa = None if kappa != kappa else kappa  # nan: all answers alike, kappa undefined
            rows.append({"question": question, "method": method, "raters": len(raters), "items": len(common),
                         "kappa": kappa})  # fmt: skip
    return rows


def intra_rater_rows(answers: list[dict], raters: list[str]) -> list[dict]:
    """Each rater's agreement with themselves: their answer to a repeated image against their first
    answer to it (Cohen's kappa; quadratic weights for realism), and the share answered alike."""
    rows = []
    for rater in raters:
        mine = [a for a in answers if a["rater"] == rater]
        firsts = {a["item"]: a for a in mine if not a["repeat"]}
        pairs = [(firsts[a["item"]], a) for a in mine if a["repeat"] and a["item"] in firsts]
        for question, scale in (("turing", None), ("realism", REALISM_SCALE), ("finding", None)):
            both = [(x[question], y[question]) for x, y in pairs if x[question] is not None]
            if not both:
                continue
            kappa = cohen_kappa([x for x, _ in both], [y for _, y in both], scale=scale)
            rows.append({
                "rater": rater, "question": question,
                "method": "Cohen's kappa" + (", quadratic weights" if scale else ""), "items": len(both),
                "identical": proportion(sum(x == y for x, y in both), len(both)),
                "kappa": None if kappa != kappa else kappa,
            })  # fmt: skip
    return rows


def progress_row(study: Study, rater: str, answers: list[dict]) -> dict:
    """A rater's answered and queued images, and the median seconds from an image shown to answered."""
    answered, queued = study.progress(rater)
    seconds = [a["seconds"] for a in answers if a["seconds"] is not None]
    median = statistics.median(seconds) if seconds else None
    return {"rater": rater, "answered": answered, "queued": queued, "median_seconds": median}


def build_report(study: Study) -> dict:
    answers = study.answers()
    first = [a for a in answers if not a["repeat"]]  # repeats only count towards intra-rater agreement
    raters = [name for name, _ in study.raters()]
    design = study.design
    return {
        "study": str(study.path),
        "design": design.as_dict(),
        "real_images": design.real_images(),
        "interval": f"{INTERVAL_METHOD}, {LEVEL:.0%}",
        "progress": [progress_row(study, r, [a for a in answers if a["rater"] == r]) for r in raters],
        "turing": [turing_row(r, [a for a in first if a["rater"] == r]) for r in raters]
        + [turing_row("pooled", first)],
        "cells": [
            cell_row(s["name"], s["kind"], [a for a in first if a["source"] == s["name"]])
            for s in design.sources
        ],
        "agreement": agreement_rows(first, raters),
        "intra_rater": intra_rater_rows(answers, raters),
        "answers": answers,
    }


def _flat(row: dict, prefix: str = "") -> dict:
    """{"accuracy": {"k": 3}} -> {"accuracy_k": 3}."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}_"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_report(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False)
    write_atomically(out / "report.json", lambda tmp: tmp.write_text(text + "\n"))
    for name in ("turing", "cells", "agreement", "intra_rater", "answers"):
        frame = pd.DataFrame([_flat(row) for row in report[name]])
        write_atomically(out / f"{name}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    section = rating_section(report)
    write_atomically(out / "report.md", lambda tmp: tmp.write_text(section))
    return out / "report.json"


def _share(p: dict) -> str:
    if not p["n"]:
        return "–"
    return f"{p['value']:.1%} ({p['k']}/{p['n']}; {p['ci_low']:.1%}–{p['ci_high']:.1%})"


def _number(value, digits: int = 2) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def rating_section(report: dict) -> str:
    """The study as a markdown section (`## Expert rating`), for a sweep report to include."""
    design = report["design"]
    progress = ", ".join(
        f"{p['rater']} {p['answered']}/{p['queued']} (median {_number(p['median_seconds'], 1)} s an image)"
        for p in report["progress"]
    )
    lines = [
        "## Expert rating",
        "",
        f"{len(design['raters'])} rater(s); {design['per_source']} images of each generated source and "
        f"{report['real_images']} real ones, blinded and shuffled "
        f"(seed {design['seed']}); prompt {design['prompt']}; questions: {', '.join(design['questions'])}. "
        f"Answered: {progress}. Intervals: {report['interval']}.",
        "",
    ]
    if "turing" in design["questions"]:
        lines += [
            "### Real or synthetic",
            "",
            "Accuracy: real called real, generated called synthetic (lower is better for the "
            "generators). Sensitivity: generated called synthetic; specificity: real called real. "
            "With more generated images than real ones, calling everything synthetic scores above 50%: "
            "read sensitivity and specificity together (their mean is 50% at chance). Pooled counts "
            "every answer as a trial, though the raters saw the same images.",
            "",
            "| rater | accuracy | sensitivity (synthetic) | specificity |",
            "| --- | --- | --- | --- |",
            *[
                f"| {r['rater']} | "
                + " | ".join(_share(r[k]) for k in ("accuracy", "sensitivity", "specificity"))
                + " |"
                for r in report["turing"]
            ],
            "",
        ]
    lines += [
        "### Per source",
        "",
        "Called synthetic: for the real images the false-alarm rate, for a generated source the rate "
        "its images were caught (lower is better). Finding agreement: yes/no answers matching what the "
        "prompt states about the finding asked; unsure answers are counted apart.",
        "",
        "| source | answers | called synthetic | realism mean (SD), median, n | finding agreement | unsure |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    real_split = next(s.get("split") for s in design["sources"] if s["kind"] == REAL)
    for c in report["cells"]:
        realism, finding = c["realism"], c["finding"]
        score = (
            f"{_number(realism['mean'])} ({_number(realism['sd'])}), {_number(realism['median'], 1)}, "
            f"{realism['n']}"
            if realism["n"]
            else "–"
        )
        name = f"real images ({real_split} split)" if c["kind"] == REAL else c["source"]
        lines.append(
            f"| {name} | {c['answers']} | {_share(c['called_synthetic'])} | {score} | "
            f"{_share(finding['agreement'])} | {finding['unsure']}/{finding['asked']} |"
        )
    if report["agreement"]:
        lines += [
            "",
            "### Inter-rater agreement",
            "",
            "| question | method | items | kappa |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {a['question']} | {a['method']} | {a['items']} | {_number(a['kappa'], 3)} |"
            for a in report["agreement"]
        ]
    if report["intra_rater"]:
        lines += [
            "",
            f"### Intra-rater agreement ({design['repeats']} images shown twice to each rater)",
            "",
            "| rater | question | method | pairs | answered alike | kappa |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {a['rater']} | {a['question']} | {a['method']} | {a['items']} | {_share(a['identical'])} | "
            f"{_number(a['kappa'], 3)} |"
            for a in report["intra_rater"]
        ]
    return "\n".join(lines) + "\n"
