"""One short in-process `medsd fit` of a tiny config, for the tests of what a run writes."""

from pathlib import Path

from experiments.cli import main as medsd


def tiny_fit_args(root: Path, *extra: str, config: str = "unet") -> list[str]:
    """The `medsd` arguments of a fit of experiments/configs/tiny/<config>.yaml into `root`, one
    validation batch, no FLOP count; `extra` are further `medsd fit` arguments."""
    return [
        "fit",
        "--config",
        f"experiments/configs/tiny/{config}.yaml",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.limit_val_batches",
        "1",
        "--cost.count_flops",
        "false",
        *extra,
    ]


def tiny_fit(root: Path, *extra: str, config: str = "unet") -> None:
    """That fit, run in this process."""
    medsd(tiny_fit_args(root, *extra, config=config))
