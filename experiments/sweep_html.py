"""`<sweep>/report.html`: the sweep for a person to look at, next to report.md.

    1. samples: a row per prompt (the first GRID_PROMPTS of the test prompts), the real images of the
       prompt's records, then each cell's first image of it, with the seed (also plots/sample_grid.png)
    2. copying: per cell, the closest generated / training pairs of the copying test, or why it did
       not run
    3. loss: training and validation loss of every cell on one plot (plots/loss_curves.png)
    4. numbers: the headline numbers of summary.csv with their 95% intervals, one column per cell,
       then the cells' insertion rates compared in pairs (`experiments.sweep_paired`)
    5. plots: quality vs cost and the per-metric bars of `sweep_report.write_plots`
    6. rating: the blind rating's section, when `<sweep>/rating/report.json` exists

Every image is referenced by a path relative to the report (the cells' own files, plots/, and
report_files/ for copies of the real images, which may lie outside the sweep or only in memory):
the folder can be copied anywhere and opened offline. All text is escaped.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from datamodules.atomic import write_atomically
from evaluation.metrics.copying import METRIC as COPYING

from . import sweep_figures
from .sweep_figures import relative
from .sweep_report import headline_numbers

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 6px; vertical-align: top; font-size: 0.85em; }
th { background: #f3f3f3; }
td.number { text-align: right; white-space: nowrap; }
table.grid img { width: 128px; height: 128px; object-fit: contain; background: #000; margin: 1px; }
.note { color: #666; font-size: 0.8em; }
table.grid td.real { white-space: nowrap; }
table.grid .note { display: block; max-width: 260px; white-space: normal; }
img.plot { max-width: 100%; margin: 0.3em; border: 1px solid #eee; }
"""


def write_html(
    matrix, folders: list, out: Path, long: pd.DataFrame, plots: list[Path], paired: str = ""
) -> Path:
    """Write `out/report.html` (and the PNGs it shows) for the sweep's cell folders; `long` is
    summary.csv's table, `plots` the figures `write_plots` made and `paired` the markdown of the
    paired comparison (`experiments.sweep_paired`)."""
    sections = [
        f"<h1>Sweep {_text(matrix.name)}</h1>",
        f"<p>Matrix: <code>{_text(matrix.path)}</code>; {len(folders)} cells. "
        "The numbers with every extractor and N are in <code>summary.csv</code>.</p>",
        samples_section(folders, out),
        copying_section(folders, out),
        loss_section(folders, out),
        numbers_section(long, [f.cell.name for f in folders]),
        markdown_html(paired),
        "<h2>Plots</h2>" + "".join(_image(relative(p, out), p.stem, "plot") for p in _quality_first(plots)),
        rating_section(out),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Sweep {_text(matrix.name)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body></html>\n"
    )
    path = out / "report.html"
    write_atomically(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def samples_section(folders: list, out: Path) -> str:
    rows = sweep_figures.grid_rows(folders, out)
    if not rows:
        return "<h2>Samples</h2><p>No cell has samples yet.</p>"
    source = sweep_figures.add_real_images(rows, folders, out)
    names = [f.cell.name for f in folders]
    grid = sweep_figures.write_grid_png(rows, names, out, out / "plots" / "sample_grid.png")
    head = "<tr><th>prompt</th><th>real</th>" + "".join(f"<th>{_text(n)}</th>" for n in names) + "</tr>"
    body = []
    for row in rows:
        real = "".join(_image(p, "real image") for p in row.real)
        cells = "".join(
            f"<td>{_grid_cell(cell, name, row.prompt)}</td>"
            for name, cell in zip(names, row.cells, strict=True)
        )
        prompt = f"{row.prompt_index}: {_text(row.prompt)}<span class='note'>{_text(row.seeds(names))}</span>"
        real += f"<span class='note'>{_text(row.real_note)}</span>"
        body.append(f"<tr><td>{prompt}</td><td class='real'>{real}</td>{cells}</tr>")
    return (
        "<h2>Samples</h2>"
        f"<p>The first {len(rows)} prompts of the sample folders (by prompt index), each cell's first image "
        f"of the prompt and the seed it was drawn with. Real images: {_text(source)}.</p>"
        f"<table class='grid'>{head}{''.join(body)}</table>"
        + (
            f"<p class='note'>Also as <a href='{_url(relative(grid, out))}'>plots/{grid.name}</a>.</p>"
            if grid
            else ""
        )
    )


def _grid_cell(cell, name: str, prompt: str) -> str:
    """A cell's image, with its own prompt text where it differs from the row's (a template)."""
    if not cell.path:
        return f"<span class='note'>{_text(cell.missing)}</span>"
    note = f"<span class='note'>prompt: {_text(cell.prompt)}</span>" if cell.prompt != prompt else ""
    return _image(cell.path, f"{name}: {cell.prompt}") + note


def copying_section(folders: list, out: Path) -> str:
    """The closest pairs of each cell the copying test ran on; the others listed once per reason."""
    parts = ["<h2>Copying</h2><p>Per cell, the generated images most like a training image (smallest "
             "ratio of training to held-out distance) in the data-copying test.</p>"]  # fmt: skip
    not_run: dict[str, list[str]] = {}
    for folder in folders:
        path = folder.metrics / "metrics.json"
        if not path.is_file():
            not_run.setdefault(f"not evaluated ({folder.status()['state']})", []).append(folder.cell.name)
            continue
        result = json.loads(path.read_text())
        rows = [r for r in result["metrics"] if r["metric"] == "copying_nearest_is_train"]
        if rows:
            parts.append(
                f"<h3>{_text(folder.cell.name)}</h3>"
                + "".join(_copying_row(row, folder, out) for row in rows)
            )
        skipped = [
            f"skipped: {v}" for k, v in result.get("skipped", {}).items() if k.startswith(COPYING.name)
        ]
        if not rows and not skipped:
            skipped = ["not run: the evaluation was given no training split"]
        for reason in skipped:
            not_run.setdefault(reason, []).append(folder.cell.name)
    parts += [
        f"<p class='note'>{_text(', '.join(cells))}: {_text(why)}</p>" for why, cells in not_run.items()
    ]
    return "".join(parts)


def _copying_row(row: dict, folder, out: Path) -> str:
    verdict = "copying detected" if row.get("copying_detected") else "no copying detected"
    expected, p_value = row.get("expected", math.nan), row.get("p_value", math.nan)
    text = (
        f"<p>{_text(row.get('extractor') or '')}: {verdict}; the nearest real image is a training image "
        f"for {row['value']:.3g} of the generated images ({expected:.3g} expected without copying), "
        f"p = {p_value:.3g}.</p>"
    )
    pairs = folder.metrics / row.get("closest_pairs", "")
    if row.get("closest_pairs") and pairs.is_file():
        return text + _image(relative(pairs, out), f"{folder.cell.name}: closest pairs", "plot")
    return (
        text
        + f"<p class='note'>No closest-pairs image ({_text(row.get('closest_pairs', 'none recorded'))}).</p>"
    )


def loss_section(folders: list, out: Path) -> str:
    plot = sweep_figures.write_loss_plot(folders, out / "plots" / "loss_curves.png")
    if plot is None:
        return "<h2>Loss</h2><p class='note'>No cell has logged losses (TensorBoard events in run/).</p>"
    return "<h2>Loss</h2>" + _image(relative(plot, out), "loss curves", "plot")


def numbers_section(long: pd.DataFrame, names: list[str]) -> str:
    """The headline numbers, a row each, a column per cell: value and [interval] where there is one."""
    numbers = headline_numbers(long)
    states = long.drop_duplicates("cell").set_index("cell")["state"]
    head = "<tr><th>number</th>" + "".join(f"<th>{_text(n)}</th>" for n in names) + "</tr>"
    rows = ["<tr><td>state</td>" + "".join(f"<td>{_text(states.get(n, ''))}</td>" for n in names) + "</tr>"]
    for column, group in numbers.groupby("column", sort=True):
        by_cell = group.drop_duplicates("cell").set_index("cell")
        cells = [_number(by_cell.loc[n]) if n in by_cell.index else "" for n in names]
        rows.append(
            f"<tr><td>{_text(column)}</td>" + "".join(f"<td class='number'>{c}</td>" for c in cells) + "</tr>"
        )
    return f"<h2>Numbers</h2><p>Value [95% interval].</p><table>{head}{''.join(rows)}</table>"


def rating_section(out: Path) -> str:
    """The blind rating's section (`medsd rate`), where a rating was run on this sweep."""
    path = out / "rating" / "report.json"
    if not path.is_file():
        return ""
    from evaluation.rating.report import rating_section as markdown  # only for a rated sweep

    return markdown_html(markdown(json.loads(path.read_text())))


def markdown_html(text: str) -> str:
    """The markdown medsd writes (headings, paragraphs, pipe tables) as html, escaped; medsd has no
    markdown renderer among its dependencies."""
    parts, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):  # the header's separator line
                table.append(line.strip().strip("|").split("|"))
            continue
        if table:
            cells = [[_text(c.strip()) for c in row] for row in table]
            head = "".join(f"<th>{c}</th>" for c in cells[0])  # a pipe table's first row is its header
            body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
            table = []
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            parts.append(f"<h{level}>{_text(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            parts.append(f"<p>{_text(line)}</p>")
    return "".join(parts)


def _number(row: pd.Series) -> str:
    value = _format(row["value"])
    low, high = row.get("ci_low"), row.get("ci_high")
    if pd.notna(low) and pd.notna(high):
        value += f" [{_format(low)}, {_format(high)}]"
    return _text(value)


def _format(value) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _quality_first(plots: list[Path]) -> list[Path]:
    return sorted(plots, key=lambda p: p.stem != "quality_vs_cost")


def _image(path: str, alt: str, kind: str = "") -> str:
    css = f" class='{kind}'" if kind else ""
    return f"<img src='{_url(path)}' alt='{_text(alt)}'{css}>"


def _url(path: str) -> str:
    return html.escape(quote(path), quote=True)


def _text(value) -> str:
    return html.escape(str(value), quote=True)
