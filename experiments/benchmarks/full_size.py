"""Benchmark: every paper config at its real size, random weights, on the CPU.

    python -m experiments.benchmarks.full_size [--configs roentgen/unet prompt_to_polyp/flux_lora]
        [--steps 2] [--sample-steps 2] [--batch-size 1] [--out figures.json]

Per paper model config (`experiments/configs/{chambon2022,da_silva2024,roentgen,prompt_to_polyp}`),
in a subprocess of its own (so that its peak memory is its own): `medsd fit` of the config with
`backbone.random_init: true` (the shipped architecture, `lightning_modules/architectures`, random
weights, no download; MSDM: its text encoder's `text_model_random_init`, over a VAE built from
msdm_vae.yaml) on a synthetic batch at the config's resolution (`HeldBatch`: generated shapes and
their prompts, held in memory), `--steps` training steps at batch `--batch-size`, the export at fit
end, then the export loaded with `load_pipeline` and one image sampled with `--sample-steps`
steps at the config's resolution.

CPU settings: one device, no accumulation, validation and checkpoints off; the config's precision,
except that 16-mixed (Kandinsky's) is bf16-mixed, the CPU's half precision. `DEPTH` says where the
model is reduced to fit 24 GB with room for other work (under 18 GB a run): FLUX.1-dev's 12B
transformer and T5-XXL keep 1 block of each kind and 2 layers, with every width, head size,
the 512 T5 tokens and the 1,024 image tokens of 512 px as published; Kandinsky keeps its depth
with the frozen weights in bf16 (on a GPU its 16-mixed holds them in fp16 too). Everything else
is full size in fp32.

Printed per config: resolution, depth, parameters (total / trainable), seconds per training step
(each step: batch start to batch end, optimiser step included; the first one has the first-call
costs), the fit's end (the export, and Lightning's teardown), building the module, loading the
export and sampling, and peak RSS (training; the whole run including sampling).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml

from experiments.lightning_cli import MedsdCLI, build_from_config
from experiments.run_lock import released_on_return

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPERS = ("chambon2022", "da_silva2024", "roentgen", "prompt_to_polyp")
COMPOSED = ("data", "trainer", "msdm_data")  # files the run configs compose, not run configs
THIS = "experiments.benchmarks.full_size"
MSDM_VAE = "prompt_to_polyp/msdm_vae"

# Config -> (what is reduced, the fit arguments that reduce it); unnamed configs run full size.
FLUX_DEPTH = {"transformer": {"num_layers": 1, "num_single_layers": 1}, "text_encoder_2": {"num_layers": 2}}
DEPTH = {
    "prompt_to_polyp/flux_lora": (
        "reduced: blocks 1/19 double + 1/38 single, T5-XXL 2/24 layers; bf16",
        {"--model.init_args.backbone.architecture_overrides": json.dumps(FLUX_DEPTH)},
    ),
    "prompt_to_polyp/kandinsky_lora": (
        "full; frozen weights bf16",
        {"--model.init_args.backbone.dtype": "bfloat16"},
    ),
}


def paper_configs() -> list[str]:
    """`paper/name` of every paper model config."""
    return [
        f"{paper}/{path.stem}"
        for paper in PAPERS
        for path in sorted((CONFIGS / paper).glob("*.yaml"))
        if path.stem not in COMPOSED
    ]


class Clock(L.Callback):
    """Per training step seconds (batch start to batch end), parameters, peak RSS of training."""

    def __init__(self):
        self.steps: list[float] = []
        self.figures: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.figures["parameters"] = sum(p.numel() for p in pl_module.parameters())
        self.figures["trainable"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        self.figures["train_peak_rss"] = peak_rss()
        self.train_end = time.perf_counter()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def read(config: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())


def resolution(config: str) -> int:
    data = read(config)["data"]
    if isinstance(data, str):  # a composed file
        data = yaml.safe_load((CONFIGS / config).parent.joinpath(data).read_text())
    return data["init_args"]["image_size"]


def cpu_precision(config: str) -> str:
    trainer = read(config)["trainer"]
    if isinstance(trainer, str):
        trainer = yaml.safe_load((CONFIGS / config).parent.joinpath(trainer).read_text())
    precision = str(trainer.get("precision", "32-true"))
    return "bf16-mixed" if precision == "16-mixed" else precision


def random_init_args(config: str, root: Path) -> dict[str, str]:
    """The fit arguments that build the config's model from shipped architectures."""
    model = read(config)["model"]
    if "backbone" in model["init_args"]:
        return {"--model.init_args.backbone.random_init": "true"}
    if model["class_path"].endswith("CompactDiffusion"):  # MSDM: a VAE of msdm_vae.yaml's shape
        vae, _ = build_from_config(["--config", str(CONFIGS / f"{MSDM_VAE}.yaml")])
        vae.vae.save_pretrained(root / "vae")
        return {
            "--model.init_args.vae": str(root / "vae"),
            "--model.init_args.text_model_random_init": "true",
        }
    return {}  # VAETraining: trained from scratch anyway


def fit_args(config: str, args: argparse.Namespace, root: Path) -> list[str]:
    size = resolution(config)
    data = {
        "image_size": size,
        "batch_size": args.batch_size,
        "n_train": args.batch_size,
        "repeats": args.steps,
    }
    settings = {
        "--data": json.dumps(
            {"class_path": "experiments.benchmarks.train_throughput.HeldBatch", "init_args": data}
        ),
        "--trainer.default_root_dir": str(root / "run"),
        "--trainer.accelerator": "cpu",
        "--trainer.devices": "1",
        "--trainer.num_nodes": "1",
        "--trainer.strategy": "auto",
        "--trainer.precision": cpu_precision(config),
        "--trainer.max_steps": str(args.steps),
        "--trainer.accumulate_grad_batches": "1",
        "--trainer.limit_val_batches": "0",
        "--trainer.num_sanity_val_steps": "0",
        "--trainer.enable_progress_bar": "false",
        "--trainer.callbacks": json.dumps([{"class_path": f"{THIS}.Clock"}]),
        "--checkpoint.save_last": "false",
        "--checkpoint.save_top_k": "0",
        "--cost.count_flops": "false",
        **random_init_args(config, root),
        **DEPTH.get(config, ("", {}))[1],
    }
    return [
        "fit",
        "--config",
        str(CONFIGS / f"{config}.yaml"),
        *(x for pair in settings.items() for x in pair),
    ]


def sample(run: Path, size: int, steps: int, precision: str) -> dict:
    """Seconds to load the run's export and to sample one image from it at `size`."""
    from lightning_modules.pipelines import load_pipeline, render

    started = time.perf_counter()
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    pipe = load_pipeline(run, dtype=dtype)
    loaded = time.perf_counter()
    images = render(pipe, ["chest x-ray with pleural effusion"], [0], steps, 3.5, height=size, width=size)
    return {
        "load_export_seconds": loaded - started,
        "sample_seconds": time.perf_counter() - loaded,
        "sample_size": list(images[0].size),
    }


def measure(config: str, args: argparse.Namespace) -> dict:
    """One config's figures (run in its own process by `main`)."""
    with tempfile.TemporaryDirectory(prefix="medsd-full-size-") as folder:
        root = Path(folder)
        argv = fit_args(config, args, root)
        started = time.perf_counter()
        with released_on_return(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "LightningCLI's args parameter", UserWarning)
            cli = MedsdCLI(args=argv)
        ended = time.perf_counter()
        # By name: run as __main__, this module is not the one the config's class path imports.
        clock = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Clock")
        figures = {
            "config": config,
            "resolution": resolution(config),
            "depth": DEPTH.get(config, ("full",))[0],
            "precision": cpu_precision(config),
            "batch_size": args.batch_size,
            **clock.figures,
            "build_seconds": clock.fit_start - started,
            "step_seconds": clock.steps,
            "fit_end_seconds": ended - clock.train_end,
        }
        del cli, clock
        gc.collect()
        if read(config)["model"]["class_path"].endswith("VAETraining"):
            figures["sample"] = None  # a VAE: nothing to prompt
        else:
            figures["sample"] = sample(
                root / "run", figures["resolution"], args.sample_steps, figures["precision"]
            )
        figures["peak_rss"] = peak_rss()
        return figures


def run_child(config: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", THIS, "--child", config, "--steps", str(args.steps)]
    command += ["--sample-steps", str(args.sample_steps), "--batch-size", str(args.batch_size)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        # A negative code is a signal: -9 is most often the kernel's out-of-memory killer.
        error = [f"exit code {result.returncode}", *result.stderr.strip().splitlines()[-3:]]
        return {"config": config, "error": error, "seconds": 0.0}
    figures = json.loads(lines[-1])
    figures["seconds"] = time.perf_counter() - started
    return figures


GIB = 2**30
COLUMNS = (
    "config",
    "px",
    "depth",
    "params M (trained)",
    "build s",
    "s/step",
    "fit end s",
    "sample s",
    "train GiB",
    "peak GiB",
)


def row(f: dict) -> list[str]:
    if "error" in f:
        return [f["config"], "", "FAILED: " + " | ".join(f["error"])]
    sample = f["sample"]
    return [
        f["config"],
        str(f["resolution"]),
        f["depth"],
        f"{f['parameters'] / 1e6:.0f} ({f['trainable'] / 1e6:.1f})",
        f"{f['build_seconds']:.0f}",
        " / ".join(f"{s:.1f}" for s in f["step_seconds"]),
        f"{f['fit_end_seconds']:.1f}",
        f"{sample['sample_seconds']:.1f}" if sample else "n/a",
        f"{f['train_peak_rss'] / GIB:.1f}",
        f"{f['peak_rss'] / GIB:.1f}",
    ]


def table(figures: list[dict]) -> str:
    rows = [list(COLUMNS), *(row(f) for f in figures)]
    whole = [r for r in rows if len(r) == len(COLUMNS)]  # a failed row's message runs on
    widths = [max(len(r[i]) for r in whole) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)).rstrip() for r in rows
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=None, help="paper/name, e.g. roentgen/unet (default: all)"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return []
    configs = args.configs or paper_configs()
    unknown = sorted(set(configs) - set(paper_configs()))
    if unknown:
        raise SystemExit(f"not paper configs: {unknown}; they are {paper_configs()}")
    figures = []
    for config in configs:
        figures.append(run_child(config, args))
        print(table(figures[-1:]).splitlines()[-1], flush=True)
    print(f"\nCPU, {torch.get_num_threads()} threads, batch {args.batch_size}, random weights")
    print(table(figures))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
