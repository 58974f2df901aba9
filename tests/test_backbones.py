import open_clip
import pytest
import torch

from lightning_modules.backbones import (
    DEMO_BASE,
    TINY_SD,
    BackboneNotFoundError,
    BackboneSpec,
    build_clip_tokenizer,
    load_text_encoder,
)
from lightning_modules.families.stable_diffusion import build_tiny_backbone, load_backbone
from lightning_modules.pipelines import base_pipeline, load_pipeline, render

PROMPTS = [
    "Small left pleural effusion. No pneumothorax.",
    "AP portable chest x-ray: ET tube 4.5 cm above the carina; café-au-lait, 1234!!",
]


def test_clip_tokenizer_matches_open_clip():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    ours = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    reference = open_clip.tokenize(PROMPTS)  # pads with 0 where the HF tokenizer pads with EOS
    for row, ref in zip(ours, reference, strict=True):
        n = int((ref != 0).sum())
        assert torch.equal(row[:n], ref[:n])
        assert (row[n:] == tokenizer.pad_token_id).all()


def test_tiny_backbone_is_deterministic_and_consistent():
    a, b = build_tiny_backbone(), build_tiny_backbone()
    for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert a.unet.config.cross_attention_dim == a.text_encoder.config.hidden_size
    assert a.unet.config.in_channels == a.vae.config.latent_channels
    assert a.sampler_config["_class_name"] == "PNDMScheduler"


def test_loads_a_local_diffusers_folder(tmp_path):
    tiny = build_tiny_backbone()
    base_pipeline(TINY_SD).save_pretrained(tmp_path)
    loaded = load_backbone(BackboneSpec(str(tmp_path), prediction_type="v_prediction"))
    torch.testing.assert_close(loaded.unet.state_dict(), tiny.unet.state_dict(), rtol=0, atol=0)
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert loaded.sampler_config["_class_name"] == "PNDMScheduler"


@pytest.mark.parametrize("name", ["nobody/no-such-model-xyz", "/nonexistent/local/folder"])
def test_missing_model_gives_one_clear_error(name):
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone(BackboneSpec(name))
    message = str(info.value)
    assert f"'{name}'" in message
    assert "offline" in message and "local" in message


def test_missing_text_encoder_gives_one_clear_error():
    with pytest.raises(BackboneNotFoundError, match="'nobody/no-such-bert'"):
        load_text_encoder("nobody/no-such-bert")


def test_the_shipped_demo_base_loads_as_a_backbone_and_a_pipeline():
    parts = load_backbone(BackboneSpec(DEMO_BASE))
    assert parts.vae.config.latent_channels == 4 and parts.unet.config.sample_size == 16
    (image,) = render(load_pipeline(DEMO_BASE), ["a bright circle on the left"], [0], steps=2, guidance=3.0)
    assert image.size == (32, 32)
