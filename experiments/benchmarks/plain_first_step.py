"""The plain-PyTorch baseline of benchmarks/startup.py: one training step of the demo's U-Net fine-tuning.

    MEDSD_FIRST_STEP_FILE=clock.txt python experiments/benchmarks/plain_first_step.py PHANTOMS MODEL

The set-up a script in the style of diffusers' train_text_to_image.py does, with no medsd and no
Lightning: load the parts of the diffusers folder MODEL, read the frontal training images of the
MIMIC-CXR-JPG folder PHANTOMS with prompts from their CheXpert labels (the records medsd's
MIMICCXRDataModule serves with prompt_source "labels"), resize and centre-crop them to 32 px, and
take one AdamW step on batches of 16. It then writes the time (time.time()) to the file named by
MEDSD_FIRST_STEP_FILE, prints how many training images it found, and exits.
"""

import argparse
import csv
import gzip
import os
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from transformers import CLIPTextModel, CLIPTokenizer

IMAGE_SIZE = 32  # experiments/configs/demo/data.yaml
BATCH_SIZE = 16
LR = 5e-4  # experiments/configs/demo/unet.yaml
FRONTAL = {"PA", "AP"}


def read_table(root: str, stem: str) -> list[dict]:
    with gzip.open(os.path.join(root, f"mimic-cxr-2.0.0-{stem}.csv.gz"), "rt", newline="") as file:
        return list(csv.DictReader(file))


def label_prompt(study: dict) -> str | None:
    """The demo's prompt from a CheXpert row: its positive findings (only label cells hold "1.0"),
    "normal chest x-ray" for No Finding alone, none for a study without a positive label."""
    findings = [name.lower() for name, value in study.items() if value == "1.0" and name != "No Finding"]
    if findings:
        return "chest x-ray with " + ", ".join(findings)
    return "normal chest x-ray" if study["No Finding"] == "1.0" else None


def training_examples(root: str) -> list[tuple[str, str]]:
    """(image path, prompt) of every frontal training image whose study has a prompt."""
    train = {row["dicom_id"] for row in read_table(root, "split") if row["split"] == "train"}
    studies = read_table(root, "chexpert")
    prompts = {(row["subject_id"], row["study_id"]): label_prompt(row) for row in studies}
    examples = []
    for row in read_table(root, "metadata"):
        prompt = prompts.get((row["subject_id"], row["study_id"]))
        if row["dicom_id"] in train and row["ViewPosition"] in FRONTAL and prompt:
            folder = f"files/p{row['subject_id'][:2]}/p{row['subject_id']}/s{row['study_id']}"
            examples.append((os.path.join(root, folder, row["dicom_id"] + ".jpg"), prompt))
    return examples


class Images(Dataset):
    def __init__(self, examples: list[tuple[str, str]], tokenizer: CLIPTokenizer):
        self.paths = [path for path, _ in examples]
        # Tokenised once up front, as train_text_to_image.py does.
        self.input_ids = tokenizer(
            [prompt for _, prompt in examples],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        self.transform = transforms.Compose(
            [
                transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(IMAGE_SIZE),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.input_ids[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phantoms", help="a MIMIC-CXR-JPG folder (medsd phantoms --layout mimic-cxr)")
    parser.add_argument("model", help="a diffusers Stable Diffusion folder (lightning_modules/demo_base)")
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR)

    examples = training_examples(args.phantoms)
    loader = DataLoader(Images(examples, tokenizer), batch_size=BATCH_SIZE, shuffle=True)
    pixels, input_ids = next(iter(loader))

    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        text = text_encoder(input_ids)[0]
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, text).sample
    F.mse_loss(prediction, noise).backward()  # the demo base predicts the noise (epsilon)
    optimizer.step()
    optimizer.zero_grad()

    with open(os.environ["MEDSD_FIRST_STEP_FILE"], "w") as file:
        file.write(repr(time.time()))
    print(f"{len(examples)} training images")


if __name__ == "__main__":
    main()
