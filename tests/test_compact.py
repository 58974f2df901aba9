"""The compact from-scratch model (MSDM-style): the VAE learns and exports unit-variance latents, the
latent model trains through `medsd fit` on CLIP or BERT text, and `medsd sample` reads its export."""

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

from datamodules import SyntheticShapesDataModule
from evaluation.sample_folder import read_manifest
from experiments.cli import main as medsd
from experiments.lightning_cli import MedsdCLI, build_datamodule
from lightning_modules import CompactDiffusion, VAETraining, load_domain_text_pipeline
from lightning_modules.backbones import TINY_BERT, TINY_CLIP, build_tiny_bert
from lightning_modules.domain_text_pipeline import DomainTextPipeline
from lightning_modules.export import read_export_manifest
from lightning_modules.families.stable_diffusion import build_tiny_backbone
from lightning_modules.objectives import diffusion_loss, sample_noise, sample_timesteps
from lightning_modules.pipelines import diffusers_pipeline, load_pipeline
from lightning_modules.settings import Objective

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny"
TEXT_MODELS = [TINY_CLIP, TINY_BERT]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def fit(config: str, root: Path, *overrides: str) -> MedsdCLI:
    args = ["fit", "--config", str(CONFIGS / config), "--trainer.default_root_dir", str(root)]
    return MedsdCLI(args=[*args, "--trainer.num_sanity_val_steps", "0", *overrides])


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    """Step 1: the tiny VAE, trained and exported by `medsd fit`."""
    root = tmp_path_factory.mktemp("vae")
    fit("compact_vae.yaml", root)
    return root


@pytest.fixture(scope="module")
def compact_runs(vae_run, tmp_path_factory) -> dict[str, tuple[CompactDiffusion, Path]]:
    """Step 2, once per text encoder: text model -> (trained module, run folder)."""
    runs = {}
    for text_model in TEXT_MODELS:
        root = tmp_path_factory.mktemp(text_model.split("/")[-1])
        cli = fit(
            "compact.yaml",
            root,
            "--model.init_args.vae",
            str(vae_run),  # a run folder stands for its export
            "--model.init_args.text_model",
            text_model,
            "--trainer.max_steps",
            "3",
        )
        runs[text_model] = (cli.model, root)
    return runs


def test_the_vae_learns_to_reconstruct():
    torch.manual_seed(0)
    data = SyntheticShapesDataModule(n_train=8, n_val=2, image_size=32, batch_size=8)
    data.setup("fit")
    images = next(iter(data.train_dataloader()))["pixel_values"]
    module = VAETraining()
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)

    def reconstruction() -> float:
        with torch.no_grad():
            return module.losses(images, sample=False)["reconstruction"].item()

    before = reconstruction()
    for _ in range(40):
        optimizer.zero_grad()
        module.losses(images, sample=True)["loss"].backward()
        optimizer.step()
    assert reconstruction() < 0.5 * before


@pytest.mark.parametrize("l1_weight, mse_weight", [(1.0, 0.0), (0.7, 0.4)])
def test_the_vae_loss_is_stable_diffusions_sum_over_pixels(l1_weight, mse_weight):
    """SD's LPIPSWithDiscriminator with logvar 0 and no LPIPS or GAN: per-image sums, batch means."""
    torch.manual_seed(0)
    # A KL weight large enough for the KL's share of the loss to show at this tolerance.
    module = VAETraining(l1_weight=l1_weight, mse_weight=mse_weight, kl_weight=2.0).eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        terms = module.losses(images, sample=False)
        posterior = module.vae.encode(images).latent_dist
        error = images - module.vae.decode(posterior.mean).sample
    mean, logvar = posterior.mean.double(), posterior.logvar.double()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum() / 3
    reconstruction = (l1_weight * error.abs().sum() + mse_weight * error.pow(2).sum()) / 3
    assert terms["reconstruction"].item() == pytest.approx(reconstruction.item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(reconstruction.item() + 2.0 * kl.item(), rel=1e-5)
    # Summed, not averaged: the loss is on the scale of a whole image (3 x 16 x 16 values).
    assert terms["reconstruction"].item() > 3 * 16 * 16 * 0.1


VAE_CONFIGS = [
    "tiny/compact_vae.yaml",
    "demo/compact_vae.yaml",
    "demo/base_vae.yaml",
    "prompt_to_polyp/msdm_vae.yaml",
]


def test_every_vae_config_uses_stable_diffusions_weights_and_no_clip():
    configs = CONFIGS.parent
    found = {
        str(path.relative_to(configs))
        for path in configs.rglob("*.yaml")
        if "lightning_modules.VAETraining" in path.read_text()
    }
    assert found == set(VAE_CONFIGS)  # a new VAE config must be checked here too
    for name in VAE_CONFIGS:
        text = (configs / name).read_text()
        config = yaml.safe_load(text)
        weights = config["model"]["init_args"]
        assert (weights["l1_weight"], weights["mse_weight"], weights["kl_weight"]) == (1.0, 0.0, 1e-6), name
        assert "MSDM" in text and "summed over pixels" in text, name  # the comment that claims them
        # A norm clip chosen for a per-pixel mean would clip every step of the summed loss.
        trainer = config["trainer"]
        if isinstance(trainer, str):  # a trainer file next to the config
            trainer = yaml.safe_load(((configs / name).parent / trainer).read_text())
        assert "gradient_clip_val" not in trainer, name


def test_vae_export_scales_its_latents_to_unit_variance(vae_run):
    folder = vae_run / "export"
    manifest = read_export_manifest(folder)
    vae = AutoencoderKL.from_pretrained(folder)
    assert manifest["strategy"] == "VAETraining"
    assert vae.config.scaling_factor == pytest.approx(manifest["scaling_factor"])
    # All 16 training images in one batch (the run's scale_batches covers them all). The trained
    # latents are draws mean + std * eps, whose variance is Var(mean) + E[std^2].
    data = build_datamodule(["--config", str(CONFIGS / "compact_vae.yaml")])
    data.setup("fit")
    images = torch.cat([batch["pixel_values"] for batch in data.train_dataloader()])
    assert len(images) == 16
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    mean, std = posterior.mean.double(), posterior.std.double()
    expected = 1 / (mean.var(unbiased=False) + std.pow(2).mean()).sqrt()
    assert vae.config.scaling_factor == pytest.approx(expected.item(), rel=1e-4)
    draws = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))) * expected
    assert draws.std().item() == pytest.approx(1.0, abs=0.02)


def test_l1_loss_is_the_mean_absolute_error_and_l2_stays_the_default():
    prediction = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert diffusion_loss(prediction, target, kind="l1").item() == pytest.approx((1 + 2 + 0.5 + 2) / 4)
    weighted = diffusion_loss(prediction, target, torch.tensor([2.0, 0.0]), kind="l1")
    assert weighted.item() == pytest.approx(2 * 1.5 / 2)
    assert Objective().loss == "l2"
    assert diffusion_loss(prediction, target).item() == pytest.approx((1 + 4 + 0.25 + 4) / 4)
    with pytest.raises(ValueError, match="'l2' or 'l1'"):
        diffusion_loss(prediction, target, kind="huber")


def test_the_modules_l1_loss_equals_a_hand_computation(compact_runs):
    module, _ = compact_runs[TINY_CLIP]
    assert module.objective.loss == "l1"
    module.eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = {
        "pixel_values": images,
        "prompts": ["a", "b"],
        **module.prompt_tokenizer(["a circle", "a square"]),
    }
    loss = module.diffusion_step(batch, torch.Generator().manual_seed(3), caption_dropout=0.0)

    # The same draws in the same order: posterior sample, noise, timesteps.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        posterior = module.vae.encode(images).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator)
        latents = (posterior.mean + posterior.std * eps) * module.vae.config.scaling_factor
        noise = sample_noise(latents, 0.0, generator)
        t = sample_timesteps(2, 1000, generator=generator)
        alpha = module.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        prediction = module.unet(noisy, t, module.text_encoder(batch["input_ids"])[0]).sample
    torch.testing.assert_close(loss, (prediction - noise).abs().mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text_model", TEXT_MODELS)
def test_only_the_unet_trains_and_all_of_it_does(text_model, compact_runs):
    module, _ = compact_runs[text_model]
    reference = build_tiny_backbone().text_encoder if text_model == TINY_CLIP else build_tiny_bert()[1]
    live, fresh = module.text_encoder.state_dict(), reference.state_dict()
    assert live.keys() == fresh.keys() and all(torch.equal(live[k], fresh[k]) for k in live)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"unet.{name}" for name, _ in module.unet.named_parameters()}
    assert module.unet.config.cross_attention_dim == module.text_encoder.config.hidden_size

    module.train()
    module.zero_grad()
    batch = {
        "pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1,
        "prompts": ["a", "b"],
        **module.prompt_tokenizer(["a circle", "a square"]),
    }
    module.diffusion_step(batch, torch.Generator().manual_seed(0), caption_dropout=0.0).backward()
    no_gradient = [n for n, p in module.unet.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_gradient


@pytest.mark.parametrize("text_model", TEXT_MODELS)
def test_the_export_samples_through_medsd_sample(text_model, compact_runs, tmp_path):
    module, root = compact_runs[text_model]
    manifest = read_export_manifest(root / "export")
    assert manifest["strategy"] == "CompactDiffusion"
    if text_model == TINY_CLIP:
        pipe = StableDiffusionPipeline.from_pretrained(root / "export")
        assert isinstance(pipe.scheduler, DDIMScheduler)
        assert pipe.tokenizer.model_max_length == module.max_length == 16  # trained and sampled alike
    else:
        pipe = load_domain_text_pipeline(root / "export")
        assert isinstance(load_pipeline(root), DomainTextPipeline)
    assert torch.equal(diffusers_pipeline(pipe).unet.conv_in.weight, module.unet.conv_in.weight)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bright circle on the left\na bright square on the right\n")
    out = tmp_path / "out"
    medsd(["sample", str(root), "--out", str(out), "--prompts", str(prompts), "--steps", "2"])
    table = read_manifest(out)
    assert len(table) == 2 and (out / "sample_config.json").is_file()
    assert all((out / path).is_file() for path in table["path"])
