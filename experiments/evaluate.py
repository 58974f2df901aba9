"""`medsd evaluate`: score a `medsd sample` output against real images.

    medsd evaluate --generated runs/x/samples --config run.yaml --real-split test [--size 256]
    medsd evaluate --generated runs/x/samples --real-folder data/real_pngs

Writes `metrics.json`, `metrics.csv`, `summary.md`, TensorBoard scalars and the metrics' files
(the copying test's tables and image grids, the insertion protocol's per-image outcomes
`insertion_outcomes.csv`) into `--out` (default `<generated>/metrics`). The
metrics are those of the registry (`evaluation.metrics`; `--list-metrics` prints them with what
each needs); every row names its protocol, extractor, weights, preprocessing, N and, for an
interval, its method. What cannot run (missing weights, unlabelled data, `--real-folder` without
splits, a protocol that would leak) is listed under `skipped` with the reason.
While it runs, `--out` is locked (`experiments.run_lock`): a second evaluation into it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from datamodules.atomic import write_atomically
from datamodules.base import SPLITS
from evaluation.classifier import ARCHS, DENSENET_IMAGENET_FILE, ClassifierSettings, LabelledImages
from evaluation.features import CLIPFeatures, MissingWeightsError, XRVFeatures
from evaluation.fid_protocols import PROTOCOLS as FID_PROTOCOLS
from evaluation.fid_protocols import ROENTGEN_IMAGES, fid_protocol
from evaluation.metrics import registry, run_all
from evaluation.metrics.classifier_protocols import PROTOCOLS
from evaluation.metrics.context import ClassifierFeatures, EvaluationContext
from evaluation.sample_folder import Generated
from evaluation.suite import PathFeatures, TensorFeatures
from evaluation.vit_features import DINOv2Features, RadDinoFeatures
from experiments.cli import command_parser, parse_with_config_args
from experiments.run_lock import RunLock

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
EXTRACTORS = ("inception", "xrv", "clip", "dinov2", "raddino", "classifier")
# RoentGen's FID (eval/calculate_fid.py): clean-fid, the first image of each prompt, at most 5,000
# images per side, Inception, torchxrayvision and CLIP features.
PRESETS = {"roentgen": {"fid_protocol": "clean-fid", "extractors": ["inception", "xrv", "clip"],
                        "fid_images": ROENTGEN_IMAGES, "fid_first_per_prompt": True}}  # fmt: skip


def build_sources(args, size: int) -> tuple[dict, CLIPFeatures | None, dict]:
    """Name -> feature source for the extractors whose weights are on disk, the CLIP model for
    prompt alignment, and name -> reason for the extractors that could not be loaded. `size`: the
    evaluation's common resolution, which the protocols that read images as medsd does state."""
    protocol = args.fid_protocol

    def protocol_source(extractor: str, **options):
        if protocol != "clean-fid":
            options["size"] = size
        return PathFeatures(fid_protocol(protocol, extractor, **options))

    # clean-fid has its own Inception, CLIP and torchxrayvision pipelines (RoentGen's); the other
    # protocols define Inception's only, and the other networks read medsd's common resize.
    clean = protocol == "clean-fid"
    builders = {
        "inception": lambda: protocol_source("inception", weights=args.inception_weights),
        "xrv": lambda: (
            protocol_source("xrv", weights=args.xrv_weights_dir)
            if clean
            else TensorFeatures(XRVFeatures(args.xrv_weights_dir), protocol="medsd")
        ),
        "clip": lambda: (
            protocol_source("clip", weights=args.clip_weights, model_name=args.clip_model)
            if clean
            else TensorFeatures(CLIPFeatures(args.clip_model, args.clip_weights), protocol="medsd")
        ),
        "dinov2": lambda: TensorFeatures(DINOv2Features(args.dinov2_model), protocol="medsd"),
        "raddino": lambda: TensorFeatures(RadDinoFeatures(args.raddino_model), protocol="medsd"),
    }
    sources, skipped = {}, {}
    for name in [n for n in args.extractors if n in builders]:  # "classifier" comes with the protocols
        try:
            sources[name] = builders[name]()
        except (MissingWeightsError, ValueError) as error:
            skipped[f"{name} features"] = str(error)
    clip = None
    if "clip" in args.extractors:
        try:
            clip = CLIPFeatures(args.clip_model, args.clip_weights)
        except MissingWeightsError:
            pass  # the same reason as "clip features"; CLIP score and CMMD are then skipped by name
    return sources, clip, skipped


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
            from experiments.lightning_cli import build_datamodule

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


def classifier_settings(args) -> ClassifierSettings | None:
    """The protocols' classifier; a torchvision DenseNet-121 starts from the ImageNet weights when
    their file is in the torch hub cache (as the papers' did), else from random weights (and its
    rows say they are not comparable)."""
    if args.classifier == "none":
        return None
    weights = args.classifier_weights
    imagenet = Path(torch.hub.get_dir()) / "checkpoints" / DENSENET_IMAGENET_FILE
    if weights is None and args.classifier == "densenet121" and imagenet.is_file():
        weights = str(imagenet)
    threshold = args.classifier_threshold
    return ClassifierSettings(
        arch=args.classifier,
        image_size=args.classifier_size,
        pretrained_weights=weights,
        epochs=args.classifier_epochs,
        batch_size=args.classifier_batch_size,
        lr=args.classifier_lr,
        threshold=threshold if threshold == "validation" else float(threshold),
        seed=args.seed,
    )


def evaluate(args, config_args: list[str]) -> dict:
    # Settings only a preset changes (no flag of their own), then the preset's.
    preset = {"fid_images": None, "fid_first_per_prompt": False, **PRESETS.get(args.fid_preset, {})}
    for key, value in preset.items():
        setattr(args, key, value)
    generated = Generated.from_folder(args.generated)
    augmentation = Generated.from_folder(args.augmentation_generated) if args.augmentation_generated else None
    context = EvaluationContext(
        generated=generated,
        data=RealData(args.real_folder, args.real_split, config_args),
        args=args,
        sources={},
        classifier_settings=classifier_settings(args),
        cache_dir=Path(args.stats_cache) if args.stats_cache else None,
        artefacts=Path(args.out),
        augmentation_generated=augmentation,
    )
    context.sources, context.clip, context.skipped = build_sources(args, context.size)
    if "classifier" in args.extractors:
        context.sources["classifier"] = ClassifierFeatures(context)
    rows = run_all(context)
    return {
        "size": context.size,
        "real_split": args.real_folder or args.real_split,
        "generated_prompt_split": generated.prompt_split,
        "fid_protocol": args.fid_protocol,
        "intervals": {"resamples": args.bootstrap, "confidence": 0.95, "seed": args.seed},
        "metrics": rows,
        "classifier_protocols": context.reports.get("classifier_protocols", {}),
        "skipped": context.skipped,
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
    lines = [
        f"# Evaluation ({result['size']} px, real: {result['real_split']}, generated from the "
        f"'{result['generated_prompt_split']}' prompts, FID protocol {result['fid_protocol']})",
        "",
    ]
    if len(table):
        columns = ["metric", "run", "label", "value", "ci_low", "ci_high", "protocol", "extractor", "weights"]
        columns += ["preprocessing", "n_real", "n_generated"]
        lines += markdown_table(table[[c for c in columns if c in table]]) + [""]
        methods = table["ci_method"].dropna().unique() if "ci_method" in table else []
        lines += [f"- interval method: {method}" for method in methods]
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


def build_parser():
    parser = command_parser(
        prog="medsd evaluate",
        description="Score generated images against real ones. Other arguments (--config FILE, "
        "--data.init_args.KEY VALUE, ...) name the real data, as for `medsd fit`.",
    )
    parser.add_argument("--generated", required=True, help="output folder of `medsd sample`")
    parser.add_argument(
        "--augmentation-generated",
        help="a `medsd sample` folder prompted from the training split, for the augmentation protocol "
        "(default: --generated, if it was)",
    )
    parser.add_argument("--real-split", default="test", help="split of the config's data to compare with")
    parser.add_argument("--real-folder", help="a folder of real images instead of a config's split")
    parser.add_argument(
        "--train-split", default="train", help="for the copying test and classifiers; '' skips both"
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
    parser.add_argument(
        "--fid-protocol",
        choices=FID_PROTOCOLS,
        default="torch-fidelity",
        help="the FID pipeline (files -> features): torch-fidelity (default), clean-fid (RoentGen's) or "
        "torchmetrics (Prompt to Polyp's); numbers across protocols do not compare",
    )
    parser.add_argument(
        "--fid-preset",
        choices=sorted(PRESETS),
        help="roentgen: clean-fid, the first image of each prompt, at most 5,000 images per side, "
        "Inception, torchxrayvision and CLIP features",
    )
    parser.add_argument(
        "--inception-weights",
        help="Inception weight file (torch-fidelity / torchmetrics: default the torch hub cache; "
        "clean-fid: its TorchScript file, default /tmp/inception-2015-12-05.pt)",
    )
    parser.add_argument("--xrv-weights-dir", help="folder with torchxrayvision's densenet121-res224-all")
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--clip-weights", help="open_clip weight file or cached tag")
    parser.add_argument("--dinov2-model", default="facebook/dinov2-large", help="a local folder or cached id")
    parser.add_argument("--raddino-model", default="microsoft/rad-dino", help="a local folder or cached id")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        help="resamples per interval (FID: half-samples; 0: no intervals)",
    )
    parser.add_argument("--seed", type=int, default=0, help="for KID subsets, bootstraps and classifiers")
    parser.add_argument(
        "--cross-prompt-pairs",
        type=int,
        default=1000,
        help="random image pairs of different prompts for the cross-prompt MS-SSIM (the diversity floor)",
    )
    classifier = parser.add_argument_group("classifier protocols (need a config with labelled splits)")
    classifier.add_argument("--classifier", choices=[*ARCHS, "none"], default="densenet121")
    classifier.add_argument(
        "--protocols",
        nargs="*",
        choices=PROTOCOLS,
        help="default: each protocol the sample folders allow (the others listed as skipped); given, a "
        "protocol that would test a classifier on what trained it stops the evaluation",
    )
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
    parser.add_argument("--list-metrics", action="store_true", help="print the metrics and what each needs")
    return parser


def main(argv: list[str]) -> None:
    parser = build_parser()
    if "--list-metrics" in argv:
        for metric in registry():
            print(f"{metric.name}: {', '.join(metric.rows)}\n    needs {metric.needs}")
        return
    args, config_args = parse_with_config_args(parser, argv)
    args.out = args.out or str(Path(args.generated) / "metrics")
    with RunLock(args.out):
        result = evaluate(args, config_args)
        write_outputs(result, Path(args.out))
    print(json.dumps(result, indent=2, default=str))
