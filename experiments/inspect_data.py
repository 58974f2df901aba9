"""`medsd inspect-data`: what a DataModule config yields, as JSON, before any GPU time is spent.

    medsd inspect-data --config run.yaml [--data.init_args.KEY VALUE ...] [--max-tokens 77]

Per split: records, images, records dropped per reason, prompts truncated, prompt length in
tokens (CLIP's tokenizer unless told otherwise), label prevalence (positive / negative /
uncertain / blank kept apart) and the distribution of low-cardinality metadata (view position,
modality, ...); with --verify-images, every image file that cannot be decoded. No model weights
are loaded.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np

from datamodules.base import SPLITS, ImageTextDataModule, Record
from datamodules.images import ImageLoadError, load_image
from experiments.cli import command_parser, parse_with_config_args
from lightning_modules.backbones import build_clip_tokenizer
from lightning_modules.prompts import PromptTokenizer

# Metadata fields with more distinct values than this (ids, paths) are not tabulated.
MAX_META_VALUES = 20
LABEL_STATES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain", None: "blank"}


def label_prevalence(records: list[Record]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = {}
    # By label pattern: MIMIC-CXR's 218k frontal images have a few thousand.
    patterns = Counter(tuple(record.labels.items()) for record in records if record.labels)
    for pattern, n in patterns.items():
        for name, value in pattern:
            counts.setdefault(name, Counter())[LABEL_STATES.get(value, str(value))] += n
    return {name: dict(c) for name, c in counts.items()}


def meta_distribution(records: list[Record]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = {}
    for record in records:
        for key, value in (record.meta or {}).items():
            counts.setdefault(key, Counter())[str(value)] += 1
    return {k: dict(c.most_common()) for k, c in counts.items() if len(c) <= MAX_META_VALUES}


def token_statistics(lengths: list[int], limit: int) -> dict[str, float]:
    if not lengths:
        return {}
    a = np.asarray(lengths)
    return {
        "min": int(a.min()),
        "median": float(np.median(a)),
        "mean": round(float(a.mean()), 2),
        "p95": float(np.percentile(a, 95)),
        "max": int(a.max()),
        "over_limit": int((a > limit).sum()),
    }


def unreadable_images(records: list[Record], draft_size: int) -> dict:
    """Decode every image file (at the reduced JPEG scale training uses) and list those that fail,
    so a corrupt or truncated file is found now rather than hours into training."""
    bad = []
    for record in records:
        if isinstance(record.image, str):
            try:
                load_image(record.image, draft_size=draft_size)
            except (ImageLoadError, FileNotFoundError) as error:
                bad.append(str(error))
    return {"count": len(bad), "examples": bad[:5]}


def summarize(
    datamodule: ImageTextDataModule, tokenizer: PromptTokenizer, verify_images: bool = False
) -> dict:
    """The JSON-ready summary; `tokenizer` also drives the DataModule's long-prompt policy."""
    datamodule.tokenizer = tokenizer
    splits = {}
    for split in SPLITS:
        usable = datamodule.usable_records(split)
        lengths = datamodule.prompt_lengths(split)  # of the records loaded, counted once (record index)
        splits[split] = {
            "records": len(usable),
            "images": len({r.image if isinstance(r.image, str) else id(r.image) for r in usable}),
            "dropped": dict(datamodule.dropped[split]),
            "truncated": datamodule.truncated[split],
            "prompt_tokens": token_statistics(lengths, tokenizer.max_length),
            "labels": label_prevalence(usable),
            "meta": meta_distribution(usable),
        }
        if verify_images:
            splits[split]["unreadable_images"] = unreadable_images(usable, datamodule.image_size)
    return {
        "datamodule": type(datamodule).__name__,
        "long_prompts": datamodule.long_prompts,
        "tokenizer": {"name": type(tokenizer.tokenizer).__name__, "max_tokens": tokenizer.max_length},
        "splits": splits,
    }


def main(argv: list[str]) -> None:
    from experiments.lightning_cli import build_datamodule  # imported here: it imports Lightning

    parser = command_parser(
        prog="medsd inspect-data",
        description="Print what a run config's DataModule yields, as JSON. Other arguments "
        "(--config FILE, --data.init_args.KEY VALUE, ...) are `medsd fit`'s.",
    )
    parser.add_argument("--max-tokens", type=int, default=77, help="the text encoder's prompt limit")
    parser.add_argument("--verify-images", action="store_true", help="decode every image, list failures")
    args, config_args = parse_with_config_args(parser, argv)
    datamodule = build_datamodule(config_args)
    tokenizer = PromptTokenizer(build_clip_tokenizer(), max_length=args.max_tokens)
    json.dump(summarize(datamodule, tokenizer, args.verify_images), sys.stdout, indent=2)
    sys.stdout.write("\n")
