"""FSDP support (`lightning_modules.sharding`): what can be checked without GPUs (FSDP itself
needs an accelerator): the shard units found in each family, the refusals, the settings given
to Lightning, and the export from a gathered full state dict."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file

from experiments.benchmarks.flops import SD15_UNET
from experiments.lightning_cli import parse_config
from lightning_modules import FluxLoRA, LoRAFineTuning
from lightning_modules.backbones import BackboneSpec
from lightning_modules.export import unsharded_copy, write_export
from lightning_modules.sharding import ShardedDiffusion, shard_units, unwrapped_name

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = BackboneSpec("medsd/tiny-sd")


def names(classes) -> set[str]:
    return {c.__name__ for c in classes}


def test_units_are_each_familys_repeated_blocks():
    assert names(shard_units(LoRAFineTuning(backbone=TINY))) == {
        "BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer",
    }  # fmt: skip
    assert names(shard_units(FluxLoRA())) == {
        "FluxTransformerBlock", "FluxSingleTransformerBlock", "T5Block", "CLIPEncoderLayer", "ResnetBlock2D",
    }  # fmt: skip


def test_units_hold_nearly_all_of_the_sd15_unet():
    # The full-size U-Net (shapes only): what stays in the root, gathered whole on every GPU,
    # must be small for sharding to pay.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    units = shard_units(unet)
    inside = {id(p) for m in unet.modules() if type(m) in units for p in m.parameters()}
    total = sum(p.numel() for p in unet.parameters())
    in_units = sum(p.numel() for p in unet.parameters() if id(p) in inside)
    assert in_units / total > 0.9


def test_strategy_defaults_and_discovered_wrap_policy(monkeypatch):
    strategy = ShardedDiffusion()
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy._state_dict_type == "full"
    with pytest.raises(ValueError, match="full-state checkpoints"):
        ShardedDiffusion(state_dict_type="sharded")
    monkeypatch.setattr(FSDPStrategy, "setup", lambda self, trainer: None)  # wrapping needs a GPU
    module = LoRAFineTuning(backbone=TINY)
    strategy.setup(SimpleNamespace(lightning_module=module))
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == shard_units(module)
    explicit = ShardedDiffusion(auto_wrap_policy={torch.nn.Linear})
    explicit.setup(SimpleNamespace(lightning_module=module))
    assert explicit.kwargs["auto_wrap_policy"]._module_classes == {torch.nn.Linear}


def test_the_cli_accepts_the_strategy():
    config = parse_config(
        "--config", "experiments/configs/tiny/lora.yaml",
        "--trainer.strategy", "lightning_modules.sharding.ShardedDiffusion",
        "--trainer.strategy.init_args.sharding_strategy", "SHARD_GRAD_OP",
    )  # fmt: skip
    assert config.trainer.strategy.class_path == "lightning_modules.sharding.ShardedDiffusion"


@pytest.mark.parametrize(
    ("kwargs", "precision", "message"),
    [
        ({"ema_decay": 0.999}, "bf16-mixed", "ema_decay"),
        ({}, "16-mixed", "VAE overflows"),
        ({"backbone": BackboneSpec("medsd/tiny-sd", dtype="bfloat16")}, "bf16-mixed", "one dtype"),
    ],
)
def test_ema_and_fp16_are_refused_before_wrapping(kwargs, precision, message):
    module = LoRAFineTuning(**{"backbone": TINY, **kwargs})
    module.trainer = SimpleNamespace(precision=precision, strategy=ShardedDiffusion(), datamodule=None)
    with pytest.raises(ValueError, match=message):
        module.setup("fit")


def test_wrapper_segments_are_removed_from_parameter_names():
    wrapped = (
        "unet._fsdp_wrapped_module.down_blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.conv.weight"
    )
    assert unwrapped_name(wrapped) == "unet.down_blocks.0.conv.weight"
    assert unwrapped_name("unet.conv_in.weight") == "unet.conv_in.weight"


def test_export_from_a_gathered_state_dict_equals_the_modules_own(tmp_path):
    module = LoRAFineTuning(backbone=TINY, rank=2)
    with torch.no_grad():  # stands for training: adapters start at zero
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    full = module.state_dict()  # what FSDP gathers onto rank 0: every weight, plain names
    write_export(module, tmp_path / "own", global_step=5)
    write_export(unsharded_copy(module, full), tmp_path / "copy", global_step=5)
    own = load_file(tmp_path / "own" / "pytorch_lora_weights.safetensors")
    copy = load_file(tmp_path / "copy" / "pytorch_lora_weights.safetensors")
    assert own.keys() == copy.keys() and all(torch.equal(own[k], copy[k]) for k in own)
    assert (tmp_path / "own" / "medsd_export.json").read_text() == (
        tmp_path / "copy" / "medsd_export.json"
    ).read_text()
    trained = next(k for k, p in module.named_parameters() if p.requires_grad)
    with pytest.raises(KeyError, match="lacks trained weights"):
        unsharded_copy(module, {k: v for k, v in full.items() if k != trained})
