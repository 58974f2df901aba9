"""`medsd prepare` for the Kandinsky 2.2 decoder: MoVQ latents and CLIP image embeddings cached,
the same loss as computing them, and training without the images or the image encoder."""

from pathlib import Path

import pytest
import torch

from experiments.prepare import prepare_cache
from lightning_modules import KandinskyDecoderTuning, Validation
from tests.helpers.cache import data, quiet_trainer, shapes_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return shapes_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "kandinsky"
    prepare_cache(data(folder), KandinskyDecoderTuning(), out)
    return out


def test_the_cache_holds_movq_latents_and_image_embeddings(folder, cache):
    module = KandinskyDecoderTuning().eval()
    direct, cached = data(folder), data(folder, cache_dir=str(cache))
    for dm in (direct, cached):
        dm.tokenizer = module.prompt_tokenizer
    for a, b in zip(direct.val_dataloader(), cached.val_dataloader(), strict=True):
        assert "pixel_values" not in b and list(b["text"]) == ["image_embeds"]
        latents, _ = module.latent_posterior(a["pixel_values"])
        torch.testing.assert_close(b["latent_mean"], latents, rtol=1e-5, atol=1e-5)
        assert torch.equal(b["latent_std"], torch.zeros_like(latents))
        embeds = module.image_embeddings(a["pixel_values"])
        torch.testing.assert_close(b["text"]["image_embeds"], embeds, rtol=1e-5, atol=1e-5)


def test_validation_loss_is_the_same_with_and_without_the_cache(folder, cache, tmp_path):
    module = KandinskyDecoderTuning()
    direct = quiet_trainer(tmp_path).validate(module, data(folder), verbose=False)[0]["val/loss"]
    cached = quiet_trainer(tmp_path).validate(module, data(folder, cache_dir=str(cache)), verbose=False)
    assert module._cached_text is True
    assert cached[0]["val/loss"] == pytest.approx(direct, rel=1e-4)


def test_a_fit_from_the_cache_needs_neither_images_nor_the_image_encoder(folder, cache, tmp_path):
    module = KandinskyDecoderTuning(validation=Validation(prompts=[]))
    calls = []
    module.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    module.movq.register_forward_hook(lambda *args: calls.append(1))
    quiet_trainer(tmp_path, max_steps=3).fit(module, data(folder, cache_dir=str(cache)))
    assert module.global_step == 3 and calls == []
    assert (tmp_path / "export" / "medsd_export.json").is_file()
