"""Does a compact model trained from scratch on a CPU draw what its prompt asks for?

    python -m experiments.benchmarks.compact_effusion [--n 1200] [--vae-minutes 1.5] [--unet-minutes 4]

On chest X-ray phantoms (MIMIC-CXR layout, drawn at 64 px, trained and judged at 32 px, prompts
made from the labels) it trains the MSDM-style pair of lightning_modules.compact: first the VAE,
then the U-Net on its latents with a frozen tiny CLIP text encoder (random weights: the U-Net
learns what its token states mean). It then renders images for prompts that state a pleural
effusion and for prompts that state none, with the same seeds for both sets so that only the
prompt differs. A tiny CNN trained on the real training phantoms judges them: the share of
images it calls "effusion" should be higher for the effusion prompts than for the others. Its
accuracy on the real test phantoms is printed too, since the rates mean little if it is poor.
The defaults take about 6 minutes on 2 busy CPU cores. The phantoms' exact truth makes the
figures honest, but they test prompt adherence, not image quality.
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch

from datamodules import MIMICCXRDataModule
from datamodules.phantoms import write_phantoms
from evaluation.classifier import ClassifierSettings, LabelledImages, predict, train_classifier
from lightning_modules import CompactDiffusion, Objective, Optimizer, VAETraining
from lightning_modules.pipelines import load_pipeline, render

LABEL = "Pleural Effusion"
EFFUSION_PROMPTS = ["chest x-ray with pleural effusion", "chest x-ray with cardiomegaly, pleural effusion"]
OTHER_PROMPTS = ["normal chest x-ray", "chest x-ray with cardiomegaly"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="runs/compact_effusion", help="phantoms, runs and samples")
    parser.add_argument("--n", type=int, default=1200, help="phantom studies (about 45%% are frontal train)")
    parser.add_argument("--phantom-size", type=int, default=64, help="width the phantoms are drawn at")
    parser.add_argument("--image-size", type=int, default=32, help="training and judging resolution")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-minutes", type=float, default=1.5, help="stops the VAE early")
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--unet-minutes", type=float, default=4.0, help="stops the U-Net early")
    parser.add_argument("--vae-widths", type=int, nargs="+", default=[16, 32, 32], help="4x downsampling")
    parser.add_argument("--unet-widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--per-prompt", type=int, default=24, help="images rendered per prompt")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--classifier-epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def fit(module: L.LightningModule, data: MIMICCXRDataModule, root: Path, steps: int, minutes: float) -> None:
    """Train on CPU without validation or checkpoints; the module exports to `root/export`. The
    U-Net's gradients are clipped at norm 1; the VAE's are not: its loss is summed over pixels (as
    Stable Diffusion's), so a norm of 1 would clip every step."""
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_time=timedelta(minutes=minutes),
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=None if isinstance(module, VAETraining) else 1.0,
    )
    trainer.fit(module, datamodule=data)
    print(f"  {type(module).__name__}: {trainer.global_step} steps")


def effusion_rate(probabilities: torch.Tensor) -> float:
    return (probabilities >= 0.5).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    L.seed_everything(args.seed)
    start = time.monotonic()
    phantoms = out / "phantoms"
    if not phantoms.exists():
        write_phantoms("mimic-cxr", args.n, phantoms, seed=args.seed, image_size=args.phantom_size)
    data = MIMICCXRDataModule(
        root=str(phantoms), image_size=args.image_size, prompt_source="labels", batch_size=args.batch_size
    )
    train = LabelledImages.from_records(data.records("train")).select([LABEL])
    test = LabelledImages.from_records(data.records("test")).select([LABEL])
    share = train.labels.eq(1).float().mean()
    print(
        f"{len(train)} training and {len(test)} test phantoms, {share:.0%} of the training ones with effusion"
    )

    fit(
        VAETraining(block_out_channels=tuple(args.vae_widths), latent_channels=4),
        data,
        out / "vae",
        args.vae_steps,
        args.vae_minutes,
    )
    compact = CompactDiffusion(
        vae=str(out / "vae"),
        max_length=32,
        image_size=args.image_size,
        block_out_channels=tuple(args.unet_widths),
        objective=Objective(loss="l1", caption_dropout=0.2),
        optimizer=Optimizer(lr=1e-3, schedule="constant"),
    )
    fit(compact, data, out / "unet", args.unet_steps, args.unet_minutes)

    pipe = load_pipeline(out / "unet")
    generated = {}
    for name, prompts in (("effusion", EFFUSION_PROMPTS), ("no effusion", OTHER_PROMPTS)):
        texts = [p for p in prompts for _ in range(args.per_prompt)]
        seeds = list(range(args.seed, args.seed + len(texts)))
        generated[name] = render(pipe, texts, seeds, args.sample_steps, args.guidance)
        folder = out / "samples" / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(generated[name]):
            image.save(folder / f"{i:03d}.png")

    settings = ClassifierSettings(
        arch="tiny", image_size=args.image_size, epochs=args.classifier_epochs, seed=args.seed
    )
    classifier = train_classifier(train.images, train.labels, train.label_names, settings)
    real = predict(classifier, test.images)[:, 0]
    truth = test.labels[:, 0] == 1
    accuracy = ((real >= 0.5) == truth).float().mean().item()
    print(f"classifier accuracy on real test phantoms: {accuracy:.1%} ({len(test)} images)")
    print(
        f"  real test phantoms called effusion: {effusion_rate(real[truth]):.1%} of effusion, "
        f"{effusion_rate(real[~truth]):.1%} of others"
    )
    for name, prompts in (("effusion", EFFUSION_PROMPTS), ("no effusion", OTHER_PROMPTS)):
        rate = effusion_rate(predict(classifier, generated[name])[:, 0])
        print(
            f"generated for {name!r} prompts {prompts}: {rate:.1%} of {len(generated[name])} called effusion"
        )
    print(f"total time {(time.monotonic() - start) / 60:.1f} min; samples in {out / 'samples'}")


if __name__ == "__main__":
    main()
