"""Package attributes imported on first use (PEP 562).

A package's `__init__` that imported every submodule would make importing one light submodule
(`datamodules.atomic`, `datamodules.phantoms`) import Lightning and torch with the rest, and a
`medsd phantoms --help` wait seconds for them. With `__getattr__ = lazy_attributes(...)` the
package names the same classes, each imported when first asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(package: str, where: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package`: `where` maps each public name to its submodule."""

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name], package), name)

    return __getattr__
