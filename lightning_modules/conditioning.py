"""Text conditioning as the model families carry it, and as a prepared cache stores it.

Stable Diffusion's conditioning is one tensor, the text encoder's states [B, L, D]; SDXL's and
FLUX's are several (token states and a pooled vector), kept as a dict of tensors. A prepared
cache stores either as named arrays, a single tensor under `SINGLE`.
"""

from __future__ import annotations

import torch

Conditioning = torch.Tensor | dict[str, torch.Tensor]

SINGLE = "prompt_embeds"


def as_arrays(conditioning: Conditioning) -> dict[str, torch.Tensor]:
    """Conditioning -> named tensors, each with the batch first."""
    return dict(conditioning) if isinstance(conditioning, dict) else {SINGLE: conditioning}


def from_arrays(arrays: dict[str, torch.Tensor]) -> Conditioning:
    """The inverse of `as_arrays`."""
    return arrays[SINGLE] if list(arrays) == [SINGLE] else dict(arrays)


def concat_rows(rows: list[Conditioning]) -> Conditioning:
    """Conditionings of a few prompts each -> one conditioning of all of them, in order."""
    names = as_arrays(rows[0])
    return from_arrays({name: torch.cat([as_arrays(row)[name] for row in rows]) for name in names})


def repeat_rows(conditioning: Conditioning, n: int) -> Conditioning:
    """A one-prompt conditioning repeated for `n` prompts."""
    arrays = as_arrays(conditioning)
    return from_arrays({name: values.expand(n, *values.shape[1:]) for name, values in arrays.items()})
