"""The classifier protocols as `medsd evaluate` runs them on a sampling run and a labelled dataset.

One classifier is trained on the real training split and shared: the insertion protocol scores
the generated images with it, and it is the augmentation protocol's "real" run (same settings,
same seed, so training it twice would give the same network). A generated image's labels are
what its prompt's records stated (`Generated.stated_labels`); images without labels take no part.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .classifier import (
    ClassifierSettings,
    ImageInput,
    LabelledImages,
    TrainedClassifier,
    penultimate_features,
    train_classifier,
)
from .protocols import abnormality_insertion, augmentation_protocol
from .suite import Generated, fid_and_kid

log = logging.getLogger(__name__)

PROTOCOLS = ("insertion", "augmentation")


def classifier_protocols(
    generated: Generated,
    real_train: LabelledImages,
    real_test: LabelledImages,
    real_validation: LabelledImages | None,
    settings: ClassifierSettings,
    protocols: Sequence[str] = PROTOCOLS,
    findings: Sequence[str] | None = None,
    resamples: int = 0,
    labels: Sequence[str] | None = None,
) -> tuple[dict, list[dict], TrainedClassifier]:
    """Run the chosen protocols; returns (their full reports, flat metric rows, the classifier
    trained on the real training split).

    labels: the labels the classifiers learn and are tested on; default every label of the
    generated images that the real ones carry too. findings: the labels the insertion protocol
    checks; default every label that at least one generated image's prompt states present.
    """
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"unknown classifier protocol(s) {unknown}: choose from {list(PROTOCOLS)}")
    manifest_names, stated, labelled, conflicts = generated.stated_labels()
    names = [name for name in manifest_names if name in real_train.label_names]
    if labels:
        unknown = [name for name in labels if name not in names]
        if unknown:
            raise ValueError(f"labels {unknown} are not carried by both the generated and real images")
        names = list(labels)
    if not names:
        raise ValueError(
            f"the generated images' labels share no name with the real ones {real_train.label_names}"
        )
    images = [path for path, keep in zip(generated.paths, labelled.tolist(), strict=True) if keep]
    synthetic = LabelledImages(images, stated[labelled], manifest_names).select(names)
    real_train, real_test = real_train.select(names), real_test.select(names)
    real_validation = real_validation.select(names) if real_validation is not None else None
    classifier = train_classifier(real_train.images, real_train.labels, names, settings, real_validation)
    reports: dict = {
        "labels": names,
        "n_generated_labelled": len(synthetic),
        "n_generated_unlabelled": int((~labelled).sum()),
        "conflicting_label_values": conflicts,
    }
    label = describe(settings, len(real_train), len(real_test))
    rows: list[dict] = []
    if "insertion" in protocols:
        chosen = list(findings) if findings else stated_present(synthetic)
        insertion = abnormality_insertion(
            classifier, synthetic.images, synthetic.labels, names, chosen, resamples
        )
        reports["insertion"] = insertion
        rows += insertion_rows(insertion, {**label, "n_generated": len(synthetic)})
    if "augmentation" in protocols:
        augmentation = augmentation_protocol(
            real_train, synthetic, real_test, settings, real_validation, names, classifier, resamples
        )
        reports["augmentation"] = augmentation
        rows += augmentation_rows(augmentation, {**label, "n_generated": len(synthetic)})
    return reports, rows, classifier


def classifier_feature_distances(
    classifier: TrainedClassifier,
    real: Sequence[ImageInput],
    generated: Sequence[ImageInput],
    resamples: int,
    seed: int,
) -> list[dict]:
    """FID and KID (with bootstrap intervals) in the penultimate features of the classifier
    trained on the real training split: a domain-feature FID that needs no downloaded weights."""
    settings = classifier.settings
    pairs = fid_and_kid(
        penultimate_features(classifier, real), penultimate_features(classifier, generated), resamples, seed
    )
    label = describe(settings, classifier.n_train, len(real))
    label["extractor"] = "domain-" + label["extractor"] + ", penultimate layer"
    label.update(n_real=len(real), n_generated=len(generated))
    return [{**row, **label} for row in pairs]


def stated_present(synthetic: LabelledImages) -> list[str]:
    """Labels stated present (1.0) by at least one image, in label order."""
    present = (synthetic.labels == 1).any(dim=0).tolist()
    chosen = [name for name, any_present in zip(synthetic.label_names, present, strict=True) if any_present]
    if not chosen:
        raise ValueError("no generated image's prompt states a finding present: nothing to insert")
    return chosen


def describe(settings: ClassifierSettings, n_train: int, n_test: int) -> dict:
    """What every classifier number was computed with."""
    start = f"from {Path(settings.pretrained_weights).name}" if settings.pretrained_weights else "random init"
    return {
        "extractor": f"classifier {settings.arch} ({start}, {settings.epochs} epochs, seed {settings.seed})",
        "preprocessing": f"grayscale, shorter side to {settings.image_size}, centre crop, "
        + ("scaled to [-1024, 1024]" if settings.arch == "xrv-densenet121" else "ImageNet mean/std"),
        "n_real": n_train,
        "n_test": n_test,
    }


def insertion_rows(report: dict, label: dict) -> list[dict]:
    rows = []
    for finding, result in report["findings"].items():
        for rate, group in (("detection_rate", "stated_present"), ("false_positive_rate", "stated_absent")):
            if result[rate] is None:
                continue
            low, high = result.get(f"{rate}_ci", (None, None))
            rows.append(
                {
                    "metric": f"insertion_{rate}",
                    "label": finding,
                    "value": result[rate],
                    "ci_low": low,
                    "ci_high": high,
                    "n_scored": result[f"n_{group}"],
                    "n_uniform": result[f"n_uniform_{group}"],
                    "threshold": result["threshold"],
                    **label,
                }
            )
    return rows


def augmentation_rows(report: dict, label: dict) -> list[dict]:
    """One row per run and metric: the macro, the macro minus the real-only run, and per label."""
    rows = []
    for run, result in report["runs"].items():
        test, ci = result["test"], result["test"].get("ci", {})
        common = {"run": run, "n_train": result["n_train"], **label}
        for metric in ("accuracy", "auroc"):
            entries = [("macro", test["macro"][metric], "macro")]
            if run != "real":
                entries.append(("macro minus real", result["macro_minus_real"][metric], "minus_real"))
            entries += [(name, m[metric], name) for name, m in test["per_label"].items()]
            for label_name, value, key in entries:
                if value is None:
                    continue
                low, high = ci.get(key, {}).get(metric, (None, None))
                rows.append(
                    {
                        "metric": f"augmentation_{metric}",
                        "label": label_name,
                        "value": float(value),
                        "ci_low": low,
                        "ci_high": high,
                        **common,
                    }
                )
    return rows
