"""Benchmark: training throughput of `medsd fit` against a plain PyTorch loop on the same module.

    python -m experiments.benchmarks.train_throughput [--strategies lora unet textual_inversion]
        [--steps 20] [--warmup-steps 3] [--batch-size 4] [--resolution 32] [--out figures.json]
    python -m experiments.benchmarks.train_throughput --device cuda --precision bf16-mixed \
        --backbone stable-diffusion-v1-5/stable-diffusion-v1-5 --resolution 512 --batch-size 8

Per strategy (the tiny config `experiments/configs/tiny/<strategy>.yaml` with `--backbone`) three
trainings run in this one process, on one batch collated once and held in memory (images
transformed, prompts tokenised by the module's tokenizer: the DataModule `HeldBatch`), so no
image decoding or tokenising is timed:

- plain: the module class built from the same config, trained by the loop of a diffusers
  training example: per step the batch to the device, `diffusion_step` (the same loss, caption
  dropout included), backward, AdamW with the module's settings, the strategy's
  `after_optimizer_step` (textual inversion restores the untrained embedding rows), the learning-
  rate schedule, `zero_grad(set_to_none=True)`. Nothing else: no logging, EMA, guard or seeding.
- medsd: `medsd fit` of the config as it runs (MedsdCLI: its Trainer, TensorBoard logger,
  progress bar, learning-rate monitor, EMA where the config keeps one, the NaN guard, which reads
  every gradient before each optimiser step, per-step seeds, cost accounting, checkpoints and the
  export at the end), with validation off so that the timed steps are training steps only.
- medsd lean: the same with what the settings let go: logging every 10^6 steps, no progress bar,
  no EMA, no FLOP count, no checkpoints. NaN guard, step seeds and cost counting cannot be
  switched off; Lightning's loop and them are what remains between "medsd lean" and "plain".

Measurement: `--warmup-steps` steps first, untimed (allocator, kernel selection, lazy
initialisation); then `--steps` timed steps. A medsd step is timed from one training batch's
start to the next one's (the run trains one extra step for that), so every callback and logger
of a step is inside it; a plain step from its start to its end. On a GPU the clock waits for the
device (`torch.cuda.synchronize`) only where the timed steps start and end: between them the
host runs ahead of the device as in a run, so what stalls it (the NaN guard reads its
finiteness check back to the host every step, the progress bar the loss) costs what it costs in a
real run. The mean step and the median step are printed: on a busy machine the median is the
steadier figure; on a GPU it is the host's step time, which matches the device's once the
launch queue is full. Peak memory: on a GPU `torch.cuda.max_memory_allocated`, reset
before each training; on a CPU the process's peak RSS so far (it only grows: a later row includes
the earlier ones). FLOPs: `lightning_modules.cost.training_flops` on one example (the count
`medsd fit` records), times the images per second; MFU on a GPU against `--peak-tflops`
(default: 989 TFLOP/s, H100 / H200 dense bf16, only for those devices with bf16-mixed). Sampling:
the medsd run's export loaded by `load_pipeline`, `render` of one batch of the prompts with
`--sample-steps` steps and classifier-free guidance, after one untimed render. Both paths run in
one process, one after the other; run on a quiet machine, since a busy one makes the figures noisy.
The fit wall time (the whole `medsd fit`: building, the export) is printed next to the steps'.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import resource
import statistics
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from diffusers.optimization import get_scheduler

from datamodules import SyntheticShapesDataModule
from datamodules.base import ImageTextCollate
from experiments.lightning_cli import MedsdCLI, build_from_config
from experiments.run_lock import released_on_return
from lightning_modules.cost import first_example, training_flops
from lightning_modules.pipelines import load_pipeline, render
from lightning_modules.precision import place_frozen_weights, train_in_fp32

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
# The tiny configs of LoRAFineTuning, FineTuning and TextualInversion.
STRATEGIES = ("lora", "unet", "textual_inversion")
# Dense bf16 tensor-core peaks (TFLOP/s), from NVIDIA's data sheets (the sparse figure is twice this).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
THIS = "experiments.benchmarks.train_throughput"
# What `medsd fit` lets go by its settings; see the docstring for what stays.
LEAN = {
    "--trainer.log_every_n_steps": "1000000",
    "--trainer.enable_progress_bar": "false",
    "--model.init_args.ema_decay": "null",
    "--cost.count_flops": "false",
    "--checkpoint.save_last": "false",
    "--checkpoint.save_top_k": "0",
}

LEGEND = """\
plain: the diffusers-example loop; medsd: `medsd fit` as configured, validation off; medsd_lean: also
without logging, progress bar, EMA, FLOP count and checkpoints (NaN guard, step seeds and the cost
counter stay). vs plain: images/s over plain's; fit s: the whole fit, building and export included."""


class HeldBatch(SyntheticShapesDataModule):
    """The first `batch_size` generated training examples, collated once when the training loader
    is asked for, and served `repeats` times: every step trains on the same tensors."""

    def __init__(self, repeats: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.repeats = repeats
        self.batch: dict | None = None

    def train_dataloader(self) -> Repeated:
        records = self.usable_records("train")[: self.batch_size]
        dataset = self.dataset(records, "train")
        self.batch = ImageTextCollate(self.tokenizer)([dataset[i] for i in range(len(records))])
        return Repeated(self.batch, self.repeats)


class Repeated:
    """One batch `times` times, as a loader (not a list, which Lightning reads as many loaders)."""

    def __init__(self, batch: dict, times: int):
        self.batch, self.times = batch, times

    def __len__(self) -> int:
        return self.times

    def __iter__(self):
        return iter([self.batch] * self.times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in module.named_parameters()}


def changed(module: torch.nn.Module, start: dict[str, torch.Tensor]) -> list[str]:
    """The parameters whose values differ from `start`."""
    return sorted(n for n, p in module.named_parameters() if not torch.equal(p.detach().cpu(), start[n]))


def trainable(module: torch.nn.Module) -> list[str]:
    return sorted(n for n, p in module.named_parameters() if p.requires_grad)


class StepClock(L.Callback):
    """Times medsd's steps `warmup_steps` to `warmup_steps + steps - 1` (from batch start to the
    next batch's start) and notes which parameters the fit changed."""

    def __init__(self, warmup_steps: int, steps: int):
        self.warmup_steps, self.steps = warmup_steps, steps
        self.marks: list[float] = []  # at the start of each timed step and of the one after
        self.changed: list[str] = []
        self.trainable: list[str] = []
        self.learning_rates: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = snapshot(pl_module)
        self.trainable = trainable(pl_module)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.learning_rates.append(trainer.optimizers[0].param_groups[0]["lr"])
        if batch_idx in (self.warmup_steps, self.warmup_steps + self.steps):
            synchronize(pl_module.device)  # only here: see the module's docstring
        if self.warmup_steps <= batch_idx <= self.warmup_steps + self.steps:
            self.marks.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.changed = changed(pl_module, self._start)
        self.peak_memory = peak_memory(pl_module.device)


def peak_memory(device: torch.device) -> int:
    """Bytes: the GPU's peak allocation since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def config_args(strategy: str, args: argparse.Namespace, repeats: int) -> list[str]:
    """The `medsd fit` config arguments both paths build their module and data from."""
    data = {"image_size": args.resolution, "batch_size": args.batch_size, "n_train": args.batch_size}
    return [
        "--config",
        str(CONFIGS / f"{strategy}.yaml"),
        "--model.init_args.backbone.name_or_path",
        args.backbone,
        "--data",
        json.dumps({"class_path": f"{THIS}.HeldBatch", "init_args": {**data, "repeats": repeats}}),
    ]


def precision_context(precision: str, device: torch.device):
    """What Lightning's precision plugin wraps a step in, for the plain loop."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def plain_run(strategy: str, args: argparse.Namespace, device: torch.device) -> tuple[dict, dict, int]:
    """Train the config's module with the plain loop: (figures, the batch it trained on, FLOPs
    per image)."""
    total = args.warmup_steps + args.steps
    torch.manual_seed(0)
    module, data = build_from_config(config_args(strategy, args, total))
    data.tokenizer = module.prompt_tokenizer  # what the module's setup does under `medsd fit`
    data.setup("fit")
    batch = data.train_dataloader().batch
    # The weight placement medsd's setup makes (and a diffusers example's `weight_dtype`): trained
    # weights fp32, frozen ones in bf16 on a GPU under bf16-mixed; a no-op on a CPU.
    train_in_fp32(module, args.precision)
    module._vae_dtype = place_frozen_weights(module, args.precision, False, device.type)
    module.to(device).train()  # trained parts in train mode, frozen ones in eval (modes.py)
    flops = training_flops(module, first_example(batch), lambda: precision_context(args.precision, device))
    settings = module.optimizer_settings
    optimizer = torch.optim.AdamW(
        [g for g in module.parameter_groups() if g["params"]],
        lr=settings.lr,
        betas=tuple(settings.betas),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        fused=settings.fused if settings.fused is not None else device.type == "cuda",
    )
    # The schedule over the medsd run's steps, so both see the same learning rates.
    schedule = get_scheduler(
        settings.schedule, optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=total + 1
    )
    start, names, learning_rates = snapshot(module), trainable(module), []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks = []  # at the start of each timed step and at the end
    for step in range(total):
        if step == args.warmup_steps:
            synchronize(device)
        if step >= args.warmup_steps:
            marks.append(time.perf_counter())
        learning_rates.append(optimizer.param_groups[0]["lr"])
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with precision_context(args.precision, device):
            loss = module.diffusion_step(on_device, None, module.objective.caption_dropout)
        loss.backward()
        optimizer.step()
        module.after_optimizer_step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    marks.append(time.perf_counter())
    figures = path_figures(marks, args, changed(module, start), names, peak_memory(device))
    figures["learning_rates"] = learning_rates
    return figures, batch, flops


def medsd_run(
    strategy: str, args: argparse.Namespace, root: Path, extra: dict[str, str]
) -> tuple[dict, dict, float]:
    """`medsd fit` of the config into `root`: (figures, the batch it trained on, fit seconds)."""
    clock = {
        "class_path": f"{THIS}.StepClock",
        "init_args": {"warmup_steps": args.warmup_steps, "steps": args.steps},
    }
    fit_args = {
        "--trainer.default_root_dir": str(root),
        # One extra step: the last timed step ends where the next one starts.
        "--trainer.max_steps": str(args.warmup_steps + args.steps + 1),
        "--trainer.limit_val_batches": "0",
        "--trainer.num_sanity_val_steps": "0",
        "--trainer.accelerator": "gpu" if args.device == "cuda" else "cpu",
        "--trainer.precision": args.precision,
        "--trainer.callbacks": json.dumps([clock]),
        **extra,
    }
    argv = ["fit", *config_args(strategy, args, args.warmup_steps + args.steps + 1)]
    argv += [item for pair in fit_args.items() for item in pair]
    started = time.perf_counter()
    with released_on_return(), warnings.catch_warnings():  # as experiments.cli.main runs `medsd fit`
        # LightningCLI warns of explicit args next to sys.argv: this process's argv is ours.
        warnings.filterwarnings("ignore", "LightningCLI's args parameter", UserWarning)
        cli = MedsdCLI(args=argv)
    fit_seconds = time.perf_counter() - started
    timer = next(c for c in cli.trainer.callbacks if isinstance(c, StepClock))
    figures = path_figures(timer.marks, args, timer.changed, timer.trainable, timer.peak_memory)
    figures["learning_rates"] = timer.learning_rates
    return figures, cli.datamodule.batch, fit_seconds


def path_figures(
    marks: list[float], args, changed_names: list[str], trainable_names: list[str], memory: int
) -> dict:
    steps = [end - start for start, end in itertools.pairwise(marks)]
    return {
        "seconds_per_step": sum(steps) / len(steps),
        # Less moved than the mean by a step that another process slowed down.
        "median_seconds_per_step": statistics.median(steps),
        "images_per_second": len(steps) * args.batch_size / sum(steps),
        "peak_memory_bytes": memory,
        "trainable": trainable_names,
        "changed": changed_names,
    }


def sampling(run: Path, prompts: list[str], args: argparse.Namespace) -> dict:
    """Images per second of `render` from the run's export, one batch of `prompts`."""
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    pipe = load_pipeline(run, device=args.device, dtype=dtype)
    seeds = list(range(len(prompts)))
    size = {"height": args.resolution, "width": args.resolution}
    render(pipe, prompts, seeds, 1, args.guidance, **size)  # untimed: first-call costs
    synchronize(torch.device(args.device))
    start = time.perf_counter()
    render(pipe, prompts, seeds, args.sample_steps, args.guidance, **size)
    synchronize(torch.device(args.device))
    seconds = time.perf_counter() - start
    return {
        "steps": args.sample_steps,
        "guidance": args.guidance,
        "images_per_second": len(prompts) / seconds,
    }


def peak_flops(args: argparse.Namespace) -> float | None:
    """FLOP/s that MFU is against: --peak-tflops, else the table's for this GPU under bf16."""
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12
    if args.device != "cuda" or not args.precision.startswith("bf16"):
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for gpu, tflops in PEAK_BF16_TFLOPS.items() if gpu in name), None)


def measure(strategy: str, args: argparse.Namespace, root: Path) -> dict:
    device = torch.device(args.device)
    plain, batch, flops = plain_run(strategy, args, device)
    medsd, medsd_batch, fit_seconds = medsd_run(strategy, args, root / strategy, {})
    lean, _, lean_fit_seconds = medsd_run(strategy, args, root / f"{strategy}-lean", LEAN)
    medsd["fit_seconds"], lean["fit_seconds"] = fit_seconds, lean_fit_seconds
    peak = peak_flops(args)
    paths = {"plain": plain, "medsd": medsd, "medsd_lean": lean}
    for figures in paths.values():
        figures["ratio_to_plain"] = figures["images_per_second"] / plain["images_per_second"]
        figures["flops_per_second"] = flops * figures["images_per_second"]
        figures["mfu"] = figures["flops_per_second"] / peak if peak else None
    same = all(torch.equal(batch[k], medsd_batch[k]) for k in ("pixel_values", "input_ids"))
    return {
        "training_flops_per_image": flops,
        "same_batch": same and batch["prompts"] == medsd_batch["prompts"],
        "paths": paths,
        "sampling": sampling(root / strategy, batch["prompts"], args),
    }


COLUMNS = ("strategy", "path", "images/s", "s/step", "median s/step", "vs plain")
COLUMNS += ("peak GiB", "GFLOP/s", "MFU", "fit s")


def table(figures: dict) -> str:
    rows = [COLUMNS, ["---"] * len(COLUMNS)]
    for strategy, result in figures["strategies"].items():
        for name, path in result["paths"].items():
            rows.append(
                [
                    strategy,
                    name,
                    f"{path['images_per_second']:.2f}",
                    f"{path['seconds_per_step']:.3f}",
                    f"{path['median_seconds_per_step']:.3f}",
                    f"{path['ratio_to_plain']:.2f}",
                    f"{path['peak_memory_bytes'] / 2**30:.2f}",
                    f"{path['flops_per_second'] / 1e9:.2f}",
                    f"{path['mfu']:.1%}" if path["mfu"] is not None else "-",
                    f"{path['fit_seconds']:.1f}" if "fit_seconds" in path else "-",
                ]
            )
        sample = result["sampling"]
        what = f"sampling ({sample['steps']} steps, guidance {sample['guidance']})"
        rows.append([strategy, what, f"{sample['images_per_second']:.2f}", *[""] * (len(COLUMNS) - 3)])
    return "\n".join(" | ".join(row).rstrip() for row in rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="medsd/tiny-sd", help="hub id, diffusers folder or tiny model")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    precisions = ("32-true", "bf16-mixed")
    parser.add_argument("--precision", choices=precisions, help="default: 32-true on CPU, bf16-mixed on GPU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    figures = {
        "device": device,
        "precision": args.precision,
        "backbone": args.backbone,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "peak_flops": peak_flops(args),
        "strategies": {},
    }
    with tempfile.TemporaryDirectory() as root:
        for strategy in args.strategies:
            figures["strategies"][strategy] = measure(strategy, args, Path(root))
    memory = "GPU max allocated" if args.device == "cuda" else "the process's peak RSS so far"
    print(f"{device}, {args.precision}, {args.backbone} at {args.resolution} px, batch {args.batch_size}")
    print(f"{args.steps} timed steps after {args.warmup_steps} warm-up steps; peak memory: {memory}")
    print(table(figures))
    print(LEGEND)
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    # Run as the importable module, so that HeldBatch and StepClock, which the fit config names
    # by their import path, are the classes `main` looks for.
    importlib.import_module(THIS).main()
