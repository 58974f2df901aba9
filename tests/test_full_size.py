"""The shipped architecture configs (`lightning_modules/architectures`) against the published
numbers, `backbone.random_init` building them without network, its CLI flag, and (slow) SD 1.x at
512 px with LoRA: two training steps, the export, and the export sampled in diffusers."""

from __future__ import annotations

import json
import time

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from transformers import BertModel, CLIPTextModel

from experiments.benchmarks.full_size import paper_configs
from experiments.lightning_cli import MedsdCLI, parse_config
from lightning_modules.architectures import NAMES, UnknownArchitectureError, architecture
from lightning_modules.backbones import BackboneSpec, load_clip_text_encoder, load_text_encoder
from lightning_modules.families import registered

SD1 = "CompVis/stable-diffusion-v1-4"
SD2 = "stabilityai/stable-diffusion-2-1"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
FLUX = "black-forest-labs/FLUX.1-dev"
KANDINSKY = "kandinsky-community/kandinsky-2-2-decoder"
PRIOR = "kandinsky-community/kandinsky-2-2-prior"

# The published values (the models' config.json files on the hub), written out here.
PUBLISHED = [
    (SD1, "unet", {"cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64}),
    (SD1, "unet", {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}),
    (
        SD1,
        "vae",
        {"scaling_factor": 0.18215, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512]},
    ),
    (SD1, "text_encoder", {"hidden_size": 768, "num_hidden_layers": 12, "max_position_embeddings": 77}),
    (SD1, "text_encoder", {"hidden_act": "quick_gelu", "vocab_size": 49408}),
    (SD2, "unet", {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "sample_size": 96}),
    (SD2, "unet", {"use_linear_projection": True, "upcast_attention": True}),
    (SD2, "text_encoder", {"hidden_size": 1024, "num_hidden_layers": 23, "hidden_act": "gelu"}),
    (SD2, "vae", {"scaling_factor": 0.18215, "sample_size": 768}),
    (SDXL, "unet", {"cross_attention_dim": 2048, "transformer_layers_per_block": [1, 2, 10]}),
    (SDXL, "unet", {"addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}),
    (SDXL, "unet", {"sample_size": 128, "attention_head_dim": [5, 10, 20]}),
    (SDXL, "vae", {"scaling_factor": 0.13025, "sample_size": 1024}),
    (SDXL, "text_encoder", {"hidden_size": 768, "num_hidden_layers": 12}),
    (SDXL, "text_encoder_2", {"hidden_size": 1280, "num_hidden_layers": 32, "projection_dim": 1280}),
    (FLUX, "transformer", {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128}),
    (
        FLUX,
        "transformer",
        {"num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768},
    ),
    (FLUX, "transformer", {"in_channels": 64, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True}),
    (FLUX, "vae", {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16}),
    (FLUX, "text_encoder_2", {"d_model": 4096, "num_layers": 24, "num_heads": 64, "d_ff": 10240, "d_kv": 64}),
    (FLUX, "text_encoder_2", {"vocab_size": 32128, "feed_forward_proj": "gated-gelu"}),
    (FLUX, "text_encoder", {"hidden_size": 768, "num_hidden_layers": 12}),
    (KANDINSKY, "unet", {"encoder_hid_dim": 1280, "encoder_hid_dim_type": "image_proj"}),
    (KANDINSKY, "unet", {"addition_embed_type": "image", "out_channels": 8, "cross_attention_dim": 768}),
    (KANDINSKY, "unet", {"block_out_channels": [384, 768, 1152, 1536], "layers_per_block": 3}),
    (KANDINSKY, "movq", {"latent_channels": 4, "num_vq_embeddings": 16384, "norm_type": "spatial"}),
    (
        PRIOR,
        "prior",
        {"embedding_dim": 1280, "num_layers": 20, "num_attention_heads": 32, "num_embeddings": 77},
    ),
    (PRIOR, "text_encoder", {"hidden_size": 1280, "num_hidden_layers": 32, "projection_dim": 1280}),
    (
        PRIOR,
        "image_encoder",
        {"hidden_size": 1664, "num_hidden_layers": 48, "patch_size": 14, "image_size": 224},
    ),
    (PRIOR, "image_encoder", {"projection_dim": 1280}),
    ("openai/clip-vit-large-patch14", "text_encoder", {"hidden_size": 768, "max_position_embeddings": 77}),
    (
        "StanfordAIMI/RadBERT",
        "text_encoder",
        {"hidden_size": 768, "num_hidden_layers": 12, "vocab_size": 28996},
    ),
    (
        "cambridgeltl/SapBERT-from-PubMedBERT-fulltext",
        "text_encoder",
        {"hidden_size": 768, "vocab_size": 30522},
    ),
    (
        "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext",
        "text_encoder",
        {"hidden_size": 768, "max_position_embeddings": 512, "vocab_size": 30522},
    ),
]


@pytest.mark.parametrize(("name", "part", "values"), PUBLISHED)
def test_shipped_configs_hold_the_published_values(name, part, values):
    config = architecture(name).config(part)
    assert {key: config[key] for key in values} == values


@pytest.mark.parametrize(
    ("name", "part", "file", "values"),
    [
        (SD1, "scheduler", "scheduler_config.json", {"_class_name": "PNDMScheduler", "beta_end": 0.012}),
        (SD2, "scheduler", "scheduler_config.json", {"prediction_type": "v_prediction"}),
        (SDXL, "scheduler", "scheduler_config.json", {"_class_name": "EulerDiscreteScheduler"}),
        (FLUX, "scheduler", "scheduler_config.json", {"shift": 3.0, "use_dynamic_shifting": True}),
        (KANDINSKY, "scheduler", "scheduler_config.json", {"beta_schedule": "linear"}),
        (FLUX, "tokenizer_2", "tokenizer_config.json", {"model_max_length": 512}),
        (SD1, "tokenizer", "tokenizer_config.json", {"model_max_length": 77}),
        (SDXL, "tokenizer_2", "tokenizer_config.json", {"pad_token": "!"}),
    ],
)
def test_shipped_schedulers_and_tokenizers_hold_the_published_values(name, part, file, values):
    config = architecture(name).config(part, file)
    assert {key: config[key] for key in values} == values


def test_sd_1_5_and_1_4_share_an_architecture_and_every_paper_model_is_shipped():
    assert NAMES["stable-diffusion-v1-5/stable-diffusion-v1-5"] == NAMES[SD1]
    for config in paper_configs():
        init = parse_config("--config", f"experiments/configs/{config}.yaml").model.init_args
        names = [init.get("backbone", {}).get("name_or_path") if "backbone" in init else None]
        names += [init.get("text_model"), init.get("prior_model")]
        for name in filter(None, names):
            assert name in NAMES, (config, name)


def test_random_init_builds_a_text_encoder_offline_and_the_same_twice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer, model = load_clip_text_encoder("openai/clip-vit-large-patch14", random_init=True)
    assert isinstance(model, CLIPTextModel) and model.config.hidden_size == 768
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408
    _, again = load_clip_text_encoder("openai/clip-vit-large-patch14", random_init=True)
    first, second = model.get_input_embeddings().weight, again.get_input_embeddings().weight
    assert torch.equal(first, second)
    tokenizer, bert = load_text_encoder("StanfordAIMI/RadBERT", random_init=True)
    assert isinstance(bert, BertModel) and bert.config.vocab_size == 28996
    assert max(tokenizer("small left pleural effusion")["input_ids"]) < 28996


def test_random_init_builds_a_reduced_part_with_published_widths():
    shipped = BackboneSpec(FLUX, random_init=True, architecture_overrides={"vae": {"layers_per_block": 1}})
    vae = shipped.architecture().build("vae", AutoencoderKL)
    assert vae.config.layers_per_block == 1
    assert (vae.config.latent_channels, vae.config.scaling_factor, vae.config.shift_factor) == (
        16,
        0.3611,
        0.1159,
    )


def test_random_init_of_a_name_without_an_architecture_lists_the_shipped_ones():
    with pytest.raises(UnknownArchitectureError, match="no architecture config is shipped") as error:
        registered("stable-diffusion").load(BackboneSpec("someone/some-model", random_init=True))
    assert SD1 in str(error.value) and FLUX in str(error.value)


def test_the_random_init_flag_parses_from_the_command_line():
    overrides = json.dumps({"unet": {"layers_per_block": 1}})
    config = parse_config(
        "--config",
        "experiments/configs/roentgen/unet.yaml",
        "--model.init_args.backbone.random_init",
        "true",
        "--model.init_args.backbone.architecture_overrides",
        overrides,
    )
    backbone = config.model.init_args.backbone
    assert backbone.random_init is True and backbone.architecture_overrides == {
        "unet": {"layers_per_block": 1}
    }
    msdm = parse_config(
        "--config",
        "experiments/configs/prompt_to_polyp/msdm.yaml",
        "--model.init_args.text_model_random_init",
        "true",
    )
    assert msdm.model.init_args.text_model_random_init is True


@pytest.mark.slow
def test_sd1_at_512_px_with_lora_trains_exports_and_samples_in_diffusers(tmp_path, monkeypatch):
    """The real SD 1.x architecture (random weights) at 512 px, batch 1: two LoRA steps, the
    export, and the export loaded into a diffusers pipeline over the same random base, 2 steps."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = dict(image_size=512, batch_size=1, n_train=1, repeats=2)
    started = time.perf_counter()
    MedsdCLI(
        args=[
            "fit",
            "--config",
            "experiments/configs/da_silva2024/lora.yaml",
            "--model.init_args.backbone.random_init",
            "true",
            "--data",
            json.dumps(
                {"class_path": "experiments.benchmarks.train_throughput.HeldBatch", "init_args": data}
            ),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "bf16-mixed",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--checkpoint.save_last",
            "false",
            "--checkpoint.save_top_k",
            "0",
            "--cost.count_flops",
            "false",
        ]
    )
    export = tmp_path / "export"
    manifest = json.loads((export / "medsd_export.json").read_text())
    assert manifest["format"] == "diffusers-lora" and manifest["base_random_init"] is True
    assert manifest["global_step"] == 2
    # diffusers' own loading: the pipeline of the (rebuilt, identical) random base and the LoRA file.
    family = registered("stable-diffusion")
    pipe = family.pipeline(family.load(BackboneSpec(SD1, random_init=True)))
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.load_lora_weights(str(export))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dtype=torch.bfloat16)  # as trained (bf16-mixed); no guidance: one U-Net pass a step
    image = pipe("chest x-ray", num_inference_steps=2, guidance_scale=1.0, height=512, width=512).images[0]
    assert image.size == (512, 512)
    print(f"SD 1.x 512 px LoRA fit + sample: {time.perf_counter() - started:.0f} s")
