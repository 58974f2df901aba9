"""The classifier protocols: label policies, metrics, reproducibility, and accuracy on chest phantoms.

Everything runs offline on a CPU with the "tiny" architecture at 64 px; DenseNet-121 is only
built (random weights, and a fake ImageNet file to check the weight loading).
"""

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchxrayvision as xrv
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn
from torchvision.models import densenet121

from datamodules.mimic_cxr import LABELS, MIMICCXRDataModule
from datamodules.phantoms import write_phantoms
from evaluation.classifier import (
    ClassifierSettings,
    LabelledImages,
    TrainedClassifier,
    build_network,
    evaluate,
    fit_thresholds,
    image_tensor,
    label_targets,
    masked_bce,
    penultimate_features,
    predict,
    train_classifier,
)
from evaluation.metrics.distances import fid_kid_rows
from evaluation.protocols import abnormality_insertion, augmentation_protocol

NAN = math.nan
EFFUSION = "Pleural Effusion"
TINY = ClassifierSettings(arch="tiny", image_size=64, epochs=10, lr=1e-3, batch_size=32)


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Frontal chest phantoms (about 450 train, 50 validation, 55 test) with the 14 CheXpert labels."""
    root = write_phantoms("mimic-cxr", 1000, tmp_path_factory.mktemp("cxr") / "mimic", seed=0, image_size=64)
    datamodule = MIMICCXRDataModule(str(root), prompt_source="labels")
    return {
        split: LabelledImages.from_records(datamodule.records(split)) for split in ("train", "val", "test")
    }


@pytest.fixture(scope="module")
def real_classifier(phantoms):
    train = phantoms["train"]
    return train_classifier(train.images, train.labels, train.label_names, TINY)


# --- label policies and loss ---------------------------------------------------------------------

LABELS_TABLE = torch.tensor([[1.0, 0.0, -1.0, NAN]])


@pytest.mark.parametrize(
    "uncertain, blank, targets, mask",
    [
        ("ignore", "negative", [1, 0, 0, 0], [1, 1, 0, 1]),
        ("zeros", "negative", [1, 0, 0, 0], [1, 1, 1, 1]),
        ("ones", "negative", [1, 0, 1, 0], [1, 1, 1, 1]),
        ("ignore", "ignore", [1, 0, 0, 0], [1, 1, 0, 0]),
        ("ones", "ignore", [1, 0, 1, 0], [1, 1, 1, 0]),
    ],
)
def test_label_policies(uncertain, blank, targets, mask):
    got_targets, got_mask = label_targets(LABELS_TABLE, uncertain, blank)
    assert got_targets.tolist() == [targets]
    assert got_mask.tolist() == [mask]


def test_default_policy_is_blank_negative_uncertain_ignored():
    settings = ClassifierSettings()
    assert (settings.arch, settings.blank, settings.uncertain, settings.image_size) == (
        "densenet121",
        "negative",
        "ignore",
        224,
    )


def test_label_values_and_settings_are_checked():
    with pytest.raises(ValueError, match="1.0, 0.0, -1.0 or NaN"):
        label_targets(torch.tensor([[2.0]]))
    with pytest.raises(ValueError, match="uncertain"):
        label_targets(LABELS_TABLE, uncertain="maybe")
    with pytest.raises(ValueError, match="arch"):
        ClassifierSettings(arch="resnet")
    with pytest.raises(ValueError, match="threshold"):
        ClassifierSettings(threshold=1.5)
    with pytest.raises(ValueError, match="shape"):
        LabelledImages(["a.png"], torch.zeros(2, 1), ["x"])


def test_masked_bce_averages_over_unmasked_entries_only():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    targets, mask = label_targets(LABELS_TABLE, "ignore", "ignore")
    expected = (
        math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))
    ) / 2  # -log(sigmoid(2)), -log(1-sigmoid(-1))
    assert masked_bce(logits, targets, mask).item() == pytest.approx(expected, rel=1e-6)
    # Changing a masked logit changes nothing.
    assert masked_bce(logits + torch.tensor([[0, 0, 9.0, -9.0]]), targets, mask).item() == pytest.approx(
        expected
    )


# --- metrics -------------------------------------------------------------------------------------


def test_evaluate_matches_hand_computation_and_sklearn():
    probabilities = torch.tensor([[0.9, 0.2], [0.4, 0.7], [0.6, 0.1], [0.2, 0.3], [0.8, 0.6]])
    labels = torch.tensor([[1.0, 0.0], [1.0, -1.0], [0.0, 0.0], [NAN, 0.0], [-1.0, 0.0]])
    result = evaluate(probabilities, labels, ["a", "b"], thresholds={"a": 0.5, "b": 0.5})

    a = result["per_label"]["a"]  # rows 0-3 (row 4 uncertain); row 3 blank -> negative
    assert (a["n"], a["n_positive"], a["n_negative"]) == (4, 2, 2)
    assert a["accuracy"] == pytest.approx(2 / 4)  # right: rows 0 and 3; wrong: rows 1 and 2
    assert a["auroc"] == pytest.approx(roc_auc_score([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.2]))
    assert a["auroc"] == pytest.approx(3 / 4)  # pairs (pos > neg): 0.9>0.6, 0.9>0.2, 0.4>0.2

    b = result["per_label"]["b"]  # all negative: accuracy only
    assert b["accuracy"] == pytest.approx(3 / 4) and b["auroc"] is None and "single class" in b["note"]
    assert result["macro"] == {
        "accuracy": pytest.approx((2 / 4 + 3 / 4) / 2),
        "accuracy_labels": ["a", "b"],
        "auroc": pytest.approx(3 / 4),
        "auroc_labels": ["a"],
    }

    ignored = evaluate(probabilities, labels, ["a", "b"], thresholds=0.5, blank="ignore")["per_label"]["a"]
    assert ignored["n"] == 3 and ignored["accuracy"] == pytest.approx(1 / 3)


def test_evaluate_label_without_evaluable_images():
    result = evaluate(torch.tensor([[0.5], [0.5]]), torch.tensor([[-1.0], [NAN]]), ["x"], blank="ignore")
    assert result["per_label"]["x"]["accuracy"] is None and "no evaluable" in result["per_label"]["x"]["note"]
    assert result["macro"]["accuracy"] is None and result["macro"]["auroc"] is None


class Brightness(nn.Module):
    """A stand-in network whose logit for every label is the image's mean normalised pixel."""

    def __init__(self, n_labels: int):
        super().__init__()
        self.n_labels = n_labels
        self.anchor = nn.Parameter(torch.zeros(()))  # so predict finds a device

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None].expand(-1, self.n_labels) + self.anchor


def gray(value: int) -> Image.Image:
    return Image.new("L", (32, 32), value)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def stub_classifier(names, settings=TINY):
    return TrainedClassifier(
        Brightness(len(names)), list(names), settings, dict.fromkeys(names, 0.5), 0, 0, []
    )


def test_thresholds_chosen_on_validation_separate_its_classes():
    # Bright images are positive, yet all score under 0.5: a fixed threshold misses them.
    values = [10, 30, 50, 70, 90, 110]
    labels = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    validation = LabelledImages([gray(v) for v in values], labels, ["a", "b"])
    classifier = stub_classifier(["a", "b"])
    fixed = evaluate(predict(classifier, validation.images), labels, ["a", "b"])
    assert fixed["per_label"]["a"]["accuracy"] == 0.5

    tuned = fit_thresholds(classifier, validation)
    probabilities = predict(tuned, validation.images)
    # Halfway (in logits) between the brightest negative and the dimmest positive.
    brightest_negative, dimmest_positive = (logit(p) for p in probabilities[2:4, 0].tolist())
    assert logit(tuned.thresholds["a"]) == pytest.approx((brightest_negative + dimmest_positive) / 2)
    assert evaluate(probabilities, labels, ["a", "b"], tuned.thresholds)["per_label"]["a"]["accuracy"] == 1.0
    assert tuned.thresholds["b"] == 0.5 and "single class" in tuned.threshold_notes["b"]


def test_validation_threshold_needs_validation_images():
    with pytest.raises(ValueError, match="validation"):
        train_classifier([gray(0)], torch.tensor([[1.0]]), ["a"], ClassifierSettings(threshold="validation"))


# --- networks ------------------------------------------------------------------------------------


def test_densenet121_loads_torchvision_imagenet_file(tmp_path):
    """torchvision's ImageNet file uses the old key names ("norm.1"); they load into today's model."""
    reference = densenet121(weights=None)
    old_names = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])", r"\1.\2", key): value
        for key, value in reference.state_dict().items()
        if not key.endswith("num_batches_tracked")  # absent from the old file
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_names
    path = tmp_path / "densenet121-imagenet.pth"
    torch.save(old_names, path)

    network = build_network("densenet121", 3, pretrained_weights=str(path))
    weight = "features.denseblock4.denselayer16.conv2.weight"
    assert torch.equal(network.state_dict()[weight], reference.state_dict()[weight])
    assert network.classifier.out_features == 3 and network.classifier.in_features == 1024


def test_xrv_densenet_starts_from_the_torchxrayvision_file_with_a_new_head(tmp_path):
    torch.manual_seed(0)
    released = xrv.models.DenseNet(weights=None)  # what torchxrayvision ships: a pickled model
    torch.save(released, tmp_path / "xrv.pt")
    network = build_network("xrv-densenet121", 2, pretrained_weights=str(tmp_path / "xrv.pt")).eval()
    weight = "features.denseblock4.denselayer16.conv2.weight"
    assert torch.equal(network.state_dict()[weight], released.state_dict()[weight])
    x = torch.rand(2, 1, 64, 64) * 2048 - 1024
    with torch.no_grad():
        expected = network.classifier(released.eval().features2(x))
        torch.testing.assert_close(network(x), expected)  # plain logits: no op_threshs calibration
    # Its input: one channel, [-1024, 1024], as torchxrayvision's normalisation gives.
    pixels = image_tensor(Image.new("L", (80, 64), 255), 32, "xrv-densenet121")
    assert pixels.shape == (1, 32, 32) and torch.all(pixels == 1024)
    with pytest.raises(ValueError, match="not for arch 'tiny'"):
        ClassifierSettings(arch="tiny", pretrained_weights=str(tmp_path / "xrv.pt"))


def test_networks_take_three_channel_images():
    for arch in ("densenet121", "tiny"):
        assert build_network(arch, 5)(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


# --- training on chest phantoms ------------------------------------------------------------------


def test_same_seed_gives_same_probabilities(phantoms):
    train, test = phantoms["train"], phantoms["test"]
    settings = ClassifierSettings(arch="tiny", image_size=64, epochs=2, lr=1e-3, batch_size=16, seed=3)
    images, labels = train.images[:48], train.labels[:48]
    first = predict(train_classifier(images, labels, train.label_names, settings), test.images)
    again = predict(train_classifier(images, labels, train.label_names, settings), test.images)
    other_seed = replace(settings, seed=4)
    other = predict(train_classifier(images, labels, train.label_names, other_seed), test.images)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_real_trained_classifier_detects_pleural_effusion_on_test_phantoms(phantoms, real_classifier):
    """The acceptance check: >= 95% accuracy for pleural effusion on the real test phantoms."""
    test = phantoms["test"]
    result = evaluate(
        predict(real_classifier, test.images), test.labels, test.label_names, real_classifier.thresholds
    )
    effusion = result["per_label"][EFFUSION]
    assert effusion["n"] >= 50 and effusion["n_positive"] >= 15 and effusion["n_negative"] >= 15
    assert effusion["accuracy"] >= 0.95, effusion
    assert effusion["auroc"] >= 0.95, effusion
    assert result["per_label"]["Atelectasis"]["auroc"] is None  # never drawn: a single class, no crash
    assert set(result["per_label"]) == set(LABELS)


def test_abnormality_insertion_tells_good_images_from_bad(phantoms, real_classifier):
    test = phantoms["test"]
    column = test.label_names.index(EFFUSION)
    good = abnormality_insertion(
        real_classifier, test.images, test.labels, test.label_names, [EFFUSION], resamples=100
    )
    effusion = good["findings"][EFFUSION]
    low, high = effusion["detection_rate_ci"]
    assert low <= effusion["detection_rate"] <= high
    low, high = effusion["false_positive_rate_ci"]
    assert low <= effusion["false_positive_rate"] <= high
    assert effusion["n_stated_present"] >= 15 and effusion["detection_rate"] >= 0.9
    assert effusion["n_stated_absent"] >= 15 and effusion["false_positive_rate"] <= 0.1
    assert good["n_uniform_images"] == 0 and effusion["threshold"] == 0.5
    assert good["architecture"] == "tiny" and good["seed"] == 0

    # A generator that ignores the finding: radiographs without effusion, prompted with one.
    normal = [image for image, value in zip(test.images, test.labels[:, column], strict=True) if value == 0]
    ignored = abnormality_insertion(real_classifier, normal, torch.ones(len(normal), 1), [EFFUSION])
    assert ignored["findings"][EFFUSION]["detection_rate"] <= 0.1
    assert ignored["findings"][EFFUSION]["false_positive_rate"] is None  # no prompt stated it absent


def test_abnormality_insertion_counts_uniform_images(real_classifier):
    """On blank images (black, grey, white) the classifier's output is arbitrary, so the protocol
    counts them rather than trusting the detection rate."""
    blanks = [Image.new("L", (64, 77), value) for value in (0, 1, 128, 255)]
    result = abnormality_insertion(real_classifier, blanks, torch.ones(4, 1), [EFFUSION])
    assert result["n_uniform_images"] == 4 and result["findings"][EFFUSION]["n_uniform_stated_present"] == 4
    assert result["findings"][EFFUSION]["n_uniform_stated_absent"] == 0
    with pytest.raises(ValueError, match="findings"):
        abnormality_insertion(real_classifier, blanks, torch.ones(4, 1), [EFFUSION], ["Edema"])


def test_augmentation_protocol_reports_three_runs_on_real_test(phantoms):
    train, test = phantoms["train"], phantoms["test"]
    names = [EFFUSION, "Cardiomegaly"]
    real = LabelledImages(train.images[:60], train.labels[:60], train.label_names)
    synthetic = LabelledImages(train.images[60:100], train.labels[60:100], train.label_names)
    settings = ClassifierSettings(arch="tiny", image_size=64, epochs=2, lr=1e-3, batch_size=16)
    result = augmentation_protocol(real, synthetic, test, settings, label_names=names)

    assert result["labels"] == names and result["n_test"] == len(test) and result["architecture"] == "tiny"
    assert {name: run["n_train"] for name, run in result["runs"].items()} == {
        "real": 60,
        "synthetic": 40,
        "real+synthetic": 100,
    }
    assert result["runs"]["real"]["macro_minus_real"] == {"accuracy": 0.0, "auroc": 0.0}
    for run in result["runs"].values():
        assert set(run["test"]["per_label"]) == set(names)
        assert run["test"]["n_images"] == len(test) and run["steps"] == 2 * math.ceil(run["n_train"] / 16)


def test_augmentation_protocol_with_validation_thresholds(phantoms):
    train, val, test = phantoms["train"], phantoms["val"], phantoms["test"]
    real = LabelledImages(train.images[:40], train.labels[:40], train.label_names)
    settings = ClassifierSettings(arch="tiny", image_size=64, epochs=1, lr=1e-3, threshold="validation")
    result = augmentation_protocol(
        real, real, test, settings, real_validation=val, label_names=[EFFUSION], resamples=40
    )
    threshold = result["runs"]["synthetic"]["thresholds"][EFFUSION]
    assert 0 < threshold < 1
    assert result["runs"]["synthetic"]["test"]["per_label"][EFFUSION]["threshold"] == threshold
    # "synthetic" is the same data, settings and seed as "real": the same network. The bootstrap is
    # paired (the same test resamples for every run), so their difference is exactly 0 on every
    # resample while each run's own interval is as wide as the test set makes it.
    synthetic_ci = result["runs"]["synthetic"]["test"]["ci"]
    assert synthetic_ci["minus_real"] == {"accuracy": [0.0, 0.0], "auroc": [0.0, 0.0]}
    low, high = synthetic_ci["macro"]["auroc"]
    assert low < result["runs"]["synthetic"]["test"]["macro"]["auroc"] <= high and high - low > 0.01
    assert synthetic_ci[EFFUSION]["accuracy"] == result["runs"]["real"]["test"]["ci"][EFFUSION]["accuracy"]


def test_augmentation_protocol_reuses_a_given_real_classifier(phantoms, real_classifier):
    train, test = phantoms["train"], phantoms["test"]
    names = list(train.label_names)
    few = LabelledImages(train.images[:20], train.labels[:20], names)
    result = augmentation_protocol(train, few, test, TINY, label_names=names, real_classifier=real_classifier)
    expected = evaluate(predict(real_classifier, test.images), test.labels, names)
    assert result["runs"]["real"]["test"] == expected
    assert result["runs"]["real"]["steps"] == real_classifier.steps
    with pytest.raises(ValueError, match="settings and labels"):
        augmentation_protocol(train, few, test, replace(TINY, epochs=1), real_classifier=real_classifier)


def test_labelled_images_from_records_select_and_combine(phantoms):
    test = phantoms["test"]
    assert test.label_names == list(LABELS) and test.labels.shape == (len(test), 14)
    assert torch.isnan(test.labels[:, test.label_names.index("Atelectasis")]).all()  # never mentioned
    picked = test.select([EFFUSION, "Cardiomegaly"])
    assert picked.label_names == [EFFUSION, "Cardiomegaly"]
    torch.testing.assert_close(
        picked.labels[:, 0], test.labels[:, test.label_names.index(EFFUSION)], equal_nan=True
    )
    assert len(picked + picked) == 2 * len(test)
    with pytest.raises(ValueError, match="not among"):
        test.select(["Tuberculosis"])


def test_penultimate_features_are_what_the_last_layer_receives(phantoms, real_classifier):
    images = phantoms["test"].images[:5]
    features = penultimate_features(real_classifier, images, batch_size=2)
    network = real_classifier.network.eval()
    pixels = torch.stack([image_tensor(image, TINY.image_size, "tiny") for image in images])
    with torch.no_grad():
        body = network[:-1](pixels)  # the tiny CNN up to (not including) its final Linear
        logits = network[-1](torch.from_numpy(features).float())
    assert features.dtype == np.float64 and features.shape == (5, network[-1].in_features)
    # (batches of 2 here, of 5 there: float32 results differ in the last digits)
    np.testing.assert_allclose(features, body.double().numpy(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, network(pixels))


def test_domain_distances_are_small_for_real_images_and_large_for_blank_ones(phantoms, real_classifier):
    """In the classifier's features, two samples of real phantoms are close and real phantoms
    and uniform gray images far apart. KID is unbiased, so near 0 for the same distribution; FID
    with 100 images of 1024-d features carries a large small-sample bias, but still orders them."""
    real, other_real = phantoms["train"].images[:100], phantoms["train"].images[100:200]
    blank = [Image.new("RGB", (64, 64), (v, v, v)) for v in range(50, 150)]
    features = {name: penultimate_features(real_classifier, images)
                for name, images in (("real", real), ("other", other_real), ("blank", blank))}  # fmt: skip
    same = fid_kid_rows(features["real"], features["other"], 0, 0, None, {})
    apart = fid_kid_rows(features["real"], features["blank"], 0, 0, None, {})
    value = {
        name: {r["metric"]: r["value"] for r in rows} for name, rows in (("same", same), ("apart", apart))
    }
    assert value["apart"]["kid"] > 20 * abs(value["same"]["kid"])
    assert value["apart"]["fid"] > 2 * value["same"]["fid"]
    assert same[0]["n_generated"] == 100
