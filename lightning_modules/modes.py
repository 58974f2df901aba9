"""Train and eval modes that follow what trains, whatever mode the parts were loaded in.

`from_pretrained` returns models in eval mode, and Lightning (2.2+) never calls `.train()` on the
module at the start of a fit: it keeps each submodule's mode. A strategy that only switched on
`requires_grad` would then train its U-Net or adapters with dropout off. So every strategy sets
the modes itself (`DiffusionModule.train`): a module holding a trainable parameter (itself or
below it) trains, a frozen one is in eval mode (no dropout, frozen norm statistics), and a module
with no parameters at all (dropout, activations) takes its parent's mode, so the dropout inside a
trained block or a LoRA adapter is active.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import contextmanager

from torch import nn

log = logging.getLogger(__name__)


def set_modes(module: nn.Module, training: bool) -> None:
    """`training=True`: the modes above (trained parts train, frozen parts eval); False: all eval."""
    trained: set[str] = set()
    holding: set[str] = set()  # modules with any parameter, themselves or below them
    for name, parameter in module.named_parameters():
        parts = name.split(".")[:-1]
        prefixes = [".".join(parts[:i]) for i in range(len(parts) + 1)]
        holding.update(prefixes)
        if parameter.requires_grad:
            trained.update(prefixes)
    modes: dict[str, bool] = {}
    # named_modules lists a parent before its children, so a parent's mode is known when needed.
    for name, child in module.named_modules(remove_duplicate=False):
        if name in holding:
            mode = name in trained
        else:
            mode = modes.get(name.rpartition(".")[0], False) if name else False
        modes[name] = training and mode
        child.training = modes[name]


@contextmanager
def restored_modes(module: nn.Module):
    """Every submodule gets its own mode back when the block ends."""
    saved = [(child, child.training) for child in module.modules()]
    try:
        yield
    finally:
        for child, mode in saved:
            child.training = mode


@contextmanager
def evaluation_modes(module: nn.Module):
    """Inside the block every submodule is in eval mode; afterwards each has its own mode back."""
    with restored_modes(module):
        set_modes(module, training=False)
        yield


def in_eval_mode(method: Callable) -> Callable:
    """Decorator: the method (a sampling call) runs with its module in eval mode, then back."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with evaluation_modes(self):
            return method(self, *args, **kwargs)

    return wrapper


def log_modes(module: nn.Module) -> None:
    """One INFO line in place of Lightning's "modules in eval mode" warning (filtered: frozen
    parts are in eval mode by design)."""
    modules = list(module.modules())
    log.info(
        "%d modules in train mode (the trained parts), %d frozen ones in eval mode",
        sum(m.training for m in modules),
        sum(not m.training for m in modules),
    )
