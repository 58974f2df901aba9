"""Kandinsky 2.2 decoder tuning: the loss against a hand computation, `medsd fit` with LoRA and with
full tuning, the exports in diffusers' Kandinsky pipelines, and `medsd sample` through prior and decoder."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    KandinskyV22CombinedPipeline,
    KandinskyV22Pipeline,
)
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evaluation.sample_folder import read_manifest
from experiments.cli import main as medsd
from experiments.lightning_cli import MedsdCLI
from lightning_modules import BackboneNotFoundError, BackboneSpec, KandinskyDecoderTuning, Objective
from lightning_modules.backbones import TINY_KANDINSKY
from lightning_modules.export import MANIFEST
from lightning_modules.families.kandinsky import LORA_WEIGHTS, build_tiny_kandinsky, load_kandinsky
from lightning_modules.pipelines import base_pipeline, load_pipeline, render
from tests.helpers.kandinsky import save_tiny_kandinsky

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny" / "kandinsky_lora.yaml"
PROMPTS = ["a bright circle on the left", "a bright square on the right"]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def module() -> KandinskyDecoderTuning:
    return KandinskyDecoderTuning(lora_rank=None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`medsd fit` on the tiny config once per setting: overrides -> (cli, run folder)."""
    done = {}

    def run(*overrides: str):
        if overrides not in done:
            root = tmp_path_factory.mktemp("kandinsky")
            args = ["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root), *overrides]
            done[overrides] = (MedsdCLI(args=args), root)
        return done[overrides]

    return run


def quantised_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] with 8-bit levels, so a round trip through PIL is exact."""
    levels = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 255 * 2 - 1


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(((image + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy())


def capture_unet_call(unet: torch.nn.Module) -> tuple[dict, torch.utils.hooks.RemovableHandle]:
    seen = {}

    def hook(_, args, kwargs, output):
        seen.update(
            sample=args[0], timesteps=args[1], embeds=kwargs["added_cond_kwargs"]["image_embeds"], out=output
        )

    return seen, unet.register_forward_hook(hook, with_kwargs=True)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_real_models_load_from_the_hub_or_a_folder_with_a_helpful_error():
    # Offline (conftest), the hub id cannot resolve: the error says how to provide the weights.
    with pytest.raises(BackboneNotFoundError, match="(?s)kandinsky-2-2-prior.*hf download"):
        load_kandinsky("kandinsky-community/kandinsky-2-2-decoder")
    with pytest.raises(ValueError, match="has its own prior"):
        load_kandinsky(TINY_KANDINSKY, prior="kandinsky-community/kandinsky-2-2-prior")


def test_diffusers_folders_load_like_the_hub_models(module, tmp_path):
    # Saved in the hub repositories' layout, the tiny model goes through the from_pretrained path.
    tiny = save_tiny_kandinsky(tmp_path)
    loaded = KandinskyDecoderTuning(
        lora_rank=None, backbone=BackboneSpec(str(tmp_path / "decoder")), prior_model=str(tmp_path / "prior")
    )
    for part in ("prior", "text_encoder", "image_encoder", "unet"):
        assert same_weights(getattr(loaded, part), getattr(tiny, part)), part
    assert same_weights(loaded.movq, tiny.movq)
    assert loaded.tokenizer("a polyp").input_ids == tiny.tokenizer("a polyp").input_ids
    # `medsd sample` on a decoder folder alone puts the released prior in front of it rather than
    # returning a decoder pipeline that cannot take prompts (offline here, so the prior is missing).
    with pytest.raises(BackboneNotFoundError, match="kandinsky-2-2-prior"):
        base_pipeline(str(tmp_path / "decoder"))
    assert loaded.image_processor.crop_size == tiny.image_processor.crop_size
    assert loaded.noise_scheduler.config.beta_schedule == "linear"
    batch = {"pixel_values": quantised_images(2, 32), "prompts": PROMPTS}
    module.objective = loaded.objective
    torch.testing.assert_close(
        loaded.diffusion_step(batch, torch.Generator().manual_seed(1), 0.5),
        module.diffusion_step(batch, torch.Generator().manual_seed(1), 0.5),
    )


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_loss_is_epsilon_mse_on_the_first_half_of_the_unet_output(module, snr_gamma):
    module.objective = Objective(snr_gamma=snr_gamma)
    pixels = quantised_images(2, 32)
    seen, handle = capture_unet_call(module.unet)
    try:
        loss = module.diffusion_step(
            {"pixel_values": pixels, "prompts": PROMPTS}, torch.Generator().manual_seed(3), 0.0
        )
    finally:
        handle.remove()

    # By hand: the same draws (noise, then timesteps) from the same seed.
    latents = module.movq.encode(pixels).latents
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    alpha_bar = module.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    assert torch.equal(seen["timesteps"], timesteps)
    torch.testing.assert_close(seen["sample"], alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise)
    assert seen["out"].sample.shape[1] == 2 * latents.shape[1]  # prediction and learned variance
    per_sample = (seen["out"].sample[:, :4] - noise).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = (alpha_bar / (1 - alpha_bar)).flatten()
        per_sample = per_sample * snr.clamp(max=snr_gamma) / snr
    torch.testing.assert_close(loss, per_sample.mean())

    # The conditioning is the frozen image encoder's embedding of the training image itself,
    # preprocessed as the prior's CLIPImageProcessor does (here no resize: both are 32 px).
    processed = module.image_processor([to_pil(p) for p in pixels], return_tensors="pt").pixel_values
    expected = module.image_encoder(processed).image_embeds
    torch.testing.assert_close(seen["embeds"], expected)


def test_image_embeddings_resize_like_the_clip_image_processor(module):
    pixels = quantised_images(
        2, 64
    )  # resized to the encoder's 32 px: PIL's and torch's bicubic differ slightly
    processed = module.image_processor([to_pil(p) for p in pixels], return_tensors="pt").pixel_values
    expected = module.image_encoder(processed).image_embeds
    torch.testing.assert_close(module.image_embeddings(pixels), expected, rtol=0, atol=2e-2)


def test_dropped_conditioning_is_the_pipelines_zero_image_embedding(module):
    seen, handle = capture_unet_call(module.unet)
    try:
        batch = {"pixel_values": quantised_images(2, 32), "prompts": PROMPTS}
        module.diffusion_step(batch, torch.Generator().manual_seed(0), caption_dropout=1.0)
    finally:
        handle.remove()
    zero = module.build_pipeline().prior_pipe.get_zero_embed(2)
    torch.testing.assert_close(seen["embeds"], zero)


def test_lora_fit_trains_only_the_adapters_and_the_export_loads_into_the_decoder_pipeline(runs):
    cli, root = runs()
    model, base = cli.model, build_tiny_kandinsky()
    for part in ("prior", "text_encoder", "image_encoder"):
        assert same_weights(getattr(model, part), getattr(base, part)), part
    assert same_weights(model.movq, base.movq)
    trained = {n: p for n, p in model.unet.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)  # B starts at zero
    base_unet = base.unet.state_dict()
    for name, value in model.unet.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base_unet[name.replace(".base_layer", "")]), name

    manifest = (root / "export" / "medsd_export.json").read_text()
    assert '"strategy": "KandinskyDecoderTuning"' in manifest and '"tuning": "lora"' in manifest
    pipe = KandinskyV22Pipeline(
        unet=base.unet, scheduler=DDPMScheduler.from_config(base.sampler_config), movq=base.movq
    )
    x, t, embeds = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 32)
    with torch.no_grad():
        before = pipe.unet(x, t, None, added_cond_kwargs={"image_embeds": embeds}).sample
        pipe.unet.load_lora_adapter(str(root / "export"), prefix=None, weight_name=LORA_WEIGHTS)
        after = pipe.unet(x, t, None, added_cond_kwargs={"image_embeds": embeds}).sample
        trained_out = model.unet(x, t, None, added_cond_kwargs={"image_embeds": embeds}).sample
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after, trained_out, rtol=1e-4, atol=1e-5)
    image = pipe(
        embeds, torch.zeros_like(embeds), height=32, width=32, num_inference_steps=2, output_type="np"
    )
    assert image.images.shape == (1, 32, 32, 3)


def test_lora_run_logs_validation_images_from_prior_and_decoder(runs):
    _, root = runs()
    events = EventAccumulator(str(root), size_guidance={"images": 0})
    events.Reload()
    grids = events.Images("val/images")
    assert [g.step for g in grids] == [4, 8, 12]  # after each epoch, not in the sanity check
    assert (grids[-1].width, grids[-1].height) == (2 * 32 + 3 * 2, 32 + 2 * 2)


def test_full_fit_exports_the_decoder_unet_and_samples_with_it(runs):
    cli, root = runs("--model.init_args.lora_rank", "null", "--trainer.max_steps", "2")
    base = build_tiny_kandinsky()
    assert not same_weights(cli.model.unet, base.unet)
    assert same_weights(cli.model.prior, base.prior)
    assert '"tuning": "full"' in (root / "export" / "medsd_export.json").read_text()
    pipe = load_pipeline(root)
    assert isinstance(pipe, KandinskyV22CombinedPipeline)
    assert same_weights(pipe.unet, cli.model.unet)
    assert same_weights(pipe.prior_prior, base.prior)


def test_an_export_whose_manifest_names_no_family_loads_by_its_strategy(runs, tmp_path):
    _, root = runs()
    export = tmp_path / "export"
    shutil.copytree(root / "export", export)
    manifest = json.loads((export / MANIFEST).read_text())
    del manifest["family"]  # as exports made before the family registry
    (export / MANIFEST).write_text(json.dumps(manifest))
    assert isinstance(load_pipeline(export), KandinskyV22CombinedPipeline)


def test_medsd_sample_renders_through_prior_and_decoder(runs, tmp_path):
    _, root = runs()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    args = ["--prompts", str(prompts), "--per-prompt", "2", "--steps", "2", "--batch-size", "4"]
    medsd(["sample", str(root), "--out", str(out), *args, "--scheduler", "ddim"])
    manifest = read_manifest(out)
    assert list(manifest["prompt"]) == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    for path in manifest["path"]:
        assert Image.open(out / path).size == (32, 32)  # the tiny model's native size


def test_a_list_of_generators_seeds_each_image_through_prior_and_decoder(runs):
    _, root = runs()
    with pytest.raises(ValueError, match="takes no --lora"):
        load_pipeline(root, lora=[root])
    pipe = load_pipeline(root, scheduler="ddim")
    assert isinstance(pipe.decoder_pipe.scheduler, DDIMScheduler)  # the decoder samples with it
    assert pipe.unet.active_adapters() == ["default_0"]
    both = render(pipe, PROMPTS, [5, 6], steps=2, guidance=4.0)
    alone = render(pipe, PROMPTS[1:], [6], steps=2, guidance=4.0)
    again = render(pipe, PROMPTS[1:], [7], steps=2, guidance=4.0)
    assert np.abs(np.asarray(both[1], int) - np.asarray(alone[0], int)).max() <= 2  # batch-independent
    assert np.abs(np.asarray(again[0], int) - np.asarray(alone[0], int)).max() > 2
