"""`medsd evaluate` end to end on small image folders, against torch-fidelity's FID."""

import json
import math

import pandas as pd
import pytest
import torch
import torch_fidelity

from datamodules.synthetic import make_shape_image
from evaluation.sample_folder import Generated
from experiments.cli import main as medsd
from tests.helpers.evaluation import random_inception_weights

pytestmark = pytest.mark.slow

SIZE = 176  # MS-SSIM's five scales need more than 160 px


def write_images(folder, seeds, kinds) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for i, (seed, kind) in enumerate(zip(seeds, kinds, strict=True)):
        name = f"{i:04d}.png"
        make_shape_image(kind, "left" if i % 2 else "right", SIZE, seed).save(folder / name)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    weights = random_inception_weights(root / "inception.pth")
    write_images(root / "real", range(12), ["circle"] * 12)
    generated = root / "generated"
    names = write_images(generated / "images", range(100, 112), ["square", "circle"] * 6)
    pd.DataFrame(
        {
            "prompt_index": [i // 4 for i in range(12)],
            "k": [i % 4 for i in range(12)],
            "prompt": [f"prompt {i // 4}" for i in range(12)],
            "seed": range(12),
            "path": [f"images/{n}" for n in names],
        }
    ).to_csv(generated / "manifest.csv", index=False)
    medsd(["evaluate", "--generated", str(generated), "--real-folder", str(root / "real"),
           "--extractors", "inception", "xrv", "--inception-weights", str(weights),
           "--xrv-weights-dir", str(root / "no-xrv"), "--bootstrap", "2",
           "--cross-prompt-pairs", "7"])  # fmt: skip
    return root, weights, json.loads((generated / "metrics" / "metrics.json").read_text())


def metric(result, name):
    return next(row for row in result["metrics"] if row["metric"] == name)


def test_inception_fid_equals_torch_fidelity(evaluated):
    root, weights, result = evaluated
    reference = torch_fidelity.calculate_metrics(
        input1=str(root / "real"),
        input2=str(root / "generated" / "images"),
        fid=True,
        kid=True,
        kid_subset_size=12,
        cuda=False,
        verbose=False,
        feature_extractor_weights_path=str(weights),
    )
    fid = metric(result, "fid")
    assert fid["value"] == pytest.approx(reference["frechet_inception_distance"], rel=1e-3, abs=1e-3)
    # 3 prompts cannot be halved into an interval: the point estimate stands, the interval says why not.
    assert fid["ci_low"] is None and "at least 4 generated units" in fid["ci_method"]
    assert fid["n_real"] == 12 and fid["n_generated"] == 12 and "torch-fidelity" in fid["extractor"]
    kid = metric(result, "kid")
    assert kid["value"] == pytest.approx(reference["kernel_inception_distance_mean"], rel=1e-3, abs=1e-6)
    assert kid["ci_low"] <= kid["ci_high"] and "over prompts" in kid["ci_method"]
    for row in result["metrics"]:
        assert all(
            row.get(key) for key in ("protocol", "extractor", "weights", "preprocessing", "n_generated")
        ), row


def test_missing_weights_skip_only_their_metrics(evaluated):
    _, _, result = evaluated
    assert "xrv features" in result["skipped"] and "densenet121" in result["skipped"]["xrv features"]
    intra = metric(result, "ms_ssim_intra_prompt")
    assert intra["prompts"] == 3 and intra["pairs"] == 18
    assert metric(result, "ms_ssim_cross_prompt")["pairs"] == 7  # --cross-prompt-pairs


def test_outputs_are_written(evaluated):
    root, _, _ = evaluated
    out = root / "generated" / "metrics"
    table = pd.read_csv(out / "metrics.csv")
    assert {"fid", "kid", "ms_ssim_intra_prompt", "ms_ssim_cross_prompt"} <= set(table.metric)
    summary = (out / "summary.md").read_text()
    assert "| fid |" in summary and "skipped xrv features" in summary
    assert list(out.glob("events.out.tfevents.*"))


def test_stated_labels_keep_agreement_and_mark_conflicts_uncertain(tmp_path):
    rows = [
        [{"Effusion": 1.0, "Edema": None}],
        # Two reports with the same impression: they agree on Edema, disagree on Effusion.
        [{"Effusion": 1.0, "Edema": 0.0}, {"Effusion": 0.0, "Edema": 0.0}],
        [],  # a prompt from a text file: no labels
    ]
    pd.DataFrame(
        {
            "prompt_index": [0, 1, 2],
            "prompt": ["a", "b", "c"],
            "path": ["x.png", "y.png", "z.png"],
            "labels": [json.dumps(r) for r in rows],
        }
    ).to_csv(tmp_path / "manifest.csv", index=False)
    names, values, labelled, conflicts = Generated.from_folder(tmp_path).stated_labels()
    assert names == ["Effusion", "Edema"] and conflicts == 1
    assert labelled.tolist() == [True, True, False]
    torch.testing.assert_close(
        values, torch.tensor([[1.0, math.nan], [-1.0, 0.0], [math.nan, math.nan]]), equal_nan=True
    )
