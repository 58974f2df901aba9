"""Multi-label chest X-ray classifiers: training, prediction, thresholds and test metrics.

The papers' protocols built on them (abnormality insertion, augmentation) are in `protocols.py`.

Labels follow CheXpert's values: 1.0 positive, 0.0 negative, -1.0 uncertain, NaN for blank ("not
mentioned"). Defaults, as in most CheXpert work: blank counts as negative (a report that does not
mention a finding usually means it is absent) and uncertain is left out of the loss ("ignore"),
so hedged reports neither teach nor punish the classifier. Test metrics always leave uncertain
labels out (their truth is unknown) and treat blanks by the same policy as training.

Predictions are positive when the probability is >= the label's threshold: 0.5 by default, or,
with `threshold="validation"`, the threshold that maximises Youden's J (sensitivity + specificity
- 1) on a real validation set, which suits rare findings better than 0.5. The threshold is always
chosen on real images, never on the test split or on the synthetic images being judged.

Images are read as grayscale, the shorter side resized and the centre cropped to `image_size`
(as torchxrayvision's evaluation does), then replicated to 3 channels and normalised with
ImageNet's statistics (torchvision DenseNet-121, tiny CNN), or kept as one channel scaled to
[-1024, 1024] (torchxrayvision's DenseNet-121, which can start from its chest X-ray weights). No
augmentation: flips would swap left and right.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models import densenet121

from datamodules.base import Record, stack_labels
from datamodules.images import load_image, to_rgb
from datamodules.safe_load import load_checkpoint
from datamodules.tables import check_choice

from .features import xrv_densenet

log = logging.getLogger(__name__)

ARCHS = ("densenet121", "xrv-densenet121", "tiny")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
BLANK_POLICIES = ("negative", "ignore")
# The ImageNet DenseNet-121 file torchvision downloads into the torch hub cache (never downloaded here).
DENSENET_IMAGENET_FILE = "densenet121-a639ec97.pth"
NOT_COMPARABLE = "random init, not comparable with Chambon et al. (an ImageNet-initialised DenseNet-121)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = str | os.PathLike | Image.Image


@dataclass(frozen=True)
class ClassifierSettings:
    """How a classifier is built and trained; every protocol result reports these.

    arch: "densenet121" (torchvision's, the papers' classifier, the default), "xrv-densenet121"
        (torchxrayvision's DenseNet-121 with a new head for our labels), or "tiny", a four-layer
        CNN for tests and CPU demonstrations only.
    pretrained_weights: a local file to start from: for "densenet121" torchvision's ImageNet state
        dict (`densenet121-a639ec97.pth`), for "xrv-densenet121" torchxrayvision's chest X-ray
        model file (`nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-
        sc15-seed0-best.pt`, densenet121-res224-all); None starts from random weights. Never
        downloaded.
    uncertain: what a -1.0 label becomes in training: "ignore" (masked out of the loss), "zeros"
        or "ones" (CheXpert's U-Zeros / U-Ones).
    blank: what a blank (NaN) label becomes in training and testing: "negative" or "ignore".
    threshold: a fixed probability (0.5), or "validation": per label, Youden's J on real validation
        images (see `fit_thresholds`).
    epochs: passes over the training images; with the same epochs a larger set trains for more steps.
    device: None picks CUDA when available. Reruns with the same seed give identical numbers on
        CPU (with the same number of torch threads); on GPU they may differ in the last digits
        (non-deterministic cuDNN kernels).
    """

    arch: str = "densenet121"
    image_size: int = 224
    pretrained_weights: str | None = None
    uncertain: str = "ignore"
    blank: str = "negative"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-2
    threshold: float | str = 0.5
    seed: int = 0
    device: str | None = None
    num_workers: int = 0

    def __post_init__(self):
        check_choice("arch", self.arch, ARCHS)
        check_choice("uncertain", self.uncertain, UNCERTAIN_POLICIES)
        check_choice("blank", self.blank, BLANK_POLICIES)
        if self.pretrained_weights is not None and self.arch == "tiny":
            raise ValueError("pretrained_weights are DenseNet-121 weights: not for arch 'tiny'")
        if self.threshold != "validation" and not (
            isinstance(self.threshold, float | int) and 0 < self.threshold < 1
        ):
            raise ValueError(f"threshold must be in (0, 1) or 'validation', got {self.threshold!r}")
        if self.image_size < 16 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("image_size must be >= 16, epochs and batch_size >= 1")


def describe(settings: ClassifierSettings, n_train: int, n_test: int) -> dict:
    """What every classifier number was computed with: a torchvision DenseNet-121 from random weights
    says it is not comparable with the papers' ImageNet-initialised one."""
    if settings.pretrained_weights:
        start = f"from {Path(settings.pretrained_weights).name}"
    else:
        start = NOT_COMPARABLE if settings.arch == "densenet121" else "random init"
    return {
        "protocol": "classifier protocols (Chambon et al. 2022 insertion; RoentGen augmentation)",
        "extractor": f"classifier {settings.arch} ({start}, {settings.epochs} epochs, seed {settings.seed})",
        "classifier_start": start,
        "weights": settings.pretrained_weights or "random init",
        "preprocessing": f"grayscale, shorter side to {settings.image_size}, centre crop, "
        + ("scaled to [-1024, 1024]" if settings.arch == "xrv-densenet121" else "ImageNet mean/std"),
        "n_real": n_train,
        "n_test": n_test,
    }


@dataclass
class LabelledImages:
    """Images with their labels: `labels[i, j]` is image i's value of `label_names[j]`
    (1.0 / 0.0 / -1.0, NaN for blank)."""

    images: list[ImageInput]
    labels: torch.Tensor
    label_names: list[str]

    def __post_init__(self):
        self.labels = torch.as_tensor(self.labels, dtype=torch.float32)
        if self.labels.shape != (len(self.images), len(self.label_names)):
            raise ValueError(
                f"labels must have shape [images, label names] = ({len(self.images)}, "
                f"{len(self.label_names)}), got {tuple(self.labels.shape)}"
            )
        _check_values(self.labels)

    @classmethod
    def from_records(cls, records: Sequence[Record]) -> LabelledImages:
        """The images and labels of DataModule records (e.g. `MIMICCXRDataModule.records("test")`)."""
        if not records or any(r.labels is None for r in records):
            raise ValueError("every record must carry labels (and there must be at least one)")
        names, labels = stack_labels([r.labels for r in records])
        return cls([r.image for r in records], labels, names)

    def select(self, names: Sequence[str]) -> LabelledImages:
        """The same images with only the label columns `names`, in that order."""
        missing = [n for n in names if n not in self.label_names]
        if missing:
            raise ValueError(f"labels {missing} are not among {self.label_names}")
        columns = [self.label_names.index(n) for n in names]
        return LabelledImages(self.images, self.labels[:, columns], list(names))

    def __add__(self, other: LabelledImages) -> LabelledImages:
        if other.label_names != self.label_names:
            raise ValueError(f"cannot combine label sets {self.label_names} and {other.label_names}")
        return LabelledImages(
            [*self.images, *other.images], torch.cat([self.labels, other.labels]), self.label_names
        )

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class TrainedClassifier:
    """A trained network with what is needed to use and report it.

    thresholds: label -> probability at or above which a prediction is positive.
    threshold_notes: label -> why its threshold is not the one the settings asked for.
    """

    network: nn.Module
    label_names: list[str]
    settings: ClassifierSettings
    thresholds: dict[str, float]
    n_train: int
    steps: int
    epoch_losses: list[float]
    threshold_notes: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict:
        """The classifier as a JSON-ready dict: settings, training size and thresholds."""
        return {
            "architecture": self.settings.arch,
            "settings": asdict(self.settings),
            "labels": self.label_names,
            "n_train": self.n_train,
            "steps": self.steps,
            "epoch_losses": self.epoch_losses,
            "thresholds": self.thresholds,
            "threshold_notes": self.threshold_notes,
        }

    def digest(self) -> str:
        """SHA-256 of what decides a prediction: the weights and buffers, the labels and thresholds.

        Two evaluations report the same digest only when they called images positive with the same
        classifier, which a paired comparison of their outcomes requires. On CPU the same real data,
        settings and seed give the same digest (see ClassifierSettings.device); on GPU they may not.
        """
        hasher = hashlib.sha256(json.dumps([self.label_names, self.thresholds], sort_keys=True).encode())
        for name, tensor in self.network.state_dict().items():
            value = tensor.detach().cpu()
            hasher.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            hasher.update(value.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return hasher.hexdigest()


# --- labels and loss -----------------------------------------------------------------------------


def label_targets(labels: torch.Tensor, uncertain: str = "ignore", blank: str = "negative"):
    """CheXpert values -> (targets in {0, 1}, mask: 1 where the value takes part in the loss).

    Blank (NaN) follows `blank`, uncertain (-1) follows `uncertain` (see ClassifierSettings).
    """
    check_choice("uncertain", uncertain, UNCERTAIN_POLICIES)
    check_choice("blank", blank, BLANK_POLICIES)
    _check_values(labels)
    is_blank, is_uncertain = torch.isnan(labels), labels == -1
    targets = (labels == 1).float()
    if uncertain == "ones":
        targets[is_uncertain] = 1.0
    mask = torch.ones_like(labels)
    if uncertain == "ignore":
        mask[is_uncertain] = 0.0
    if blank == "ignore":
        mask[is_blank] = 0.0
    return targets, mask


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the unmasked entries only, so ignored labels neither add
    loss nor dilute the average."""
    losses = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (losses * mask).sum() / mask.sum().clamp(min=1)


# --- networks and images -------------------------------------------------------------------------


def build_network(arch: str, n_labels: int, pretrained_weights: str | None = None) -> nn.Module:
    """A network with `n_labels` logits: a DenseNet-121 (optionally pretrained, see
    ClassifierSettings) or a tiny CNN."""
    check_choice("arch", arch, ARCHS)
    if arch == "tiny":
        return _tiny_cnn(n_labels)
    if arch == "xrv-densenet121":
        return _xrv_densenet(n_labels, pretrained_weights)
    network = densenet121(weights=None)
    if pretrained_weights is not None:
        network.load_state_dict(_imagenet_state_dict(pretrained_weights))
    network.classifier = nn.Linear(network.classifier.in_features, n_labels)
    return network


def _tiny_cnn(n_labels: int, width: int = 16) -> nn.Module:
    """Four stride-2 convolutions and a linear head: trains in seconds on a CPU at 64-128 px."""
    layers: list[nn.Module] = []
    channels = 3
    for out in (width, 2 * width, 4 * width, 8 * width):
        conv = nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, n_labels))


def _xrv_densenet(n_labels: int, pretrained_weights: str | None) -> nn.Module:
    """torchxrayvision's DenseNet-121 with a fresh linear head over its 1024 pooled features. Its
    output calibration (`op_threshs`) belongs to its own 18 pathologies, so it is removed: the
    head returns plain logits, thresholded like the other networks'."""
    import torchxrayvision as xrv

    if pretrained_weights is None:
        network = xrv.models.DenseNet(weights=None)
    else:
        network = xrv_densenet(pretrained_weights, release=None)  # read without running code
    network.op_threshs = None
    network.classifier = nn.Linear(network.classifier.in_features, n_labels)
    return network


def _imagenet_state_dict(path: str) -> dict[str, torch.Tensor]:
    """torchvision's DenseNet-121 file, whose old key names ("norm.1") become today's ("norm1")."""
    state = load_checkpoint(path)
    old_key = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_\w+))$")
    return {old_key.sub(r"\1\2", key): value for key, value in state.items()}


def gray_pixels(image: ImageInput, size: int) -> np.ndarray:
    """One image -> float32 [size, size] in [0, 1]: grayscale, shorter side resized, centre cropped."""
    rgb = to_rgb(image) if isinstance(image, Image.Image) else load_image(image, draft_size=size)
    gray = ImageOps.fit(rgb.convert("L"), (size, size), method=Image.BICUBIC)
    return np.asarray(gray, dtype=np.float32) / 255.0


def image_tensor(image: ImageInput, size: int, arch: str = "densenet121") -> torch.Tensor:
    """One image -> float [3, size, size]: `gray_pixels` replicated to 3 channels and normalised
    with ImageNet's mean and std; for "xrv-densenet121" [1, size, size] in [-1024, 1024]."""
    pixels = torch.from_numpy(gray_pixels(image, size))
    if arch == "xrv-densenet121":
        return (2 * pixels[None] - 1) * 1024
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (pixels.expand(3, size, size) - mean) / std


class _ImageDataset(Dataset):
    """Images decoded on access (in DataLoader workers when there are any), with optional targets."""

    def __init__(self, images: Sequence[ImageInput], size: int, arch: str, targets=None, mask=None):
        self.images, self.size, self.arch, self.targets, self.mask = images, size, arch, targets, mask

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        pixels = image_tensor(self.images[index], self.size, self.arch)
        if self.targets is None:
            return pixels
        return pixels, self.targets[index], self.mask[index]


# --- training and prediction ---------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch, so initial weights (and any dropout) repeat on a rerun; the
    batch order has its own seeded generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_classifier(
    images: Sequence[ImageInput],
    labels: torch.Tensor,
    label_names: Sequence[str],
    settings: ClassifierSettings | None = None,
    validation: LabelledImages | None = None,
) -> TrainedClassifier:
    """Train a multi-label classifier with masked BCE and AdamW (see ClassifierSettings).

    labels: [N, L] CheXpert values, NaN for blank. validation: real labelled images, required
    when settings.threshold is "validation" (thresholds are chosen on them) and unused otherwise.
    """
    settings = settings or ClassifierSettings()
    data = LabelledImages(list(images), labels, list(label_names))
    if settings.threshold == "validation" and validation is None:
        raise ValueError("threshold='validation' needs real validation images (validation=...)")
    targets, mask = label_targets(data.labels, settings.uncertain, settings.blank)
    if mask.sum() == 0:
        raise ValueError("no label takes part in the loss under this label policy")
    seed_everything(settings.seed)
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network = build_network(settings.arch, len(data.label_names), settings.pretrained_weights).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loader = DataLoader(
        _ImageDataset(data.images, settings.image_size, settings.arch, targets, mask),
        batch_size=settings.batch_size,
        shuffle=True,
        num_workers=settings.num_workers,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    network.train()
    epoch_losses, steps = [], 0
    for epoch in range(settings.epochs):
        total = 0.0
        for pixels, batch_targets, batch_mask in loader:
            optimizer.zero_grad()
            logits = network(pixels.to(device))
            loss = masked_bce(logits, batch_targets.to(device), batch_mask.to(device))
            loss.backward()
            optimizer.step()
            total += loss.item() * len(pixels)
            steps += 1
        epoch_losses.append(total / len(data))
        log.info("classifier epoch %d/%d: loss %.4f", epoch + 1, settings.epochs, epoch_losses[-1])
    network.eval()
    fixed = float(0.5 if settings.threshold == "validation" else settings.threshold)
    thresholds = dict.fromkeys(data.label_names, fixed)
    classifier = TrainedClassifier(
        network, data.label_names, settings, thresholds, len(data), steps, epoch_losses
    )
    return fit_thresholds(classifier, validation) if settings.threshold == "validation" else classifier


@torch.no_grad()
def predict(classifier: TrainedClassifier, images: Sequence[ImageInput], batch_size: int | None = None):
    """Probabilities [N, L] (float32, CPU), columns in `classifier.label_names` order."""
    settings = classifier.settings
    loader = DataLoader(
        _ImageDataset(list(images), settings.image_size, settings.arch),
        batch_size=batch_size or settings.batch_size,
        num_workers=settings.num_workers,
    )
    network = classifier.network.eval()
    device = next(network.parameters()).device
    batches = [torch.sigmoid(network(pixels.to(device))).float().cpu() for pixels in loader]
    return torch.cat(batches) if batches else torch.empty(0, len(classifier.label_names))


@torch.no_grad()
def penultimate_features(
    classifier: TrainedClassifier, images: Sequence[ImageInput], batch_size: int | None = None
) -> np.ndarray:
    """Float64 [N, D]: what the classifier's last linear layer receives for each image.

    A network trained on the real domain's labels describes images by what tells its findings
    apart, so Fréchet and kernel distances in this space are domain-feature FID / KID, available
    wherever the classifier protocols run, with no downloaded extractor.
    """
    settings = classifier.settings
    network = classifier.network.eval()
    last_linear = [m for m in network.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    handle = last_linear.register_forward_hook(
        lambda _m, inputs, _out: captured.append(inputs[0].double().cpu())
    )
    loader = DataLoader(
        _ImageDataset(list(images), settings.image_size, settings.arch),
        batch_size=batch_size or settings.batch_size,
        num_workers=settings.num_workers,
    )
    device = next(network.parameters()).device
    try:
        for pixels in loader:
            network(pixels.to(device))
    finally:
        handle.remove()
    return torch.cat(captured).numpy()


def fit_thresholds(classifier: TrainedClassifier, validation: LabelledImages) -> TrainedClassifier:
    """A copy of `classifier` whose thresholds maximise Youden's J on real `validation` images.

    Every threshold between the best cut's score and the next lower validation score gives the
    same J; the midpoint (in logits) is taken rather than the cut itself, which sits on the
    weakest positive's score and misses test positives just under it. A label with a single class
    among the validation images keeps the threshold 0.5, with a note.
    """
    validation = validation.select(classifier.label_names)
    probabilities = predict(classifier, validation.images).numpy()
    thresholds, notes = {}, {}
    for j, name in enumerate(classifier.label_names):
        targets, known = _test_truth(validation.labels[:, j], classifier.settings.blank)
        scores = probabilities[known, j]
        if len(set(targets.tolist())) < 2:
            thresholds[name] = 0.5
            notes[name] = "validation set has a single class for this label: threshold 0.5"
            continue
        fpr, tpr, cut = roc_curve(targets, scores)
        finite = np.isfinite(cut)
        best = float(cut[finite][np.argmax((tpr - fpr)[finite])])
        below = scores[scores < best]
        thresholds[name] = _logit_midpoint(best, float(below.max())) if len(below) else best
    return replace(classifier, thresholds=thresholds, threshold_notes=notes)


def _logit_midpoint(p: float, q: float) -> float:
    """The probability halfway between p and q in logits (sigmoid outputs crowd near 0 and 1)."""
    logits = [math.log(x / (1 - x)) for x in np.clip([p, q], 1e-7, 1 - 1e-7)]
    return 1 / (1 + math.exp(-(logits[0] + logits[1]) / 2))


# --- metrics -------------------------------------------------------------------------------------


def _test_truth(labels: torch.Tensor, blank: str) -> tuple[np.ndarray, np.ndarray]:
    """(0/1 truth of the evaluable entries, mask of evaluable entries) of one label column:
    uncertain entries are never evaluable, blank ones count as negative or not by `blank`."""
    targets, mask = label_targets(labels, uncertain="ignore", blank=blank)
    known = mask.bool().numpy()
    return targets.numpy()[known], known


def evaluate(
    probabilities: torch.Tensor,
    labels: torch.Tensor,
    label_names: Sequence[str],
    thresholds: dict[str, float] | float = 0.5,
    blank: str = "negative",
) -> dict:
    """Accuracy (at each label's threshold) and AUROC per label, with their macro averages.

    Uncertain labels are left out; blanks are negative or left out by `blank`. A label whose
    evaluable entries hold a single class gets AUROC None with a note, and is left out of the
    macro AUROC (the macro lists the labels it averages).
    """
    probabilities, labels = torch.as_tensor(probabilities), torch.as_tensor(labels, dtype=torch.float32)
    if probabilities.shape != labels.shape or labels.shape[1] != len(label_names):
        raise ValueError(
            f"probabilities {tuple(probabilities.shape)} and labels {tuple(labels.shape)} must both be "
            f"[N, {len(label_names)}]"
        )
    per_label = {}
    for j, name in enumerate(label_names):
        threshold = thresholds if isinstance(thresholds, float | int) else thresholds[name]
        targets, known = _test_truth(labels[:, j], blank)
        per_label[name] = label_metrics(targets, probabilities[:, j].numpy()[known], float(threshold))
    return {"n_images": len(labels), "blank": blank, "per_label": per_label, "macro": _macro(per_label)}


def label_metrics(targets: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Accuracy and AUROC of one label's evaluable entries (targets 0/1, scores probabilities)."""
    n_positive = int(targets.sum())
    result = {
        "n": len(targets),
        "n_positive": n_positive,
        "n_negative": len(targets) - n_positive,
        "threshold": threshold,
        "accuracy": float(np.mean((scores >= threshold) == (targets == 1))) if len(targets) else None,
        "auroc": None,
    }
    if len(targets) == 0:
        result["note"] = "no evaluable image (all uncertain or blank): no accuracy or AUROC"
    elif n_positive in (0, len(targets)):
        result["note"] = "a single class among the test images: AUROC undefined"
    else:
        result["auroc"] = float(roc_auc_score(targets, scores))
    return result


def _macro(per_label: dict[str, dict]) -> dict:
    """Unweighted means over the labels that have each metric, naming those labels."""
    macro = {}
    for metric in ("accuracy", "auroc"):
        names = [name for name, m in per_label.items() if m[metric] is not None]
        macro[metric] = float(np.mean([per_label[n][metric] for n in names])) if names else None
        macro[f"{metric}_labels"] = names
    return macro


# --- checks --------------------------------------------------------------------------------------


def _check_values(labels: torch.Tensor) -> None:
    """Labels hold only CheXpert's values: 1, 0, -1 or NaN (blank)."""
    known = labels[~torch.isnan(labels)]
    bad = known[(known != 1) & (known != 0) & (known != -1)]
    if len(bad):
        found = sorted(set(bad.tolist()))[:5]
        raise ValueError(f"labels must be 1.0, 0.0, -1.0 or NaN (blank), found {found}")


__all__ = [
    "ClassifierSettings",
    "LabelledImages",
    "TrainedClassifier",
    "build_network",
    "evaluate",
    "fit_thresholds",
    "label_metrics",
    "label_targets",
    "masked_bce",
    "predict",
    "train_classifier",
]
