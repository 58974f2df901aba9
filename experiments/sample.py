"""`medsd sample`: render prompts with a trained model into a reproducible, resumable image folder.

    medsd sample SOURCE --out DIR --prompts prompts.txt [options]
    medsd sample SOURCE --out DIR --config run.yaml --split test [--data.init_args.KEY VALUE ...]

SOURCE is a run folder, an export folder, a diffusers pipeline folder or hub id, or medsd/tiny-sd
(see `lightning_modules.pipelines.load_pipeline`). Prompts come from a text file (one per line,
blank lines ignored, repeats kept) or from a split of a run config's dataset (identical prompts
rendered once, keeping the labels of every record that had them). The folder receives:

    DIR/images/, DIR/manifest.csv, DIR/sample_config.json   the format of
                             `evaluation.sample_folder` (images, their prompts, seeds and labels,
                             the settings and the split or file the prompts came from)
    DIR/cost/rank<R>.json    images, seconds, images/s, FLOPs per image and peak GPU memory of
                             rank R (added up over resumed runs)

Seeds: image k of prompt i has seed `seed + i * per_prompt + k`, and its noise comes from its own
CPU `torch.Generator`, so the noise does not depend on the device, the batch size or the other
images of its batch. A rerun with the same arguments on the same machine reproduces every image
bit for bit; another GPU or batch size computes the same images up to floating-point rounding.

Resume: images are written atomically (temporary file, then rename), and a rerun into the same
DIR renders only the missing ones. A DIR made with other settings (sampler, steps, guidance,
size, seed, images per prompt, model, prompts) is refused. manifest.csv is written (atomically)
only once every image exists, and removed when a run finds one missing, so it never lists a
missing image.
While it samples, the process of rank 0 owns DIR (`experiments.run_lock`): a second `medsd
sample` into it is refused, naming the first.

Several GPUs: `--rank R --world-size W` (read from torchrun's RANK / WORLD_SIZE by default) gives
item n (in manifest order) to rank n % W. Each rank writes its own images; whichever rank finds
every image present when it finishes writes the manifest. After a crashed rank, rerun it (or a
single process with the same arguments) to finish the missing images and write the manifest.

The papers' samplers: `--preset roentgen` (PNDM, 75 steps, guidance 4) and
`--preset prompt-to-polyp` (DDIM, 150 steps, guidance 3.5); explicit flags override a preset.
A preset's sampler is a DDPM one, for models trained on a DDPM noise schedule (epsilon or
v-prediction): a flow-matching model (FLUX) keeps its own sampler and takes the preset's steps and
guidance, while a `--scheduler` it cannot run is refused before anything is written.

Prompts are written into `--prompt-template`; by default, into the caption template a
textual-inversion export records (the one its token was trained in), else used as they are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from datamodules.atomic import write_atomically
from datamodules.base import SPLITS, Record
from evaluation.sample_folder import (
    MANIFEST_FILE,
    SETTINGS_FILE,
    file_source,
    image_path,
    sampling_cost_path,
    split_source,
    write_manifest,
)
from experiments.cli import command_parser, parse_with_config_args
from experiments.export_checkpoint import checkpoint_export
from experiments.run_lock import for_rank
from lightning_modules.cost import flop_count
from lightning_modules.pipelines import (
    IncompatibleSamplerError,
    export_manifest,
    is_flow_matching,
    load_pipeline,
    model_sampler,
    render,
    resolve_source,
    swapped_sampler,
)

log = logging.getLogger(__name__)

PRESETS = {
    "roentgen": {"scheduler": "pndm", "steps": 75, "guidance": 4.0},
    "prompt-to-polyp": {"scheduler": "ddim", "steps": 150, "guidance": 3.5},
}
# Without a preset or flag: the model's own sampler and diffusers' defaults.
DEFAULTS = {"scheduler": None, "steps": 50, "guidance": 7.5}


class SettingsMismatchError(ValueError):
    """The output folder holds images made with other settings; mixing them would be silent."""


@dataclass(frozen=True)
class Prompt:
    """A prompt and the distinct label sets of the records it came from (none for a text file)."""

    text: str
    labels: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Item:
    """Image k of prompt prompt_index."""

    prompt_index: int
    k: int
    seed: int

    @property
    def path(self) -> str:
        return image_path(self.prompt_index, self.k)


@dataclass
class Settings:
    """What the images depend on (not where or how fast they are computed).

    scheduler: None samples with the model's own sampler.
    prompt_template: None takes the caption template the export records (textual inversion), else
        '{prompt}'; `sample` records the template it used.
    """

    source: str
    per_prompt: int = 1
    seed: int = 0
    scheduler: str | None = None
    steps: int = DEFAULTS["steps"]
    guidance: float = DEFAULTS["guidance"]
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"
    prompt_template: str | None = None
    base_model: str | None = None
    textual_inversion: list[str] = field(default_factory=list)
    lora: list[str] = field(default_factory=list)


# --- prompts ------------------------------------------------------------------------------------


def prompts_from_records(records: list[Record]) -> list[Prompt]:
    """One prompt per distinct text, in order of first appearance, with the distinct label sets
    of all its records: a dataset often repeats an impression ("No acute process") under
    different labels, and rendering it once per record would only repeat the same distribution."""
    labels: dict[str, list[dict]] = {}
    for record in records:
        seen = labels.setdefault(record.prompt, [])
        if record.labels is not None and record.labels not in seen:
            seen.append(record.labels)
    return [Prompt(text, tuple(label_sets)) for text, label_sets in labels.items()]


def prompts_from_file(path: str | Path) -> list[Prompt]:
    """One prompt per non-blank line, surrounding whitespace removed; repeated lines are kept."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Prompt(line.strip()) for line in lines if line.strip()]


def prompts_from_split(config_args: list[str], split: str) -> list[Prompt]:
    """The prompts of `split` of a run config's DataModule (no model weights are loaded)."""
    from experiments.lightning_cli import build_datamodule  # imported here: it imports Lightning

    records = build_datamodule(config_args).records(split)
    if not records:
        raise ValueError(f"the {split} split of {' '.join(config_args)} has no records")
    return prompts_from_records(records)


# --- items, seeds and ranks ---------------------------------------------------------------------


def plan(n_prompts: int, per_prompt: int, seed: int) -> list[Item]:
    """Every image to render, in manifest order; image k of prompt i gets seed
    `seed + i * per_prompt + k`, so no two images of a folder share a seed."""
    return [Item(i, k, seed + i * per_prompt + k) for i in range(n_prompts) for k in range(per_prompt)]


def shard(items: list[Item], rank: int, world_size: int) -> list[Item]:
    """Rank `rank`'s share: item n goes to rank n % world_size (no gap, no overlap)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return items[rank::world_size]


def env_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) when not launched by it."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    return int(rank), int(os.environ.get("WORLD_SIZE", "1"))


# --- the output folder --------------------------------------------------------------------------


def recorded_settings(settings: Settings, prompts: list[Prompt], prompt_source: dict | None = None) -> dict:
    """`sample_config.json`: the settings with local paths made absolute, the export's manifest
    (which run and step made the model) and a digest of the prompts, so that a resume with a
    retrained model or an edited prompt list is refused instead of mixing images."""
    source = resolve_source(settings.source)
    texts = json.dumps([p.text for p in prompts]).encode()
    return {
        **asdict(settings),
        "source": str(source),
        "export": export_manifest(source),
        "base_model": settings.base_model and absolute_if_local(settings.base_model),
        "textual_inversion": [absolute_if_local(p) for p in settings.textual_inversion],
        "lora": [absolute_if_local(p) for p in settings.lora],
        "prompts": {"count": len(prompts), "sha256": hashlib.sha256(texts).hexdigest()},
        "prompt_source": prompt_source,
    }


def absolute_if_local(name_or_path: str) -> str:
    """A local path made absolute (a resume may start elsewhere); a hub id as it is."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path


def check_settings(out: Path, recorded: dict) -> None:
    """Write `sample_config.json`, or refuse a folder whose images were made otherwise."""
    path = out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [
            f"{k}: {before.get(k)!r} there, {recorded.get(k)!r} now"
            for k in recorded
            if before.get(k) != recorded.get(k)
        ]
        if changed:
            raise SettingsMismatchError(
                f"{out} holds images made with other settings ({'; '.join(changed)}). "
                f"Use another --out, or the same arguments to resume."
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(recorded, indent=2) + "\n"))


def save_image(image: Image.Image, path: Path) -> None:
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def manifest_rows(prompts: list[Prompt], items: list[Item]) -> list[dict]:
    return [
        {
            "prompt_index": item.prompt_index,
            "k": item.k,
            "prompt": prompts[item.prompt_index].text,
            "seed": item.seed,
            "path": item.path,
            "labels": prompts[item.prompt_index].labels,
        }
        for item in items
    ]


# --- sampling -----------------------------------------------------------------------------------


def apply_template(template: str, text: str) -> str:
    return template.replace("{prompt}", text)


def with_export_template(settings: Settings) -> Settings:
    """The settings with their prompt template resolved. A textual-inversion export records the
    caption template its token was trained in, and its prompts only work written into it: that
    is the default, and an explicit template that replaces it is logged."""
    recorded = (export_manifest(resolve_source(settings.source)) or {}).get("prompt_template")
    if settings.prompt_template is None:
        if recorded is not None:
            log.info("prompts are written into %r, the export's training caption template", recorded)
        return replace(settings, prompt_template=recorded or "{prompt}")
    if recorded is not None and settings.prompt_template != recorded:
        log.info(
            "--prompt-template %r replaces %r, the export's training caption template",
            settings.prompt_template,
            recorded,
        )
    return settings


def fit_sampler(settings: Settings, preset: str | None = None) -> Settings:
    """The settings with a sampler the model can run, checked before anything is written.

    A preset's sampler (PNDM, DDIM) is a DDPM one, made for models trained on a DDPM noise
    schedule (epsilon or v-prediction). A model that cannot run it (a flow-matching one: FLUX)
    keeps its own sampler, with the preset's steps and guidance, and `scheduler` None records
    that. A sampler asked for by name (`preset` None) that the model cannot run is refused with
    an IncompatibleSamplerError (a ValueError) saying why.
    """
    if settings.scheduler is None:
        return settings
    sampler = model_sampler(settings.source, settings.base_model)
    try:
        swapped_sampler(sampler, settings.scheduler)
    except IncompatibleSamplerError:
        if preset is None:
            raise
        log.info(
            "--preset %s: the model keeps its own sampler, %s%s, instead of the preset's %s, a DDPM "
            "sampler for epsilon / v-prediction models; sampling with %d steps, guidance %g",
            preset,
            type(sampler).__name__,
            " (flow matching)" if is_flow_matching(sampler) else "",
            settings.scheduler,
            settings.steps,
            settings.guidance,
        )
        return replace(settings, scheduler=None)
    return settings


def warn_if_placeholder_unused(recorded: dict, texts: list[str]) -> None:
    """A textual-inversion export only acts where its token is in the prompt; prompts lack it
    when neither they nor the template (the export's caption template by default) carry it."""
    export = recorded["export"] or {}
    token = export.get("token")
    if export.get("strategy") == "TextualInversion" and not any(token in t for t in texts):
        log.warning(
            "no prompt contains the learned token %s: add it, e.g. --prompt-template '%s {prompt}'",
            token,
            token,
        )


def sample(
    out: str | Path,
    prompts: list[Prompt],
    settings: Settings,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    prompt_source: dict | None = None,
) -> bool:
    """Render this rank's missing images into `out`; return True once every image of every rank
    exists and the manifest is written. `prompt_source` (`evaluation.sample_folder.split_source` or
    `file_source`) is recorded for the evaluation: which split the prompts came from."""
    if not prompts:
        raise ValueError("no prompts to sample")
    if settings.per_prompt < 1 or batch_size < 1:
        raise ValueError(
            f"per_prompt and batch_size must be at least 1, got {settings.per_prompt}, {batch_size}"
        )
    settings = fit_sampler(with_export_template(settings))
    if "{prompt}" not in settings.prompt_template:
        raise ValueError(f"--prompt-template must contain {{prompt}}, got {settings.prompt_template!r}")
    out = Path(out)
    recorded = recorded_settings(settings, prompts, prompt_source)
    check_settings(out, recorded)
    (out / "images").mkdir(exist_ok=True)
    items = plan(len(prompts), settings.per_prompt, settings.seed)
    if not all((out / item.path).is_file() for item in items):
        (out / MANIFEST_FILE).unlink(missing_ok=True)  # stale: it would list missing images
    todo = [item for item in shard(items, rank, world_size) if not (out / item.path).is_file()]
    if todo:
        texts = [apply_template(settings.prompt_template, p.text) for p in prompts]
        warn_if_placeholder_unused(recorded, texts)
        pipe = load_pipeline(
            settings.source,
            base_model=settings.base_model,
            textual_inversion=settings.textual_inversion,
            lora=settings.lora,
            scheduler=settings.scheduler,
            device=device,
            dtype=getattr(torch, settings.dtype),
        )
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        meter = SamplingMeter(device)
        for number, batch in enumerate(tqdm(batches, desc=f"sample rank {rank}/{world_size}", unit="batch")):
            with meter.measure(len(batch), count_flops=number == 0):
                images = render(
                    pipe,
                    [texts[item.prompt_index] for item in batch],
                    [item.seed for item in batch],
                    settings.steps,
                    settings.guidance,
                    settings.height,
                    settings.width,
                )
            for item, image in zip(batch, images, strict=True):
                save_image(image, out / item.path)
        meter.write(sampling_cost_path(out, rank))
    missing = sum(not (out / item.path).is_file() for item in items)
    if missing:
        log.info("rank %d done; %d images of other ranks missing, so no manifest yet", rank, missing)
        return False
    write_manifest(out, manifest_rows(prompts, items))
    return True


class SamplingMeter:
    """Sampling cost: FLOPs per image (counted on the first batch, whose time is then left out,
    the counter slowing it down), images per second and peak GPU memory. Each call of `sample`
    adds its images and time to the rank's record, so a resumed run reports its total."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.images = self.timed_images = 0
        self.seconds = 0.0
        self.flops_per_image: float | None = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def measure(self, n_images: int, count_flops: bool):
        start = time.perf_counter()
        if count_flops:
            with flop_count() as total:
                yield
            self.flops_per_image = total() / n_images
        else:
            yield
            self.seconds += time.perf_counter() - start
            self.timed_images += n_images
        self.images += n_images

    def write(self, path: Path) -> None:
        previous = json.loads(path.read_text()) if path.is_file() else {}
        record = {
            "images": previous.get("images", 0) + self.images,
            "timed_images": previous.get("timed_images", 0) + self.timed_images,
            "wall_seconds": previous.get("wall_seconds", 0.0) + self.seconds,
            "flops_per_image": self.flops_per_image or previous.get("flops_per_image"),
            "device": str(self.device),
            "peak_gpu_memory_bytes": (
                torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
            ),
        }
        timed = record["timed_images"]
        record["images_per_second"] = timed / record["wall_seconds"] if record["wall_seconds"] else None
        path.parent.mkdir(exist_ok=True)
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


# --- command line -------------------------------------------------------------------------------


def build_parser():
    parser = command_parser(
        prog="medsd sample",
        description="Render prompts with a trained model into DIR/images, DIR/manifest.csv. Other "
        "arguments (--config FILE, --data.init_args.KEY VALUE, ...) are `medsd fit`'s and name "
        "the dataset whose --split gives the prompts.",
    )
    parser.add_argument("source", help="run folder, export folder, diffusers folder or hub id")
    parser.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    parser.add_argument(
        "--checkpoint",
        help="with a run folder: sample its best or last checkpoint (or a .ckpt path) instead of the "
        "fit's final export, exported first to <run>/export-<checkpoint name> (see `medsd export`)",
    )
    parser.add_argument("--prompts", help="text file, one prompt per line (instead of --config)")
    parser.add_argument(
        "--config", action="append", default=[], help="run config whose dataset gives the prompts"
    )
    parser.add_argument("--split", default="test", choices=SPLITS, help="dataset split with --config")
    parser.add_argument(
        "--max-prompts", type=int, help="render only the split's first N distinct prompts (dataset order)"
    )
    parser.add_argument("--per-prompt", type=int, default=1, help="images per prompt")
    parser.add_argument(
        "--seed", type=int, default=0, help="image k of prompt i gets seed SEED + i * PER_PROMPT + k"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a paper's scheduler, steps and guidance")
    parser.add_argument("--scheduler", help="ddim, pndm, dpm++, euler, ... (default: the model's own)")
    parser.add_argument("--steps", type=int, help=f"inference steps (default {DEFAULTS['steps']})")
    parser.add_argument("--guidance", type=float, help=f"guidance scale (default {DEFAULTS['guidance']})")
    parser.add_argument("--height", type=int, help="default: the model's native size")
    parser.add_argument("--width", type=int, help="default: the model's native size")
    parser.add_argument(
        "--prompt-template",
        help="e.g. '<token> {prompt}' (default: a textual-inversion export's training caption "
        "template, else '{prompt}')",
    )
    parser.add_argument("--base-model", help="base for a textual-inversion / LoRA export")
    parser.add_argument("--textual-inversion", action="append", default=[], help="extra embeddings")
    parser.add_argument("--lora", action="append", default=[], help="extra LoRA weights")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="default: cuda:LOCAL_RANK if a GPU is present, else cpu")
    rank, world_size = env_rank()
    parser.add_argument("--rank", type=int, default=rank, help="default: $RANK (torchrun)")
    parser.add_argument("--world-size", type=int, default=world_size, help="default: $WORLD_SIZE")
    return parser


def sampler_settings(args: argparse.Namespace) -> dict:
    """Scheduler, steps and guidance: explicit flags, else the preset's, else the defaults."""
    preset = PRESETS.get(args.preset, {})
    return {
        key: getattr(args, key) if getattr(args, key) is not None else preset.get(key, default)
        for key, default in DEFAULTS.items()
    }


def default_device() -> str:
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def main(argv: list[str]) -> None:
    parser = build_parser()
    args, overrides = parse_with_config_args(parser, argv)
    if overrides and not args.config:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if bool(args.prompts) == bool(args.config):
        parser.error("give the prompts: --prompts FILE, or --config RUN.yaml [--split SPLIT]")
    # Config files first, then the dotted overrides: the order `medsd fit` reads them in.
    config_args = [arg for path in args.config for arg in ("--config", path)] + overrides
    if args.prompts:
        prompts, prompt_source = prompts_from_file(args.prompts), file_source(args.prompts)
    else:
        prompts = prompts_from_split(config_args, args.split)[: args.max_prompts]
        prompt_source = split_source(args.split, config_args, args.max_prompts)
    source = args.source
    if args.checkpoint:
        source = str(checkpoint_export(args.source, args.checkpoint, args.world_size))
    settings = Settings(
        source=source,
        per_prompt=args.per_prompt,
        seed=args.seed,
        height=args.height,
        width=args.width,
        dtype=args.dtype,
        prompt_template=args.prompt_template,
        base_model=args.base_model,
        textual_inversion=args.textual_inversion,
        lora=args.lora,
        **sampler_settings(args),
    )
    # A flag names a sampler the user wants; a preset's stands for the papers' models (DDPM ones).
    settings = fit_sampler(settings, preset=args.preset if args.scheduler is None else None)
    try:
        # Rank 0 owns the folder; the other ranks write their own images into it.
        with for_rank(args.out, args.rank):
            done = sample(
                args.out,
                prompts,
                settings,
                batch_size=args.batch_size,
                rank=args.rank,
                world_size=args.world_size,
                device=args.device or default_device(),
                prompt_source=prompt_source,
            )
    except SettingsMismatchError as error:
        raise SystemExit(f"medsd sample: {error}") from None
    print(f"{args.out}: {'complete, manifest written' if done else 'waiting for other ranks'}")
