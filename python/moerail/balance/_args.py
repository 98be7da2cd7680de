"""Argument checks shared by the balance modules (loads, placements, sizes)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import _checks

# ------------------------------------------------------------------------------------------------
# argument helpers
# ------------------------------------------------------------------------------------------------


def _loads(x, name: str, *, ndim: int = 2, doc: str = "[num_layers, num_experts]") -> torch.Tensor:
    """A float64 CPU contiguous copy of a load matrix (tensor, numpy array or nested list)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}: expected a tensor or an array of numbers ({e})") from None
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name}: expected real numbers, got {str(x.dtype).replace('torch.', '')}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {doc}, got shape {tuple(x.shape)}")
    return x.detach().to(device="cpu", dtype=torch.float64).contiguous()


def _placement(x, name: str, num_layers: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {str(x.dtype).replace('torch.', '')}")
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [num_layers, num_replicas], got shape {tuple(x.shape)}")
    if num_layers is not None and x.shape[0] != num_layers:
        raise ValueError(f"{name}: expected {num_layers} layers, got {x.shape[0]}")
    return x.detach().to(device="cpu", dtype=torch.int64).contiguous()


# The most layers / experts / slots / devices a placement table has (the core's MAX_REPLICAS):
# outputs are allocated from these sizes, so a larger one is a ValueError, not an overflow.
MAX_SIZE = 1 << 24


def _int(v, name: str, minimum: int = 1) -> int:
    if name.startswith("num_"):
        return _checks.integer(v, name, minimum=minimum, maximum=MAX_SIZE)
    return _checks.integer(v, name, minimum=minimum)
