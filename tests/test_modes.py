"""Train and eval modes follow what trains, for every family, with parts loaded by `from_pretrained`.

Parts built from config start in train mode and would hide a module that never switches them:
every backbone here is read from a saved folder (the shipped demo base, or each tiny model saved
in its hub layout), which leaves its parts in eval mode, as the hub models arrive.
"""

from pathlib import Path

import lightning as L
import pytest
from torch import nn

from experiments.cli import main as medsd
from lightning_modules.backbones import TINY_FLUX, TINY_SDXL
from lightning_modules.pipelines import base_pipeline
from tests.helpers.kandinsky import save_tiny_kandinsky

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TINY = "experiments/configs/tiny"
DEMO_BASE = "medsd/demo-base"  # lightning_modules/demo_base, a diffusers folder


def wrong_modes(module: nn.Module) -> list[str]:
    """Modules holding parameters whose mode is not "train if any of them trains"."""
    wrong = []
    for name, child in module.named_modules():
        parameters = list(child.parameters())
        if parameters and child.training != any(p.requires_grad for p in parameters):
            wrong.append(name)
    return wrong


def dropout_modes(module: nn.Module) -> list[bool]:
    """The `training` flag of every active dropout (p > 0) inside a part that trains."""
    flags = []
    for child in module.modules():
        if any(p.requires_grad for p in child.parameters()):
            flags += [d.training for d in child.children() if isinstance(d, nn.Dropout) and d.p > 0]
            flags += [
                d.training
                for holder in child.children()
                if isinstance(holder, nn.ModuleDict)  # peft keeps its LoRA dropout in one
                for d in holder.values()
                if isinstance(d, nn.Dropout) and d.p > 0
            ]
    return flags


class ModeProbe(L.Callback):
    """Records the modes inside every training and validation step of the fit it is given to."""

    records: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        ModeProbe.records = []
        training_step, validation_step = pl_module.training_step, pl_module.validation_step

        def probed_training_step(*args, **kwargs):
            ModeProbe.records.append(
                {
                    "stage": "train",
                    "wrong": wrong_modes(pl_module),
                    "dropout": dropout_modes(pl_module),
                    "eval_modules": sum(not m.training for m in pl_module.modules()),
                }
            )
            return training_step(*args, **kwargs)

        def probed_validation_step(*args, **kwargs):
            training = [name for name, m in pl_module.named_modules() if m.training]
            ModeProbe.records.append({"stage": "val", "training": training})
            return validation_step(*args, **kwargs)

        pl_module.training_step = probed_training_step
        pl_module.validation_step = probed_validation_step


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """The tiny SDXL, FLUX and Kandinsky models saved as diffusers folders in the hubs' layout."""
    root = tmp_path_factory.mktemp("saved")
    base_pipeline(TINY_SDXL).save_pretrained(root / "sdxl")
    base_pipeline(TINY_FLUX).save_pretrained(root / "flux")
    save_tiny_kandinsky(root)
    return {name: root / name for name in ("sdxl", "flux", "prior", "decoder")}


def backbone(path) -> list[str]:
    return ["--model.init_args.backbone.name_or_path", str(path)]


# config -> the overrides that read its backbone from a saved folder (and switch dropout on).
FAMILIES = {
    "unet": lambda s: backbone(DEMO_BASE),
    "text_encoder": lambda s: backbone(DEMO_BASE),
    "lora": lambda s: [*backbone(DEMO_BASE), "--model.init_args.dropout", "0.1"],
    "textual_inversion": lambda s: backbone(DEMO_BASE),
    "domain_text_encoder": lambda s: backbone(DEMO_BASE),
    "compact": lambda s: ["--model.init_args.vae", "lightning_modules/demo_base/vae"],  # dropout 0.1
    "compact_vae": lambda s: [],  # trains every part: all of it in train mode
    "sdxl_unet": lambda s: backbone(s["sdxl"]),
    "sdxl_lora": lambda s: [*backbone(s["sdxl"]), "--model.init_args.dropout", "0.1"],
    "flux_lora": lambda s: [*backbone(s["flux"]), "--model.init_args.dropout", "0.1"],
    "kandinsky_lora": lambda s: [
        *backbone(s["decoder"]),
        "--model.init_args.prior_model",
        str(s["prior"]),
        "--model.init_args.lora_dropout",
        "0.1",
    ],
}
WITH_DROPOUT = {"lora", "compact", "sdxl_lora", "flux_lora", "kandinsky_lora"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trained_parts_train_and_frozen_parts_are_in_eval_mode(family, saved, tmp_path):
    medsd(
        [
            "fit",
            "--config",
            f"{TINY}/{family}.yaml",
            *FAMILIES[family](saved),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "1",  # a validation between the two steps: the second must be back in train mode
            "--trainer.limit_val_batches",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.callbacks+=tests.test_modes.ModeProbe",
            "--cost.count_flops",
            "false",
        ]
    )
    records = ModeProbe.records
    assert [r["stage"] for r in records] == ["train", "val", "train", "val"]
    for record in records:
        if record["stage"] == "train":
            assert record["wrong"] == [], f"{family}: modules in the wrong mode during training"
        else:
            assert record["training"] == [], f"{family}: modules in train mode during validation"
    frozen = records[0]["eval_modules"]
    assert (frozen == 0) == (family == "compact_vae")  # a frozen part exists in every other family
    if family in WITH_DROPOUT:
        active = [r["dropout"] for r in records if r["stage"] == "train"]
        assert all(flags and all(flags) for flags in active), f"{family}: dropout off while training"
