"""`medsd fit` with each dataset's DataModule on its phantoms, with and without `medsd prepare`."""

from pathlib import Path

import pytest
import torch

from datamodules.phantoms import write_phantoms
from experiments.cli import main as medsd
from experiments.lightning_cli import build_from_config

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny" / "phantoms"
LAYOUTS = {"mimic_cxr": "mimic-cxr", "rocov2": "rocov2", "medvqa_gi": "medvqa-gi"}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_fit_with_and_without_the_prepared_cache(name, tmp_path):
    root = write_phantoms(LAYOUTS[name], 24, tmp_path / "data", seed=3, image_size=64)
    args = ["--config", str(CONFIGS / f"{name}.yaml"), "--data.init_args.root", str(root)]
    short = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "1"]

    medsd(["fit", *args, *short, "--trainer.default_root_dir", str(tmp_path / "direct")])
    assert (tmp_path / "direct" / "export" / "unet").is_dir()

    cache = tmp_path / "cache"
    medsd(["prepare", *args, "--out", str(cache)])
    cached_args = [*args, "--data.init_args.cache_dir", str(cache)]
    medsd(["fit", *cached_args, *short, "--trainer.default_root_dir", str(tmp_path / "cached")])
    assert (tmp_path / "cached" / "export" / "unet").is_dir()

    # The cached path serves the same examples: the same prompts, and the latent posterior of the
    # same transformed images.
    module, direct = build_from_config(args)
    _, cached = build_from_config(cached_args)
    module.eval()
    for dm in (direct, cached):
        dm.tokenizer = module.prompt_tokenizer
    a = next(iter(direct._loader(direct.usable_records("train"), shuffle=False, split="train")))
    b = next(iter(cached._loader(cached.usable_records("train"), shuffle=False, split="train")))
    assert a["prompts"] == b["prompts"]
    mean, std = module.latent_posterior(a["pixel_values"])
    torch.testing.assert_close(b["latent_mean"], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["latent_std"], std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        b["text"]["prompt_embeds"], module.encode_prompts(a["prompts"]), rtol=1e-5, atol=1e-5
    )
