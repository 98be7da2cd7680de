"""Device paths of moerail's ops: the CUDA kernels of ``csrc/cuda`` (compiled by NVRTC at run
time, launched on torch's current stream into tensors torch allocated), and torch formulas on the
device for the small reductions that have no kernel (losses, expert-bias update, token
dropping).

Every function here has the signature of the op of the same name in ``ops.py``; ``ops`` calls
it for CUDA tensors (and, in the tests, for CPU tensors when the CPU emulator of the kernels is
switched on with :func:`use_emulator`). Host synchronisation happens only where the output size
depends on the data (a dropless permute without ``num_out_tokens``), as in Megatron-Core; under
CUDA-graph capture nothing synchronises.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import List, Optional

import torch
from torch import Tensor

from .. import _checks, _native

_emulator: Optional[str] = None
_configured = False
_lock = threading.Lock()

# Status bits of the kernels (csrc/cuda/common.cuh).
_ST_NONFINITE, _ST_BAD_INDEX, _ST_DUPLICATE = 1, 2, 4


def use_emulator(path: Optional[str]) -> None:
    """Run the CUDA kernels on CPU tensors through the CPU emulator library at ``path`` (built
    from the same sources by the tests; see ``tests/cuda_emu``). ``None`` switches it off."""
    global _emulator
    _native.cuda.device_set_emulator(None if path is None else str(path))
    _emulator = None if path is None else str(path)


def emulating() -> bool:
    return _emulator is not None


def wants(args) -> bool:
    """True when the op's tensors live on a device moerail has kernels for (CUDA), or on the
    CPU with the emulator on."""
    for a in args:
        if isinstance(a, Tensor):
            if a.device.type == "cuda":
                return True
            if a.device.type == "cpu":
                return _emulator is not None
    return False


def nvrtc_search_dirs() -> List[str]:
    """Directories that may hold pip's NVRTC: ``site-packages/nvidia/*/lib`` (the wheels torch
    depends on), ``cuda.pathfinder``'s answer where importable, torch's own lib directory."""
    dirs: List[str] = []
    try:  # pragma: no cover - depends on what is installed
        from cuda import pathfinder  # type: ignore[import-not-found]

        found = pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path
        if found:
            dirs.append(str(Path(found).parent))
    except Exception:
        pass
    for entry in sys.path:
        nvidia = Path(entry or ".") / "nvidia"
        if nvidia.is_dir():
            dirs.extend(str(p / "lib") for p in sorted(nvidia.iterdir()) if (p / "lib").is_dir())
    dirs.append(str(Path(torch.__file__).parent / "lib"))
    return dirs


def configure() -> None:
    """Tells the native loader where NVRTC may be and which CUDA major torch was built with
    (once, before the first kernel; ``MOERAIL_NVRTC_PATH`` overrides both)."""
    global _configured
    with _lock:
        if _configured:
            return
        major = None
        if torch.version.cuda:
            major = int(torch.version.cuda.split(".")[0])
        _native.cuda.device_configure(nvrtc_search_dirs(), major)
        _configured = True


def _stream(t: Tensor) -> int:
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def _launch_ready(t: Tensor) -> int:
    configure()
    return _stream(t)


def _ws(nbytes: int, like: Tensor) -> Tensor:
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=like.device)


def _syncs_allowed(t: Tensor) -> bool:
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _value_checks(t: Tensor) -> bool:
    """Whether to read the kernels' value checks (non-finite logits, bad expert ids) back: one
    small device-to-host read, i.e. a host synchronisation, per call. Off by default on devices
    (training hot paths must not sync); on in the debug mode (``MOERAIL_DEVICE_CHECKS=1`` or
    :func:`set_device_checks`), where the device path raises the ValueError the CPU path raises
    for the same input. Never under CUDA-graph capture nor inside :func:`trusted_indices`."""
    return _CHECKS and not getattr(_trusted, "on", False) and _syncs_allowed(t)


# The CPU path always checks (in Rust, at no cost); devices only in the debug mode.
_CHECKS = os.environ.get("MOERAIL_DEVICE_CHECKS", "0") == "1"


def device_checks_enabled() -> bool:
    """Whether the device value checks (the debug mode) are on."""
    return _CHECKS


def set_device_checks(enabled: bool) -> bool:
    """Turns the device value checks on or off for the process; returns the previous setting.

    On: each op on CUDA / NPU tensors reads a status word back (a host synchronisation) and raises
    ``ValueError`` for non-finite logits, out-of-range expert ids or row indices, as the CPU path
    does. Off (the default, unless ``MOERAIL_DEVICE_CHECKS=1``): no synchronisation, and bad values give
    unspecified results."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    global _CHECKS
    before, _CHECKS = _CHECKS, enabled
    return before


@contextlib.contextmanager
def device_checks(enabled: bool = True):
    """``with device_checks(): ...``: the debug mode inside, the previous setting after."""
    before = set_device_checks(enabled)
    try:
        yield
    finally:
        set_device_checks(before)


_trusted = threading.local()


@contextlib.contextmanager
def trusted_indices():
    """For moerail's own calls with indices it made itself (the dispatcher's sums): the value
    checks, which guard user input, would only add a host sync each. Per thread."""
    before = getattr(_trusted, "on", False)
    _trusted.on = True
    try:
        yield
    finally:
        _trusted.on = before


def _status(t: Tensor) -> Optional[Tensor]:
    return torch.zeros((1,), dtype=torch.int32, device=t.device) if _value_checks(t) else None


def _finite(t: Tensor, what: str) -> None:
    if _value_checks(t) and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what}: must be finite (found NaN or inf)")


def _raise_nonfinite(status: Optional[Tensor], what: str) -> None:
    if status is not None and int(status.item()) & _ST_NONFINITE:
        raise ValueError(f"{what}: must be finite (found NaN or inf)")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------


def _route(logits, topk, pre, groups, group_topk, scale, score_function, bias, dense: bool):
    t, e = logits.shape
    s = _launch_ready(logits)
    logits = logits.contiguous()
    probs_k = torch.empty((t, topk), dtype=logits.dtype, device=logits.device)
    indices = torch.empty((t, topk), dtype=torch.int64, device=logits.device)
    tpe = torch.zeros((e,), dtype=torch.int64, device=logits.device)
    probs = rmap = None
    if dense:
        probs = torch.empty((t, e), dtype=logits.dtype, device=logits.device)
        rmap = torch.empty((t, e), dtype=torch.bool, device=logits.device)
    if bias is not None:
        _finite(bias, "expert_bias")
    status = _status(logits)
    cfg = _native.ops.RouterConfig(topk, score_function, pre, groups, group_topk, scale)
    _native.cuda.device_router_forward(
        logits, cfg, None if bias is None else bias.contiguous(), probs_k, indices, tpe, probs, rmap, status, s,
    )
    _raise_nonfinite(status, "logits")
    return probs_k, indices, tpe, probs, rmap


def topk_route(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, expert_bias):
    _, indices, tpe, probs, rmap = _route(
        logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, expert_bias, True
    )
    return probs, rmap, indices, tpe


def topk_route_compact(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, expert_bias):
    probs_k, indices, tpe, _, _ = _route(
        logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, expert_bias, False
    )
    return probs_k, indices, tpe


def topk_route_backward(grad_probs, logits, indices, topk, use_pre_softmax, scaling_factor, score_function):
    s = _launch_ready(logits)
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    cfg = _native.ops.RouterConfig(topk, score_function, use_pre_softmax, None, None, scaling_factor)
    _native.cuda.device_router_backward(
        grad_probs.contiguous(), logits.contiguous(), indices.contiguous(), cfg, grad_logits, s,
    )
    return grad_logits


def aux_loss_scores(logits, topk, score_function):
    s = _launch_ready(logits)
    t, e = logits.shape
    scores = torch.empty((t, e), dtype=acc_dtype(logits.dtype), device=logits.device)
    rmap = torch.empty((t, e), dtype=torch.bool, device=logits.device)
    tpe = torch.zeros((e,), dtype=torch.int64, device=logits.device)
    status = _status(logits)
    _native.cuda.device_aux_scores_forward(logits.contiguous(), topk, score_function, scores, rmap, tpe, status, s)
    _raise_nonfinite(status, "logits")
    return scores, rmap, tpe


def aux_loss_scores_backward(grad_scores, logits, score_function):
    s = _launch_ready(logits)
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _native.cuda.device_aux_scores_backward(
        grad_scores.to(acc_dtype(logits.dtype)).contiguous(), logits.contiguous(), score_function, grad_logits, s
    )
    return grad_logits


# The reductions below have no kernel: they are a few torch ops on the device (as Megatron-Core
# computes them), in the accumulation dtype, so no token data leaves the device.


def load_balancing_loss(probs, tokens_per_expert, num_seqs, scale):
    t, e = probs.shape
    acc = acc_dtype(probs.dtype)
    seq = torch.arange(t, device=probs.device) % num_seqs
    sums = torch.zeros((num_seqs, e), dtype=acc, device=probs.device).index_add_(0, seq, probs.to(acc))
    value = (sums * tokens_per_expert.reshape(num_seqs, e).to(acc)).sum() * scale
    return value.to(probs.dtype)


def load_balancing_loss_backward(grad, probs, tokens_per_expert, num_seqs, scale):
    t, e = probs.shape
    acc = acc_dtype(probs.dtype)
    seq = torch.arange(t, device=probs.device) % num_seqs
    per_seq = tokens_per_expert.reshape(num_seqs, e).to(acc) * (grad.to(acc) * scale)
    return per_seq[seq].to(probs.dtype).contiguous()


def z_loss(logits, coeff):
    _finite(logits, "logits")
    acc = acc_dtype(logits.dtype)
    lse = torch.logsumexp(logits.to(acc), dim=-1)
    value = (lse.square().mean() if lse.numel() else lse.sum()) * coeff
    return value.to(logits.dtype), lse


def z_loss_backward(grad, logits, lse, coeff):
    acc = acc_dtype(logits.dtype)
    t = max(logits.shape[0], 1)
    soft = torch.softmax(logits.to(acc), dim=-1)
    g = soft * (lse.unsqueeze(-1) * (2.0 * coeff / t)) * grad.to(acc)
    return g.to(logits.dtype).contiguous()


def expert_bias_update(tokens_per_expert, expert_bias, rate):
    tpe = tokens_per_expert.to(torch.float64)
    if _value_checks(tpe) and bool((tpe < 0).any()):
        raise ValueError("tokens_per_expert: counts must be non-negative")
    mean = tpe.mean(dim=-1, keepdim=True)
    return (expert_bias.to(torch.float32) + rate * torch.sign(mean - tpe).to(torch.float32)).contiguous()


def apply_token_dropping(probs, routing_map, topk, capacity_factor, drop_policy, pad_to_capacity):
    """Megatron's capacity rule; ties go to the lower token (a stable sort), as on the CPU."""
    t, e = probs.shape
    if drop_policy not in ("probs", "position"):
        raise ValueError(f"drop_policy: expected 'probs' or 'position', got '{drop_policy}'")
    if not 1 <= topk <= e:
        raise ValueError(f"topk: must be in [1, num_experts={e}], got {topk}")
    if _value_checks(probs) and bool(torch.isnan(probs).any()):
        raise ValueError("probs: must not contain NaN")
    capacity = _native.ops.get_capacity(t * topk, e, capacity_factor, None)
    if capacity > t:
        return probs.clone(memory_format=torch.contiguous_format), (routing_map | pad_to_capacity).contiguous()
    routed = routing_map.to(probs.dtype)
    key = probs * routed if drop_policy == "probs" else routed
    order = torch.sort(key, dim=0, descending=True, stable=True).indices[:capacity]
    keep = torch.zeros((t, e), dtype=torch.bool, device=probs.device).scatter_(0, order, True)
    out_map = keep if pad_to_capacity else keep & routing_map
    out_probs = torch.where(keep & routing_map, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
    return out_probs.contiguous(), out_map.contiguous()


# ----------------------------------------------------------------------------------------------
# Permutation
# ----------------------------------------------------------------------------------------------


def check_token_rows(tokens: Tensor, t: int) -> None:
    if tokens.dim() != 2 or tokens.shape[0] != t:
        raise ValueError(f"tokens: expected shape [{t}, hidden] (the rows of routing_map), got {list(tokens.shape)}")


def check_index_shape(tokens: Tensor, indices: Tensor) -> None:
    if tokens.dim() != 2 or indices.dim() != 2 or tokens.shape[0] != indices.shape[0]:
        raise ValueError(
            f"indices: expected shape [{tokens.shape[0]}, topk] (one row per token), got {list(indices.shape)}"
        )


def _bad_status(status: Tensor, what: str) -> None:
    bits = int(status.item())
    if bits & _ST_BAD_INDEX:
        raise ValueError(f"{what}: expert ids must be in [0, num_experts)")
    if bits & _ST_DUPLICATE:
        raise ValueError(f"{what}: a token lists the same expert twice")


def _layout(tokens, routing, num_experts, probs, num_out_tokens, align_size, what):
    """Dropless layout on the device: (sorted_indices, permuted_probs or None, row counts)."""
    s = _launch_ready(tokens)
    t = routing.shape[0]
    routing = routing.contiguous()
    ws = _ws(_native.cuda.device_workspace_bytes("layout", t, num_experts), tokens)
    row_counts = torch.empty((num_experts,), dtype=torch.int64, device=tokens.device)
    meta = torch.empty((1,), dtype=torch.int64, device=tokens.device)
    status = torch.zeros((1,), dtype=torch.int32, device=tokens.device)
    align = max(align_size, 1)
    _native.cuda.device_layout_count(routing, num_experts, align, ws, row_counts, meta, status, s)
    trusted = num_out_tokens >= 0 and align <= 1 and not _value_checks(tokens)
    if trusted:
        # The caller's count is trusted (as TE's fused permute does): no host sync. Rows past the
        # routed copies, if the count was too large, stay -1 (zero rows), never unwritten memory.
        rows = num_out_tokens
    else:
        # The output size depends on the routing: one read of the row count (and the status).
        rows = int(meta.item())
        _bad_status(status, what)
        if align > 1:
            _checks.padded_rows_fit(rows, _checks.permuted_row_bytes(tokens, probs), align, tokens.device)
        if num_out_tokens >= 0 and align <= 1 and num_out_tokens != rows:
            raise ValueError(
                f"num_out_tokens: routing_map routes {rows} token copies, but num_out_tokens={num_out_tokens}"
            )
    if trusted:
        sorted_indices = torch.full((rows,), -1, dtype=torch.int64, device=tokens.device)
        pp = None if probs is None else torch.zeros((rows,), dtype=probs.dtype, device=tokens.device)
    else:
        sorted_indices = torch.empty((rows,), dtype=torch.int64, device=tokens.device)
        pp = None if probs is None else torch.empty((rows,), dtype=probs.dtype, device=tokens.device)
    _native.cuda.device_layout_fill(
        routing, num_experts, ws, None if probs is None else probs.contiguous(), sorted_indices, pp, s
    )
    return sorted_indices, pp, row_counts


def _gather(tokens, sorted_indices):
    out = torch.empty((sorted_indices.shape[0], tokens.shape[1]), dtype=tokens.dtype, device=tokens.device)
    _native.cuda.device_gather_rows(tokens.contiguous(), sorted_indices, out, _launch_ready(tokens))
    return out


def permute(tokens, routing_map, probs, num_out_tokens, drop_and_pad, align_size):
    t, e = routing_map.shape
    check_token_rows(tokens, t)
    if drop_and_pad:
        s = _launch_ready(tokens)
        capacity = num_out_tokens // e
        sorted_indices = torch.empty((capacity * e,), dtype=torch.int64, device=tokens.device)
        pp = None if probs is None else torch.empty((capacity * e,), dtype=probs.dtype, device=tokens.device)
        _native.cuda.device_layout_drop_and_pad(
            routing_map.contiguous(), capacity, None if probs is None else probs.contiguous(), sorted_indices, pp, s
        )
        row_counts = torch.full((e,), capacity, dtype=torch.int64, device=tokens.device)
    else:
        sorted_indices, pp, row_counts = _layout(
            tokens, routing_map, e, probs, num_out_tokens, align_size, "routing_map"
        )
    out = _gather(tokens, sorted_indices)
    if pp is None:
        pp = torch.empty((0,), dtype=tokens.dtype if probs is None else probs.dtype, device=tokens.device)
    return out, pp, sorted_indices, row_counts


def permute_by_indices(tokens, indices, num_experts, probs, align_size):
    check_index_shape(tokens, indices)
    sorted_indices, pp, row_counts = _layout(tokens, indices, num_experts, probs, -1, align_size, "indices")
    out = _gather(tokens, sorted_indices)
    if pp is None:
        pp = torch.empty((0,), dtype=tokens.dtype, device=tokens.device)
    return out, pp, sorted_indices, row_counts


def _check_rows(sorted_indices: Tensor, num_tokens: int) -> None:
    """Row targets in [-1, num_tokens) (-1: padding), as the CPU path checks."""
    if _value_checks(sorted_indices) and sorted_indices.numel():
        lo, hi = torch.aminmax(sorted_indices)
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= num_tokens:
            raise ValueError(
                f"sorted_indices: entries must be token indices in [0, {num_tokens}) or -1 (padding), "
                f"found {lo if lo < -1 else hi}"
            )


def unpermute(permuted_tokens, sorted_indices, num_tokens, row_weights):
    _check_rows(sorted_indices, num_tokens)
    s = _launch_ready(permuted_tokens)
    x = permuted_tokens.contiguous()
    out = torch.empty((num_tokens, x.shape[1]), dtype=x.dtype, device=x.device)
    w = None if row_weights is None else row_weights.to(acc_dtype(x.dtype)).contiguous()
    ws = _ws(_native.cuda.device_workspace_bytes("unpermute", num_tokens, sorted_indices.shape[0]), x)
    _native.cuda.device_unpermute(x, sorted_indices.contiguous(), w, out, ws, s)
    return out


def unpermute_backward(grad_out, permuted_tokens, sorted_indices, row_weights):
    s = _launch_ready(grad_out)
    n = sorted_indices.shape[0]
    acc = acc_dtype(grad_out.dtype)
    grad_x = torch.empty((n, grad_out.shape[1]), dtype=grad_out.dtype, device=grad_out.device)
    grad_w = None if permuted_tokens is None else torch.empty((n,), dtype=acc, device=grad_out.device)
    w = None if row_weights is None else row_weights.to(acc).contiguous()
    _native.cuda.device_unpermute_backward(
        grad_out.contiguous(), None if permuted_tokens is None else permuted_tokens.contiguous(),
        sorted_indices.contiguous(), w, grad_x, grad_w, s,
    )
    if grad_w is None:
        grad_w = torch.empty((0,), dtype=acc, device=grad_out.device)
    return grad_x, grad_w


def row_weights(probs, sorted_indices, row_counts, acc):
    n = sorted_indices.shape[0]
    if _value_checks(row_counts) and int(row_counts.sum()) != n:
        raise ValueError(f"routing_map: routes {int(row_counts.sum())} token copies, but there are {n} rows")
    # Row indices are checked by the unpermute these weights feed (the kernel skips bad ones).
    s = _launch_ready(probs)
    w = torch.empty((sorted_indices.shape[0],), dtype=acc, device=probs.device)
    ws = _ws(_native.cuda.device_workspace_bytes("offsets", probs.shape[1]), probs)
    _native.cuda.device_row_weights(probs.contiguous(), sorted_indices.contiguous(), row_counts.contiguous(), w, ws, s)
    return w


def scatter_rows(values, sorted_indices, row_counts, num_tokens, num_experts):
    s = _launch_ready(values)
    out = torch.zeros((num_tokens, num_experts), dtype=values.dtype, device=values.device)
    ws = _ws(_native.cuda.device_workspace_bytes("offsets", num_experts), values)
    _native.cuda.device_scatter_rows(values.contiguous(), sorted_indices.contiguous(), row_counts.contiguous(), out, ws, s)
    return out


def sort_chunks(input, split_sizes, sorted_idxs):
    s = _launch_ready(input)
    split_sizes = split_sizes.to(device=input.device, dtype=torch.int64).contiguous()
    sorted_idxs = sorted_idxs.to(device=input.device, dtype=torch.int64).contiguous()
    if split_sizes.shape != sorted_idxs.shape or split_sizes.dim() != 1:
        raise ValueError(
            f"sorted_idxs: expected the shape of split_sizes {list(split_sizes.shape)}, got {list(sorted_idxs.shape)}"
        )
    if _syncs_allowed(input):
        n = split_sizes.numel()
        if int(split_sizes.sum()) != input.shape[0] or bool((split_sizes < 0).any()):
            raise ValueError(f"split_sizes: expected non-negative sizes summing to {input.shape[0]} rows")
        if n and not torch.equal(torch.sort(sorted_idxs).values, torch.arange(n, device=input.device)):
            raise ValueError(f"sorted_idxs: expected a permutation of 0..{n - 1}")
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    ws = _ws(_native.cuda.device_workspace_bytes("sort_chunks", split_sizes.numel()), input)
    _native.cuda.device_sort_chunks(input.contiguous(), split_sizes, sorted_idxs, out, ws, s)
    return out


def status(probe_driver: bool = True, probe_nvrtc: bool = True) -> dict:
    """The CUDA side as ``moerail doctor`` reports it (see ``moerail.backends``). Without
    ``probe_nvrtc`` nothing is searched or loaded for NVRTC."""
    if probe_nvrtc:
        configure()
    return dict(_native.cuda.device_status(probe_driver, probe_nvrtc))


if os.environ.get("MOERAIL_CUDA_EMULATOR"):  # pragma: no cover - a debugging switch
    use_emulator(os.environ["MOERAIL_CUDA_EMULATOR"])
