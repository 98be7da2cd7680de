"""moerail's ops on MindSpore tensors.

Two ways in:

* **Host tensors** (MindSpore on CPU): :func:`topk_route`, :func:`permute`, :func:`unpermute` and
  :func:`sort_chunks_by_idxs` take ``mindspore.Tensor`` arguments, view them as torch tensors
  through numpy without copying (``Tensor.asnumpy()`` shares a CPU tensor's memory,
  ``torch.from_numpy`` shares the array's), run moerail's op and hand the results back with
  ``mindspore.Tensor.from_numpy`` (no copy either). Same results as the torch ops, bit for bit.
  These are forward calls (no MindSpore autograd); bfloat16 has no numpy type and is refused.
* **Graph / device code**: the extension library exports C entry points in MindSpore's AOT
  custom-operator convention (``int f(int nparam, void **params, int *ndims, int64_t **shapes,
  const char **dtypes, void *stream, void *extra)``). :func:`aot_op` builds the
  ``mindspore.ops.Custom(func_type="aot")`` for one of them:

  ========================================  =============================================  =========================
  name                                      inputs                                         outputs
  ========================================  =============================================  =========================
  ``permute``                               tokens [T, H], routing_map [T, E] (bool/uint8)  permuted [N, H], sorted_indices [N] int64
  ``permute_with_probs``                    tokens, routing_map, probs [T, E]              permuted, permuted_probs [N], sorted_indices
  ``gather_rows``                           x [T, H], sorted_indices [N]                   out [N, H]
  ``unpermute``                             permuted [N, H], sorted_indices [N]            out [T, H]
  ``unpermute_weighted``                    permuted, sorted_indices, weights [N]          out [T, H]
  ========================================  =============================================  =========================

  ``N`` is the number of routed (token, expert) pairs (``routing_map.sum()``); rows are grouped by
  expert, ascending by token, as everywhere in moerail. A failing call returns non-zero and
  leaves its message for :func:`aot_last_error`; it never writes an output.

MindSpore is imported lazily: importing this module does not need it.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .. import _native
from ..ops import permutation as _dispatch
from ..ops import router as _router

__all__ = [
    "AOT_OPS",
    "aot_library_path",
    "aot_op",
    "aot_last_error",
    "topk_route",
    "permute",
    "unpermute",
    "sort_chunks_by_idxs",
]

AOT_OPS = ("permute", "permute_with_probs", "gather_rows", "unpermute", "unpermute_weighted")


def _ms():
    try:
        import mindspore
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("moerail.integrations.mindspore needs mindspore (pip install mindspore)") from e
    return mindspore


def aot_library_path() -> str:
    """Path of the shared library that exports the ``moerail_aot_*`` entry points."""
    return os.path.abspath(_native.__file__)


def aot_op(name: str, out_shape, out_dtype):
    """``mindspore.ops.Custom`` running moerail's AOT entry point ``name`` (see the module's
    table); ``out_shape`` / ``out_dtype`` as ``ops.Custom`` takes them (a function or a value; a
    tuple of them for several outputs)."""
    if name not in AOT_OPS:
        raise ValueError(f"name: expected one of {', '.join(AOT_OPS)}, got {name!r}")
    ms = _ms()
    return ms.ops.Custom(f"{aot_library_path()}:moerail_aot_{name}", out_shape=out_shape, out_dtype=out_dtype,
                         func_type="aot")


def aot_last_error() -> str:
    """The message of this thread's last failed ``moerail_aot_*`` call ("" if none)."""
    lib = ctypes.CDLL(aot_library_path())
    lib.moerail_aot_last_error.restype = ctypes.c_char_p
    return lib.moerail_aot_last_error().decode()


def _to_torch(x, name: str) -> torch.Tensor:
    ms = _ms()
    if not isinstance(x, ms.Tensor):
        raise TypeError(f"{name}: expected a mindspore.Tensor, got {type(x).__name__}")
    if x.dtype == ms.bfloat16:
        raise TypeError(f"{name}: bfloat16 has no numpy type; use the AOT entry points (aot_op) or float32")
    return torch.from_numpy(np.ascontiguousarray(x.asnumpy()))


def _from_torch(t: Optional[torch.Tensor]):
    if t is None:
        return None
    ms = _ms()
    return ms.Tensor.from_numpy(t.detach().contiguous().numpy())


def topk_route(logits, topk: int, **kwargs):
    """:func:`moerail.topk_route` on a MindSpore tensor (``expert_bias`` may be one too)."""
    if kwargs.get("expert_bias") is not None:
        kwargs["expert_bias"] = _to_torch(kwargs["expert_bias"], "expert_bias")
    out = _router.topk_route(_to_torch(logits, "logits"), topk, **kwargs)
    return tuple(_from_torch(t) for t in out)


def permute(tokens, routing_map, probs=None, num_out_tokens: Optional[int] = None, drop_and_pad: bool = False,
            align_size: int = 0) -> Tuple:
    """:func:`moerail.permute` on MindSpore tensors: ``(permuted, permuted_probs or None,
    sorted_indices, pad_offsets or None, tokens_per_expert)``."""
    out = _dispatch.permute(_to_torch(tokens, "tokens"), _to_torch(routing_map, "routing_map"),
                            None if probs is None else _to_torch(probs, "probs"), num_out_tokens=num_out_tokens,
                            drop_and_pad=drop_and_pad, align_size=align_size)
    return tuple(_from_torch(t) for t in out)


def unpermute(permuted_tokens, sorted_indices, restore_shape: Sequence[int], probs=None, routing_map=None,
              drop_and_pad: bool = False, permuted_probs=None):
    """:func:`moerail.unpermute` on MindSpore tensors."""
    def opt(x, name):
        return None if x is None else _to_torch(x, name)

    out = _dispatch.unpermute(_to_torch(permuted_tokens, "permuted_tokens"), _to_torch(sorted_indices, "sorted_indices"),
                              torch.Size(restore_shape), probs=opt(probs, "probs"),
                              routing_map=opt(routing_map, "routing_map"), drop_and_pad=drop_and_pad,
                              permuted_probs=opt(permuted_probs, "permuted_probs"))
    return _from_torch(out)


def sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=None):  # noqa: A002 - Megatron's name
    """:func:`moerail.sort_chunks_by_idxs` on MindSpore tensors."""
    out = _dispatch.sort_chunks_by_idxs(_to_torch(input, "input"), _to_torch(split_sizes, "split_sizes"),
                                        _to_torch(sorted_idxs, "sorted_idxs"),
                                        None if probs is None else _to_torch(probs, "probs"))
    if isinstance(out, tuple):
        return tuple(_from_torch(t) for t in out)
    return _from_torch(out)
