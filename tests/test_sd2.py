"""The Stable Diffusion 2.x shape (v-prediction) end to end on the tiny backbone: fit, export, sample."""

import json

import torch
from diffusers import StableDiffusionPipeline

from experiments.cli import main as medsd
from lightning_modules.backbones import TINY_SD2, BackboneSpec
from lightning_modules.families.stable_diffusion import load_backbone
from lightning_modules.objectives import prediction_target


def test_tiny_sd2_is_shaped_like_stable_diffusion_2():
    parts = load_backbone(BackboneSpec(TINY_SD2))
    assert parts.noise_scheduler.config.prediction_type == "v_prediction"
    assert parts.sampler_config["_class_name"] == "DDIMScheduler"
    assert parts.sampler_config["prediction_type"] == "v_prediction"
    assert parts.unet.config.use_linear_projection and parts.text_encoder.config.hidden_act == "gelu"
    # What the U-Net learns to predict: v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0.
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    alpha_bar = parts.noise_scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(prediction_target(parts.noise_scheduler, latents, noise, t), expected)


def test_tiny_sd2_fits_exports_and_samples(tmp_path):
    run = tmp_path / "run"
    medsd(["fit", "--config", "experiments/configs/tiny/unet.yaml", "--trainer.default_root_dir", str(run),
           "--model.init_args.backbone.name_or_path", TINY_SD2, "--trainer.max_steps", "3",
           "--trainer.limit_val_batches", "1"])  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(run / "export")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a circle\n")
    medsd(["sample", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "samples"),
           "--steps", "2", "--per-prompt", "2"])  # fmt: skip
    assert len(list((tmp_path / "samples" / "images").glob("*.png"))) == 2
    settings = json.loads((run / "metrics.json").read_text())["cost"]
    assert settings["training"]["images"] == 12
