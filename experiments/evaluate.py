"""`medsd evaluate`: score a `medsd sample` output against real images.

    medsd evaluate --generated runs/x/samples --config run.yaml --real-split test [--size 256]
    medsd evaluate --generated runs/x/samples --real-folder data/real_pngs

Writes `metrics.json`, `metrics.csv`, `summary.md` and TensorBoard scalars into `--out`
(default `<generated>/metrics`). Every row names its extractor, weights, preprocessing and N.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from evaluation.features import CLIPFeatures, InceptionFeatures, XRVFeatures
from evaluation.suite import (
    Generated,
    RealSet,
    diversity,
    extract,
    fid_and_kid,
    load_uint8,
    memorisation,
    run_metric,
)
from lightning_modules.export import write_atomically

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def build_extractors(args) -> tuple[dict, dict]:
    """Name -> extractor for those whose weights are on disk; name -> reason for the others."""
    builders = {
        "inception": lambda: InceptionFeatures(args.inception_weights),
        "xrv": lambda: XRVFeatures(args.xrv_weights_dir),
        "clip": lambda: CLIPFeatures(args.clip_model, args.clip_weights),
    }
    extractors, skipped = {}, {}
    for name in args.extractors:
        try:
            extractors[name] = builders[name]()
        except FileNotFoundError as error:
            skipped[f"{name} features"] = str(error)
    return extractors, skipped


def real_paths(args, config_args: list[str], split: str) -> list[str]:
    if args.real_folder:
        folder = Path(args.real_folder)
        return sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    from experiments.cli import build_datamodule

    records = build_datamodule(config_args).records(split)
    return [r.image for r in records if isinstance(r.image, str)]


def evaluate(args, config_args: list[str]) -> dict:
    generated = Generated.from_manifest(args.generated)
    fake_images = load_uint8(generated.paths, args.size)
    size = args.size or fake_images.shape[-1]
    cache = Path(args.stats_cache) if args.stats_cache else None
    real = RealSet(real_paths(args, config_args, args.real_split), size, cache)
    extractors, skipped = build_extractors(args)
    rows: list[dict] = []

    for name, extractor in extractors.items():
        labelled = {**extractor.label, "n_real": len(real.paths), "n_generated": len(generated.paths)}

        def scores(extractor=extractor, labelled=labelled) -> list[dict]:
            fake = extract(extractor, fake_images)
            return [
                {**row, **labelled} for row in fid_and_kid(real.features(extractor), fake, args.bootstrap, 0)
            ]

        run_metric(f"fid/kid ({name})", rows, skipped, scores)

    run_metric("ms-ssim", rows, skipped, lambda: diversity(generated, fake_images))

    if args.train_split and extractors and not args.real_folder:
        name, extractor = next(iter(extractors.items()))
        train = RealSet(real_paths(args, config_args, args.train_split), size, cache)

        def copies() -> list[dict]:
            row = memorisation(
                train.features(extractor),
                real.features(extractor),
                extract(extractor, fake_images),
                args.memorisation_quantile,
            )
            return [
                {**row, **extractor.label, "n_real": len(train.paths), "n_generated": len(generated.paths)}
            ]

        run_metric("memorisation", rows, skipped, copies)

    return {
        "size": size,
        "real_split": args.real_folder or args.real_split,
        "metrics": rows,
        "skipped": skipped,
    }


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def markdown_table(table: pd.DataFrame) -> list[str]:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "metrics.json", json.dumps(result, indent=2, default=str) + "\n")
    table = pd.DataFrame(result["metrics"])
    write_text_atomically(out / "metrics.csv", table.to_csv(index=False))
    lines = [f"# Evaluation ({result['size']} px, real: {result['real_split']})", ""]
    if len(table):
        columns = [c for c in ("metric", "value", "ci_low", "ci_high", "extractor", "n_real", "n_generated")
                   if c in table]  # fmt: skip
        lines += markdown_table(table[columns]) + [""]
    lines += [f"- skipped {name}: {reason}" for name, reason in result["skipped"].items()]
    write_text_atomically(out / "summary.md", "\n".join(lines) + "\n")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out)) as writer:
        for row in result["metrics"]:
            tag = row["metric"] + (f"/{row['extractor'].split()[0]}" if "extractor" in row else "")
            writer.add_scalar(f"eval/{tag}", row["value"])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="medsd evaluate",
        description="Score generated images against real ones. Other arguments (--config FILE, "
        "--data.init_args.KEY VALUE, ...) name the real data, as for `medsd fit`.",
    )
    parser.add_argument("--generated", required=True, help="output folder of `medsd sample`")
    parser.add_argument("--real-split", default="test", help="split of the config's data to compare with")
    parser.add_argument("--real-folder", help="a folder of real images instead of a config's split")
    parser.add_argument("--train-split", default="train", help="for memorisation; '' to skip")
    parser.add_argument("--size", type=int, help="common resolution (default: the generated images')")
    parser.add_argument("--extractors", nargs="+", default=["inception", "xrv", "clip"])
    parser.add_argument("--inception-weights", help="FID Inception weight file (default: torch hub cache)")
    parser.add_argument("--xrv-weights-dir", help="folder with torchxrayvision's densenet121-res224-all")
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--clip-weights", help="open_clip weight file or cached tag")
    parser.add_argument("--bootstrap", type=int, default=200, help="FID bootstrap resamples (0: none)")
    parser.add_argument("--memorisation-quantile", type=float, default=0.05)
    parser.add_argument("--stats-cache", help="folder caching real-set features")
    parser.add_argument("--out", help="default: <generated>/metrics")
    args, config_args = parser.parse_known_args(argv)
    result = evaluate(args, config_args)
    write_outputs(result, Path(args.out or Path(args.generated) / "metrics"))
    print(json.dumps(result, indent=2, default=str))
