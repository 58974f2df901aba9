"""One short in-process `medsd fit` of a tiny config, for the tests of what a run writes."""

from pathlib import Path

from experiments.cli import main as medsd


def tiny_fit(root: Path, *extra: str, config: str = "unet") -> None:
    """`medsd fit` of experiments/configs/tiny/<config>.yaml into `root`, one validation batch,
    no FLOP count; `extra` are further `medsd fit` arguments (--trainer.max_steps, ...)."""
    medsd(
        [
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
    )
