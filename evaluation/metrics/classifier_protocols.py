"""The papers' classifier protocols as `medsd evaluate` runs them, with leakage refused by construction.

One classifier trained on the real training split is shared (`EvaluationContext.classifier`):
the insertion protocol scores the generated images with it, and it is the augmentation protocol's
"real" run. A generated image's labels are what its prompt's records stated
(`Generated.stated_labels`); images without labels take no part.

What trains a classifier never comes from what it is tested on:
- augmentation trains on synthetic images and tests on the real test split, so its synthetic
  images must be rendered from TRAINING prompts: rendered from the test reports, they carry
  exactly the test labels of the studies they are scored on. It uses the sample folder given with
  --augmentation-generated, else --generated, and refuses either unless its recorded prompt split
  is the training split;
- insertion tests the real-trained classifier on generated images, so they must not be rendered
  from the training reports whose real images trained it: it refuses a set prompted from the
  training split (test prompts are what the papers used).
Asked for explicitly (--protocols), a refused protocol stops the evaluation with the reason;
by default it is listed as skipped with the reason and the rest runs.
"""

from __future__ import annotations

import pandas as pd
import torch

from ..classifier import LabelledImages, TrainedClassifier, describe, predict
from ..insertion_outcomes import outcome_table, write_outcomes
from ..protocols import abnormality_insertion, augmentation_protocol
from ..sample_folder import Generated
from . import Metric
from .context import EvaluationContext, NotApplicable

PROTOCOLS = ("insertion", "augmentation")


class LeakageError(SystemExit):
    """An explicitly requested protocol would test a classifier on what trained it."""


def refusal(context: EvaluationContext, protocol: str, generated: Generated, folder: str) -> str | None:
    """Why `protocol` may not run on `generated`, or None when it may."""
    args, split = context.args, generated.prompt_split
    source = (
        "a prompt file" if generated.prompt_source else "an unrecorded source (a folder from an older medsd)"
    )
    origin = f"the '{split}' split" if split else source
    if protocol == "augmentation" and split != args.train_split:
        return (
            f"the augmentation protocol trains classifiers on synthetic images and tests them on the real "
            f"'{args.real_split}' split, so its synthetic images must be prompted from the training split; "
            f"{folder} was prompted from {origin}. Sample the training prompts (medsd sample ... --split "
            f"{args.train_split or 'train'}) and pass that folder with --augmentation-generated"
        )
    if protocol == "insertion" and split is not None and split == args.train_split:
        return (
            f"the insertion protocol scores generated images with a classifier trained on the real "
            f"'{split}' split, and {folder} was prompted from those same reports; sample the test prompts "
            f"(medsd sample ... --split {args.real_split})"
        )
    return None


def chosen_protocols(context: EvaluationContext) -> list[str]:
    """The protocols that may run; an explicitly requested one that may not raises LeakageError."""
    explicit = context.args.protocols is not None
    sets = {
        "insertion": (context.generated, context.args.generated),
        "augmentation": augmentation_set(context),
    }
    chosen = []
    for protocol in context.args.protocols if explicit else PROTOCOLS:
        reason = refusal(context, protocol, *sets[protocol])
        if reason is None:
            chosen.append(protocol)
        elif explicit:
            raise LeakageError(f"medsd evaluate: refused: {reason}")
        else:
            context.skip(f"{protocol} protocol", reason)
    if not chosen:
        raise NotApplicable(
            "no classifier protocol may run on these sample folders (see the skipped protocols)"
        )
    return chosen


def augmentation_set(context: EvaluationContext) -> tuple[Generated, str]:
    if context.augmentation_generated is not None:
        return context.augmentation_generated, context.args.augmentation_generated
    return context.generated, context.args.generated


def labelled_synthetic(
    generated: Generated, names: list[str]
) -> tuple[LabelledImages, list[list[int]], dict, list[int]]:
    """The labelled generated images, their prompt groups, counts for the report, and their
    positions among the generated images."""
    manifest_names, stated, labelled, conflicts = generated.stated_labels()
    missing = [name for name in names if name not in manifest_names]
    if missing:
        raise NotApplicable(f"the generated images' prompts carry no labels {missing}")
    rows = labelled.nonzero().flatten().tolist()
    images = LabelledImages([generated.paths[i] for i in rows], stated[labelled], manifest_names).select(
        names
    )
    counts = {
        "n_generated_labelled": len(rows),
        "n_generated_unlabelled": int((~labelled).sum()),
        "conflicting_label_values": conflicts,
    }
    return images, generated.groups(rows), counts, rows


def compute(context: EvaluationContext) -> list[dict]:
    if context.classifier_settings is None:
        raise NotApplicable("--classifier none")
    protocols = chosen_protocols(context)
    args, settings = context.args, context.classifier_settings
    names = context.classifier_labels()
    classifier = context.classifier()
    real_train = context.data.labelled(context.require_train_split()).select(names)
    real_test = context.data.labelled(args.real_split).select(names)
    label = describe(settings, len(real_train), len(real_test))
    reports: dict = {"labels": names, "classifier_start": label["classifier_start"]}
    rows: list[dict] = []
    if "insertion" in protocols:
        synthetic, groups, counts, positions = labelled_synthetic(context.generated, names)
        findings = list(args.findings) if args.findings else stated_present(synthetic)
        probabilities = predict(classifier, synthetic.images)
        insertion = abnormality_insertion(
            classifier, synthetic.images, synthetic.labels, names, findings, args.bootstrap, groups=groups,
            probabilities=probabilities,
        )  # fmt: skip
        outcomes = insertion_outcomes(context, positions, synthetic, findings, classifier, probabilities)
        reports["insertion"] = {
            **insertion,
            **counts,
            "prompt_split": context.generated.prompt_split,
            **outcomes,
        }
        rows += insertion_rows(insertion, {**label, "n_generated": len(synthetic)}, args.bootstrap)
    if "augmentation" in protocols:
        generated, folder = augmentation_set(context)
        synthetic, _, counts, _ = labelled_synthetic(generated, names)
        validation = (
            context.data.labelled(args.val_split).select(names)
            if settings.threshold == "validation"
            else None
        )
        augmentation = augmentation_protocol(
            real_train, synthetic, real_test, settings, validation, names, classifier, args.bootstrap
        )
        reports["augmentation"] = {
            **augmentation,
            **counts,
            "generated": str(folder),
            "prompt_split": generated.prompt_split,
        }
        rows += augmentation_rows(augmentation, {**label, "n_generated": len(synthetic)}, args.bootstrap)
    context.reports["classifier_protocols"] = reports
    return rows


def insertion_outcomes(
    context: EvaluationContext,
    positions: list[int],
    synthetic: LabelledImages,
    findings: list[str],
    classifier: TrainedClassifier,
    probabilities: torch.Tensor,
) -> dict:
    """Write what each scored image's prompt stated and whether the classifier called it positive
    (`evaluation.insertion_outcomes`) beside metrics.json. For the report: the classifier's digest
    and the file's name (None without a folder to write to)."""
    digest = classifier.digest()
    if context.artefacts is None:
        return {"classifier_digest": digest, "outcomes": None}
    generated = context.generated
    images = pd.DataFrame({"prompt_index": generated.prompt_index, "prompt": generated.prompts})
    images["k"] = generated.k or images.groupby("prompt_index").cumcount()
    images["seed"] = pd.array(generated.seeds or [None] * len(images), dtype="Int64")
    images = images.iloc[positions].reset_index(drop=True)
    stated = synthetic.labels[:, [synthetic.label_names.index(f) for f in findings]]
    columns = [classifier.label_names.index(f) for f in findings]
    thresholds = torch.tensor([classifier.thresholds[f] for f in findings])
    positive = probabilities[:, columns] >= thresholds
    table = outcome_table(images, findings, stated, positive, digest)
    return {"classifier_digest": digest, "outcomes": write_outcomes(context.artefacts, table).name}


def stated_present(synthetic: LabelledImages) -> list[str]:
    """Labels stated present (1.0) by at least one image, in label order."""
    present = (synthetic.labels == 1).any(dim=0).tolist()
    chosen = [name for name, any_present in zip(synthetic.label_names, present, strict=True) if any_present]
    if not chosen:
        raise NotApplicable("no generated image's prompt states a finding present: nothing to insert")
    return chosen


def insertion_rows(report: dict, label: dict, resamples: int) -> list[dict]:
    method = (
        f"percentile bootstrap over {report['bootstrap']['over']}, {resamples} resamples"
        if resamples
        else None
    )
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
                    "ci_method": method,
                    "n_scored": result[f"n_{group}"],
                    "n_uniform": result[f"n_uniform_{group}"],
                    "threshold": result["threshold"],
                    **label,
                }
            )
    return rows


def augmentation_rows(report: dict, label: dict, resamples: int) -> list[dict]:
    """One row per run and metric: the macro, the macro minus the real-only run, and per label."""
    method = (
        f"paired percentile bootstrap over real test images, {resamples} resamples" if resamples else None
    )
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
                        "ci_method": method,
                        **common,
                    }
                )
    return rows


METRIC = Metric(
    name="classifier protocols",
    needs="a config's labelled training and test splits, labelled generated prompts, a classifier",
    rows=(
        "insertion_detection_rate",
        "insertion_false_positive_rate",
        "augmentation_accuracy",
        "augmentation_auroc",
    ),
    plotted=("insertion_detection_rate", "insertion_false_positive_rate", "augmentation_auroc"),
    compute=compute,
)
