"""Can a VAE draw what the demo's insertion protocol looks for? Real phantoms against their
reconstructions, judged by the demo's classifier.

    python -m experiments.benchmarks.demo_base_vae [--root PHANTOMS] [--vae DIR ...]

Every adapted cell of the demo decodes through its base model's VAE, so a VAE whose
reconstructions of real phantoms without an effusion are called "effusion" by a classifier
trained on real phantoms caps every cell's false-positive rate, whatever the strategy learns.
This trains that classifier (the demo matrix's settings: tiny CNN, 32 px, 10 epochs, lr 1e-3,
seed 0) on the real training split and prints its effusion detection and false-positive rates
on the real frontal test phantoms and on their reconstructions (encoder mean, decoded) through
each `--vae` folder (default: the shipped demo base's). Measured at the start of the demo base
on grey-level scenes: real 0.04, its VAE 0.96, the demo's in-domain compact VAE 0.17.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules import MIMICCXRDataModule
from datamodules.phantoms import write_phantoms
from evaluation.classifier import ClassifierSettings, predict, train_classifier
from lightning_modules.backbones import DEMO_BASE_DIR

LABELS = ["Pleural Effusion", "Cardiomegaly"]
SIZE = 32


def label_matrix(records) -> torch.Tensor:
    return torch.tensor(
        [[np.nan if r.labels.get(n) is None else r.labels[n] for n in LABELS] for r in records]
    )


def reconstructions(vae_dir: str | Path, images: list[Image.Image]) -> list[Image.Image]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(i, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for i in images]
    )
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    return [
        Image.fromarray(((d.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for d in decoded
    ]


def rates(classifier, images: list[Image.Image], stated: torch.Tensor) -> dict[str, float | int]:
    """Effusion detection over images stated positive, false positives over those stated negative."""
    called = predict(classifier, images)[:, 0] >= classifier.thresholds[LABELS[0]]
    present, absent = stated == 1, stated == 0
    return {
        "detection": called[present].float().mean().item(),
        "false_positive": called[absent].float().mean().item(),
        "n_present": int(present.sum()),
        "n_absent": int(absent.sum()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--root", help="MIMIC-CXR-layout phantoms (default: written as the demo's, 800 studies)"
    )
    parser.add_argument(
        "--out", default="runs/demo_base_vae", help="where phantoms are written without --root"
    )
    parser.add_argument("--vae", nargs="+", default=[str(DEMO_BASE_DIR / "vae")], help="VAE folders")
    args = parser.parse_args(argv)
    root = Path(args.root or Path(args.out) / "mimic-cxr")
    if not args.root and not root.is_dir():  # written once, then reused
        write_phantoms("mimic-cxr", 800, root, image_size=64)
    data = MIMICCXRDataModule(root=root, prompt_source="labels", image_size=SIZE, batch_size=16)
    train, test = data.records("train"), data.records("test")
    settings = ClassifierSettings(arch="tiny", image_size=SIZE, epochs=10, lr=1e-3, seed=0)
    classifier = train_classifier([r.image for r in train], label_matrix(train), LABELS, settings)
    images = [Image.open(r.image).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC) for r in test]
    stated = label_matrix(test)[:, 0]
    print(f"{'images':60s} detection  false positive  (n present / absent)")
    for name, shown in [("real test phantoms", images)] + [(v, reconstructions(v, images)) for v in args.vae]:
        r = rates(classifier, shown, stated)
        counts = f"({r['n_present']} / {r['n_absent']})"
        print(f"{name:60s} {r['detection']:9.3f}  {r['false_positive']:14.3f}  {counts}")


if __name__ == "__main__":
    main()
