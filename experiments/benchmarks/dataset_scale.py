"""Benchmark: start-up on a MIMIC-CXR-JPG-sized dataset, first and later starts, and 8 local ranks.

    python -m experiments.benchmarks.dataset_scale --images 377110 [--out DIR] [--ranks 8]

Writes the layout of mimic_scale_layout.py under --out (kept, and reused by a rerun with the same
--images and --seed), then times fresh processes, each doing for its data what `medsd fit` does
with RoentGen's run config (experiments/configs/roentgen/unet.yaml: frontal views, impression
prompts, 512 px), up to its first training batch: import medsd's CLI and build the DataModule from
the config, attach the text encoder's tokenizer (CLIP ViT-L/14's, SD 1.x's), prepare_data,
setup("fit"), the long-prompt policy, the train and validation loaders and one training batch.

- first start: on an empty record index, so the records are built (reports read and sectioned,
  prompts tokenised) and stored;
- second start: the same, reading the index;
- inspect-data: `medsd inspect-data` on the same config, index present;
- 8 ranks: as torchrun starts them (RANK, WORLD_SIZE, a gloo process group), on an empty index;
  Lightning's order: rank 0's prepare_data, a barrier, every rank's setup. Against the first start;
  and again on the index the ranks built, against the second start.

It prints, for each, the seconds from launch to the first training batch (for ranks: the last
rank's; for inspect-data: to its JSON), the part of them that is importing medsd's CLI, and peak
memory per process; then the targets (issue 16, on a 2-core machine: first start <= 60 s, second
<= 10 s, <= 1.5 GB, 8 ranks <= 1.5x one rank). Eight processes share two cores here, so each
rank's own imports and reads take four times as long as one process's: the ranks' figures also
give the time after the imports. Run it alone: a timing taken beside other work is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "configs" / "roentgen" / "unet.yaml"
TARGETS = {"first": 60.0, "second": 10.0, "memory_gb": 1.5, "ranks_ratio": 1.5}


def config_args(data: Path, index: Path) -> list[str]:
    return [
        "--config", str(CONFIG),
        "--data.init_args.root", str(data),
        "--data.init_args.reports", str(data),
        "--data.init_args.record_index_dir", str(index),
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "2",
    ]  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """One start (or one rank of one): its times since launch and peak memory, as JSON on stdout."""
    launched = float(os.environ["MEDSD_LAUNCHED"])
    from experiments.lightning_cli import build_datamodule
    from lightning_modules.backbones import build_clip_tokenizer
    from lightning_modules.prompts import PromptTokenizer

    imported = time.time()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
    datamodule = build_datamodule(config_args(Path(args.data), Path(args.index)))
    datamodule.tokenizer = PromptTokenizer(build_clip_tokenizer())  # what the module's setup attaches
    if rank == 0:
        datamodule.prepare_data()
    if world > 1:
        dist.barrier()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    datamodule.val_dataloader()
    next(iter(loader))
    ready = time.time()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    records = len(datamodule.usable_records("train"))
    print(
        json.dumps(
            {"imports": imported - launched, "ready": ready - launched, "peak": peak, "train": records}
        )
    )


def launch(extra: list[str], env: dict[str, str]) -> subprocess.Popen:
    env = {**env, "MEDSD_LAUNCHED": repr(time.time())}
    command = [sys.executable, "-m", "experiments.benchmarks.dataset_scale", *extra]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate()
    if process.returncode != 0:
        print(err[-4000:], file=sys.stderr)
        raise RuntimeError(f"a start exited with status {process.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def start(data: Path, index: Path, ranks: int = 1) -> dict:
    """`ranks` processes started at once; the slowest one's times, and the largest peak memory."""
    env = dict(os.environ)
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks))
    processes = [
        launch(
            ["--child", "--data", str(data), "--index", str(index)],
            {**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(ranks)
    ]
    results = [finish(p) for p in processes]
    return {
        "imports": max(r["imports"] for r in results),
        "ready": max(r["ready"] for r in results),
        "peak_gb": max(r["peak"] for r in results) / 1e9,
        "train": results[0]["train"],
    }


def inspect_data_child(args: argparse.Namespace) -> None:
    """`medsd inspect-data` (its JSON thrown away), then its time since launch and peak memory."""
    import contextlib
    import io

    from experiments import inspect_data

    launched = float(os.environ["MEDSD_LAUNCHED"])
    import experiments.lightning_cli  # noqa: F401  (what inspect-data imports first)

    imported = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        inspect_data.main(config_args(Path(args.data), Path(args.index)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"imports": imported - launched, "ready": time.time() - launched, "peak": peak}))


def inspect_data(data: Path, index: Path) -> dict:
    result = finish(launch(["--inspect", "--data", str(data), "--index", str(index)], dict(os.environ)))
    return {"ready": result["ready"], "imports": result["imports"], "peak_gb": result["peak"] / 1e9}


def dataset(out: Path, images: int, seed: int) -> Path:
    from experiments.benchmarks.mimic_scale_layout import write_scale_layout

    data, stamp = out / "mimic-cxr-jpg", out / "layout.json"
    wanted = {"images": images, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()).get("asked") == wanted:
        return data
    shutil.rmtree(data, ignore_errors=True)
    begun = time.time()
    counts = write_scale_layout(data, images, seed)
    stamp.write_text(json.dumps({"asked": wanted, "written": counts}) + "\n")
    print(f"wrote {counts} in {time.time() - begun:.0f} s to {data}")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=377_110)
    parser.add_argument("--out", default="runs/dataset-scale", help="where the layout and indexes go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inspect", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.inspect:
        return inspect_data_child(args)
    out = Path(args.out)
    data = dataset(out, args.images, args.seed)
    one, many = out / "index-one", out / "index-ranks"
    for folder in (one, many):
        shutil.rmtree(folder, ignore_errors=True)
    rows = {
        "first start": start(data, one),
        "second start": start(data, one),
        "inspect-data": inspect_data(data, one),
        f"{args.ranks} ranks, first": start(data, many, args.ranks),
        f"{args.ranks} ranks, second": start(data, many, args.ranks),
    }
    print(f"\n{args.images} images, {rows['first start']['train']} training records (RoentGen's config)")
    print(f"{'':22} {'ready s':>8} {'imports s':>10} {'after s':>8} {'peak GB':>8}")
    for name, row in rows.items():
        after = row["ready"] - row["imports"]
        print(f"{name:22} {row['ready']:8.1f} {row['imports']:10.1f} {after:8.1f} {row['peak_gb']:8.2f}")
    first, second = rows["first start"], rows["second start"]
    ranks = rows[f"{args.ranks} ranks, first"], rows[f"{args.ranks} ranks, second"]
    ratios = [many["ready"] / one["ready"] for many, one in zip(ranks, (first, second), strict=True)]
    after = [
        (m["ready"] - m["imports"]) / (o["ready"] - o["imports"])
        for m, o in zip(ranks, (first, second), strict=True)
    ]
    peak = max(row["peak_gb"] for name, row in rows.items() if "ranks" not in name)
    print(f"\n{args.ranks} ranks / one rank: {ratios[0]:.2f}x first, {ratios[1]:.2f}x second start")
    print(f"after the imports:   {after[0]:.2f}x first, {after[1]:.2f}x second start")
    checks = {
        f"first start <= {TARGETS['first']:g} s": first["ready"] <= TARGETS["first"],
        f"second start <= {TARGETS['second']:g} s": second["ready"] <= TARGETS["second"],
        f"peak memory <= {TARGETS['memory_gb']:g} GB": peak <= TARGETS["memory_gb"],
        f"{args.ranks} ranks <= {TARGETS['ranks_ratio']:g}x one rank (first start)": ratios[0]
        <= TARGETS["ranks_ratio"],
    }
    for name, met in checks.items():
        print(f"{'met ' if met else 'MISSED'} {name}")


if __name__ == "__main__":
    main()
