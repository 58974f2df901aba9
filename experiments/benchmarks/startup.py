"""Benchmark: the time from launch to the end of the first training step, `medsd fit` vs plain PyTorch.

    python -m experiments.benchmarks.startup [--repeats 3] [--threads 1] [--n 200]

Both runners fine-tune the U-Net of the shipped demo base (lightning_modules/demo_base) on the
same chest X-ray phantoms with the demo's settings (32 px, batches of 16, AdamW at 5e-4), each in
a fresh process timed from just before it is launched to the moment its first optimizer step has
finished:

- medsd: `medsd fit --config experiments/configs/demo/unet.yaml` with the callback of
  first_step_clock.py, which notes the time after the first training batch and ends the process;
- plain: plain_first_step.py, the same set-up written the way diffusers' train_text_to_image.py
  does it, with no medsd and no Lightning.

The rounds interleave (medsd, plain, medsd, ...) so that a change in the machine's load touches
both. It prints each runner's median and minimum and the ratio of the medians (the aim: medsd
within 1.1x), then the same for the imports alone (`medsd fit`'s, experiments.lightning_cli, vs
the libraries the plain script imports), for the interpreter's exit after them (which a
first-step time leaves out) and for the whole of `medsd --help`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Not imported here: the `medsd fit` process imports it, and with it Lightning.
CLOCK = "experiments.benchmarks.first_step_clock.FirstStepClock"
CLOCK_FILE = "MEDSD_FIRST_STEP_FILE"  # first_step_clock.CLOCK_FILE, which would import Lightning
ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "lightning_modules" / "demo_base"  # what medsd/demo-base names
CONFIG = ROOT / "experiments" / "configs" / "demo" / "unet.yaml"
PLAIN = Path(__file__).resolve().parent / "plain_first_step.py"
# The imports alone, each process noting the time they finished as the training runs do (its
# interpreter's exit, a second or two with these libraries loaded, comes after).
NOTE_TIME = f"; import os, time; open(os.environ['{CLOCK_FILE}'], 'w').write(repr(time.time()))"
MEDSD_IMPORTS = "import experiments.lightning_cli" + NOTE_TIME  # what `medsd fit` imports
PLAIN_IMPORTS = (  # plain_first_step.py's
    "import pandas, torch, torchvision, transformers; "
    "from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler; "
    "from diffusers.optimization import get_scheduler; "
    "from torch.utils.tensorboard import SummaryWriter; "
    "from transformers import CLIPTextModel, CLIPTokenizer" + NOTE_TIME
)


def environment(threads: int) -> dict[str, str]:
    """What both runners run under: the same threads, nothing fetched from the hub."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"exit status {done.returncode}: {' '.join(command)}")
    return done


def timed(command: list[str], env: dict[str, str], clock: Path) -> tuple[float, float, str]:
    """Seconds from launching `command` to the time it wrote to `clock` and to its exit, and its stdout."""
    clock.unlink(missing_ok=True)
    start = time.time()  # the wall clock, since the time in `clock` is taken in the other process
    done = run(command, {**env, CLOCK_FILE: str(clock)})
    end = time.time()
    if not clock.is_file():
        raise RuntimeError(f"it exited without writing the time to {clock}: {' '.join(command)}")
    return float(clock.read_text()) - start, end - start, done.stdout


def medsd_fit(phantoms: Path, run_dir: Path) -> list[str]:
    return [
        *[sys.executable, "-m", "experiments.cli", "fit", "--config", str(CONFIG)],
        *["--data.init_args.root", str(phantoms), "--trainer.default_root_dir", str(run_dir)],
        *["--trainer.max_steps", "1", f"--trainer.callbacks+={CLOCK}"],
    ]


def row(name: str, medsd: list[float], plain: list[float] | None = None) -> str:
    a = statistics.median(medsd)
    if plain is None:
        return f"{name:<18} | {a:7.2f} {min(medsd):7.2f} |"
    b = statistics.median(plain)
    return f"{name:<18} | {a:7.2f} {min(medsd):7.2f} | {b:7.2f} {min(plain):7.2f} | {a / b:5.2f}x"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each runner")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and MKL_NUM_THREADS")
    parser.add_argument("--n", type=int, default=200, help="phantom images to write (~half train frontal)")
    args = parser.parse_args(argv)
    env = environment(args.threads)
    print(
        f"time to the first training step: demo U-Net fine-tuning of {MODEL.relative_to(ROOT)}, "
        f"{args.n} phantom images, {args.threads} thread(s), {args.repeats} repeat(s)"
    )
    print("(the figures mean something only on an otherwise quiet machine)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        phantoms = Path(tmp) / "mimic-cxr"
        run(
            [sys.executable, "-m", "experiments.cli", "phantoms", "--layout", "mimic-cxr"]
            + ["--n", str(args.n), "--image-size", "64", "--out", str(phantoms)],
            env,
        )
        clock = Path(tmp) / "clock"
        steps: dict[str, list[float]] = {"medsd": [], "plain": []}
        # Round 0 is not timed: it brings every library either runner imports into the OS file
        # cache, so that neither pays a cold first start alone.
        for i in range(args.repeats + 1):
            medsd, _, _ = timed(medsd_fit(phantoms, Path(tmp) / f"run{i}"), env, clock)
            plain_command = [sys.executable, str(PLAIN), str(phantoms), str(MODEL), "--logs", f"{tmp}/tb{i}"]
            plain, _, stdout = timed(plain_command, env, clock)
            if i == 0:
                continue
            steps["medsd"].append(medsd)
            steps["plain"].append(plain)
            print(f"round {i}: medsd {medsd:.2f} s, plain {plain:.2f} s ({stdout.strip()})", flush=True)

        imports: dict[str, list[float]] = {"medsd": [], "plain": []}
        exits: dict[str, list[float]] = {"medsd": [], "plain": []}
        helps = []
        for _ in range(args.repeats):
            for name, code in (("medsd", MEDSD_IMPORTS), ("plain", PLAIN_IMPORTS)):
                imported, exited, _ = timed([sys.executable, "-c", code], env, clock)
                imports[name].append(imported)
                exits[name].append(exited - imported)
            start = time.perf_counter()
            run([sys.executable, "-m", "experiments.cli", "--help"], env)
            helps.append(time.perf_counter() - start)

    print()
    print(f"{'seconds':<18} | {'medsd':>7} {'min':>7} | {'plain':>7} {'min':>7} | medsd / plain (medians)")
    print(row("to the first step", steps["medsd"], steps["plain"]))
    print(row("imports", imports["medsd"], imports["plain"]))
    print(row("exit after those", exits["medsd"], exits["plain"]))
    print(row("medsd --help", helps))
    print("(imports: `import experiments.lightning_cli` vs the plain script's;")
    print(" medsd --help: the whole command, its exit included)")


if __name__ == "__main__":
    main()
