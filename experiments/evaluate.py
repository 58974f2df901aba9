"""`medsd evaluate`: score a `medsd sample` output against real images.

    medsd evaluate --generated runs/x/samples --config run.yaml --real-split test [--size 256]
    medsd evaluate --generated runs/x/samples --real-folder data/real_pngs

Writes `metrics.json`, `metrics.csv`, `summary.md` and TensorBoard scalars into `--out`
(default `<generated>/metrics`). Every row names its extractor, weights, preprocessing and N.

Metrics: FID and KID per feature extractor (Inception, torchxrayvision, open_clip, and the
penultimate layer of the classifier the protocols train on the real data), MS-SSIM within and
across prompts, CLIP score, memorisation against the training split, and the classifier
protocols (abnormality insertion, augmentation) when the config's data carries labels; bootstrap
intervals for FID, KID, CLIP score and the classifier metrics. What cannot run (missing weights,
unlabelled data, `--real-folder` without splits) is listed under `skipped` with the reason.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.atomic import write_atomically
from datamodules.base import SPLITS
from evaluation.classifier import ARCHS, ClassifierSettings, LabelledImages
from evaluation.classifier_suite import PROTOCOLS, classifier_feature_distances, classifier_protocols
from evaluation.features import CLIPFeatures, InceptionFeatures, XRVFeatures
from evaluation.suite import (
    Generated,
    RealSet,
    clip_score,
    diversity,
    extract,
    fid_and_kid,
    load_uint8,
    memorisation,
    run_metric,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
EXTRACTORS = ("inception", "xrv", "clip", "classifier")


def build_extractors(args) -> tuple[dict, dict]:
    """Name -> extractor for those whose weights are on disk; name -> reason for the others."""
    builders = {
        "inception": lambda: InceptionFeatures(args.inception_weights),
        "xrv": lambda: XRVFeatures(args.xrv_weights_dir),
        "clip": lambda: CLIPFeatures(args.clip_model, args.clip_weights),
    }
    extractors, skipped = {}, {}
    for name in [n for n in args.extractors if n in builders]:  # "classifier" comes with the protocols
        try:
            extractors[name] = builders[name]()
        except FileNotFoundError as error:
            skipped[f"{name} features"] = str(error)
    return extractors, skipped


class RealData:
    """The real images: a folder (standing for the evaluated split only), or the splits of a
    config's DataModule (built once, on first use)."""

    def __init__(self, folder: str | None, split: str, config_args: list[str]):
        self.folder, self.split, self.config_args, self._datamodule = folder, split, config_args, None

    def records(self, split: str) -> list:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
        if self.folder:
            raise ValueError(f"the '{split}' split needs a config's DataModule, not --real-folder")
        if self._datamodule is None:
            from experiments.cli import build_datamodule

            self._datamodule = build_datamodule(self.config_args)
        return self._datamodule.records(split)

    def paths(self, split: str) -> list:
        if self.folder and split == self.split:
            folder = Path(self.folder)
            return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [r.image for r in self.records(split)]  # paths, or images the dataset holds in memory

    def labelled(self, split: str) -> LabelledImages:
        """A split's images with their labels; an error when the split is empty or unlabelled."""
        records = self.records(split)
        if not records:
            raise ValueError(f"the '{split}' split has no records")
        return LabelledImages.from_records(records)


def classifier_settings(args) -> ClassifierSettings:
    threshold = args.classifier_threshold
    return ClassifierSettings(
        arch=args.classifier,
        image_size=args.classifier_size,
        pretrained_weights=args.classifier_weights,
        epochs=args.classifier_epochs,
        batch_size=args.classifier_batch_size,
        lr=args.classifier_lr,
        threshold=threshold if threshold == "validation" else float(threshold),
        seed=args.seed,
    )


def evaluate(args, config_args: list[str]) -> dict:
    generated = Generated.from_manifest(args.generated)
    fake_images = load_uint8(generated.paths, args.size)
    size = args.size or fake_images.shape[-1]
    cache = Path(args.stats_cache) if args.stats_cache else None
    data = RealData(args.real_folder, args.real_split, config_args)
    real = RealSet(data.paths(args.real_split), size, cache)
    extractors, skipped = build_extractors(args)
    fake_features = {name: None for name in extractors}

    def fake(name: str) -> np.ndarray:
        """The generated images' features, extracted once per extractor."""
        if fake_features[name] is None:
            fake_features[name] = extract(extractors[name], fake_images)
        return fake_features[name]

    rows: list[dict] = []
    n = {"n_generated": len(generated.paths)}
    for name, extractor in extractors.items():

        def scores(name=name, extractor=extractor) -> list[dict]:
            labelled = {**extractor.label, "n_real": len(real.paths), **n}
            pairs = fid_and_kid(real.features(extractor), fake(name), args.bootstrap, args.seed)
            return [{**row, **labelled} for row in pairs]

        run_metric(f"fid/kid ({name})", rows, skipped, scores)

    run_metric("ms-ssim", rows, skipped, lambda: [{**row, **n} for row in diversity(generated, fake_images)])

    if "clip" in extractors:
        clip = extractors["clip"]

        def alignment() -> list[dict]:
            score = clip_score(clip, fake("clip"), generated.prompts, args.bootstrap, args.seed)
            return [{**row, **clip.label, **n} for row in score]

        run_metric("clip score", rows, skipped, alignment)

    if args.train_split and not extractors:
        skipped["memorisation"] = "needs the features of an extractor, and none could be loaded"
    if args.train_split and extractors:
        name, extractor = next(iter(extractors.items()))

        def copies() -> list[dict]:
            train = RealSet(data.paths(args.train_split), size, cache)
            row = memorisation(
                train.features(extractor), real.features(extractor), fake(name), args.memorisation_quantile
            )
            return [{**row, **extractor.label, "n_real": len(train.paths), **n}]

        run_metric("memorisation", rows, skipped, copies)

    protocols: dict = {}
    trained: dict = {}
    if args.classifier != "none" and args.protocols and args.train_split:

        def judged() -> list[dict]:
            reports, protocol_rows, trained["classifier"] = classifier_protocols(
                generated,
                data.labelled(args.train_split),
                data.labelled(args.real_split),
                data.labelled(args.val_split) if args.classifier_threshold == "validation" else None,
                classifier_settings(args),
                args.protocols,
                args.findings,
                args.bootstrap,
                args.classifier_labels,
            )
            protocols.update(reports)
            return protocol_rows

        run_metric("classifier protocols", rows, skipped, judged)

    if "classifier" in args.extractors and "classifier" not in trained:
        skipped["fid/kid (classifier)"] = "needs the classifier the protocols train (labelled splits)"
    if "classifier" in trained:

        def domain_scores() -> list[dict]:
            return classifier_feature_distances(
                trained["classifier"], real.paths, generated.paths, args.bootstrap, args.seed
            )

        run_metric("fid/kid (classifier)", rows, skipped, domain_scores)

    return {
        "size": size,
        "real_split": args.real_folder or args.real_split,
        "bootstrap": {"resamples": args.bootstrap, "confidence": 0.95, "seed": args.seed},
        "metrics": rows,
        "classifier_protocols": protocols,
        "skipped": skipped,
    }


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def markdown_table(table: pd.DataFrame) -> list[str]:
    """A DataFrame as markdown table lines: floats to 4 significant digits, NaN and None empty."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "" if np.isnan(value) else f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "metrics.json", json.dumps(result, indent=2, default=str) + "\n")
    table = pd.DataFrame(result["metrics"])
    write_text_atomically(out / "metrics.csv", table.to_csv(index=False))
    lines = [f"# Evaluation ({result['size']} px, real: {result['real_split']})", ""]
    if len(table):
        columns = ["metric", "run", "label", "value", "ci_low", "ci_high", "extractor"]
        columns += ["n_real", "n_generated"]
        lines += markdown_table(table[[c for c in columns if c in table]]) + [""]
    lines += [f"- skipped {name}: {reason}" for name, reason in result["skipped"].items()]
    write_text_atomically(out / "summary.md", "\n".join(lines) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out)) as writer:
        for row in result["metrics"]:
            writer.add_scalar(tensorboard_tag(row), row["value"])


def tensorboard_tag(row: dict) -> str:
    """eval/<metric>[/<run>][/<label>][/<extractor's first word>], one tag per row."""
    parts = [row["metric"], row.get("run"), row.get("label")]
    if row.get("extractor"):
        parts.append(row["extractor"].split()[0])
    return "/".join(["eval", *(str(p).replace(" ", "_") for p in parts if p)])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="medsd evaluate",
        description="Score generated images against real ones. Other arguments (--config FILE, "
        "--data.init_args.KEY VALUE, ...) name the real data, as for `medsd fit`.",
    )
    parser.add_argument("--generated", required=True, help="output folder of `medsd sample`")
    parser.add_argument("--real-split", default="test", help="split of the config's data to compare with")
    parser.add_argument("--real-folder", help="a folder of real images instead of a config's split")
    parser.add_argument(
        "--train-split", default="train", help="for memorisation and classifiers; '' skips both"
    )
    parser.add_argument("--size", type=int, help="common resolution (default: the generated images')")
    parser.add_argument(
        "--extractors",
        nargs="+",
        choices=EXTRACTORS,
        default=list(EXTRACTORS),
        help="classifier: the penultimate features of the classifier the protocols train on the real "
        "training split (domain-feature FID / KID without downloaded weights)",
    )
    parser.add_argument("--inception-weights", help="FID Inception weight file (default: torch hub cache)")
    parser.add_argument("--xrv-weights-dir", help="folder with torchxrayvision's densenet121-res224-all")
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--clip-weights", help="open_clip weight file or cached tag")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0: no intervals)")
    parser.add_argument("--memorisation-quantile", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="for KID subsets, bootstraps and classifiers")
    classifier = parser.add_argument_group("classifier protocols (need a config with labelled splits)")
    classifier.add_argument("--classifier", choices=[*ARCHS, "none"], default="densenet121")
    classifier.add_argument("--protocols", nargs="*", choices=PROTOCOLS, default=list(PROTOCOLS))
    classifier.add_argument("--classifier-labels", nargs="+", help="default: all labels of both sets")
    classifier.add_argument("--findings", nargs="+", help="labels to insert (default: all stated present)")
    classifier.add_argument("--classifier-size", type=int, default=224)
    classifier.add_argument("--classifier-epochs", type=int, default=10)
    classifier.add_argument("--classifier-batch-size", type=int, default=32)
    classifier.add_argument("--classifier-lr", type=float, default=1e-4)
    classifier.add_argument("--classifier-weights", help="weights to start from (see ClassifierSettings)")
    classifier.add_argument(
        "--classifier-threshold", default="0.5", help="a probability or 'validation' (Youden's J)"
    )
    classifier.add_argument("--val-split", default="val")
    parser.add_argument("--stats-cache", help="folder caching real-set features")
    parser.add_argument("--out", help="default: <generated>/metrics")
    args, config_args = parser.parse_known_args(argv)
    result = evaluate(args, config_args)
    write_outputs(result, Path(args.out or Path(args.generated) / "metrics"))
    print(json.dumps(result, indent=2, default=str))
