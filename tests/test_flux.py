"""FluxLoRA: the rectified-flow loss by hand, FLUX's latent packing, a `medsd fit` of the tiny model
whose export loads into diffusers' FluxPipeline, and `medsd sample` from its run folder."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evaluation.sample_folder import read_manifest
from experiments.cli import main as medsd
from experiments.lightning_cli import MedsdCLI
from lightning_modules import BackboneNotFoundError, BackboneSpec, FluxLoRA, Objective
from lightning_modules.backbones import TINY_FLUX
from lightning_modules.export import read_export_manifest
from lightning_modules.families.flux import build_tiny_flux, load_flux
from lightning_modules.flux import FlowMatching, latent_ids, pack_latents, unpack_latents
from lightning_modules.pipelines import base_pipeline, load_pipeline

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny" / "flux_lora.yaml"
PROMPTS = ["a bright circle on the left", "a bright square on the right"]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[FluxLoRA, Path]:
    """`medsd fit` of the tiny FLUX LoRA config (12 steps, 3 validations): (trained module, run folder)."""
    root = tmp_path_factory.mktemp("flux_lora")
    cli = MedsdCLI(args=["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root)])
    return cli.model.eval(), root


def patch_index(c: int, row: int, col: int, width: int) -> tuple[int, int]:
    """Where FLUX's packing puts latent (channel c, row, col): (token, feature), written out by hand."""
    token = (row // 2) * (width // 2) + col // 2
    return token, c * 4 + (row % 2) * 2 + col % 2


def test_flow_matching_loss_matches_a_hand_computation(monkeypatch):
    module = FluxLoRA()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 16, 4, 6, generator=g)
    sigmas = torch.tensor([0.25, 0.9])
    velocity = torch.randn(2, 6, 64, generator=g)  # what the stub transformer answers, packed
    seen = {}

    def stub_transformer(**inputs):
        seen.update(inputs)
        return (velocity,)

    monkeypatch.setattr(module.transformer, "forward", stub_transformer)
    text = {"prompt_embeds": torch.randn(2, 5, 32, generator=g), "pooled": torch.randn(2, 32, generator=g)}
    loss = module.velocity_loss(x0, noise, sigmas, text)

    expected_input = torch.empty(2, 6, 64)
    squared_error = 0.0
    for b, s in enumerate(sigmas.tolist()):
        for c in range(16):
            for row in range(4):
                for col in range(6):
                    token, feature = patch_index(c, row, col, width=6)
                    x_t = (1 - s) * x0[b, c, row, col] + s * noise[b, c, row, col]
                    target = noise[b, c, row, col] - x0[b, c, row, col]
                    expected_input[b, token, feature] = x_t
                    squared_error += (velocity[b, token, feature] - target) ** 2
    torch.testing.assert_close(loss, squared_error / x0.numel())
    torch.testing.assert_close(seen["hidden_states"], expected_input)
    assert torch.equal(seen["timestep"], sigmas)  # FLUX takes t in [0, 1] and scales it by 1000 itself
    assert torch.equal(seen["guidance"], torch.ones(2))  # FlowMatching's training guidance
    assert seen["encoder_hidden_states"] is text["prompt_embeds"]
    assert seen["pooled_projections"] is text["pooled"]
    assert torch.equal(seen["txt_ids"], torch.zeros(5, 3))  # every text token at position (0, 0, 0)
    assert seen["img_ids"].tolist() == [[0, r, c] for r in range(2) for c in range(3)]


def test_sigma_sampling_uniform_and_logit_normal():
    uniform = FlowMatching().sample_sigmas(5, torch.Generator().manual_seed(1))
    assert torch.equal(uniform, torch.rand(5, generator=torch.Generator().manual_seed(1)))
    logit = FlowMatching("logit_normal", logit_mean=0.5, logit_std=2.0)
    expected = torch.sigmoid(torch.randn(5, generator=torch.Generator().manual_seed(1)) * 2.0 + 0.5)
    torch.testing.assert_close(logit.sample_sigmas(5, torch.Generator().manual_seed(1)), expected)


def test_ddpm_timestep_settings_are_refused():
    with pytest.raises(ValueError, match="snr_gamma"):
        FluxLoRA(objective=Objective(snr_gamma=5.0))


def test_packing_round_trips_and_matches_flux_pipeline():
    latents = torch.randn(3, 16, 8, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 3, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), latents)
    # FluxPipeline unpacks from the image size: latents of 8 x 6 are 16 x 12 px with a 2x VAE.
    assert torch.equal(FluxPipeline._unpack_latents(packed, 16, 12, vae_scale_factor=2), latents)
    ids = FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32)
    assert torch.equal(latent_ids(8, 6), ids)


def test_a_local_diffusers_folder_loads_through_from_pretrained(tmp_path):
    base_pipeline(TINY_FLUX).save_pretrained(tmp_path)
    loaded, built = load_flux(BackboneSpec(str(tmp_path))), build_tiny_flux()
    for name in ("text_encoder", "text_encoder_2", "vae", "transformer"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(loaded, name)(PROMPTS).input_ids == getattr(built, name)(PROMPTS).input_ids
    assert loaded.sampler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"


def test_a_missing_model_names_the_way_to_provide_it():
    with pytest.raises(BackboneNotFoundError, match="hf download"):
        load_flux(BackboneSpec("medsd-tests/no-such-flux"))


def test_fit_trains_only_the_adapters_and_the_export_loads_into_flux_pipeline(run):
    module, root = run
    assert read_export_manifest(root / "export")["strategy"] == "FluxLoRA"
    base = build_tiny_flux()
    trained = module.transformer.state_dict()
    adapters = {k: v for k, v in trained.items() if "lora_" in k}
    frozen = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert frozen.keys() == base.transformer.state_dict().keys()
    assert all(torch.equal(v, base.transformer.state_dict()[k]) for k, v in frozen.items())
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # initialised at 0
    for name in ("text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(module, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    events = EventAccumulator(str(root), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("val/images")) == 3  # after each epoch (none in the sanity check)

    def render(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe(PROMPTS[0], num_inference_steps=2, generator=generator, output_type="np").images

    pipe = base_pipeline(TINY_FLUX)
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe)
    pipe.load_lora_weights(str(root / "export"))
    assert abs(render(pipe) - before).max() > 1e-3
    # The loaded adapters (alpha 8 over rank 4, read from the file's metadata) compute what the
    # trained module computes.
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 64, 64, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        pooled_projections=torch.randn(1, 32, generator=g),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
        txt_ids=torch.zeros(7, 3),
        img_ids=latent_ids(16, 16),
        return_dict=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.transformer(**inputs)[0], module.transformer(**inputs)[0], rtol=1e-4, atol=1e-5
        )


def test_medsd_sample_renders_the_run_with_its_lora(run, tmp_path):
    _, root = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    medsd(
        ["sample", str(root), "--out", str(out), "--prompts", str(prompts), "--per-prompt", "2"]
        + ["--steps", "2", "--guidance", "3.5", "--seed", "3", "--batch-size", "2"]
    )
    assert load_pipeline(root).transformer.active_adapters() == ["lora_0"]  # what the command loads
    manifest = read_manifest(out)
    assert list(manifest["prompt"]) == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert list(manifest["seed"]) == [3, 4, 5, 6]
    for path in manifest["path"]:
        with Image.open(out / path) as image:
            assert (image.size, image.mode) == ((32, 32), "RGB")


def test_bf16_mixed_on_gpu_keeps_only_the_adapters_in_fp32_and_fp16_is_refused():
    module = FluxLoRA()
    gpu = SimpleNamespace(root_device=torch.device("cuda", 0))  # only its type is read: nothing moves
    module.trainer = SimpleNamespace(precision="bf16-mixed", strategy=gpu, datamodule=None)
    module.setup("fit")
    assert {p.dtype for p in module.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}
    # The mixed-dtype model trains under autocast (here the CPU's), with fp32 gradients.
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "prompts": PROMPTS}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.diffusion_step(batch, torch.Generator().manual_seed(0), caption_dropout=0.5)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and g.dtype == torch.float32 for g in grads)

    module.trainer = SimpleNamespace(precision="16-mixed", strategy=gpu, datamodule=None)
    with pytest.raises(ValueError, match="fp16"):
        module.setup("fit")
