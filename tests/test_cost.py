"""Cost accounting: FLOP counts against published figures, and the cost every run writes."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from experiments.benchmarks.flops import text_encoder_flops, unet_flops
from experiments.cli import main as medsd
from lightning_modules import TextualInversion
from lightning_modules.cost import count_flops, parameter_counts

pytestmark = pytest.mark.slow

TINY = "experiments/configs/tiny"


def test_sd15_unet_flops_match_the_published_figure():
    """About 803 GFLOPs forward at 512 px, batch 1, and 2.41 T with the backward pass."""
    assert unet_flops(512) == pytest.approx(803e9, rel=0.05)
    assert unet_flops(512, backward=True) == pytest.approx(2.41e12, rel=0.05)
    assert text_encoder_flops() == pytest.approx(13.3e9, rel=0.05)


def test_flops_of_a_linear_layer_by_hand():
    layer = nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    assert count_flops(lambda: layer(x)) == 2 * 3 * 8 * 4
    # Backward: the input gradient and the weight gradient, one product each.
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * (2 * 3 * 8 * 4)


def test_parameter_counts_share_tied_weights_once():
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied, as in many language models
    model = nn.Sequential(embedding, head, nn.Linear(10, 2))
    model[2].requires_grad_(False)
    assert parameter_counts(model) == {"total": 40 + 22, "trainable": 40}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    short = ["--trainer.max_steps", "4", "--trainer.limit_val_batches", "1"]
    for name in ("unet", "lora"):
        medsd(
            ["fit", "--config", f"{TINY}/{name}.yaml", "--trainer.default_root_dir", str(root / name), *short]
        )
    return {name: json.loads((root / name / "metrics.json").read_text())["cost"] for name in ("unet", "lora")}


def test_a_resumed_run_adds_to_its_time_and_images(tmp_path):
    run = ["fit", "--config", f"{TINY}/unet.yaml", "--trainer.default_root_dir", str(tmp_path)]
    medsd(
        [*run, "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1", "--cost.count_flops", "false"]
    )
    first = json.loads((tmp_path / "metrics.json").read_text())["cost"]["training"]
    medsd([*run, "--trainer.max_steps", "8", "--trainer.limit_val_batches", "1", "--ckpt_path", "last"])
    resumed = json.loads((tmp_path / "metrics.json").read_text())["cost"]["training"]
    assert first["flops_per_image"] is None  # counting switched off
    assert (first["images"], resumed["images"]) == (16, 32)
    assert resumed["wall_seconds"] > first["wall_seconds"]


def test_every_run_writes_its_cost(runs):
    for cost in runs.values():
        training = cost["training"]
        assert training["images"] == 4 * 4  # max_steps x batch size of tiny/data.yaml
        assert training["flops_total"] == training["flops_per_image"] * training["images"]
        assert training["wall_seconds"] > 0 and training["devices"] == "1 x cpu"
        assert training["peak_gpu_memory_bytes"] is None and training["gpu_hours"] is None
    assert (
        runs["unet"]["parameters"]["total"]
        == runs["lora"]["parameters"]["total"] - (runs["lora"]["parameters"]["trainable"])
    )


def test_counting_flops_leaves_the_run_bit_identical(tmp_path):
    """The count (a training step of its own) runs on no batch of its own and with the random
    state forked: weights trained with and without it are the same to the bit."""
    weights = {}
    for count in ("true", "false"):
        run = tmp_path / count
        medsd(
            [
                "fit",
                "--config",
                f"{TINY}/unet.yaml",  # caption dropout and EMA: both read the random stream
                "--trainer.default_root_dir",
                str(run),
                "--trainer.max_steps",
                "6",
                "--trainer.limit_val_batches",
                "1",
                "--cost.count_flops",
                count,
            ]
        )
        weights[count] = load_file(run / "export" / "unet" / "diffusion_pytorch_model.safetensors")
        flops = json.loads((run / "metrics.json").read_text())["cost"]["training"]["flops_per_image"]
        assert (flops is not None) == (count == "true")
    assert weights["true"].keys() == weights["false"].keys()
    for name, tensor in weights["true"].items():
        assert torch.equal(tensor, weights["false"][name]), name


def test_training_flops_follow_what_trains(runs):
    """LoRA backpropagates through the U-Net like full fine-tuning but computes gradients only for
    its small adapters (and adds their small forward cost): fewer FLOPs per training image; the
    frozen U-Net weights need no weight gradient."""
    unet, lora = runs["unet"]["training"]["flops_per_image"], runs["lora"]["training"]["flops_per_image"]
    assert lora < unet
    assert runs["lora"]["parameters"]["trainable"] < runs["unet"]["parameters"]["trainable"] / 10


def test_textual_inversion_counts_only_its_new_token_rows():
    module = TextualInversion(placeholder_token="<x>", initializer_token="shape", num_vectors=3)
    hidden = module.text_encoder.get_input_embeddings().weight.shape[1]
    assert parameter_counts(module)["trainable"] == 3 * hidden
