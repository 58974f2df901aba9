"""What the metrics of one `medsd evaluate` share: the image sets, their features per source,
the labelled real splits and the classifier trained on the real training split, each made once
on first use, so that a metric asks for what it needs and nothing is computed twice."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..classifier import (
    ClassifierSettings,
    LabelledImages,
    TrainedClassifier,
    describe,
    penultimate_features,
    train_classifier,
)
from ..features import CLIPFeatures
from ..sample_folder import Generated
from ..suite import FeatureSource, ImageSet, TensorFeatures

log = logging.getLogger(__name__)

# Image sets a metric can ask for: the generated images, the real split they are compared with,
# the real training split (copying test, classifiers).
SETS = ("generated", "real", "train")


class RealImages(Protocol):
    """The real data: image paths and labelled images of a split (a config's DataModule)."""

    folder: str | None

    def paths(self, split: str) -> list: ...

    def labelled(self, split: str) -> LabelledImages: ...


class NotApplicable(ValueError):
    """A metric cannot run on this evaluation's inputs; the message says why (it is listed as skipped)."""


@dataclass
class EvaluationContext:
    """args: `medsd evaluate`'s settings (real_split, train_split, bootstrap, seed, ...);
    sources: the feature sources whose weights were found, by name; classifier_settings: None when
    `--classifier none`."""

    generated: Generated
    data: RealImages
    args: Any
    sources: dict[str, FeatureSource]
    classifier_settings: ClassifierSettings | None = None
    clip: CLIPFeatures | None = None
    cache_dir: Path | None = None
    artefacts: Path | None = None  # where metrics write files beside metrics.json (tables, grids)
    augmentation_generated: Generated | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # what could not run -> why
    reports: dict = field(default_factory=dict)  # full reports beside the rows (classifier protocols)
    _sets: dict = field(default_factory=dict, repr=False)
    _classifier: TrainedClassifier | None = field(default=None, repr=False)

    def skip(self, name: str, reason: str) -> None:
        log.warning("skipping %s: %s", name, reason)
        self.skipped[name] = reason

    def images(self, which: str) -> ImageSet:
        if which not in SETS:
            raise ValueError(f"unknown image set {which!r}: one of {SETS}")
        if which not in self._sets:
            if which == "generated":
                self._sets[which] = ImageSet(list(self.generated.paths), self.args.size)
            else:
                split = self.args.real_split if which == "real" else self.require_train_split()
                self._sets[which] = ImageSet(self.data.paths(split), self.size, self.cache_dir)
        return self._sets[which]

    @property
    def size(self) -> int:
        """The common resolution: --size, else the generated images' own (one size: a mix is refused),
        to which the real images are resized."""
        return self.args.size or self.images("generated").uint8().shape[-1]

    def features(self, source: str, which: str) -> np.ndarray:
        return self.images(which).features(self.sources[source])

    def clip_features(self, which: str) -> np.ndarray:
        """The normalised CLIP image embeddings (prompt alignment, CMMD), whatever the FID protocol."""
        if self.clip is None:
            raise NotApplicable("needs CLIP weights (--clip-weights)")
        return self.images(which).features(TensorFeatures(self.clip, protocol="open_clip"))

    def require_train_split(self) -> str:
        if not self.args.train_split:
            raise NotApplicable("needs the real training split (--train-split is empty)")
        if self.data.folder:
            raise NotApplicable("needs a config's training split, not only --real-folder")
        return self.args.train_split

    def counts(self, **extra) -> dict:
        """N of the generated and real sets, for a row."""
        return {"n_generated": len(self.generated.paths), "n_real": len(self.images("real")), **extra}

    def prompt_groups(self) -> list[list[int]]:
        return self.generated.groups()

    def classifier(self) -> TrainedClassifier:
        """The classifier trained on the real training split (shared by the protocols and the
        domain-feature distances), trained on first use."""
        if self.classifier_settings is None:
            raise NotApplicable("needs a classifier (--classifier none was given)")
        if self._classifier is None:
            names = self.classifier_labels()
            train = self.data.labelled(self.require_train_split()).select(names)
            validation = None
            if self.classifier_settings.threshold == "validation":
                validation = self.data.labelled(self.args.val_split).select(names)
            self._classifier = train_classifier(
                train.images, train.labels, names, self.classifier_settings, validation
            )
        return self._classifier

    def classifier_labels(self) -> list[str]:
        """The labels the classifiers learn: --classifier-labels, else every label of the generated
        images that the real training images carry too."""
        manifest_names = self.generated.stated_labels()[0]
        real_names = self.data.labelled(self.require_train_split()).label_names
        names = [name for name in manifest_names if name in real_names]
        if self.args.classifier_labels:
            unknown = [name for name in self.args.classifier_labels if name not in names]
            if unknown:
                raise NotApplicable(f"labels {unknown} are not carried by both the generated and real images")
            names = list(self.args.classifier_labels)
        if not names:
            raise NotApplicable(f"the generated images' labels share no name with the real ones {real_names}")
        return names


@dataclass
class ClassifierFeatures:
    """The penultimate features of the classifier trained on the real training split: a domain
    feature space that needs no downloaded weights (FID, KID, PRDC in it are domain-feature
    distances). Its label names the trained classifier, so that cached features of one classifier
    are never read for another."""

    context: EvaluationContext

    @property
    def label(self) -> dict:
        classifier = self.context.classifier()
        label = describe(classifier.settings, classifier.n_train, len(self.context.images("real")))
        return {
            "protocol": "domain features",
            "extractor": "domain-" + label["extractor"] + ", penultimate layer",
            "weights": f"trained here on the '{self.context.args.train_split}' split",
            "preprocessing": label["preprocessing"],
        }

    def features_of(self, images: ImageSet) -> np.ndarray:
        return penultimate_features(self.context.classifier(), images.paths)
