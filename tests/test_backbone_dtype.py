"""`backbone.dtype`: weights read in half precision (less host memory for large models), trained
weights back in fp32, and the precision that such a run needs."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from datamodules import SyntheticShapesDataModule
from lightning_modules import FluxLoRA, LoRAFineTuning
from lightning_modules.backbones import TINY_FLUX, TINY_SD, BackboneSpec
from lightning_modules.families.stable_diffusion import load_backbone
from lightning_modules.pipelines import base_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = SimpleNamespace(root_device=torch.device("cpu"))


def dtypes(module, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters() if p.requires_grad == trainable and p.is_floating_point()}


def test_a_local_model_is_read_in_the_dtype(tmp_path):
    base_pipeline(TINY_SD).save_pretrained(tmp_path)
    full = load_backbone(BackboneSpec(str(tmp_path)))
    half = load_backbone(BackboneSpec(str(tmp_path), dtype="bfloat16"))
    for part in ("unet", "vae", "text_encoder"):
        ours, reference = getattr(half, part).state_dict(), getattr(full, part).state_dict()
        assert {v.dtype for v in ours.values() if v.is_floating_point()} == {torch.bfloat16}
        assert all(torch.equal(ours[k], reference[k].to(ours[k].dtype)) for k in reference)


def test_flux_frozen_in_bf16_trains_fp32_adapters_under_bf16_mixed():
    module = FluxLoRA(backbone=BackboneSpec(TINY_FLUX, dtype="bfloat16"), max_sequence_length=32)
    assert dtypes(module, trainable=False) == {torch.bfloat16}
    module.trainer = SimpleNamespace(precision="bf16-mixed", strategy=CPU, datamodule=None)
    module.setup("fit")
    assert dtypes(module, trainable=True) == {torch.float32}
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "prompts": ["a circle", "a square"]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.diffusion_step(batch, torch.Generator().manual_seed(0), caption_dropout=0.0)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_half_frozen_weights_need_a_mixed_precision():
    module = LoRAFineTuning(backbone=BackboneSpec("medsd/tiny-sd", dtype="bfloat16"))
    module.trainer = SimpleNamespace(precision="32-true", strategy=CPU, datamodule=None)
    with pytest.raises(ValueError, match="bf16-mixed or 16-mixed"):
        module.setup("fit")


def test_fit_under_bf16_mixed_on_cpu_exports_fp32_adapters(tmp_path):
    module = LoRAFineTuning(backbone=BackboneSpec("medsd/tiny-sd", dtype="bfloat16"), rank=2)
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, SyntheticShapesDataModule(n_train=8, n_val=2, image_size=32, batch_size=4))
    adapters = load_file(tmp_path / "export" / "pytorch_lora_weights.safetensors")
    assert adapters and {v.dtype for v in adapters.values()} == {torch.float32}
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k or "lora.up" in k)
