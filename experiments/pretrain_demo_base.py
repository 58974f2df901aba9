"""Pretrain the demo's base model on a procedural domain that is not chest X-rays.

    python -m experiments.pretrain_demo_base [--out DIR] [--vae-minutes 2] [--minutes 10]

Stable Diffusion meets radiographs after pretraining on natural images, with a VAE that encodes
any image well and a U-Net whose cross-attention ties words to places, sizes and brightness; the
demo needs the same situation at CPU scale, so its base model (`medsd/demo-base`) is pretrained
here on generated grey-level scenes whose captions say where each shape is, how large and how
bright (datamodules/scenes.py), and then adapted to chest phantoms by every strategy. Two
`medsd fit` runs, each bounded by time: a VAE (experiments/configs/demo/base_vae.yaml), then a
tiny text-to-image U-Net on its latents with a frozen tiny CLIP text encoder (base.yaml). The
second run's export, a diffusers pipeline folder, is copied to `--out`; the repository ships the
result, so the demo never waits for this.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from datamodules.atomic import atomic_directory

from .cli import main as medsd

CONFIGS = Path(__file__).resolve().parent / "configs" / "demo"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "lightning_modules" / "demo_base"


def time_limit(minutes: float) -> list[str]:
    return ["--trainer.max_time", f"00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}"]


def pretrain(out: Path, work: Path, vae_minutes: float, minutes: float) -> Path:
    medsd(["fit", "--config", str(CONFIGS / "base_vae.yaml"), "--trainer.default_root_dir", str(work / "vae"),
           *time_limit(vae_minutes)])  # fmt: skip
    medsd(["fit", "--config", str(CONFIGS / "base.yaml"), "--trainer.default_root_dir", str(work / "base"),
           "--model.init_args.vae", str(work / "vae" / "export"), *time_limit(minutes)])  # fmt: skip
    with atomic_directory(out) as scratch:
        shutil.copytree(work / "base" / "export", scratch, dirs_exist_ok=True)
        without_machine_paths(scratch)
    return out


# Where the manifest and diffusers' configs record the folders a model was made from.
PATH_KEYS = ("base_model", "_name_or_path")


def without_machine_paths(folder: Path) -> None:
    """The folder ships with the package: the absolute paths of this machine its JSON files
    record (informational in a self-contained pipeline) become relative to the working folder."""
    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        absolute = {k: v for k, v in data.items() if k in PATH_KEYS and os.path.isabs(str(v))}
        if absolute:
            data.update({k: os.path.relpath(v) for k, v in absolute.items()})
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the base model folder goes")
    parser.add_argument("--work", default="runs/demo-base", help="the two runs' folders")
    parser.add_argument("--vae-minutes", type=float, default=2.0, help="time limit of the VAE run")
    parser.add_argument("--minutes", type=float, default=10.0, help="time limit of the U-Net run")
    args = parser.parse_args(argv)
    print(pretrain(Path(args.out), Path(args.work), args.vae_minutes, args.minutes))


if __name__ == "__main__":
    main()
