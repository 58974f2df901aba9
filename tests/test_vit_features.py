"""DINOv2 / RAD-DINO feature extractors (evaluation.vit_features) on a tiny random Dinov2Model saved
to tmp_path: the features are the model's own CLS token after the final layernorm on pixels
preprocessed by hand here, RAD-DINO's preprocessing follows a saved image processor config as
transformers applies it, and a Fréchet distance on the features equals one computed from the model's
direct outputs. Nothing is downloaded."""

import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model

from evaluation.features import MissingWeightsError
from evaluation.statistics import FeatureStatistics, frechet_distance
from evaluation.vit_features import DINOv2Features, RadDinoFeatures

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture
def tiny_dinov2(tmp_path):
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=56,
    )
    model = Dinov2Model(config).eval()
    folder = tmp_path / "tiny-dinov2"
    model.save_pretrained(folder)
    return folder, model


def smooth_images(count: int, height: int, width: int, seed: int, offset: float = 0.0) -> torch.Tensor:
    """uint8 RGB images with structure at every scale above a few pixels (not white noise, on which
    bicubic overshoot and clamping would dominate a comparison of resize implementations)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 9, 11, generator=generator) * 200 + offset
    x = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8)


def hand_preprocess(images, short, crop, mean, std):
    """Shorter side to `short` (longer int(short * long / short_in)), bicubic antialiased, back to
    8-bit levels, centre crop, /255, normalise: the documented pipeline, written out again."""
    h, w = images.shape[-2:]
    size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    # float32 like the extractor: in float64 a few values near k + 0.5 would round to the other level
    x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0, 255).round()
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    x = x[..., top : top + crop, left : left + crop] / 255
    return (x - mean) / std


def test_dinov2_features_are_the_model_cls_token_after_the_final_layernorm(tiny_dinov2):
    folder, model = tiny_dinov2
    extractor = DINOv2Features(str(folder))  # Stein et al.'s 224 px, ImageNet mean / std
    images = smooth_images(3, 240, 300, seed=1)
    features = extractor(images)
    assert features.dtype == torch.float64 and features.shape == (3, 32)

    pixels = hand_preprocess(images, 224, 224, IMAGENET_MEAN, IMAGENET_STD)
    assert pixels.shape == (3, 3, 224, 224)
    with torch.no_grad():
        output = model(pixel_values=pixels, output_hidden_states=True)
    # The CLS token of the encoder's last hidden state, through the model's final layernorm.
    cls = model.layernorm(output.hidden_states[-1])[:, 0]
    torch.testing.assert_close(features, cls.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(features, output.pooler_output.double(), rtol=1e-5, atol=1e-6)
    # and not the raw (pre-layernorm) token, which would be a different vector
    assert not torch.allclose(features, output.hidden_states[-1][:, 0].double(), atol=1e-3)

    label = extractor.label
    assert set(label) == {"extractor", "weights", "preprocessing"}
    assert label["weights"] == str(folder)
    assert "CLS" in label["extractor"] and "32-d" in label["extractor"]
    assert "shorter side to 224" in label["preprocessing"] and "centre crop 224x224" in label["preprocessing"]
    assert "(0.485, 0.456, 0.406)" in label["preprocessing"] and "Stein" in label["preprocessing"]


def test_raddino_follows_the_folders_image_processor_config_as_transformers_applies_it(tiny_dinov2):
    folder, model = tiny_dinov2
    BitImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 56, "width": 56},
        image_mean=[0.53, 0.53, 0.53],
        image_std=[0.26, 0.26, 0.26],
    ).save_pretrained(folder)
    extractor = RadDinoFeatures(str(folder))
    assert (extractor.size, extractor.crop_size) == (64, 56)
    assert "from preprocessor_config.json" in extractor.label["preprocessing"]
    assert "default" not in extractor.label["preprocessing"]

    processor = AutoImageProcessor.from_pretrained(folder)
    level = 1 / 255 / 0.26  # one 8-bit step after normalisation
    for height, width in ((70, 90), (90, 70), (64, 64)):
        images = smooth_images(2, height, width, seed=height)
        ours = extractor.preprocess(images)
        # Given float pixels, transformers resizes without rounding to 8-bit levels: ours differs
        # from it by that rounding only (a wrong size, crop offset or mean/std would be far off).
        theirs = processor(images=list(images.float()), return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape == (2, 3, 56, 56)
        assert (ours - theirs).abs().max() <= 0.5 * level + 1e-5

        features = extractor(images)
        with torch.no_grad():
            direct = model(
                pixel_values=hand_preprocess(
                    images, 64, 56, torch.full((1, 3, 1, 1), 0.53), torch.full((1, 3, 1, 1), 0.26)
                )
            ).pooler_output
        torch.testing.assert_close(features, direct.double(), rtol=1e-5, atol=1e-6)

    # An explicit argument takes precedence over the config, and the label says so.
    overridden = RadDinoFeatures(str(folder), crop_size=42)
    assert overridden.crop_size == 42 and "crop_size from argument" in overridden.label["preprocessing"]


def test_raddino_without_a_processor_config_uses_the_documented_defaults(tiny_dinov2):
    folder, _ = tiny_dinov2
    extractor = RadDinoFeatures(str(folder))
    assert (extractor.size, extractor.crop_size) == (518, 518)
    torch.testing.assert_close(extractor.mean.flatten(), torch.full((3,), 0.5307))
    torch.testing.assert_close(extractor.std.flatten(), torch.full((3,), 0.2583))
    assert "size from default" in extractor.label["preprocessing"]
    assert "518x518" in extractor.label["preprocessing"]


def test_unsupported_processor_settings_are_refused(tiny_dinov2):
    folder, _ = tiny_dinov2
    BitImageProcessor(resample=2).save_pretrained(folder)  # bilinear
    with pytest.raises(ValueError, match="resample"):
        RadDinoFeatures(str(folder))


def test_frechet_distance_of_the_features_equals_one_from_the_models_direct_outputs(tiny_dinov2):
    folder, model = tiny_dinov2
    extractor = DINOv2Features(str(folder), size=56, crop_size=56)
    first, second = smooth_images(48, 64, 72, seed=2), smooth_images(48, 64, 72, seed=3, offset=40)

    statistics = []
    for images in (first, second):
        stats = FeatureStatistics()
        for batch in images.split(16):
            stats.update(extractor(batch))
        statistics.append(stats)
    ours = frechet_distance(
        statistics[0].mean, statistics[0].covariance, statistics[1].mean, statistics[1].covariance
    )

    direct = []
    with torch.no_grad():
        for images in (first, second):
            pixels = hand_preprocess(images, 56, 56, IMAGENET_MEAN, IMAGENET_STD)
            direct.append(model(pixel_values=pixels).pooler_output.double().numpy())
    mu1, mu2 = direct[0].mean(axis=0), direct[1].mean(axis=0)
    sigma1, sigma2 = np.cov(direct[0], rowvar=False), np.cov(direct[1], rowvar=False)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root))
    assert expected > 0
    assert ours == pytest.approx(expected, rel=1e-9)


def test_missing_weights_say_where_to_put_them_and_which_flag_passes_them(tmp_path):
    absent = tmp_path / "no-such-folder"
    with pytest.raises(MissingWeightsError, match="--dinov2-model DIR"):
        DINOv2Features(str(absent))
    with pytest.raises(MissingWeightsError, match="--raddino-model DIR") as error:
        RadDinoFeatures(str(absent))
    assert "hf download microsoft/rad-dino --local-dir DIR" in str(error.value)
    with pytest.raises(MissingWeightsError, match="--raddino-model"):
        RadDinoFeatures("medsd-tests/not-a-cached-model")  # a hub id that is not in the cache
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="no config.json"):
        DINOv2Features(str(empty))
    (empty / "config.json").write_text(Dinov2Config(hidden_size=32, num_attention_heads=2).to_json_string())
    with pytest.raises(MissingWeightsError, match="--dinov2-model"):  # a config but no weight file
        DINOv2Features(str(empty))


def test_a_hub_id_resolves_from_the_local_cache_only(tiny_dinov2, tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder, model = tiny_dinov2
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--example--tiny-dinov2" / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (cache / "models--example--tiny-dinov2" / "refs").mkdir()
    (cache / "models--example--tiny-dinov2" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    extractor = DINOv2Features("example/tiny-dinov2", size=56, crop_size=56)
    assert extractor.label["weights"] == str(snapshot)
    images = smooth_images(2, 56, 56, seed=4)
    with torch.no_grad():
        direct = model(
            pixel_values=hand_preprocess(images, 56, 56, IMAGENET_MEAN, IMAGENET_STD)
        ).pooler_output
    torch.testing.assert_close(extractor(images), direct.double(), rtol=1e-5, atol=1e-6)
