"""Each tiny config trains through `medsd fit`, and its export loads where it should."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.lightning_cli import MedsdCLI, build_from_config
from lightning_modules import load_domain_text_pipeline
from lightning_modules.backbones import TINY_SD, build_tiny_bert
from lightning_modules.families.stable_diffusion import build_tiny_backbone
from lightning_modules.pipelines import base_pipeline

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tiny"


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    """Runs `medsd fit` on a tiny config once per module; returns (cli, run folder)."""
    runs = {}

    def run(name: str, *overrides: str):
        key = (name, overrides)
        if key not in runs:
            root = tmp_path_factory.mktemp(name)
            args = ["fit", "--config", str(CONFIGS / f"{name}.yaml")]
            cli = MedsdCLI(args=[*args, "--trainer.default_root_dir", str(root), *overrides])
            runs[key] = (cli, root)
        return runs[key]

    return run


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def render(pipe, seed: int = 0):
    return pipe(
        "a bright circle on the left",
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def test_textual_inversion_export_loads_in_diffusers(fit):
    cli, root = fit("textual_inversion")
    pipe = base_pipeline(TINY_SD)
    base_rows = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    pipe.load_textual_inversion(str(root / "export" / "learned_embeds.safetensors"))

    ids = pipe.tokenizer.convert_tokens_to_ids(["<shape>", "<shape>_1"])
    assert ids == [len(base_rows), len(base_rows) + 1]
    loaded = pipe.text_encoder.get_input_embeddings().weight.detach()
    trained = cli.model.learned_embeddings()
    assert torch.equal(loaded[ids], trained)
    assert torch.equal(loaded[: len(base_rows)], base_rows)  # every other row bit-identical
    # The placeholder moved away from its initialiser, and the live model kept the base rows.
    start = base_rows[pipe.tokenizer.convert_tokens_to_ids("shape</w>")]
    assert not torch.allclose(trained[0], start)
    live = cli.model.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(live[: len(base_rows)], base_rows)
    assert render(pipe).shape == (1, 32, 32, 3)


def test_unet_export_is_a_diffusers_pipeline_with_only_the_unet_changed(fit):
    cli, root = fit("unet")
    exported = StableDiffusionPipeline.from_pretrained(root / "export")
    base = base_pipeline(TINY_SD)
    assert not same_weights(exported.unet, base.unet)
    assert same_weights(exported.vae, base.vae)
    assert same_weights(exported.text_encoder, base.text_encoder)
    assert type(exported.scheduler).__name__ == "PNDMScheduler"
    image = render(exported)
    assert image.shape == (1, 32, 32, 3) and 0 <= image.min() and image.max() <= 1
    # With EMA on, the export holds the averaged weights, not the last step's.
    shadow = cli.model.ema.shadow_params
    names = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    first = names[0].removeprefix("unet.")
    assert torch.equal(exported.unet.state_dict()[first], shadow[0].cpu())
    assert not torch.equal(shadow[0].cpu(), cli.model.unet.state_dict()[first])


def test_run_folder_holds_config_logs_checkpoints_and_export(fit):
    _, root = fit("unet")
    assert (root / "config.yaml").is_file()
    events = EventAccumulator(str(root), size_guidance={"images": 0})
    events.Reload()
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])
    grids = events.Images("val/images")
    # One grid after each of the 3 epochs; none in the sanity check, which would delay training.
    assert [g.step for g in grids] == [4, 8, 12]
    # Two 32-px prompts side by side with make_grid's 2-px padding.
    assert (grids[-1].width, grids[-1].height) == (2 * 32 + 3 * 2, 32 + 2 * 2)
    checkpoints = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert {"last.ckpt", "best.ckpt"} <= set(checkpoints)
    assert (root / "export" / "medsd_export.json").is_file()
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    # Only what trains is checkpointed: frozen parts are reloaded from the backbone.
    assert state["state_dict"] and all(k.startswith("unet.") for k in state["state_dict"])
    assert "ema" in state


def test_lora_export_loads_with_load_lora_weights_and_changes_the_output(fit):
    cli, root = fit("lora")
    assert (root / "export" / "pytorch_lora_weights.safetensors").is_file()
    pipe = base_pipeline(TINY_SD)
    before = render(pipe)
    pipe.load_lora_weights(str(root / "export"))
    after = render(pipe)
    assert abs(after - before).max() > 1e-3
    # The loaded adapters compute what the trained module computes.
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.unet(x, t, cond).sample, cli.model.unet(x, t, cond).sample, rtol=1e-4, atol=1e-5
        )


def test_text_encoder_and_unet_tuning_changes_both(fit):
    _, root = fit("text_encoder")
    exported = StableDiffusionPipeline.from_pretrained(root / "export")
    base = base_pipeline(TINY_SD)
    assert not same_weights(exported.text_encoder, base.text_encoder)
    assert not same_weights(exported.unet, base.unet)
    assert same_weights(exported.vae, base.vae)


def test_text_encoder_alone_leaves_the_unet_identical(fit):
    cli, root = fit("text_encoder", "--model.init_args.train_unet", "false")
    exported = StableDiffusionPipeline.from_pretrained(root / "export")
    base = base_pipeline(TINY_SD)
    assert not same_weights(exported.text_encoder, base.text_encoder)
    assert same_weights(exported.unet, base.unet)
    assert same_weights(exported.vae, base.vae)
    group_lrs = [g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups]
    assert group_lrs == [5e-4]  # the text encoder's own rate; the empty U-Net group is dropped


def test_domain_text_encoder_export_loads_with_the_medsd_loader(fit):
    cli, root = fit("domain_text_encoder")
    pipe = load_domain_text_pipeline(root / "export")
    _, bert = build_tiny_bert()
    assert same_weights(pipe.text_encoder, bert)  # configured frozen
    assert same_weights(pipe.projection, cli.model.projection)
    assert not same_weights(pipe.pipeline.unet, build_tiny_backbone().unet)
    image = pipe(
        ["left pleural effusion"],
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 32, 32, 3)


def test_dropped_captions_get_the_empty_prompts_ids_and_mask():
    """A BERT-like encoder reads the attention mask: a dropped caption must be encoded exactly as
    the empty prompt is at sampling time, mask included."""
    module, _ = build_from_config(["--config", str(CONFIGS / "domain_text_encoder.yaml")])
    module.eval()
    batch = module.prompt_tokenizer(["a bright circle on the left", "a square"])
    with torch.no_grad():
        dropped = module.batch_conditioning(batch, torch.Generator().manual_seed(0), caption_dropout=1.0)
        empty = module.encode_prompts(["", ""], unconditional=True)
    torch.testing.assert_close(dropped, empty)
