"""The precision policy for a fit on the GPU, checked on CPU: under a mixed precision every frozen
part of every family is stored in the half type, what trains stays fp32, and the autoencoder is in
bf16 under bf16-mixed but fp32 under 16-mixed (an fp16 VAE overflows)."""

import pytest
import torch

from lightning_modules import (
    BackboneSpec,
    FluxLoRA,
    KandinskyDecoderTuning,
    LoRAFineTuning,
    SDXLLoRAFineTuning,
)
from lightning_modules.backbones import TINY_SDXL
from lightning_modules.precision import place_frozen_weights

pytestmark = pytest.mark.slow  # builds every family's tiny model twice

STRATEGIES = {
    "sd_lora": lambda: LoRAFineTuning(rank=2),
    "sdxl_lora": lambda: SDXLLoRAFineTuning(rank=2, backbone=BackboneSpec(TINY_SDXL)),
    "flux_lora": lambda: FluxLoRA(rank=2),
    "kandinsky_lora": lambda: KandinskyDecoderTuning(lora_rank=2),
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize(
    ("precision", "half", "autoencoder_dtype"),
    [("bf16-mixed", torch.bfloat16, torch.bfloat16), ("16-mixed", torch.float16, torch.float32)],
)
def test_on_the_gpu_frozen_parts_are_half_and_trained_ones_fp32(name, precision, half, autoencoder_dtype):
    module = STRATEGIES[name]()
    returned = place_frozen_weights(module, precision, sharded=False, device="cuda")
    assert returned == autoencoder_dtype
    autoencoder = {id(p) for p in module.autoencoder.parameters()}
    trained = [p for p in module.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    for part_name, part in module.named_children():
        for p in part.parameters():
            if p.requires_grad:
                continue
            expected = autoencoder_dtype if id(p) in autoencoder else half
            assert p.dtype == expected, (part_name, p.dtype)


def test_off_the_gpu_or_in_fp32_nothing_is_cast():
    module = LoRAFineTuning(rank=2)
    assert place_frozen_weights(module, "bf16-mixed", sharded=False, device="cpu") == torch.float32
    assert place_frozen_weights(module, "32-true", sharded=False, device="cuda") == torch.float32
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_under_fsdp_nothing_is_cast_and_the_autoencoder_takes_the_compute_precision():
    module = LoRAFineTuning(rank=2)
    assert place_frozen_weights(module, "bf16-mixed", sharded=True, device="cuda") == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.parameters())
