"""The papers' classifier protocols, with bootstrap confidence intervals.

Two protocols judge generated images with a classifier rather than a distance between feature
distributions, because they ask a clinical question: does the image show what its prompt says?

- `abnormality_insertion` (Chambon et al. 2022): a DenseNet-121 trained on real radiographs scores
  the synthetic images whose prompts state a finding; the share it calls positive is the
  detection rate (95% for pleural effusion in the paper's best model).
- `augmentation_protocol` (RoentGen): the same classifier is trained on real, on synthetic and on
  real + synthetic images and each is tested on the same real test split.

Intervals (`resamples` > 0) are percentile bootstraps over what was scored: the synthetic images'
prompts for insertion (a prompt's images together), the real test images for augmentation. The
three augmentation runs are scored on the same resamples (a paired bootstrap), so the interval of a
difference between runs is not widened by test-set noise that the runs share.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch

from .bootstrap import bootstrap_intervals
from .classifier import (
    ClassifierSettings,
    ImageInput,
    LabelledImages,
    TrainedClassifier,
    evaluate,
    gray_pixels,
    predict,
    train_classifier,
)

log = logging.getLogger(__name__)

# Pixel standard deviation (grayscale in [0, 1]) under which a generated image counts as uniform
# (blank: black, grey or white), not as a radiograph.
UNIFORM_STD = 0.02


def abnormality_insertion(
    classifier: TrainedClassifier,
    synthetic_images: Sequence[ImageInput],
    synthetic_labels: torch.Tensor,
    label_names: Sequence[str],
    findings: Sequence[str] = ("Pleural Effusion",),
    resamples: int = 0,
    confidence: float = 0.95,
    groups: Sequence[Sequence[int]] | None = None,
    probabilities: torch.Tensor | None = None,
) -> dict:
    """Chambon et al.'s check: does a classifier trained on REAL images see the finding a prompt asked for?

    synthetic_labels: [N, L] what each image's prompt states (columns `label_names`). Per finding:
    the detection rate over images whose prompt states it (1.0), and the false-positive rate over
    images whose prompt states it is absent (0.0), None when there are none. A high detection rate
    alone could come from a classifier that calls everything positive; the false-positive rate
    rules that out. With `resamples`, each rate gets a bootstrap interval (`*_ci`), over `groups`
    (the images of each prompt, resampled together: they are not independent) when given.
    probabilities: the classifier's predictions on the images (`predict`), when already made.

    Uniform images (blank black, grey or white ones, as a generator's fp16 NaNs produce) are
    counted per group (`n_uniform_*`) but scored like any other: the rates stay the protocol's. A
    classifier's output on an image so unlike a radiograph is arbitrary (it may well call it
    positive), so a detection rate means little when uniform images are among those scored.
    """
    synthetic = LabelledImages(list(synthetic_images), synthetic_labels, list(label_names))
    missing = [f for f in findings if f not in classifier.label_names or f not in synthetic.label_names]
    if missing:
        raise ValueError(
            f"findings {missing} must be labels of both the classifier {classifier.label_names} "
            f"and the synthetic images {synthetic.label_names}"
        )
    if probabilities is None:
        probabilities = predict(classifier, synthetic.images)
    flat = torch.tensor([is_uniform(image, classifier.settings.image_size) for image in synthetic.images])
    results, hits = {}, {}
    for finding in findings:
        stated = synthetic.labels[:, synthetic.label_names.index(finding)]
        scores = probabilities[:, classifier.label_names.index(finding)]
        threshold = classifier.thresholds[finding]
        hits[finding] = ((scores >= threshold).numpy(), (stated == 1).numpy(), (stated == 0).numpy())
        results[finding] = {
            "threshold": threshold,
            **_positive_share(scores, flat, stated == 1, threshold, "stated_present", "detection_rate"),
            **_positive_share(scores, flat, stated == 0, threshold, "stated_absent", "false_positive_rate"),
        }
    if resamples:

        def rates(indices: np.ndarray) -> dict[str, float]:
            return {
                f"{finding}|{rate}": _share(positive[indices], group[indices])
                for finding, (positive, present, absent) in hits.items()
                for rate, group in (("detection_rate", present), ("false_positive_rate", absent))
            }

        seed = classifier.settings.seed
        intervals = bootstrap_intervals(rates, len(synthetic), resamples, confidence, seed, groups)
        for key, interval in intervals.items():
            finding, rate = key.split("|")
            results[finding][f"{rate}_ci"] = list(interval)
    return {
        "protocol": "abnormality insertion (Chambon et al. 2022): real-trained classifier, synthetic images",
        "n_images": len(synthetic),
        "n_uniform_images": int(flat.sum()),
        "findings": results,
        "seed": classifier.settings.seed,
        "architecture": classifier.settings.arch,
        "bootstrap": {
            "resamples": resamples,
            "confidence": confidence,
            "over": "prompts (their images together)" if groups is not None else "synthetic images",
        },
        "classifier": classifier.describe(),
    }


def _share(positive: np.ndarray, group: np.ndarray) -> float:
    """Share of `positive` among the `group` entries; NaN when the group is empty."""
    return float(positive[group].mean()) if group.any() else float("nan")


def _positive_share(
    scores: torch.Tensor, uniform: torch.Tensor, chosen: torch.Tensor, threshold: float, group: str, rate: str
) -> dict:
    """Of the `chosen` images: how many, how many uniform, how many reach `threshold`, that share
    and the mean score."""
    scores = scores[chosen]
    n, hits = len(scores), int((scores >= threshold).sum())
    return {
        f"n_{group}": n,
        f"n_uniform_{group}": int(uniform[chosen].sum()),
        f"n_predicted_positive_{group}": hits,
        rate: hits / n if n else None,
        f"mean_probability_{group}": float(scores.mean()) if n else None,
    }


def is_uniform(image: ImageInput, size: int) -> bool:
    """Near-uniform: a pixel standard deviation under UNIFORM_STD (a radiograph's is about 0.2)."""
    return float(gray_pixels(image, size).std()) < UNIFORM_STD


def augmentation_protocol(
    real_train: LabelledImages,
    synthetic: LabelledImages,
    real_test: LabelledImages,
    settings: ClassifierSettings | None = None,
    real_validation: LabelledImages | None = None,
    label_names: Sequence[str] | None = None,
    real_classifier: TrainedClassifier | None = None,
    resamples: int = 0,
    confidence: float = 0.95,
) -> dict:
    """RoentGen's check: train on real, on synthetic and on real + synthetic; test each on real.

    All three use the same settings and seed (the same epochs, so larger sets train for more steps;
    `steps` is reported). label_names: the labels to train and test (default: real_train's); every
    set must carry them. Thresholds, when chosen, come from `real_validation`. real_classifier:
    one already trained on `real_train` with these settings and labels (the insertion protocol's),
    used instead of training it again. Reports each run's test metrics and its macro accuracy and
    AUROC minus the real-only run's; with `resamples`, paired bootstrap intervals of both (`ci`).
    """
    settings = settings or ClassifierSettings()
    names = list(label_names or real_train.label_names)
    real_train, synthetic, real_test = (s.select(names) for s in (real_train, synthetic, real_test))
    if real_classifier is not None and (
        real_classifier.settings != settings or real_classifier.label_names != names
    ):
        raise ValueError("real_classifier must be trained with the protocol's settings and labels")
    training_sets = {"real": real_train, "synthetic": synthetic, "real+synthetic": real_train + synthetic}
    runs, probabilities = {}, {}
    for name, data in training_sets.items():
        if name == "real" and real_classifier is not None:
            classifier = real_classifier
        else:
            log.info("augmentation protocol: training on %s (%d images)", name, len(data))
            classifier = train_classifier(data.images, data.labels, names, settings, real_validation)
        probabilities[name] = predict(classifier, real_test.images)
        test = evaluate(probabilities[name], real_test.labels, names, classifier.thresholds, settings.blank)
        runs[name] = {
            "n_train": len(data),
            "steps": classifier.steps,
            "thresholds": classifier.thresholds,
            "test": test,
        }
    for run in runs.values():
        run["macro_minus_real"] = {
            metric: _difference(run["test"]["macro"][metric], runs["real"]["test"]["macro"][metric])
            for metric in ("accuracy", "auroc")
        }
    if resamples:
        _add_paired_intervals(runs, probabilities, real_test, names, settings, resamples, confidence)
    return {
        "protocol": "augmentation (RoentGen): train on real / synthetic / real+synthetic, test on real",
        "labels": names,
        "n_test": len(real_test),
        "seed": settings.seed,
        "architecture": settings.arch,
        "settings": asdict(settings),
        "bootstrap": {"resamples": resamples, "confidence": confidence, "over": "real test images (paired)"},
        "runs": runs,
    }


def _add_paired_intervals(
    runs: dict, probabilities: dict, test: LabelledImages, names: list[str], settings, resamples, confidence
) -> None:
    """Bootstrap intervals of each run's macro and per-label accuracy and AUROC, and of its macro
    difference to the real-only run, all on the same test resamples.

    A resample's macro AUROC averages the labels the full test set has an AUROC for; where one of
    them holds a single class in the resample the macro is undefined there (NaN, see
    `bootstrap_intervals`) rather than an average over different labels.
    """
    averaged = runs["real"]["test"]["macro"]["auroc_labels"]

    def scores(indices: np.ndarray) -> dict[str, float]:
        values = {}
        for name, probs in probabilities.items():
            thresholds = runs[name]["thresholds"]
            metrics = evaluate(probs[indices], test.labels[indices], names, thresholds, settings.blank)
            per_label = metrics["per_label"]
            aurocs = [per_label[label]["auroc"] for label in averaged]
            values[f"{name}|macro|auroc"] = (
                float(np.mean(aurocs)) if aurocs and None not in aurocs else float("nan")
            )
            values[f"{name}|macro|accuracy"] = _nan_if_none(metrics["macro"]["accuracy"])
            for label, m in per_label.items():
                for metric in ("accuracy", "auroc"):
                    values[f"{name}|{label}|{metric}"] = _nan_if_none(m[metric])
        for name in probabilities:
            for metric in ("accuracy", "auroc"):
                values[f"{name}|minus_real|{metric}"] = (
                    values[f"{name}|macro|{metric}"] - values[f"real|macro|{metric}"]
                )
        return values

    intervals = bootstrap_intervals(scores, len(test), resamples, confidence, settings.seed)
    for key, interval in intervals.items():
        name, part, metric = key.split("|")
        ci = runs[name]["test"].setdefault("ci", {})
        ci.setdefault(part, {})[metric] = list(interval)


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _difference(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference
