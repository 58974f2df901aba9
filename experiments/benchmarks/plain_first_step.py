"""The plain-PyTorch baseline of benchmarks/startup.py: one training step of the demo's U-Net fine-tuning.

    MEDSD_FIRST_STEP_FILE=clock.txt python experiments/benchmarks/plain_first_step.py PHANTOMS MODEL

The set-up diffusers' train_text_to_image.py does, with no medsd and no Lightning: seed, a
TensorBoard writer for the losses, the parts of the diffusers folder MODEL, the frontal training
images of the MIMIC-CXR-JPG folder PHANTOMS with prompts from their CheXpert labels (the records
medsd's MIMICCXRDataModule serves with prompt_source "labels"; the tables read with pandas, as
the example reads its data through `datasets`, which uses pandas and pyarrow), resized and
centre-cropped to 32 px, AdamW with the demo's warm-up schedule, and one step on a batch of 16.
What it leaves out that medsd does before its first step (validation batches, a saved config,
checkpoint and learning-rate callbacks) is medsd's own cost. It then writes the time
(time.time()) to the file named by MEDSD_FIRST_STEP_FILE, prints how many training images it
found, and exits.
"""

import argparse
import os
import time

import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from torchvision import transforms
from transformers import CLIPTextModel, CLIPTokenizer

IMAGE_SIZE = 32  # experiments/configs/demo/data.yaml
BATCH_SIZE = 16
LR = 5e-4  # experiments/configs/demo/unet.yaml
WARMUP_STEPS = 10
MAX_STEPS = 240  # experiments/configs/demo/trainer.yaml
FRONTAL = {"PA", "AP"}


def read_table(root: str, stem: str) -> pd.DataFrame:
    return pd.read_csv(os.path.join(root, f"mimic-cxr-2.0.0-{stem}.csv.gz"))


def label_prompt(study: pd.Series) -> str | None:
    """The demo's prompt from a CheXpert row: its positive findings, "normal chest x-ray" for No
    Finding alone, none for a study without a positive label."""
    labels = study.drop(["subject_id", "study_id"])
    findings = [name.lower() for name, value in labels.items() if value == 1.0 and name != "No Finding"]
    if findings:
        return "chest x-ray with " + ", ".join(findings)
    return "normal chest x-ray" if labels["No Finding"] == 1.0 else None


def training_examples(root: str) -> list[tuple[str, str]]:
    """(image path, prompt) of every frontal training image whose study has a prompt."""
    split = read_table(root, "split")
    train = set(split.loc[split["split"] == "train", "dicom_id"])
    studies = read_table(root, "chexpert")
    prompts = {(row.subject_id, row.study_id): label_prompt(row) for _, row in studies.iterrows()}
    examples = []
    for row in read_table(root, "metadata").itertuples():
        prompt = prompts.get((row.subject_id, row.study_id))
        if row.dicom_id in train and row.ViewPosition in FRONTAL and prompt:
            subject = str(row.subject_id)
            folder = f"files/p{subject[:2]}/p{subject}/s{row.study_id}"
            examples.append((os.path.join(root, folder, row.dicom_id + ".jpg"), prompt))
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
    parser.add_argument("--logs", default="runs/plain-first-step", help="the TensorBoard folder")
    args = parser.parse_args()
    torch.manual_seed(0)
    writer = SummaryWriter(args.logs)

    tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR)
    schedule = get_scheduler("constant_with_warmup", optimizer, WARMUP_STEPS, MAX_STEPS)

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
    loss = F.mse_loss(prediction, noise)  # the demo base predicts the noise (epsilon)
    loss.backward()
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()

    with open(os.environ["MEDSD_FIRST_STEP_FILE"], "w") as file:
        file.write(repr(time.time()))
    writer.add_scalar("train/loss", loss.item(), 1)
    writer.close()
    print(f"{len(examples)} training images")


if __name__ == "__main__":
    main()
