"""The paired comparison of two cells' insertion rates (evaluation/paired.py): a hand-computed
difference, the coverage and width of its interval on simulated cells whose true difference is
known, the refusals, the classifier digest it relies on, and its section in the sweep report."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from numpy.polynomial.hermite_e import hermegauss
from PIL import Image

from evaluation.classifier import ClassifierSettings, train_classifier
from evaluation.insertion_outcomes import OUTCOMES_FILE, outcome_table, read_outcomes, write_outcomes
from evaluation.paired import PairingError, paired_differences
from evaluation.sample_folder import read_manifest
from experiments.evaluate import write_outputs
from experiments.matrix import Matrix
from experiments.sample import prompts_from_split
from experiments.sweep import plan as sweep_plan
from experiments.sweep_report import write_report
from tests.test_sweep_html import DATA, TINY, write_cell

DIGEST = "c" * 64


def outcomes(
    stated, positive, seeds=None, prompts=None, digest=DIGEST, findings=("Effusion",)
) -> pd.DataFrame:
    """A cell's outcomes for P prompts of K images each: stated [P, F], positive [P, K, F]; image k of
    prompt i has seed i * K + k unless `seeds` says otherwise, prompt i the text "prompt i"."""
    positive = np.asarray(positive, dtype=bool)
    n_prompts, k = positive.shape[:2]
    images = pd.DataFrame(
        {
            "prompt_index": np.repeat(np.arange(n_prompts), k),
            "k": np.tile(np.arange(k), n_prompts),
            "seed": pd.array(seeds if seeds is not None else np.arange(n_prompts * k), dtype="Int64"),
            "prompt": np.repeat(
                prompts if prompts is not None else [f"prompt {i}" for i in range(n_prompts)], k
            ),
        }
    )
    stated = torch.tensor(np.repeat(np.asarray(stated, dtype=np.float32), k, axis=0))
    return outcome_table(
        images, list(findings), stated, torch.tensor(positive.reshape(n_prompts * k, -1)), digest
    )


# Three prompts of two images; Effusion stated present, present, absent; Edema uncertain, blank, absent.
STATED = [[1, -1], [1, np.nan], [0, 0]]
A = [[[1, 0], [1, 0]], [[1, 0], [0, 0]], [[0, 0], [1, 1]]]
B = [[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 1], [0, 1]]]


def test_the_difference_is_the_hand_computed_one_and_a_single_prompt_gives_a_point_interval(tmp_path):
    findings = ("Effusion", "Edema")
    write_outcomes(tmp_path, outcomes(STATED, A, findings=findings))  # through the file
    a = read_outcomes(tmp_path)
    b = outcomes(STATED, B, findings=findings)
    results = {(r["finding"], r["rate"]): r for r in paired_differences(a, b, resamples=200, seed=1)}
    # Effusion detection: A calls 3 of the 4 present-stated images positive, B 1 of 4.
    assert results["Effusion", "detection_rate"]["value"] == pytest.approx(3 / 4 - 1 / 4)
    assert results["Effusion", "detection_rate"]["n_prompts"] == 2
    assert results["Effusion", "detection_rate"]["n_images"] == 4
    # Effusion false positives: prompt 2 only, A 1 of 2, B 0 of 2.
    assert results["Effusion", "false_positive_rate"]["value"] == pytest.approx(1 / 2)
    # Edema: only prompt 2 states it (absent): A 1 of 2, B 2 of 2; no prompt states it present.
    edema = results["Edema", "false_positive_rate"]
    assert edema["value"] == pytest.approx(1 / 2 - 1)
    assert (edema["n_prompts"], edema["n_images"]) == (1, 2)
    assert ("Edema", "detection_rate") not in results
    # Every resample holding prompt 2 (70% of them: 1 - (2/3)^3) gives exactly -1/2.
    assert (edema["ci_low"], edema["ci_high"], edema["excludes_zero"]) == (-0.5, -0.5, True)


def test_without_resamples_there_is_no_interval():
    (detection,) = paired_differences(outcomes(STATED[:2], A[:2]), outcomes(STATED[:2], B[:2]), resamples=0)
    assert detection["value"] == pytest.approx(0.5)
    assert (detection["ci_low"], detection["ci_high"], detection["excludes_zero"]) == (None, None, None)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_paired_interval_covers_the_true_difference_and_is_narrower_than_unpaired():
    """Two cells whose images are called positive with probability sigmoid(base + u_p): u_p ~ N(0, 2²)
    is the prompt's effect, shared by both cells (some reports are easy to render, some hard)."""
    n_prompts, per_prompt, sd, bases = 100, 2, 2.0, (1.0, 0.3)
    nodes, weights = hermegauss(60)  # E[f(u)] = sum(w f(sd x)) / sqrt(2 pi) for u ~ N(0, sd²)
    expected = [weights @ sigmoid(base + sd * nodes) / np.sqrt(2 * np.pi) for base in bases]
    truth = expected[0] - expected[1]
    rng = np.random.default_rng(0)
    stated = np.ones((n_prompts, 1))
    repetitions, resamples = 300, 200
    covered, paired_widths, unpaired_widths = 0, [], []
    for repetition in range(repetitions):
        effect = rng.normal(0, sd, size=(n_prompts, 1, 1))
        cells = [rng.random((n_prompts, per_prompt, 1)) < sigmoid(base + effect) for base in bases]
        (result,) = paired_differences(
            outcomes(stated, cells[0]), outcomes(stated, cells[1]), resamples=resamples, seed=repetition
        )
        covered += result["ci_low"] <= truth <= result["ci_high"]
        paired_widths.append(result["ci_high"] - result["ci_low"])
        # Unpaired: each cell's rate on its own resample of prompts.
        rates = [
            cell.mean(axis=(1, 2))[rng.integers(n_prompts, size=(resamples, n_prompts))].mean(1)
            for cell in cells
        ]
        low, high = np.quantile(rates[0] - rates[1], [0.025, 0.975])
        unpaired_widths.append(high - low)
    coverage = covered / repetitions
    error = np.sqrt(0.95 * 0.05 / repetitions)
    assert coverage >= 0.92, f"coverage {coverage:.3f}, Monte Carlo standard error {error:.3f} around 0.95"
    ratio = np.mean(paired_widths) / np.mean(unpaired_widths)
    assert ratio < 0.8, f"paired intervals {ratio:.2f} times as wide as unpaired ones"
    print(f"coverage {coverage:.3f} ± {error:.3f}, paired / unpaired width {ratio:.2f}")


def test_different_images_seeds_prompts_or_classifiers_are_refused():
    a = outcomes(STATED, A)
    with pytest.raises(PairingError, match="different images: 0 only in A, 2 only in B"):
        paired_differences(outcomes(STATED[:2], A[:2]), a)
    with pytest.raises(PairingError, match=r"1 image\(s\) with different seeds \(e.g. prompt 0 image 1"):
        paired_differences(a, outcomes(STATED, B, seeds=[0, 9, 2, 3, 4, 5]))
    with pytest.raises(PairingError, match=r"2 image\(s\) with different prompts \(e.g. prompt 2 image 0"):
        paired_differences(a, outcomes(STATED, B, prompts=["prompt 0", "prompt 1", "other"]))
    with pytest.raises(
        PairingError, match=r"2 image\(s\) with different statements \(e.g. prompt 0 image 0, Effusion"
    ):
        paired_differences(a, outcomes([[0], [1], [0]], B))
    with pytest.raises(PairingError, match="different classifiers .*cccccccccccc and dddddddddddd"):
        paired_differences(a, outcomes(STATED, B, digest="d" * 64), names=("A", "B"))


def test_the_classifier_digest_repeats_for_the_same_training_and_not_for_another_seed():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)) for _ in range(8)]
    labels = torch.tensor([[1.0], [0.0]] * 4)
    settings = ClassifierSettings(arch="tiny", image_size=16, epochs=1, batch_size=4, seed=0, device="cpu")
    digests = [
        train_classifier(images, labels, ["Effusion"], s).digest()
        for s in (settings, settings, replace(settings, seed=1))
    ]
    assert digests[0] == digests[1] != digests[2]


# --- the sweep report ------------------------------------------------------------------------------

# The fake sweep's four prompts of two images: Effusion stated present, present, absent, absent, and
# which images each cell's classifier calls positive.
SWEEP_STATED = [[1], [1], [0], [0]]
CALLED = {
    "unet": [[[1], [1]], [[1], [1]], [[0], [0]], [[0], [0]]],  # detection 4/4, false positives 0/4
    "lora": [[[1], [0]], [[0], [0]], [[0], [1]], [[1], [1]]],  # detection 1/4, false positives 3/4
}
# Per prompt, unet - lora: detection 1/2 (prompt 0) and 1 (prompt 1), false positives -1/2 and -1.
# A resample of the four prompts holds prompt 0 but not prompt 1 a quarter of the time ((3/4)^4 -
# (2/4)^4), and the reverse as often, so 200 resamples' 2.5% and 97.5% quantiles are those values.


def write_insertion(folder, called, digest: str = DIGEST) -> None:
    """The outcomes `medsd evaluate` writes for a cell's sample folder, and its insertion section."""
    write_outcomes(folder.metrics, fake_outcomes(folder, called, digest))
    add_insertion_section(folder, {"classifier_digest": digest, "outcomes": OUTCOMES_FILE})


def fake_outcomes(folder, called, digest: str) -> pd.DataFrame:
    images = read_manifest(folder.samples)
    positive = torch.tensor(np.asarray(called, dtype=bool).reshape(len(images), 1))
    stated = torch.tensor(np.repeat(np.asarray(SWEEP_STATED, dtype=np.float32), 2, axis=0))
    return outcome_table(images, ["Effusion"], stated, positive, digest)


def add_insertion_section(folder, insertion: dict) -> None:
    result = json.loads((folder.metrics / "metrics.json").read_text())
    result["classifier_protocols"] = {"insertion": insertion}
    write_outputs(result, folder.metrics)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """unet and lora compared; old evaluated without outcomes; skipped with insertion skipped; failed."""
    folder = tmp_path_factory.mktemp("paired-sweep")
    names = ["unet", "lora", "old", "skipped", "failed"]
    spec = {"name": "paired", "axes": {"strategy": {n: {"config": str(TINY / "unet.yaml")} for n in names}}}
    (folder / "matrix.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    matrix = Matrix.load(folder / "matrix.yaml")
    out = folder / "out"
    cells = dict(zip(names, sweep_plan(matrix, out), strict=True))
    prompts = prompts_from_split(DATA, "test")
    for name in names[:4]:
        write_cell(cells[name], 0, copying=False, prompts=prompts)
    for name, called in CALLED.items():
        write_insertion(cells[name], called)
    add_insertion_section(cells["old"], {"classifier_digest": DIGEST})  # an older medsd's metrics.json
    result = json.loads((cells["skipped"].metrics / "metrics.json").read_text())
    result["skipped"]["insertion protocol"] = "prompted from the training split"
    write_outputs(result, cells["skipped"].metrics)
    cells["failed"].write_plan()
    cells["failed"].write_status(state="failed", error="fit: exit code 1")
    write_report(matrix, list(cells.values()), out)
    return out


def test_the_sweep_report_compares_the_cells_with_outcomes_and_says_why_the_others_are_not(sweep):
    summary = pd.read_csv(sweep / "summary.csv")
    paired = summary[summary["metric"].str.startswith("paired_difference_")].set_index("metric")
    assert list(paired.index) == ["paired_difference_detection_rate", "paired_difference_false_positive_rate"]
    assert set(paired["cell"]) == {"strategy-unet"} and set(paired["compared_with"]) == {"strategy-lora"}
    assert list(paired["label"]) == ["Effusion", "Effusion"]
    assert list(paired["value"]) == pytest.approx([4 / 4 - 1 / 4, 0 / 4 - 3 / 4])
    assert list(paired["ci_low"]) == [0.5, -1] and list(paired["ci_high"]) == [1, -0.5]
    assert list(paired["excludes_zero"]) == [True, True]
    assert list(paired["n_prompts"]) == [2, 2] and list(paired["n_generated"]) == [4, 4]
    wide = (sweep / "summary.md").read_text()
    assert "compared_with" not in wide and "n_prompts" not in wide  # the wide table: cells and headlines
    report = (sweep / "report.md").read_text()
    section = report[report.index("## Prompt following, paired") :]
    assert (
        "| strategy-unet | strategy-lora | Effusion | detection rate | 0.75 | [0.5, 1] | yes | 2 | 4 |"
        in section
    )
    assert "every pair of done cells" in section
    assert "- strategy-old: not compared: evaluated by a medsd that kept no per-image outcomes" in section
    assert (
        "- strategy-skipped: not compared: insertion protocol skipped: prompted from the training" in section
    )
    assert "- strategy-failed: not compared: not done (failed)" in section
    html = (sweep / "report.html").read_text()
    assert "<h2>Prompt following, paired</h2>" in html
    assert "<td>strategy-unet</td><td>strategy-lora</td><td>Effusion</td><td>false positive rate</td>" in html


def report_of_a_copy(sweep: Path, tmp_path: Path, change) -> str:
    """report.md of a copy of the sweep whose cell folders `change(cells)` altered."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    matrix = Matrix.load(sweep.parent / "matrix.yaml")
    cells = sweep_plan(matrix, copy)
    change(cells)
    write_report(matrix, cells, copy)
    return (copy / "report.md").read_text()


def test_outcomes_not_of_the_cells_evaluation_are_not_read(sweep, tmp_path):
    def change(cells):
        (cells[0].metrics / OUTCOMES_FILE).write_text("prompt_index,k\n0,0\n")
        write_outcomes(cells[1].metrics, fake_outcomes(cells[1], CALLED["lora"], "e" * 64))  # a later run's
        write_outcomes(cells[3].metrics, fake_outcomes(cells[3], CALLED["lora"], DIGEST))  # an earlier run's

    report = report_of_a_copy(sweep, tmp_path, change)
    assert "- strategy-unet: not compared: unreadable outcomes: " in report and "has no column(s)" in report
    assert "- strategy-lora: not compared: insertion_outcomes.csv was not written by the evaluation" in report
    assert "- strategy-skipped: not compared: insertion protocol skipped: " in report


def test_a_pair_scored_by_different_classifiers_is_refused(sweep, tmp_path):
    report = report_of_a_copy(
        sweep, tmp_path, lambda cells: write_insertion(cells[1], CALLED["lora"], "d" * 64)
    )
    assert "No pair of cells could be compared." in report
    assert (
        "- strategy-unet vs strategy-lora: refused: strategy-unet and strategy-lora were scored by " in report
    )
