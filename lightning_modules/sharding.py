"""FSDP for the diffusion strategies, for models whose weights do not fit on one GPU.

    medsd fit --config run.yaml --trainer.strategy lightning_modules.sharding.ShardedDiffusion \
              --trainer.devices 4 --trainer.precision bf16-mixed

`ShardedDiffusion` is Lightning's FSDPStrategy with the choices a diffusion model needs:
- Shard units are the model family's repeated blocks (U-Net attention and ResNet blocks, FLUX's
  double and single blocks, the text encoders' layers), found in the model, so each GPU holds
  1/N of every block and gathers one block at a time; the remaining small layers form the root.
- `use_orig_params`: frozen and trained weights (LoRA inside frozen attention) share units.
- Full-state checkpoints: one file, as without FSDP, that `medsd fit --ckpt_path` resumes from.
The modules then keep every weight in fp32 shards (FSDP gathers them in bf16 for compute), render
validation images inside `validation_step` (where FSDP has gathered the root's weights), and
export from a full state dict gathered onto rank 0. EMA is not supported under FSDP.
"""

from __future__ import annotations

import logging

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from .families import all_families

log = logging.getLogger(__name__)

# Where `nn.Module.named_parameters` of a wrapped model differs from its state dict's keys.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def shard_units(model: nn.Module) -> set[type[nn.Module]]:
    """The block classes of `model` that FSDP wraps as units: those its family names (or, for a
    model of no family, any registered family's)."""
    family = getattr(model, "family", None)
    names = (
        family.block_classes
        if family is not None
        else set().union(*(f.block_classes for f in all_families()))
    )
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def unwrapped_name(name: str) -> str:
    """A parameter's name without FSDP's wrapper segments: its key in a full state dict."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def check_sharding_settings(module: nn.Module, precision: str) -> None:
    """Refuse what FSDP cannot do with a diffusion strategy, before any weight is wrapped."""
    if getattr(module, "ema_decay", None) is not None:
        raise ValueError(
            "ema_decay is not supported with FSDP (the EMA would need the full weights on every "
            "rank): unset it, or train on one GPU / with DDP"
        )
    spec = getattr(module, "backbone_spec", None)
    if getattr(spec, "dtype", None) is not None:
        raise ValueError(
            f"backbone.dtype '{spec.dtype}' with FSDP: a shard unit must hold one dtype, and trained "
            "weights stay fp32; unset it (FSDP keeps fp32 shards and gathers them in bf16)"
        )
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(
            f"with FSDP use precision '32-true' or 'bf16-mixed', not '{precision}': FSDP gathers every "
            "weight in the compute precision, and the VAE overflows in fp16"
        )


def is_sharded(trainer) -> bool:
    return trainer is not None and isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


class ShardedDiffusion(FSDPStrategy):
    """FSDPStrategy with medsd's defaults (see the module docstring); every FSDPStrategy argument
    can still be given, an explicit `auto_wrap_policy` replacing the discovered units."""

    def __init__(self, **kwargs):
        # The modules rely on both (Lightning's defaults today): mixed frozen / trained units, and
        # checkpoints that hold plain, full tensors of the trained weights only.
        kwargs.setdefault("use_orig_params", True)
        if kwargs.setdefault("state_dict_type", "full") != "full":
            raise ValueError("ShardedDiffusion saves full-state checkpoints: leave state_dict_type 'full'")
        super().__init__(**kwargs)

    def setup(self, trainer) -> None:
        if "auto_wrap_policy" not in self.kwargs:
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            units = shard_units(trainer.lightning_module)
            log.info("FSDP units: %s", ", ".join(sorted(u.__name__ for u in units)))
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(units)
        super().setup(trainer)
