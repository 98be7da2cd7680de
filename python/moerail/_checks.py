"""Argument checks shared by the public functions: clear exceptions that name the argument.

The native layer checks again (shapes, dtypes, values); these run first so that no output is
allocated, and nothing is computed, for a call that cannot succeed.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def tensor(
    x,
    name: str,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    shape_doc: str = "",
) -> torch.Tensor:
    """Checks that `x` is a tensor of `ndim` dimensions and one of `dtypes`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        doc = f" {shape_doc}" if shape_doc else ""
        raise ValueError(f"{name}: expected a {ndim}-D tensor{doc}, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}: expected dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if x.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported")
    return x


def same_rows(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{b_name}: expected {a.shape[0]} rows (the rows of {a_name}), got {b.shape[0]}"
        )


def integer(v, name: str, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An int (or a 0-d integer tensor, as Megatron passes counts) within bounds."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_floating_point() or v.dtype == torch.bool:
            raise TypeError(f"{name}: expected an int, got a tensor of shape {tuple(v.shape)}")
        v = int(v.item())
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            import numpy as np

            if isinstance(v, np.integer):
                v = int(v)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {v}")
    if not -(2**63) <= v < 2**63:  # every size and count is an int64 (Rust, torch)
        raise ValueError(f"{name}: must fit int64, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name}: must be <= {maximum}, got {v}")
    return v


def real(v, name: str, *, positive: bool = False) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise TypeError(f"{name}: expected a number, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name}: must be > 0, got {v}")
    return v


def routing_map(x, name: str = "routing_map") -> torch.Tensor:
    """Megatron's routing_map: a bool tensor [num_tokens, num_experts].

    Integer tensors are refused rather than read as ``x != 0``: an integer tensor of that rank is
    usually top-k expert ids ``[num_tokens, topk]`` (DeepEP / TransformerEngine style), which read
    as a map would give wrong rows and ``tokens_per_expert`` without any error."""
    x = tensor(x, name, ndim=2, shape_doc="[num_tokens, num_experts]")
    if x.dtype == torch.bool:
        return x
    got = str(x.dtype).replace("torch.", "")
    if x.dtype in INT_DTYPES:
        raise TypeError(
            f"{name}: expected a bool tensor [num_tokens, num_experts], got {got} of shape {tuple(x.shape)}. "
            f"Top-k expert ids [num_tokens, topk] go to moerail.permute_by_indices(tokens, indices, num_experts, probs); "
            f"a 0/1 integer map: pass {name}.bool()"
        )
    raise TypeError(f"{name}: expected a bool tensor [num_tokens, num_experts], got {got}")


def one_of(v, name: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if v not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {v!r}")
    return v
