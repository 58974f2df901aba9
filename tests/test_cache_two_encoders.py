"""Prepared text conditioning for the families with two text encoders (SDXL, FLUX): both parts
cached, the same loss as encoding on the fly, and the encoders idle for the rest of the fit."""

from pathlib import Path

import pytest
import torch

from experiments.prepare import prepare_cache
from lightning_modules import FluxLoRA, Objective, SDXLLoRAFineTuning, Validation
from lightning_modules.backbones import BackboneSpec
from lightning_modules.text_conditioning import release_text_encoders
from tests.helpers.cache import data, quiet_trainer, shapes_folder

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {
    "sdxl": lambda **kw: SDXLLoRAFineTuning(backbone=BackboneSpec("medsd/tiny-sdxl"), **kw),
    "flux": lambda **kw: FluxLoRA(max_sequence_length=32, **kw),
}
VALIDATION = Validation(prompts=["a bright circle", "a dark square"], num_inference_steps=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return shapes_folder(tmp_path_factory)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, folder, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("cache") / request.param
    prepare_cache(data(folder), FAMILIES[request.param](), out)
    return request.param, out


def test_the_cache_holds_both_parts_of_the_conditioning(folder, family):
    name, cache = family
    module = FAMILIES[name]().eval()
    direct, cached = data(folder), data(folder, cache_dir=str(cache))
    for dm in (direct, cached):
        dm.tokenizer = module.prompt_tokenizer
    for a, b in zip(direct.val_dataloader(), cached.val_dataloader(), strict=True):
        expected = module.encode_prompts(a["prompts"])
        assert sorted(b["text"]) == ["pooled", "prompt_embeds"]
        for part in ("prompt_embeds", "pooled"):
            torch.testing.assert_close(b["text"][part], expected[part], rtol=1e-5, atol=1e-5)


def test_validation_loss_is_the_same_with_and_without_the_cache(folder, family, tmp_path):
    name, cache = family
    module = FAMILIES[name]()
    direct = quiet_trainer(tmp_path).validate(module, data(folder), verbose=False)[0]["val/loss"]
    assert module._cached_text is False
    cached = quiet_trainer(tmp_path).validate(module, data(folder, cache_dir=str(cache)), verbose=False)
    assert module._cached_text is True
    assert cached[0]["val/loss"] == pytest.approx(direct, rel=1e-4)


def test_with_the_cache_the_encoders_run_once_for_the_empty_and_the_validation_prompts(
    folder, family, tmp_path
):
    """Caption dropout, validation losses and validation images over three steps: each encoder
    runs twice (the empty prompt, then the validation prompts, as the fit starts) and never again."""
    name, cache = family
    module = FAMILIES[name](objective=Objective(caption_dropout=0.5), validation=VALIDATION)
    calls = {"first": 0, "second": 0}
    for key, encoder in zip(calls, module.text_encoders(), strict=True):
        encoder.register_forward_hook(lambda *args, key=key: calls.__setitem__(key, calls[key] + 1))
    quiet_trainer(tmp_path, max_steps=3).fit(module, data(folder, cache_dir=str(cache)))
    assert module._cached_text is True
    assert calls == {"first": 2, "second": 2}
    assert all(next(e.parameters()).device.type == "cpu" for e in module.text_encoders())


def test_validation_images_from_kept_conditioning_equal_freshly_encoded_ones(family):
    name, _ = family
    module = FAMILIES[name](validation=VALIDATION).eval()
    fresh = module.generate(VALIDATION.prompts, [0, 1])
    release_text_encoders(module)  # what a fit from the cache does first
    module.text_encoders()[0].forward = None  # any further encoding would fail
    torch.testing.assert_close(module.generate(VALIDATION.prompts, [0, 1]), fresh, rtol=1e-5, atol=1e-5)
