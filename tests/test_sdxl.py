"""SDXL strategies on the tiny SDXL-shaped backbone: conditioning as diffusers' SDXL pipeline builds
it, fit, export and sample."""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from experiments.cli import main as medsd
from experiments.lightning_cli import build_from_config
from lightning_modules.backbones import TINY_SDXL
from lightning_modules.families.sdxl import build_tiny_sdxl
from lightning_modules.pipelines import base_pipeline, load_pipeline
from lightning_modules.sdxl import second_encoder_ids

pytestmark = pytest.mark.slow

TINY = "experiments/configs/tiny"
PROMPTS = ["a bright circle on the left", "a square"]


@pytest.fixture(scope="module")
def module():
    model, _ = build_from_config(["--config", f"{TINY}/sdxl_unet.yaml"])
    return model.eval()


def test_second_encoder_ids_equal_the_second_tokenizer():
    parts = build_tiny_sdxl()
    first = parts.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    second = parts.tokenizer_2(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert not torch.equal(first, second)  # the padding differs
    converted = second_encoder_ids(first, parts.tokenizer.eos_token_id, parts.tokenizer_2.pad_token_id)
    assert torch.equal(converted, second)


def test_conditioning_equals_the_sdxl_pipeline(module):
    pipe = StableDiffusionXLPipeline(
        **{**base_pipeline(TINY_SDXL).components}, force_zeros_for_empty_prompt=False
    )
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        ours = module.encode_prompts(PROMPTS)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    torch.testing.assert_close(ours["pooled"], pooled)

    # Size conditioning: original = target = the image size, crop at (0, 0), as the pipeline's default.
    noisy, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, 32).repeat(2, 1)
    with torch.no_grad():
        expected = pipe.unet(
            noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        torch.testing.assert_close(module.denoise(noisy, t, ours), expected)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folders = {}
    for name in ("sdxl_unet", "sdxl_lora"):
        folders[name] = tmp_path_factory.mktemp(name)
        medsd(["fit", "--config", f"{TINY}/{name}.yaml", "--trainer.default_root_dir", str(folders[name]),
               "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1"])  # fmt: skip
    return folders


def test_full_fine_tuning_exports_an_sdxl_pipeline(runs):
    pipe = load_pipeline(runs["sdxl_unet"])
    base = base_pipeline(TINY_SDXL)
    assert isinstance(pipe, StableDiffusionXLPipeline) and not pipe.config.force_zeros_for_empty_prompt
    changed = [
        name
        for name in ("unet", "text_encoder", "text_encoder_2", "vae")
        if any(
            not torch.equal(a, b)
            for a, b in zip(
                getattr(pipe, name).state_dict().values(),
                getattr(base, name).state_dict().values(),
                strict=True,
            )
        )
    ]
    assert changed == ["unet", "text_encoder"]  # the second encoder and the VAE stay frozen


def test_lora_export_loads_into_the_sdxl_pipeline(runs):
    pipe = load_pipeline(runs["sdxl_lora"])
    base = base_pipeline(TINY_SDXL)
    images = [
        p(
            PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
        for p in (pipe, base)
    ]
    assert not torch.allclose(torch.as_tensor(images[0]), torch.as_tensor(images[1]))


def test_sdxl_runs_sample_through_the_command(runs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    for name, run in runs.items():
        out = tmp_path / name
        medsd(["sample", str(run), "--prompts", str(prompts), "--out", str(out), "--steps", "2"])
        assert len(list((out / "images").glob("*.png"))) == 2 and (out / "manifest.csv").is_file()
