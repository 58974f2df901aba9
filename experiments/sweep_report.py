"""The summary of a sweep: one table across cells, plots, and `report.md`.

    <sweep>/summary.csv   long form: one row per cell and number (its axis labels, metric,
                          extractor, label, run, value, interval, N), the cost included
    <sweep>/summary.md    wide form: one row per cell, one column per headline number
    <sweep>/plots/*.png   each headline metric per cell with its 95% interval; quality vs cost
    <sweep>/report.md     states of the cells, the wide table, the cells' insertion rates compared in
                          pairs (`experiments.sweep_paired`: rows `paired_difference_*` in summary.csv,
                          with `compared_with`) and the plots
    <sweep>/report.html   the same with the images: a prompt grid across cells, copying pairs, loss
                          curves (`experiments.sweep_html`)

Cells that are not done appear with their state and no numbers; nothing is dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from datamodules.atomic import write_atomically
from evaluation.metrics import registry
from evaluation.sample_folder import sampling_cost_path

from .evaluate import markdown_table
from .matrix import Matrix, slug
from .sweep_paired import PAIRED_COLUMNS, compare_cells
from .sweep_paired import markdown as paired_section

# The run's cost fields carried into the summary: name -> (section, key) of its metrics.json "cost".
# (Sampling FLOPs come from `medsd sample`'s own record, at the settings the images were made with.)
COST_FIELDS = {
    "parameters_trainable": ("parameters", "trainable"),
    "train_flops_per_image": ("training", "flops_per_image"),
    "train_wall_seconds": ("training", "wall_seconds"),
    "gpu_hours": ("training", "gpu_hours"),
}


# summary.csv's columns that describe a number, not the cell (the others are its axis labels and state).
NUMBER_COLUMNS = {"metric", "extractor", "label", "run", "value", "ci_low", "ci_high", "n_generated"}
NUMBER_COLUMNS |= set(PAIRED_COLUMNS)

# Left out of the wide table (kept in summary.csv): accuracies next to the AUROCs, and timings.
HIDDEN = {"augmentation_accuracy", "sampling_flops_per_image"}


def cell_rows(folder) -> list[dict]:
    """A cell's numbers: its evaluation's metric rows and its run's cost, labelled with the cell."""
    status = folder.status()
    base = {"cell": folder.cell.name, **dict(folder.cell.labels), "state": status["state"]}
    rows = []
    metrics = folder.metrics / "metrics.json"
    if metrics.is_file():
        for row in json.loads(metrics.read_text())["metrics"]:
            rows.append(
                {
                    **base,
                    "metric": row["metric"],
                    "extractor": (row.get("extractor") or "").split(" ")[0],
                    "label": row.get("label"),
                    "run": row.get("run"),
                    "value": row["value"],
                    "ci_low": row.get("ci_low"),
                    "ci_high": row.get("ci_high"),
                    "n_generated": row.get("n_generated"),
                }
            )
    cost_path = folder.run / "metrics.json"
    if cost_path.is_file():
        cost = json.loads(cost_path.read_text()).get("cost", {})
        for name, (section, key) in COST_FIELDS.items():
            value = cost.get(section, {}).get(key)
            if value is not None:
                rows.append({**base, "metric": name, "extractor": "cost", "value": value})
    sampling = sampling_cost_path(folder.samples)
    flops = json.loads(sampling.read_text()).get("flops_per_image") if sampling.is_file() else None
    if flops:
        rows.append({**base, "metric": "sampling_flops_per_image", "extractor": "cost", "value": flops})
    return rows or [base]


def headline_numbers(long: pd.DataFrame) -> pd.DataFrame:
    """The rows of the headline numbers, each named in a `column` ("fid inception", "clip_score
    open_clip", "augmentation_auroc real+synthetic macro", ...)."""
    numbers = long.dropna(subset=["metric"]).copy()
    keep = numbers["label"].isna() | numbers["label"].isin(["macro", "macro minus real"])
    keep |= numbers["metric"].str.startswith("insertion_")
    keep &= ~numbers["metric"].isin(HIDDEN)
    keep &= numbers["run"].ne("real")  # the same real-only classifier in every cell (NaN: kept)
    numbers = numbers[keep]
    parts = (
        numbers[["metric", "run", "label", "extractor"]].astype(object).fillna("").astype(str).values.tolist()
    )
    numbers["column"] = [" ".join(p for p in row if p and p not in ("cost", "classifier")) for row in parts]
    return numbers


def headline(long: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, one column per headline number (see `headline_numbers`)."""
    numbers = headline_numbers(long)
    states = long.drop_duplicates("cell").set_index("cell")
    label_columns = [c for c in states.columns if c not in NUMBER_COLUMNS]
    if numbers.empty:
        return states[label_columns].reset_index()
    wide = numbers.pivot_table(index="cell", columns="column", values="value", aggfunc="first")
    return states[label_columns].join(wide).reset_index()


def write_report(matrix: Matrix, folders: list, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    paired = compare_cells(folders)
    long = pd.DataFrame([row for folder in folders for row in cell_rows(folder)] + paired.rows)
    section = paired_section(paired)
    for column in ("metric", "extractor", "label", "run", "value", "ci_low", "ci_high"):
        if column not in long:
            long[column] = None
    write_atomically(out / "summary.csv", lambda tmp: long.to_csv(tmp, index=False))
    wide = headline(long)
    table = "\n".join(markdown_table(wide))
    write_atomically(out / "summary.md", lambda tmp: tmp.write_text(table + "\n"))
    plots = write_plots(long, list(matrix.axes), out / "plots")
    states = long.drop_duplicates("cell")["state"].value_counts().to_dict()
    lines = [
        f"# Sweep {matrix.name}",
        "",
        f"Matrix: `{matrix.path}`; {len(folders)} cells: "
        + ", ".join(f"{n} {state}" for state, n in sorted(states.items())),
        "",
        "Intervals, per-label classifier figures and every number's extractor and N are in "
        "`summary.csv`; each cell's own `metrics/summary.md` has the full evaluation. `report.html` adds "
        "the images: the same prompts across cells beside real ones, the copying test's closest pairs, "
        "the loss curves.",
        "",
        table,
        "",
        section,
        *[f"![{p.stem}](plots/{p.name})" for p in plots],
    ]
    write_atomically(out / "report.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    from .sweep_html import write_html  # imported here: it imports this module

    write_html(matrix, folders, out, long, plots, section)
    return out / "report.md"


def plotted(long: pd.DataFrame) -> pd.DataFrame:
    """The numbers worth a bar chart, as the metric registry names them (`Metric.plotted`): those
    without a label, insertion rates per finding, and the synthetic and real+synthetic
    augmentation runs' macro AUROC."""
    names = {name for metric in registry() for name in metric.plotted}
    metric, label, run = long["metric"], long["label"], long["run"].astype(object).fillna("")
    chosen = metric.isin(names)
    plain = chosen & label.isna()
    insertion = chosen & metric.str.startswith("insertion_", na=False)
    augmentation = chosen & (metric == "augmentation_auroc") & (label == "macro") & (run != "real")
    return long[plain | insertion | augmentation]


def write_plots(long: pd.DataFrame, axes: list[str], folder: Path) -> list[Path]:
    """A bar per cell for each quality number (with its interval), and quality vs training cost."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    quality = plotted(long).copy()
    for column in ("extractor", "label", "run"):
        quality[column] = quality[column].astype(object).fillna("")  # an all-empty column reads as float
    written = []
    for (metric, extractor, label, run), group in quality.groupby(["metric", "extractor", "label", "run"]):
        figure, axis = plt.subplots(figsize=(max(4, 0.6 * len(group) + 2), 3.5))
        values = group["value"].astype(float)
        low = (values - group["ci_low"].astype(float)).clip(lower=0).fillna(0)
        high = (group["ci_high"].astype(float) - values).clip(lower=0).fillna(0)
        axis.bar(range(len(group)), values, yerr=[low, high], capsize=3, color="#4c72b0")
        axis.set_xticks(range(len(group)), [_short(r, axes) for r in group.to_dict("records")], rotation=45,
                        ha="right", fontsize=7)  # fmt: skip
        name = " ".join(p for p in (metric, run, label) if p)
        axis.set_title(
            f"{name} ({extractor})" if extractor and extractor != "classifier" else name, fontsize=9
        )
        figure.tight_layout()
        written.append(_save(figure, folder / f"{slug(name)}_{slug(extractor or 'none')}.png"))
        plt.close(figure)
    cost = long[long["metric"] == "train_flops_per_image"][["cell", "value"]]
    cost = cost.rename(columns={"value": "flops"})
    # Quality vs cost: FID where an extractor was available, else the insertion detection rates.
    fid = quality[quality["metric"] == "fid"]
    points = fid if len(fid) else quality[quality["metric"] == "insertion_detection_rate"]
    points = points.merge(cost, on="cell") if len(points) and len(cost) else pd.DataFrame()
    if len(points):
        figure, axis = plt.subplots(figsize=(5, 4))
        series = "extractor" if len(fid) else "label"
        for name, group in points.groupby(series):
            axis.scatter(group["flops"].astype(float), group["value"].astype(float), label=name)
            rows = sorted(group.to_dict("records"), key=lambda r: (float(r["flops"]), float(r["value"])))
            for i, row in enumerate(rows):
                # Staggered, so that cells of equal cost (same architecture) stay readable.
                offset = (4, 4 - 8 * (i % 3))
                axis.annotate(
                    _short(row, axes), (row["flops"], row["value"]), xytext=offset,
                    textcoords="offset points", fontsize=6,
                )  # fmt: skip
        axis.set_xscale("log")
        axis.set_xlabel("training FLOPs per image")
        axis.set_ylabel(
            "FID (lower is better)" if len(fid) else "insertion detection rate (higher is better)"
        )
        axis.legend(fontsize=7)
        axis.set_title("quality vs cost")
        figure.tight_layout()
        written.append(_save(figure, folder / "quality_vs_cost.png"))
        plt.close(figure)
    return written


def _short(row: dict, axes: list[str]) -> str:
    return ", ".join(str(row[a]) for a in axes if a in row)


def _save(figure, path: Path) -> Path:
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    return path
