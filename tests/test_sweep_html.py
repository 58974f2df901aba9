"""`<sweep>/report.html` (experiments/sweep_html.py) on a finished sweep's folders, written by the
project's own writers without training: the prompt grid, the copying pairs, the loss curves, the
numbers, and that every image is found relative to the report, in a copy of the folder too."""

import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import yaml
from PIL import Image
from selenium.webdriver.support.ui import WebDriverWait
from torch.utils.tensorboard import SummaryWriter

from evaluation.copying import closest_pairs, nearest_neighbours, write_closest_pairs
from evaluation.sample_folder import split_source, write_manifest
from experiments.evaluate import write_outputs
from experiments.matrix import Matrix
from experiments.sample import check_settings, manifest_rows, plan, prompts_from_split
from experiments.sweep import plan as sweep_plan
from experiments.sweep_html import markdown_html
from experiments.sweep_report import write_report
from tests.browser import browser, image_load_failures  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "configs" / "tiny"
DATA = ["--config", str(TINY / "unet.yaml")]  # the synthetic shapes: in-memory test images, 4 prompts
SEEDS = {"unet": 0, "lora": 100}  # the lora cell sampled with other seeds: the grid must say so
SKIP_REASON = "needs the features of an extractor with weights (not the trained classifier's)"


class Page(HTMLParser):
    """The report's image sources and tables (rows of cell texts, and the images in each cell)."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tables: list[list[list[tuple[str, list[str]]]]] = []
        self.in_cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append(("", []))
            self.in_cell = True
        elif tag == "img":
            self.images.append(dict(attrs)["src"])
            if self.in_cell:
                self.tables[-1][-1][-1][1].append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.in_cell = False

    def handle_data(self, data):
        if self.in_cell:
            text, images = self.tables[-1][-1][-1]
            self.tables[-1][-1][-1] = (text + data, images)


def read_page(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def write_cell(folder, seed: int, copying: bool, prompts) -> None:
    """A done cell's folders as fit, sample and evaluate write them."""
    folder.write_plan()
    items = plan(len(prompts), per_prompt=2, seed=seed)
    rng = np.random.default_rng(seed)
    for item in items:
        path = folder.samples / item.path
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    check_settings(folder.samples, {"seed": seed, "prompt_source": split_source("test", DATA)})
    write_manifest(folder.samples, manifest_rows(prompts, items))
    with SummaryWriter(str(folder.run)) as writer:  # the writer behind Lightning's TensorBoardLogger
        for step in range(1, 6):
            writer.add_scalar("train/loss", 1 / step + seed / 1000, step)
        writer.add_scalar("val/loss", 0.5, 5)
    (folder.run / "metrics.json").write_text('{"cost": {"training": {"flops_per_image": 1e9}}}')
    rows = [{"metric": "fid", "value": 10.0 + seed, "ci_low": 8.0, "ci_high": 12.5, "extractor": "inception"}]
    skipped = {}
    if copying:
        features = rng.normal(size=(len(items) + 6, 4))
        table = nearest_neighbours(features[:4], features[4:6], features[6:])
        paths = [folder.samples / item.path for item in items]
        grid = write_closest_pairs(
            closest_pairs(table, 2), paths, paths[:4], folder.metrics / "copying/x.png"
        )
        rows.append({"metric": "copying_nearest_is_train", "value": 0.5, "expected": 0.67, "p_value": 0.9,
                     "copying_detected": False, "extractor": "inception",
                     "closest_pairs": str(grid.relative_to(folder.metrics))})  # fmt: skip
    else:
        skipped["copying test"] = SKIP_REASON
    result = {"size": 32, "real_split": "test", "generated_prompt_split": "test",
              "fid_protocol": "torch-fidelity", "metrics": rows, "skipped": skipped}  # fmt: skip
    write_outputs(result, folder.metrics)
    folder.write_status(state="done", stage="evaluate")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Three cells: unet (copying test run), lora (copying test skipped, other seeds), and a failed
    textual-inversion cell with nothing but its status."""
    folder = tmp_path_factory.mktemp("sweep")
    strategies = {
        name: {"config": str(TINY / f"{name}.yaml")} for name in ("unet", "lora", "textual_inversion")
    }
    spec = {"name": "html", "axes": {"strategy": strategies}}
    (folder / "matrix.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    matrix = Matrix.load(folder / "matrix.yaml")
    out = folder / "out"
    folders = sweep_plan(matrix, out)
    prompts = prompts_from_split(DATA, "test")
    write_cell(folders[0], SEEDS["unet"], copying=True, prompts=prompts)
    write_cell(folders[1], SEEDS["lora"], copying=False, prompts=prompts)
    folders[2].write_plan()
    folders[2].write_status(state="failed", error="fit: exit code 1")
    write_report(matrix, folders, out)
    return out


CELLS = ["strategy-unet", "strategy-lora", "strategy-textual_inversion"]


def grid(page: Page):
    return next(t for t in page.tables if [text for text, _ in t[0]][:2] == ["prompt", "real"])


def test_the_grid_has_a_row_per_prompt_and_the_real_images_then_the_cells_in_order(sweep):
    table = grid(read_page(sweep / "report.html"))
    assert [text for text, _ in table[0]] == ["prompt", "real", *CELLS]
    prompts = [p.text for p in prompts_from_split(DATA, "test")]
    assert len(table) - 1 == len(prompts) == 4
    for number, (row, prompt) in enumerate(zip(table[1:], prompts, strict=True)):
        (label, _), (_, real), (_, unet), (_, lora), (failed, no_image) = row
        assert label.startswith(f"{number}: {prompt}")
        assert "seeds differ: strategy-unet" in label  # lora's seeds are 100 + ..., unet's 0 + ...
        assert real and all(p.startswith("report_files/real/") for p in real)  # copies of in-memory images
        assert unet == [f"strategy-unet/samples/images/{number:06d}_00.png"]
        assert lora == [f"strategy-lora/samples/images/{number:06d}_00.png"]
        assert not no_image and "no samples (failed)" in failed
    assert (sweep / "plots" / "sample_grid.png").is_file()


def test_every_image_is_a_file_relative_to_the_report_in_a_copy_of_the_folder(sweep, tmp_path):
    copy = tmp_path / "elsewhere" / "sweep"
    shutil.copytree(sweep, copy)
    text = (copy / "report.html").read_text()
    assert str(sweep) not in text and "file:" not in text and "http" not in text
    page = read_page(copy / "report.html")
    assert page.images
    for source in page.images:
        assert not source.startswith("/")
        path = (copy / unquote(source)).resolve()
        assert path.is_file() and path.is_relative_to(copy.resolve()), source
        Image.open(path).verify()


def test_copying_pairs_shown_where_the_test_ran_and_the_reason_where_it_was_skipped(sweep):
    text = (sweep / "report.html").read_text()
    section = text[text.index("<h2>Copying</h2>") : text.index("<h2>Loss</h2>")]
    assert "strategy-unet/metrics/copying/x.png" in section and "no copying detected" in section
    assert "strategy-lora: skipped: needs the features of an extractor with weights" in section
    assert "strategy-textual_inversion: not evaluated (failed)" in section


def test_loss_curves_and_numbers_with_intervals(sweep):
    page = read_page(sweep / "report.html")
    assert "plots/loss_curves.png" in page.images and "plots/quality_vs_cost.png" in page.images
    numbers = next(t for t in page.tables if t[0][0][0] == "number")
    fid = next(row for row in numbers if row[0][0] == "fid inception")
    assert [text for text, _ in fid[1:]] == ["10 [8, 12.5]", "110 [8, 12.5]", ""]


def rewritten(sweep: Path, tmp_path: Path, change) -> str:
    """The report of a copy of the sweep folder that `change(copy)` altered."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    change(copy)
    matrix = Matrix.load(sweep.parent / "matrix.yaml")
    write_report(matrix, sweep_plan(matrix, copy), copy)
    return (copy / "report.html").read_text()


def replace_in(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


def test_a_split_that_cannot_be_rebuilt_leaves_the_real_column_empty_and_says_why(sweep, tmp_path):
    settings = Path("strategy-unet/samples/sample_config.json")
    text = rewritten(sweep, tmp_path, lambda copy: replace_in(copy / settings, "unet.yaml", "gone.yaml"))
    assert "Real images: none: the real images could not be read" in text
    page = Page()
    page.feed(text)
    assert all(not row[1][1] and row[2][1] for row in grid(page)[1:])  # no real image; the cells' still


def test_a_missing_image_is_named_in_its_place(sweep, tmp_path):
    image = "strategy-unet/samples/images/000000_00.png"
    text = rewritten(sweep, tmp_path, lambda copy: (copy / image).unlink())
    page = Page()
    page.feed(text)
    row = grid(page)[1]
    unet_text, unet_images = row[2]
    assert not unet_images and "images/000000_00.png is missing" in unet_text
    assert row[3][1] == ["strategy-lora/samples/images/000000_00.png"]  # the other cells unchanged


def test_text_is_escaped(sweep, tmp_path):
    manifest = Path("strategy-unet/samples/manifest.csv")
    text = rewritten(
        sweep,
        tmp_path,
        lambda copy: replace_in(copy / manifest, "a bright circle on the left", "<b>c</b> & l"),
    )
    assert "<b>c" not in text and "&lt;b&gt;c&lt;/b&gt; &amp; l" in text


def test_a_rated_sweep_shows_the_rating_section(sweep, tmp_path, monkeypatch):
    from evaluation.rating import report

    def rate(copy: Path) -> None:
        (copy / "rating").mkdir()
        (copy / "rating" / "report.json").write_text('{"raters": 2}')

    monkeypatch.setattr(report, "rating_section", lambda r: f"## Expert rating\n\n{r['raters']} rater(s)\n")
    assert "<h2>Expert rating</h2><p>2 rater(s)</p>" in rewritten(sweep, tmp_path, rate)
    assert "Expert rating" not in (sweep / "report.html").read_text()  # not rated: no section


def test_markdown_sections_become_escaped_html():
    text = "## Rating <x>\n\nOne & two.\n\n| a | b |\n| --- | --- |\n| 1 | <i> |\n"
    assert markdown_html(text) == (
        "<h2>Rating &lt;x&gt;</h2><p>One &amp; two.</p>"
        "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>&lt;i&gt;</td></tr></table>"
    )


@pytest.mark.slow
def test_every_image_loads_in_a_browser_from_a_copy_of_the_folder(sweep, tmp_path, browser):  # noqa: F811
    copy = tmp_path / "copied" / "sweep"
    shutil.copytree(sweep, copy)
    browser.get("file://" + str(copy / "report.html"))
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    assert image_load_failures(browser) == []
    # The grid: 4 prompts x (1 real image + 2 sampled cells); one copying grid; the loss curves; the
    # sweep report's plots (FID and quality vs cost).
    plots = len(list((copy / "plots").glob("*.png"))) - 2  # less the grid's and the loss curves' PNGs
    assert plots == 2
    assert browser.execute_script("return document.images.length") == 4 * 3 + 1 + 1 + plots
