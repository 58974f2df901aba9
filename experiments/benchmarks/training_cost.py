"""Benchmark: the training cost of each model family, as every run records it.

    python -m experiments.benchmarks.training_cost [--steps 12] [CONFIG ...] [-- FIT ARGS ...]
    python -m experiments.benchmarks.training_cost -- --trainer.accelerator gpu --trainer.precision bf16-mixed

Runs a short `medsd fit` of each config (default: the tiny config of every family) in its own
process, with any extra `medsd fit` arguments after `--` (accelerator, precision, devices,
batch size, ...), and prints the `cost` each run wrote into its metrics.json: trainable
parameters, training FLOPs per image, images per second, peak GPU memory and wall time. On a
GPU machine this gives the per-family throughput and memory figures under a chosen precision;
on a CPU it checks the same path with tiny models.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
FAMILIES = ["unet", "lora", "textual_inversion", "sdxl_lora", "flux_lora", "kandinsky_lora", "compact_vae"]


def measure(config: Path, steps: int, fit_args: list[str], root: Path) -> dict:
    """Train `config` for `steps` steps in a fresh process; the run's recorded cost."""
    run = root / config.stem
    command = [sys.executable, "-m", "experiments.cli", "fit", "--config", str(config)]
    command += ["--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(run), *fit_args]
    subprocess.run(command, check=True, capture_output=True)
    return json.loads((run / "metrics.json").read_text())["cost"]


def row(name: str, cost: dict) -> str:
    training = cost["training"]
    flops = training["flops_per_image"]
    memory = training["peak_gpu_memory_bytes"]
    return " | ".join(
        [
            name,
            training["precision"],
            training["devices"],
            f"{cost['parameters']['trainable']:,}",
            f"{flops / 1e9:.2f}" if flops else "",
            f"{training['images_per_second']:.1f}",
            f"{memory / 2**30:.2f}" if memory else "",
            f"{training['wall_seconds']:.1f}",
        ]
    )


def main() -> None:
    argv = sys.argv[1:]
    fit_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", help="run configs (default: the tiny one of each family)")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args(own)
    configs = [Path(c) for c in args.configs] or [CONFIGS / f"{name}.yaml" for name in FAMILIES]
    print(f"{args.steps} steps each; extra fit arguments: {' '.join(fit_args) or '(none)'}")
    print("config | precision | devices | trainable | train GFLOPs/image | images/s | peak GPU GiB | wall s")
    with tempfile.TemporaryDirectory() as root:
        for config in configs:
            print(row(config.stem, measure(config, args.steps, fit_args, Path(root))), flush=True)


if __name__ == "__main__":
    main()
