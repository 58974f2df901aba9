"""`medsd evaluate` end to end on chest phantoms: every metric, labelled, with intervals.

The "generated" set is a second phantom draw written as `medsd sample` writes its output (the
same manifest code), standing for a generator that draws exactly what its prompts ask for. All
extractor weights are random and saved to disk, as a user's downloaded files would be.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import torchxrayvision as xrv

from datamodules.mimic_cxr import MIMICCXRDataModule
from datamodules.phantoms import write_phantoms
from evaluation.features import XRV_WEIGHTS, CLIPFeatures
from evaluation.insertion_outcomes import OUTCOMES_FILE, read_outcomes
from evaluation.sample_folder import SETTINGS_FILE, read_manifest, split_source, write_manifest
from evaluation.suite import load_uint8
from experiments.cli import main as medsd
from experiments.sample import Item, manifest_rows, prompts_from_records
from tests.helpers.evaluation import random_inception_weights, tiny_open_clip

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "experiments/configs/tiny/phantoms/mimic_cxr.yaml"
SIZE = 176  # MS-SSIM's five scales need more than 160 px
EFFUSION = "Pleural Effusion"


def write_generated(records, out: Path, split: str) -> None:
    """Two images per distinct prompt (its records' images, repeated when it has one), with the
    manifest of `medsd sample`, recorded as prompted from `split`."""
    prompts = prompts_from_records(records)
    by_prompt = {}
    for record in records:
        by_prompt.setdefault(record.prompt, []).append(record.image)
    items = []
    for i, prompt in enumerate(prompts):
        for k in range(2):
            item = Item(i, k, seed=1000 * i + k)
            (out / item.path).parent.mkdir(parents=True, exist_ok=True)
            images = by_prompt[prompt.text]
            shutil.copy(images[k % len(images)], out / item.path)
            items.append(item)
    write_manifest(out, manifest_rows(prompts, items))
    (out / SETTINGS_FILE).write_text(json.dumps({"prompt_source": split_source(split, [])}))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom-eval")
    real = write_phantoms("mimic-cxr", 200, root / "real", seed=0, image_size=SIZE)
    fake = write_phantoms("mimic-cxr", 40, root / "fake", seed=1, image_size=SIZE)
    # Test prompts for FID and insertion, training prompts for augmentation (a stand-in draw each).
    write_generated(MIMICCXRDataModule(str(fake)).records("train"), root / "generated", "test")
    write_generated(MIMICCXRDataModule(str(fake)).records("train"), root / "generated-train", "train")

    inception = random_inception_weights(root / "inception.pth")
    torch.manual_seed(0)
    (root / "xrv").mkdir()
    weight_file = Path(xrv.models.model_urls[XRV_WEIGHTS]["weights_url"]).name
    torch.save(xrv.models.DenseNet(weights=None), root / "xrv" / weight_file)
    clip_config, clip = tiny_open_clip(root, "medsd-tiny-clip")
    torch.save(clip.state_dict(), root / "clip.pt")

    medsd(
        [
            "evaluate",
            "--generated",
            str(root / "generated"),
            "--config",
            str(CONFIG),
            "--augmentation-generated",
            str(root / "generated-train"),
            "--data.init_args.root",
            str(real),
            "--real-split",
            "test",
            "--size",
            str(SIZE),
            "--inception-weights",
            str(inception),
            "--xrv-weights-dir",
            str(root / "xrv"),
            "--clip-model",
            str(clip_config),
            "--clip-weights",
            str(root / "clip.pt"),
            "--extractors",
            "clip",
            "inception",
            "xrv",
            "classifier",
            "--classifier-labels",
            EFFUSION,
            "Cardiomegaly",
            "--classifier",
            "tiny",
            "--classifier-size",
            "64",
            "--classifier-epochs",
            "8",
            "--classifier-lr",
            "1e-3",
            "--bootstrap",
            "20",
        ]
    )
    out = root / "generated" / "metrics"
    return root, real, json.loads((out / "metrics.json").read_text())


def rows(result, metric, **where) -> list[dict]:
    return [
        row
        for row in result["metrics"]
        if row["metric"] == metric and all(row.get(k) == v for k, v in where.items())
    ]


def test_every_metric_is_written_with_its_extractor_and_n(evaluated):
    root, real, result = evaluated
    # Per-finding distances need 10+ images with a finding on both sides: few here.
    assert all(name.startswith("per-finding") for name in result["skipped"]), result["skipped"]
    n_test = len(MIMICCXRDataModule(str(real)).records("test"))
    for word in ("inception", "torchxrayvision", "open_clip", "domain-classifier tiny"):
        for metric in ("fid", "kid"):
            (row,) = [r for r in rows(result, metric) if word in r["extractor"]]
            assert row["n_real"] == n_test and row["n_generated"] > 0
            assert row["ci_low"] <= row["ci_high"] and row["preprocessing"] and row["ci_method"]
            assert row["protocol"] and row["weights"]
    for metric in ("ms_ssim_intra_prompt", "ms_ssim_cross_prompt", "clip_score", "cmmd"):
        assert len(rows(result, metric)) == 1, metric
    for metric in ("precision", "recall", "density", "coverage"):
        assert len(rows(result, metric)) == 4, metric  # inception, torchxrayvision, open_clip, classifier
    # The copying test in every extractor's features but the classifier's (trained on the training split).
    copying = rows(result, "copying_nearest_is_train")
    assert len(copying) == 3 and not any("classifier" in row["extractor"] for row in copying)
    assert all((root / "generated" / "metrics" / row["closest_pairs"]).is_file() for row in copying)
    for run in ("real", "synthetic", "real+synthetic"):
        (auroc,) = rows(result, "augmentation_auroc", run=run, label="macro")
        assert auroc["ci_low"] <= auroc["ci_high"] and auroc["n_test"] == n_test
        assert rows(result, "augmentation_accuracy", run=run, label=EFFUSION)
    assert len(rows(result, "augmentation_auroc", label="macro minus real")) == 2
    (detection,) = rows(result, "insertion_detection_rate", label=EFFUSION)
    assert detection["ci_low"] <= detection["value"] <= detection["ci_high"]
    assert "classifier tiny" in detection["extractor"]
    assert set(result["classifier_protocols"]) >= {"insertion", "augmentation"}


def test_outputs_hold_the_same_rows(evaluated):
    root, _, result = evaluated
    out = root / "generated" / "metrics"
    table = pd.read_csv(out / "metrics.csv")
    assert len(table) == len(result["metrics"])
    summary = (out / "summary.md").read_text()
    assert "insertion_detection_rate" in summary and "clip_score" in summary
    assert list(out.glob("events.out.tfevents.*"))


def test_insertion_sees_effusion_drawn_by_a_faithful_generator(evaluated):
    """The generated images are phantoms whose effusion matches their labels, so a classifier
    trained on real phantoms should detect most stated effusions and few stated absences."""
    _, _, result = evaluated
    (detection,) = rows(result, "insertion_detection_rate", label=EFFUSION)
    (false_positive,) = rows(result, "insertion_false_positive_rate", label=EFFUSION)
    assert detection["value"] > false_positive["value"] + 0.3


def test_insertion_outcomes_hold_the_rates_counts_seeds_and_classifier(evaluated):
    """insertion_outcomes.csv, beside metrics.json, counts to the rates the protocol reported."""
    root, _, result = evaluated
    insertion = result["classifier_protocols"]["insertion"]
    assert insertion["outcomes"] == OUTCOMES_FILE
    outcomes = read_outcomes(root / "generated" / "metrics")
    assert set(outcomes["classifier"]) == {insertion["classifier_digest"]}
    manifest = read_manifest(root / "generated")
    assert insertion["n_images"] == len(manifest)  # every generated image is labelled here
    assert len(outcomes) == len(manifest) * len(insertion["findings"])
    for finding, reported in insertion["findings"].items():
        mine = outcomes[outcomes["finding"] == finding]
        for rate, stated, group in (
            ("detection_rate", 1, "stated_present"),
            ("false_positive_rate", 0, "stated_absent"),
        ):
            called = mine.loc[mine["stated"] == stated, "called_positive"]
            assert (
                len(called) == reported[f"n_{group}"]
                and called.sum() == reported[f"n_predicted_positive_{group}"]
            )
            assert called.mean() == pytest.approx(reported[rate])
    images = outcomes.merge(manifest, on=["prompt_index", "k"], suffixes=("", "_manifest"))
    assert len(images) == len(outcomes) and (images["seed"] == images["seed_manifest"]).all()


def test_clip_score_equals_a_hand_computation(evaluated):
    root, _, result = evaluated
    manifest = pd.read_csv(root / "generated" / "manifest.csv", keep_default_na=False)
    model = open_clip.create_model("medsd-tiny-clip", pretrained=str(root / "clip.pt")).eval()
    extractor = CLIPFeatures("medsd-tiny-clip", model=model)
    images = load_uint8([root / "generated" / p for p in manifest["path"]], SIZE)
    tokenizer = open_clip.get_tokenizer("medsd-tiny-clip")
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(extractor.preprocess(images)), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(list(manifest["prompt"]))), dim=-1)
    # torchmetrics' CLIPScore clamps the mean at 0, not each cosine.
    expected = max(float(np.mean(100 * (image * text).sum(dim=1).numpy())), 0.0)
    (score,) = rows(result, "clip_score")
    assert score["value"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def classifier_only(root: Path, real: Path, generated: str, *extra: str) -> list[str]:
    """A quick `medsd evaluate` of one sample folder with the classifier protocols alone."""
    return ["evaluate", "--generated", str(root / generated), "--config", str(CONFIG),
            "--data.init_args.root", str(real), "--size", "64", "--extractors", "classifier",
            "--classifier", "tiny", "--classifier-size", "32", "--classifier-epochs", "1",
            "--bootstrap", "0", *extra]  # fmt: skip


def test_augmentation_refuses_test_prompted_images(evaluated):
    """Asked for explicitly, the augmentation protocol on images rendered from the test reports stops
    with the reason and what to sample instead; by default it is skipped with that reason."""
    root, real, _ = evaluated
    with pytest.raises(SystemExit, match="prompted from the training split.*--split train"):
        medsd(
            classifier_only(
                root, real, "generated", "--protocols", "augmentation", "--out", str(root / "refused")
            )
        )
    medsd(classifier_only(root, real, "generated", "--out", str(root / "default")))
    result = json.loads((root / "default" / "metrics.json").read_text())
    assert "prompted from the 'test' split" in result["skipped"]["augmentation protocol"]
    assert rows(result, "insertion_detection_rate") and not rows(result, "augmentation_auroc")


def test_insertion_refuses_training_prompted_images(evaluated):
    root, real, _ = evaluated
    out = str(root / "refused-insertion")
    with pytest.raises(SystemExit, match="insertion protocol .* same reports"):
        medsd(classifier_only(root, real, "generated-train", "--protocols", "insertion", "--out", out))
