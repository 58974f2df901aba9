"""`medsd prepare`'s cache: the same batches as decoding and encoding on the fly, and refusals."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import CSVImageTextDataModule, write_synthetic_folder
from datamodules.cache import CacheMismatchError, PreparedCache
from experiments.cli import main as medsd
from experiments.prepare import prepare_cache
from lightning_modules import FineTuning, Objective, TextualInversion
from lightning_modules.backbones import BackboneSpec
from tests.helpers.cache import data, shapes_folder

pytestmark = pytest.mark.slow

TINY = BackboneSpec("medsd/tiny-sd")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return shapes_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache"
    prepare_cache(data(folder), FineTuning(backbone=TINY), out)
    return out


def val_loss(module, datamodule) -> float:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return trainer.validate(module, datamodule, verbose=False)[0]["val/loss"]


def test_cached_batches_equal_the_decoded_ones(folder, cache):
    module = FineTuning(backbone=TINY).eval()
    direct, cached = data(folder), data(folder, cache_dir=str(cache))
    for dm in (direct, cached):
        dm.tokenizer = module.prompt_tokenizer
    for a, b in zip(direct.val_dataloader(), cached.val_dataloader(), strict=True):
        assert a["prompts"] == b["prompts"] and "pixel_values" not in b
        mean, std = module.latent_posterior(a["pixel_values"])
        torch.testing.assert_close(b["latent_mean"], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["latent_std"], std, rtol=1e-5, atol=1e-5)
        assert list(b["text"]) == ["prompt_embeds"]  # SD: one array, the text encoder's states
        torch.testing.assert_close(
            b["text"]["prompt_embeds"], module.encode_prompts(a["prompts"]), rtol=1e-5, atol=1e-5
        )
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_cached_images_are_the_transformed_images_to_8_bits(folder, cache):
    direct = next(iter(data(folder).val_dataloader()))["pixel_values"]
    # Without latents in the cache, the resized images are served instead.
    dataset = PreparedCache(cache).dataset(
        "val", data(folder).records("val"), data(folder).transform_settings()
    )
    dataset.names = []
    cached = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    assert cached.shape == direct.shape
    assert (cached - direct).abs().max() <= 1 / 127.5 + 1e-6  # half an 8-bit step, in [-1, 1] units


def test_validation_loss_is_the_same_with_and_without_the_cache(folder, cache):
    # Fixed noise, timesteps and posterior draws: the loss only differs by float rounding.
    module = FineTuning(backbone=TINY)
    direct = val_loss(module, data(folder))
    assert module._cached_text is False
    cached = val_loss(module, data(folder, cache_dir=str(cache)))
    assert module._cached_text is True
    assert cached == pytest.approx(direct, rel=1e-4)


def test_a_trained_text_encoder_ignores_the_cached_embeddings(folder, cache):
    module = TextualInversion(placeholder_token="<x>", initializer_token="shape", backbone=TINY)
    val_loss(module, data(folder, cache_dir=str(cache)))  # still needs the token ids
    assert module._cached_text is False


def test_a_cache_for_other_records_or_transform_is_refused(folder, cache, tmp_path):
    with pytest.raises(CacheMismatchError, match="transform"):
        next(iter(CSVImageTextDataModule(str(folder), image_size=16, cache_dir=str(cache)).val_dataloader()))
    other = write_synthetic_folder(tmp_path / "other", n=8, size=48, val_fraction=0.5, seed=1)
    with pytest.raises(CacheMismatchError, match="records that differ"):
        next(iter(data(other, cache_dir=str(cache)).val_dataloader()))
    with pytest.raises(ValueError, match="random crops or flips"):
        next(iter(data(folder, cache_dir=str(cache), random_flip=True).val_dataloader()))


def test_a_cache_from_another_vae_is_refused(folder, cache, tmp_path):
    manifest = PreparedCache(cache).manifest
    manifest["model"]["backbone"] = "someone/else@None"
    moved = tmp_path / "cache"
    moved.mkdir()
    (moved / "cache.json").write_text(json.dumps(manifest))
    module = FineTuning(backbone=TINY)
    with pytest.raises(CacheMismatchError, match="someone/else"):
        val_loss(module, data(folder, cache_dir=str(moved)))


def test_missing_cache_says_how_to_make_it(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="medsd prepare"):
        next(iter(data(folder, cache_dir=str(tmp_path / "none")).val_dataloader()))


def test_prepare_then_fit_through_the_cli(tmp_path):
    config = str(Path(__file__).resolve().parents[1] / "experiments/configs/tiny/lora.yaml")
    cache = tmp_path / "cache"
    medsd(["prepare", "--config", config, "--out", str(cache), "--splits", "train", "val"])
    assert sorted(PreparedCache(cache).manifest["splits"]) == ["train", "val"]
    root = tmp_path / "run"
    medsd(["fit", "--config", config, "--data.init_args.cache_dir", str(cache),
           "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4"])  # fmt: skip
    assert (root / "export" / "pytorch_lora_weights.safetensors").is_file()


def test_with_cached_embeddings_the_text_encoder_encodes_only_the_empty_prompt(folder, cache, tmp_path):
    """Training from a cache with caption dropout runs the frozen text encoder once, for the
    empty prompt, and then moves it off the accelerator (a no-op on this CPU)."""
    module = FineTuning(backbone=TINY, objective=Objective(caption_dropout=0.5))
    calls = []
    module.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data(folder, cache_dir=str(cache)))
    assert module._cached_text is True and len(calls) == 1
    assert next(module.text_encoder.parameters()).device.type == "cpu"
