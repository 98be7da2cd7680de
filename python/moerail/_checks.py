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


_ADDRESSABLE = 1 << 47  # what one process can map on 64-bit Linux (4-level page tables)
_MEMORY: dict = {}


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The memory limit of this process's control group (a container's ``--memory``), the smallest
    on its path to the root (v2 ``memory.max``; v1 ``memory.limit_in_bytes``); ``None`` when there
    is none or it cannot be read. A process there is killed past it, whatever RAM the machine has."""
    import os

    try:
        with open(proc_cgroup) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return None
    found = []
    for _, controllers, path in entries:
        if controllers == "":  # v2: the unified hierarchy
            base, name = root if os.path.exists(os.path.join(root, "cgroup.controllers")) else os.path.join(
                root, "unified"), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            try:
                with open(os.path.join(base, *parts[:depth], name)) as f:
                    text = f.read().strip()
            except OSError:
                continue
            # v2 writes "max" and v1 a page-rounded 2**63 - 1 when there is no limit.
            if text.isdigit() and 0 < int(text) < 1 << 62:
                found.append(int(text))
    return min(found) if found else None


def device_memory(device: torch.device) -> int:
    """Bytes of memory ``device`` has (cached): for the CPU the machine's RAM, or its control
    group's limit where that is lower (a container); the card's for a CUDA or NPU device; the
    64-bit user address space when it cannot be read."""
    key = (device.type, device.index)
    mem = _MEMORY.get(key)
    if mem is None:
        mem = 0
        try:
            if device.type == "cpu":
                import os

                mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                limit = cgroup_memory_limit()
                if limit is not None and (mem <= 0 or limit < mem):
                    mem = limit
            elif device.type in ("cuda", "npu"):
                mod = getattr(torch, device.type)
                mem = int(mod.get_device_properties(device.index if device.index is not None
                                                    else mod.current_device()).total_memory)
        except (AttributeError, OSError, RuntimeError, ValueError):
            mem = 0
        mem = min(mem, _ADDRESSABLE) if mem > 0 else _ADDRESSABLE
        _MEMORY[key] = mem
    return mem


def padded_rows_fit(rows: int, row_bytes: int, align_size: int, device: torch.device) -> None:
    """Raises a ValueError naming ``align_size`` when ``rows`` rows of ``row_bytes`` (a permuted
    row, its index and its prob), padded to multiples of ``align_size``, need more bytes than
    ``device`` has: before anything that size is allocated (an allocation error at best, the
    kernel's OOM killer at worst)."""
    need = rows * row_bytes
    mem = device_memory(device)
    if need > mem:
        raise ValueError(
            f"align_size: padding each expert's rows to a multiple of {align_size} gives {rows} rows, "
            f"{need} bytes ({need / 2**30:.1f} GiB) for the permuted rows and their indices, more than the "
            f"{mem} bytes ({mem / 2**30:.1f} GiB) of memory of {device}"
        )


def permuted_row_bytes(tokens: torch.Tensor, probs: Optional[torch.Tensor]) -> int:
    """Bytes one row of a permute's outputs takes: the row, its int64 index, its prob."""
    return tokens.shape[1] * tokens.element_size() + 8 + (0 if probs is None else probs.element_size())
