"""`medsd export`: write a run's export from one of its checkpoints.

    medsd export runs/unet                          # the best checkpoint -> runs/unet/export-best
    medsd export runs/unet --checkpoint last        # or last, or a .ckpt path
    medsd export runs/unet --checkpoint best --out my_export

A fit ends with an export of its final weights (`<run>/export`); the checkpoint with the lowest
validation loss is often the one to sample from. The run's saved `config.yaml` rebuilds the
strategy (its backbone loaded again), the checkpoint's trained weights and EMA replace the
fresh ones, and the export is written exactly as at the end of a fit, into a new folder so the
fit's own export stays as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

from experiments.cli import command_parser
from lightning_modules.export import MANIFEST, write_export
from lightning_modules.trained_weights import load_trained

log = logging.getLogger(__name__)


def checkpoint_path(run: Path, which: str) -> Path:
    """`best` (the checkpoint with the lowest validation loss), `last`, or a path to a .ckpt file."""
    folder = run / "checkpoints"
    if which in ("last", "best"):
        path = folder / f"{which}.ckpt"
    else:
        path = Path(which)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def export_folder(run: str | Path, checkpoint: Path) -> Path:
    """Where a checkpoint's export goes by default: `<run>/export-<checkpoint name>`."""
    return Path(run) / f"export-{checkpoint.stem}"


def export_checkpoint(run: str | Path, which: str = "best", out: str | Path | None = None) -> Path:
    """Rebuild the run's strategy, load the checkpoint's trained weights, write its export."""
    from datamodules.safe_load import load_checkpoint
    from experiments.lightning_cli import build_from_config  # imported here: it imports Lightning

    run = Path(run)
    config = run / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run} has no config.yaml: is it a `medsd fit` run folder?")
    path = checkpoint_path(run, which)
    module, _ = build_from_config(["--config", str(config)])
    checkpoint = load_checkpoint(path)
    load_trained(module, checkpoint)
    folder = Path(out) if out else export_folder(run, path)
    write_export(module.eval(), folder, checkpoint["global_step"])
    log.info("exported %s (step %d) to %s", path.name, checkpoint["global_step"], folder)
    return folder


def checkpoint_export(run: str | Path, which: str, world_size: int = 1) -> Path:
    """The export of a run's checkpoint for sampling: reused while newer than the checkpoint,
    else written here (by a single process: several ranks would race on the folder)."""
    path = checkpoint_path(Path(run), which)
    folder = export_folder(run, path)
    manifest = folder / MANIFEST
    if manifest.is_file() and manifest.stat().st_mtime >= path.stat().st_mtime:
        return folder
    if world_size > 1:
        raise RuntimeError(
            f"{folder} is missing or older than {path.name}: write it once with "
            f"`medsd export {run} --checkpoint {which}` before sampling on several ranks"
        )
    return export_checkpoint(run, which)


def main(argv: list[str]) -> None:
    parser = command_parser(prog="medsd export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a `medsd fit` run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a .ckpt path")
    parser.add_argument("--out", help="default: <run>/export-<checkpoint name>")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.run, args.checkpoint, args.out))
