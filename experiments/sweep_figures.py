"""The figures of a sweep's html report, gathered from the cells' folders: the prompt grid (real
images beside each cell's image of the same prompt) and the loss curves, with the PNGs they make
under `<sweep>/plots/` and `<sweep>/report_files/`.

Paths are relative to the sweep folder, so that the report still finds them in a copy of it.
"""

from __future__ import annotations

import os
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from datamodules.atomic import atomic_directory, write_atomically
from datamodules.images import load_image, to_rgb
from evaluation.sample_folder import read_manifest, read_settings

# Rows of the grid: the first prompts of the sample folders (a sweep's test split may hold thousands).
GRID_PROMPTS = 8
# Real images shown per prompt: a templated prompt ("normal chest x-ray") can stand for many studies.
REAL_PER_PROMPT = 2
# Longest side of the real images' copies: the dataset's files may be full-size radiographs.
REAL_SIZE = 256
# Lightning's TensorBoard tags of the training and validation loss (lightning_modules).
LOSS_TAGS = {"train/loss": "train", "val/loss": "val"}


@dataclass
class GridCell:
    """A cell's image of a grid row: its path relative to the sweep, its seed and prompt text; no
    path where the cell has no image of the prompt (with why in `missing`)."""

    path: str | None
    seed: int | None = None
    prompt: str = ""
    missing: str = ""


@dataclass
class GridRow:
    prompt_index: int
    prompt: str  # the text most cells rendered (a textual-inversion cell's adds its token)
    cells: list[GridCell]
    real: list[str] = field(default_factory=list)  # copies of the real images, relative to the sweep
    real_note: str = ""

    def seeds(self, names: list[str]) -> str:
        """The seed the row's images were drawn with, or each cell's where they differ."""
        seeds = {name: c.seed for name, c in zip(names, self.cells, strict=True) if c.seed is not None}
        if len(set(seeds.values())) <= 1:
            return f"seed {next(iter(seeds.values()))}" if seeds else "no images"
        return "seeds differ: " + ", ".join(f"{name} {seed}" for name, seed in seeds.items())


def relative(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def grid_rows(folders: list, out: Path, n: int = GRID_PROMPTS) -> list[GridRow]:
    """The first `n` prompt indices of the cells' sample folders, each cell's first image of each. Cells that
    sample one split list its distinct prompts in the same order, so a prompt index is the same
    prompt in every cell, written into each cell's own template."""
    manifests = {
        f.cell.name: read_manifest(f.samples) for f in folders if (f.samples / "manifest.csv").is_file()
    }
    indices = sorted({int(i) for table in manifests.values() for i in table["prompt_index"]})[:n]
    rows = []
    for index in indices:
        cells = []
        for folder in folders:
            table = manifests.get(folder.cell.name)
            if table is None:
                cells.append(GridCell(None, missing=f"no samples ({folder.status()['state']})"))
                continue
            images = table[table["prompt_index"] == index].sort_values("k")
            if images.empty:
                cells.append(GridCell(None, missing="prompt not sampled"))
                continue
            image = images.iloc[0]
            if not (folder.samples / image["path"]).is_file():
                cells.append(GridCell(None, prompt=image["prompt"], missing=f"{image['path']} is missing"))
                continue
            seed = int(image["seed"]) if "seed" in images and image["seed"] != "" else None
            cells.append(GridCell(relative(folder.samples / image["path"], out), seed, image["prompt"]))
        texts = Counter(c.prompt for c in cells if c.prompt)  # one at least: the index is in a manifest
        rows.append(GridRow(index, texts.most_common(1)[0][0], cells))
    return rows


def add_real_images(rows: list[GridRow], folders: list, out: Path) -> str:
    """Copy the real images of each row's prompt into `report_files/real/`: the records of the split
    the first sampled cell's prompts came from whose prompt is that cell's text of the row (rebuilt
    from the data config `medsd sample` recorded). Returns where they came from, or why there are
    none."""
    position, folder = next((i, f) for i, f in enumerate(folders) if (f.samples / "manifest.csv").is_file())
    source = read_settings(folder.samples).get("prompt_source") or {}
    if "split" not in source:
        return "none: the prompts came from a prompt file, not a dataset split"
    from experiments.lightning_cli import build_datamodule  # the data config's DataModule only

    try:
        records = build_datamodule(source["data"]).records(source["split"])
    except (Exception, SystemExit) as error:  # the grid still shows the cells; the report says why
        # A config the parser refuses exits (its message on stderr) while handling the error itself.
        cause = error.__context__ if isinstance(error, SystemExit) and error.__context__ else error
        return f"none: the real images could not be read ({type(cause).__name__}: {cause})"
    by_prompt: dict[str, list] = {}
    for record in records:
        by_prompt.setdefault(record.prompt, []).append(record)
    # Written whole, so that no real image of an earlier report's rows stays behind.
    with atomic_directory(out / "report_files" / "real") as scratch:
        for row in rows:
            matching = by_prompt.get(row.cells[position].prompt, [])
            shown, unreadable = matching[:REAL_PER_PROMPT], 0
            for j, record in enumerate(shown):
                name = f"{row.prompt_index:06d}_{j}.png"
                try:
                    thumbnail(record.image).save(scratch / name, format="PNG")
                except (OSError, ValueError):  # a bad file of the dataset: the row says so
                    unreadable += 1
                    continue
                row.real.append(f"report_files/real/{name}")
            row.real_note = f"{len(shown)} of {len(matching)} record(s) with this prompt"
            row.real_note += f", {unreadable} unreadable" if unreadable else ""
            studies = [str((r.meta or {}).get("study_id")) for r in shown if (r.meta or {}).get("study_id")]
            row.real_note += f"; studies {', '.join(studies)}" if studies else ""
    return f"the '{source['split']}' split of {' '.join(source['data'])}, as {folder.cell.name} sampled it"


def thumbnail(image: str | Image.Image) -> Image.Image:
    """A record's image (a file, or one the dataset holds in memory) at most REAL_SIZE on a side."""
    image = to_rgb(image).copy() if isinstance(image, Image.Image) else load_image(image)
    image.thumbnail((REAL_SIZE, REAL_SIZE))
    return image


def write_grid_png(rows: list[GridRow], names: list[str], out: Path, path: Path) -> Path | None:
    """The grid as one figure: a row per prompt, the first real image then each cell's image."""
    if not rows:
        return None
    plt = _pyplot()
    columns = ["real", *names]
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(1.6 * len(columns) + 1.5, 1.7 * len(rows)),
                                squeeze=False)  # fmt: skip
    for r, row in enumerate(rows):
        for c, image in enumerate([row.real[0] if row.real else None, *(cell.path for cell in row.cells)]):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if image is not None:
                with Image.open(out / image) as picture:
                    axis.imshow(picture.convert("RGB"))
            if r == 0:
                axis.set_title(textwrap.fill(columns[c], 18), fontsize=7)
        label = (
            textwrap.fill(f"{row.prompt_index}: {row.prompt}", 24)
            + "\n"
            + textwrap.fill(row.seeds(names), 24)
        )
        axes[r][0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)
    return path


def loss_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """A run folder's logged losses, "train" / "val" -> [(step, value)]; the event files of a resumed
    fit are read in order, a later file's value replacing an earlier one's at the same step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    for events in sorted(run.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: every point
        accumulator.Reload()
        for tag in set(accumulator.Tags()["scalars"]) & set(LOSS_TAGS):
            points = curves.setdefault(LOSS_TAGS[tag], {})
            points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return {name: sorted(points.items()) for name, points in curves.items()}


def write_loss_plot(folders: list, path: Path) -> Path | None:
    """Training (lines) and validation (dashed, dots) loss of every cell on one plot."""
    curves = {f.cell.name: loss_curves(f.run) for f in folders if f.run.is_dir()}
    curves = {name: c for name, c in curves.items() if c}
    if not curves:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(9, 4))
    for number, (name, cell) in enumerate(curves.items()):
        color = f"C{number % 10}"
        for kind, style in (("train", {"linewidth": 1}), ("val", {"linestyle": "--", "marker": "o"})):
            if kind in cell:
                steps, values = zip(*cell[kind], strict=True)
                axis.plot(steps, values, color=color, label=f"{name} {kind}", **style)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("training (solid) and validation (dashed) loss")
    axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the curves, not on them
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt
