"""Every registered model family builds its tiny model, trains two steps, exports and samples.

A family added to `lightning_modules.families.REGISTRY` without a tiny run here fails the first
test: the table below is where its end-to-end check goes.
"""

import pytest
import torch

from lightning_modules.backbones import build_tiny_vae
from lightning_modules.export import read_export_manifest
from lightning_modules.families import REGISTRY, pipeline_family, registered, tiny_model_family
from lightning_modules.pipelines import load_pipeline, render
from tests.helpers.fit import tiny_fit

# Family -> the tiny config (experiments/configs/tiny/<name>.yaml) that trains it.
TINY_RUNS = {
    "stable-diffusion": "lora",
    "sdxl": "sdxl_lora",
    "flux": "flux_lora",
    "kandinsky": "kandinsky_lora",
    "compact": "compact",
}


def test_every_registered_family_has_a_tiny_run():
    assert set(TINY_RUNS) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_family_s_tiny_models_build_into_its_own_pipeline(name):
    family = registered(name)
    for tiny_name, build in family.tiny_models.items():
        assert tiny_model_family(tiny_name) is family
        parts = build()
        for role in (family.denoiser, family.autoencoder, *family.text_encoders):
            assert isinstance(getattr(parts, role), torch.nn.Module), (tiny_name, role)
        pipe = family.pipeline(parts)
        assert pipeline_family(type(pipe).__name__) is family, tiny_name
        assert family.native_size(pipe) == 32  # the tiny models' image side


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_family_trains_two_steps_exports_and_samples(name, tmp_path):
    extra = []
    if name == "compact":  # a new U-Net over a VAE folder: the tiny VAE, saved
        build_tiny_vae().save_pretrained(tmp_path / "vae")
        extra = ["--model.init_args.vae", str(tmp_path / "vae")]
    run = tmp_path / "run"
    tiny_fit(run, "--trainer.max_steps", "2", *extra, config=TINY_RUNS[name])

    manifest = read_export_manifest(run / "export")
    assert manifest["family"] == name and manifest["global_step"] == 2
    pipe = load_pipeline(run)
    (image,) = render(pipe, ["a bright circle on the left"], [0], steps=2, guidance=2.0)
    assert image.size == (32, 32)
    assert len(set(image.getdata())) > 1  # an image, not a constant fill
