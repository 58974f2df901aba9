"""Reading torch files without running their code.

`torch.load` without `weights_only` unpickles anything, and a pickle can call any function: a
crafted checkpoint or weights file runs code on load. medsd reads every torch file with
`weights_only=True`, which rebuilds only tensors and plain containers. Files that hold whole
pickled models (torchxrayvision's releases) are read the same way with the model's module
classes allowed and nothing else, so a file that needs any other object is refused.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
from pathlib import Path

import torch
from torch import nn


class UnsafeFileError(ValueError):
    """A torch file needs objects beyond tensors (and the allowed classes) to be read."""


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint or state-dict file (tensors, numbers, strings, containers), on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeFileError(
            f"{path} holds objects other than tensors and plain containers, and reading it could run "
            f"code, so it is refused ({str(error).splitlines()[0]})"
        ) from None


def module_classes(*modules: str) -> list[type]:
    """Every nn.Module class defined in the named Python modules (their members and submodules'
    as imported there)."""
    classes = []
    for name in modules:
        module = importlib.import_module(name)
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, nn.Module)]
    return classes


def load_pickled_module(path: str | Path, allowed: list[type]) -> nn.Module:
    """A whole pickled nn.Module whose classes are all in `allowed` (else UnsafeFileError)."""
    try:
        with torch.serialization.safe_globals(allowed):
            module = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeFileError(
            f"{path} needs objects other than tensors and the model's own layer classes, and reading "
            f"it could run code, so it is refused ({str(error).splitlines()[0]})"
        ) from None
    if not isinstance(module, nn.Module):
        raise UnsafeFileError(f"{path} holds a {type(module).__name__}, not a pickled model")
    for child in module.modules():
        # Models pickled by torch < 1.6 lack this attribute, which state_dict() reads.
        if not hasattr(child, "_non_persistent_buffers_set"):
            child._non_persistent_buffers_set = set()
    return module


def check_state_dict(path: str | Path) -> Path:
    """`path`, once read without running code and found to be a state dict (names -> tensors):
    for libraries that then load the same file themselves with a full unpickler (torch-fidelity's
    Inception, which torchmetrics uses too)."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeFileError(f"{path} is not a state dict (a mapping of names to tensors)")
    return Path(path)
