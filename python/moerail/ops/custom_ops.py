"""moerail's torch custom ops (``*``): real kernels in Rust, fake kernels for
tracing (``torch.compile``, meta tensors), and autograd formulas.

Every op allocates its outputs with torch and lets ``moerail._native`` write into them.
Backward passes save index maps (selected experts, sorted_indices, row counts), never copies of
activations; the only activation saved is the expert output of an unpermute whose probs need a
gradient (the gradient of a weight is a dot product with that output).

The public functions with Megatron-Core's argument names live in ``router.py`` and
``permutation.py`` (``moerail.ops``); use those.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _native, backends
from ..backends import cuda as _device
from ..backends import npu as _npu

__all__: List[str] = []


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision moerail computes in: float64 for float64 data, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(shape, dtype, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device)


def _dispatch_mode_active() -> bool:
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # pragma: no cover - older or newer torch without the helper
        return True
    return _get_current_dispatch_mode() is not None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(args) -> bool:
    """True when the arguments are ordinary tensors outside any tracing: the kernel can run
    directly. Anything else (torch.compile, fake or functional tensors, vmap, dispatch modes,
    tensor subclasses) goes through the registered custom op."""
    if torch.compiler.is_compiling() or _dispatch_mode_active():
        return False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN:
                return False
            if torch._C._functorch.is_functorch_wrapped_tensor(a):
                return False
    return True


class _Op:
    """One moerail op: a torch custom op ``<name>`` (schema, fake kernel,
    autograd — what torch.compile, tracing and opcheck see) and, for eager calls on ordinary
    tensors, the same kernel, setup and backward behind a plain ``torch.autograd.Function``.

    Why both: an eager call through ``torch.library.custom_op`` takes several Python/C++ hops
    (about 50 us a call, 200 us a forward + backward), more than the whole computation of the
    small ops (router, losses); ``autograd.Function`` costs a fraction of that. The results
    are the same: both paths run the same functions.
    """

    def __init__(self, name: str, fn):
        self.name = name
        self.cpu_kernel = fn
        # The CUDA path: the function of the same name in backends.cuda (every op has one); the NPU
        # path: the one in backends.npu.
        self.device_kernel = getattr(_device, name)
        self.npu_kernel = getattr(_npu, name)
        self.custom_op = torch.library.custom_op(f"moerail::{name}", fn, mutates_args=())
        self.custom_op.register_kernel("cuda", self.device_kernel)
        if torch._C._get_privateuse1_backend_name() == "npu":  # torch_npu was imported first
            self.custom_op.register_kernel("npu", self.npu_kernel)
        self._function = None
        self.__doc__ = fn.__doc__

    def kernel(self, *args):
        if _npu.wants(args):
            return self.npu_kernel(*args)
        if _device.wants(args):
            return self.device_kernel(*args)
        if not backends._noticed:
            backends.notice_cpu_only()
        return self.cpu_kernel(*args)

    def register_fake(self, fake):
        self.custom_op.register_fake(fake)
        return fake

    def register_autograd(self, backward, *, setup_context):
        self.custom_op.register_autograd(backward, setup_context=setup_context)
        kernel = self.kernel

        class _Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = kernel(*args)
                setup_context(ctx, args, out)
                return out

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        _Function.__name__ = _Function.__qualname__ = f"moerail_{self.name}"
        self._function = _Function

    def __call__(self, *args):
        if not _eager(args):
            return self.custom_op(*args)
        if (
            self._function is not None
            and torch.is_grad_enabled()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        ):
            return self._function.apply(*args)
        return self.kernel(*args)


def _op(name: str):
    return lambda fn: _Op(name, fn)


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------


@_op("topk_route")
def topk_route(
    logits: Tensor,
    topk: int,
    use_pre_softmax: bool,
    num_groups: Optional[int],
    group_topk: Optional[int],
    scaling_factor: Optional[float],
    score_function: str,
    expert_bias: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(probs [T, E], routing_map [T, E], indices [T, k], tokens_per_expert [E])."""
    t, e = logits.shape
    probs = _empty((t, e), logits.dtype, logits)
    routing_map = _empty((t, e), torch.bool, logits)
    probs_k = _empty((t, topk), logits.dtype, logits)
    indices = _empty((t, topk), torch.int64, logits)
    tpe = _empty((e,), torch.int64, logits)
    cfg = _native.ops.RouterConfig(topk, score_function, use_pre_softmax, num_groups, group_topk, scaling_factor)
    _native.ops.router_forward(logits.contiguous(), cfg, expert_bias, probs_k, indices, tpe, probs, routing_map)
    return probs, routing_map, indices, tpe


@topk_route.register_fake
def _(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, expert_bias):
    t, e = logits.shape
    return (
        logits.new_empty((t, e)),
        logits.new_empty((t, e), dtype=torch.bool),
        logits.new_empty((t, topk), dtype=torch.int64),
        logits.new_empty((e,), dtype=torch.int64),
    )


@_op("topk_route_compact")
def topk_route_compact(
    logits: Tensor,
    topk: int,
    use_pre_softmax: bool,
    num_groups: Optional[int],
    group_topk: Optional[int],
    scaling_factor: Optional[float],
    score_function: str,
    expert_bias: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """(probs [T, k], indices [T, k], tokens_per_expert [E])."""
    t, e = logits.shape
    probs_k = _empty((t, topk), logits.dtype, logits)
    indices = _empty((t, topk), torch.int64, logits)
    tpe = _empty((e,), torch.int64, logits)
    cfg = _native.ops.RouterConfig(topk, score_function, use_pre_softmax, num_groups, group_topk, scaling_factor)
    _native.ops.router_forward(logits.contiguous(), cfg, expert_bias, probs_k, indices, tpe)
    return probs_k, indices, tpe


@topk_route_compact.register_fake
def _(logits, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function, expert_bias):
    t, e = logits.shape
    return (
        logits.new_empty((t, topk)),
        logits.new_empty((t, topk), dtype=torch.int64),
        logits.new_empty((e,), dtype=torch.int64),
    )


@_op("topk_route_backward")
def topk_route_backward(
    grad_probs: Tensor,
    logits: Tensor,
    indices: Tensor,
    topk: int,
    use_pre_softmax: bool,
    scaling_factor: Optional[float],
    score_function: str,
) -> Tensor:
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    cfg = _native.ops.RouterConfig(topk, score_function, use_pre_softmax, None, None, scaling_factor)
    _native.ops.router_backward(grad_probs.contiguous(), logits.contiguous(), indices.contiguous(), cfg, grad_logits)
    return grad_logits


@topk_route_backward.register_fake
def _(grad_probs, logits, indices, topk, use_pre_softmax, scaling_factor, score_function):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _route_setup(ctx, inputs, output):
    logits, topk, use_pre_softmax, _, _, scaling_factor, score_function, _ = inputs
    indices = output[2] if len(output) == 4 else output[1]
    ctx.save_for_backward(logits, indices)
    ctx.args = (topk, use_pre_softmax, scaling_factor, score_function)


def _route_backward(ctx, grad_probs, *_unused):
    logits, indices = ctx.saved_tensors
    if grad_probs is None or not ctx.needs_input_grad[0]:
        return (None,) * 8
    grad = topk_route_backward(grad_probs, logits, indices, *ctx.args)
    return (grad,) + (None,) * 7


topk_route.register_autograd(_route_backward, setup_context=_route_setup)
topk_route_compact.register_autograd(_route_backward, setup_context=_route_setup)


@_op("aux_loss_scores")
def aux_loss_scores(logits: Tensor, topk: int, score_function: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(scores [T, E] in fp32/fp64, routing_map [T, E], tokens_per_expert [E])."""
    t, e = logits.shape
    scores = _empty((t, e), acc_dtype(logits.dtype), logits)
    routing_map = _empty((t, e), torch.bool, logits)
    tpe = _empty((e,), torch.int64, logits)
    _native.ops.aux_scores_forward(logits.contiguous(), topk, score_function, scores, routing_map, tpe)
    return scores, routing_map, tpe


@aux_loss_scores.register_fake
def _(logits, topk, score_function):
    t, e = logits.shape
    return (
        logits.new_empty((t, e), dtype=acc_dtype(logits.dtype)),
        logits.new_empty((t, e), dtype=torch.bool),
        logits.new_empty((e,), dtype=torch.int64),
    )


@_op("aux_loss_scores_backward")
def aux_loss_scores_backward(grad_scores: Tensor, logits: Tensor, score_function: str) -> Tensor:
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _native.ops.aux_scores_backward(
        grad_scores.to(acc_dtype(logits.dtype)).contiguous(), logits.contiguous(), score_function, grad_logits
    )
    return grad_logits


@aux_loss_scores_backward.register_fake
def _(grad_scores, logits, score_function):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _aux_scores_setup(ctx, inputs, output):
    logits, _, score_function = inputs
    ctx.save_for_backward(logits)
    ctx.score_function = score_function


def _aux_scores_backward(ctx, grad_scores, _grad_map, _grad_tpe):
    (logits,) = ctx.saved_tensors
    if grad_scores is None or not ctx.needs_input_grad[0]:
        return None, None, None
    return aux_loss_scores_backward(grad_scores, logits, ctx.score_function), None, None


aux_loss_scores.register_autograd(_aux_scores_backward, setup_context=_aux_scores_setup)


@_op("load_balancing_loss")
def load_balancing_loss(probs: Tensor, tokens_per_expert: Tensor, num_seqs: int, scale: float) -> Tensor:
    """scale * sum_{b,e} (sum of probs[t, e] over the tokens t of sequence b) * tokens_per_expert[b, e]."""
    value = _native.ops.load_balancing_loss_forward(
        probs.contiguous(), tokens_per_expert.to(torch.float64).contiguous(), num_seqs, scale
    )
    return torch.tensor(value, dtype=probs.dtype, device=probs.device)


@load_balancing_loss.register_fake
def _(probs, tokens_per_expert, num_seqs, scale):
    return probs.new_empty(())


@_op("load_balancing_loss_backward")
def load_balancing_loss_backward(
    grad: Tensor, probs: Tensor, tokens_per_expert: Tensor, num_seqs: int, scale: float
) -> Tensor:
    grad_probs = torch.empty_like(probs, memory_format=torch.contiguous_format)
    _native.ops.load_balancing_loss_backward(
        float(grad.item()), tokens_per_expert.to(torch.float64).contiguous(), num_seqs, scale, grad_probs
    )
    return grad_probs


@load_balancing_loss_backward.register_fake
def _(grad, probs, tokens_per_expert, num_seqs, scale):
    return torch.empty_like(probs, memory_format=torch.contiguous_format)


def _lbl_setup(ctx, inputs, output):
    probs, tpe, num_seqs, scale = inputs
    ctx.save_for_backward(probs, tpe)
    ctx.args = (num_seqs, scale)


def _lbl_backward(ctx, grad):
    probs, tpe = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    return load_balancing_loss_backward(grad, probs, tpe, *ctx.args), None, None, None


load_balancing_loss.register_autograd(_lbl_backward, setup_context=_lbl_setup)


@_op("z_loss")
def z_loss(logits: Tensor, coeff: float) -> Tuple[Tensor, Tensor]:
    """(coeff * mean_t logsumexp(logits[t])^2, logsumexp per token [T] kept for the backward)."""
    lse = _empty((logits.shape[0],), acc_dtype(logits.dtype), logits)
    value = _native.ops.z_loss_forward(logits.contiguous(), lse)
    return torch.tensor(value * coeff, dtype=logits.dtype, device=logits.device), lse


@z_loss.register_fake
def _(logits, coeff):
    return logits.new_empty(()), logits.new_empty((logits.shape[0],), dtype=acc_dtype(logits.dtype))


@_op("z_loss_backward")
def z_loss_backward(grad: Tensor, logits: Tensor, lse: Tensor, coeff: float) -> Tensor:
    grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    _native.ops.z_loss_backward(float(grad.item()) * coeff, logits.contiguous(), lse.contiguous(), grad_logits)
    return grad_logits


@z_loss_backward.register_fake
def _(grad, logits, lse, coeff):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _z_setup(ctx, inputs, output):
    logits, coeff = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.coeff = coeff


def _z_backward(ctx, grad, _grad_lse):
    logits, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad is None:
        return None, None
    return z_loss_backward(grad, logits, lse, ctx.coeff), None


z_loss.register_autograd(_z_backward, setup_context=_z_setup)


@_op("expert_bias_update")
def expert_bias_update(tokens_per_expert: Tensor, expert_bias: Tensor, rate: float) -> Tensor:
    out = torch.empty_like(expert_bias, dtype=torch.float32, memory_format=torch.contiguous_format)
    _native.ops.expert_bias_update(
        tokens_per_expert.to(torch.float64).contiguous(), expert_bias.to(torch.float32).contiguous(), rate, out
    )
    return out


@expert_bias_update.register_fake
def _(tokens_per_expert, expert_bias, rate):
    return torch.empty_like(expert_bias, dtype=torch.float32, memory_format=torch.contiguous_format)


@_op("apply_token_dropping")
def apply_token_dropping(
    probs: Tensor, routing_map: Tensor, topk: int, capacity_factor: float, drop_policy: str, pad_to_capacity: bool
) -> Tuple[Tensor, Tensor]:
    out_probs = torch.empty_like(probs, memory_format=torch.contiguous_format)
    out_map = torch.empty_like(routing_map, memory_format=torch.contiguous_format)
    _native.ops.token_dropping(
        probs.contiguous(), routing_map.contiguous(), topk, capacity_factor, drop_policy, pad_to_capacity,
        out_probs, out_map,
    )
    return out_probs, out_map


@apply_token_dropping.register_fake
def _(probs, routing_map, topk, capacity_factor, drop_policy, pad_to_capacity):
    return (
        torch.empty_like(probs, memory_format=torch.contiguous_format),
        torch.empty_like(routing_map, memory_format=torch.contiguous_format),
    )


def _drop_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _drop_backward(ctx, grad_probs, _grad_map):
    (kept,) = ctx.saved_tensors
    grad = None if grad_probs is None else grad_probs * kept
    return grad, None, None, None, None, None


apply_token_dropping.register_autograd(_drop_backward, setup_context=_drop_setup)


# ----------------------------------------------------------------------------------------------
# Permutation
# ----------------------------------------------------------------------------------------------


@_op("permute")
def permute(
    tokens: Tensor,
    routing_map: Tensor,
    probs: Optional[Tensor],
    num_out_tokens: int,
    drop_and_pad: bool,
    align_size: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(permuted_tokens [N, H], permuted_probs [N] (empty without probs), sorted_indices [N],
    rows per expert [E]). ``num_out_tokens < 0``: not given."""
    t, e = routing_map.shape
    routing_map = routing_map.contiguous()
    probs_c = None if probs is None else probs.contiguous()
    if drop_and_pad:
        capacity = num_out_tokens // e
        sorted_indices = _empty((capacity * e,), torch.int64, tokens)
        pp = None if probs is None else _empty((capacity * e,), probs.dtype, tokens)
        _native.ops.permute_drop_and_pad_layout(routing_map, capacity, probs_c, sorted_indices, pp)
        row_counts = torch.full((e,), capacity, dtype=torch.int64, device=tokens.device)
    else:
        counts = _empty((e,), torch.int64, tokens)
        _native.ops.count_routing_map(routing_map, counts)
        rows = int(counts.sum())
        # num_out_tokens counts the routed copies (Megatron's), before any alignment padding.
        if num_out_tokens >= 0 and num_out_tokens != rows:
            raise ValueError(
                f"num_out_tokens: routing_map routes {rows} token copies, but num_out_tokens={num_out_tokens}"
            )
        if align_size > 1:
            counts = (counts + align_size - 1) // align_size * align_size
            rows = int(counts.sum())
            _checks.padded_rows_fit(rows, _checks.permuted_row_bytes(tokens, probs), align_size, tokens.device)
        sorted_indices = _empty((rows,), torch.int64, tokens)
        pp = None if probs is None else _empty((rows,), probs.dtype, tokens)
        row_counts = _empty((e,), torch.int64, tokens)
        _native.ops.permute_map_layout(routing_map, max(align_size, 1), probs_c, sorted_indices, pp, row_counts)
    out = _empty((sorted_indices.shape[0], tokens.shape[1]), tokens.dtype, tokens)
    _native.ops.gather_rows(tokens.contiguous(), sorted_indices, out)
    if pp is None:
        pp = _empty((0,), tokens.dtype if probs is None else probs.dtype, tokens)
    return out, pp, sorted_indices, row_counts


def _permute_rows_fake(num_out_tokens: int, align_size: int, drop_and_pad: bool, e: int):
    if drop_and_pad:
        return (num_out_tokens // e) * e
    if num_out_tokens >= 0 and align_size <= 1:
        return num_out_tokens
    return torch.library.get_ctx().new_dynamic_size()


@permute.register_fake
def _(tokens, routing_map, probs, num_out_tokens, drop_and_pad, align_size):
    e = routing_map.shape[1]
    rows = _permute_rows_fake(num_out_tokens, align_size, drop_and_pad, e)
    pp = tokens.new_empty((0,)) if probs is None else probs.new_empty((rows,))
    return (
        tokens.new_empty((rows, tokens.shape[1])),
        pp,
        tokens.new_empty((rows,), dtype=torch.int64),
        tokens.new_empty((e,), dtype=torch.int64),
    )


def _permute_setup(ctx, inputs, output):
    tokens, routing_map, probs = inputs[:3]
    _, _, sorted_indices, row_counts = output
    ctx.save_for_backward(sorted_indices, row_counts)
    ctx.num_tokens = tokens.shape[0]
    ctx.num_experts = routing_map.shape[1]
    ctx.probs_dtype = None if probs is None else probs.dtype


def _permute_backward(ctx, grad_out, grad_pp, _gs, _gc):
    sorted_indices, row_counts = ctx.saved_tensors
    grad_tokens = grad_probs = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        grad_tokens = unpermute(grad_out, sorted_indices, ctx.num_tokens, None)
    if ctx.probs_dtype is not None and ctx.needs_input_grad[2] and grad_pp is not None:
        grad_probs = scatter_rows(
            grad_pp.to(ctx.probs_dtype), sorted_indices, row_counts, ctx.num_tokens, ctx.num_experts
        )
    return grad_tokens, None, grad_probs, None, None, None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


@_op("permute_by_indices")
def permute_by_indices(
    tokens: Tensor, indices: Tensor, num_experts: int, probs: Optional[Tensor], align_size: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The index form of permute: (permuted_tokens, permuted_probs, sorted_indices, rows per expert)."""
    indices = indices.contiguous()
    counts = _empty((num_experts,), torch.int64, tokens)
    _native.ops.count_indices(indices, num_experts, counts)
    if align_size > 1:
        counts = (counts + align_size - 1) // align_size * align_size
    rows = int(counts.sum())
    if align_size > 1:
        _checks.padded_rows_fit(rows, _checks.permuted_row_bytes(tokens, probs), align_size, tokens.device)
    sorted_indices = _empty((rows,), torch.int64, tokens)
    pp = None if probs is None else _empty((rows,), probs.dtype, tokens)
    row_counts = _empty((num_experts,), torch.int64, tokens)
    _native.ops.permute_index_layout(
        indices, num_experts, max(align_size, 1), None if probs is None else probs.contiguous(),
        sorted_indices, pp, row_counts,
    )
    out = _empty((rows, tokens.shape[1]), tokens.dtype, tokens)
    _native.ops.gather_rows(tokens.contiguous(), sorted_indices, out)
    if pp is None:
        pp = _empty((0,), tokens.dtype, tokens)
    return out, pp, sorted_indices, row_counts


@permute_by_indices.register_fake
def _(tokens, indices, num_experts, probs, align_size):
    rows = torch.library.get_ctx().new_dynamic_size()
    pp = tokens.new_empty((0,)) if probs is None else probs.new_empty((rows,))
    return (
        tokens.new_empty((rows, tokens.shape[1])),
        pp,
        tokens.new_empty((rows,), dtype=torch.int64),
        tokens.new_empty((num_experts,), dtype=torch.int64),
    )


def _permute_idx_setup(ctx, inputs, output):
    tokens, indices, num_experts, probs, _ = inputs
    _, _, sorted_indices, row_counts = output
    ctx.save_for_backward(indices, sorted_indices, row_counts)
    ctx.num_tokens = tokens.shape[0]
    ctx.probs_dtype = None if probs is None else probs.dtype


def _permute_idx_backward(ctx, grad_out, grad_pp, _gs, _gc):
    indices, sorted_indices, row_counts = ctx.saved_tensors
    grad_tokens = grad_probs = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        grad_tokens = unpermute(grad_out, sorted_indices, ctx.num_tokens, None)
    if ctx.probs_dtype is not None and ctx.needs_input_grad[3] and grad_pp is not None:
        # Row r holds (token sorted_indices[r], expert expert_of_row[r]): find its top-k slot.
        experts = torch.repeat_interleave(torch.arange(row_counts.numel(), device=row_counts.device), row_counts)
        real = sorted_indices >= 0
        tok = sorted_indices[real]
        slot = (indices[tok] == experts[real].unsqueeze(1)).to(torch.int8).argmax(dim=1)
        grad_probs = torch.zeros(indices.shape, dtype=ctx.probs_dtype, device=indices.device)
        grad_probs[tok, slot] = grad_pp[real].to(ctx.probs_dtype)
    return grad_tokens, None, None, grad_probs, None


permute_by_indices.register_autograd(_permute_idx_backward, setup_context=_permute_idx_setup)


@_op("unpermute")
def unpermute(
    permuted_tokens: Tensor, sorted_indices: Tensor, num_tokens: int, row_weights: Optional[Tensor]
) -> Tensor:
    """out[t] = sum over rows r of token t (ascending) of permuted_tokens[r] * row_weights[r]."""
    out = _empty((num_tokens, permuted_tokens.shape[1]), permuted_tokens.dtype, permuted_tokens)
    w = None if row_weights is None else row_weights.to(acc_dtype(permuted_tokens.dtype)).contiguous()
    _native.ops.unpermute(permuted_tokens.contiguous(), sorted_indices.contiguous(), w, out)
    return out


@unpermute.register_fake
def _(permuted_tokens, sorted_indices, num_tokens, row_weights):
    return permuted_tokens.new_empty((num_tokens, permuted_tokens.shape[1]))


@_op("unpermute_backward")
def unpermute_backward(
    grad_out: Tensor,
    permuted_tokens: Optional[Tensor],
    sorted_indices: Tensor,
    row_weights: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """(grad of permuted_tokens, grad of row_weights — empty when permuted_tokens is None)."""
    n = sorted_indices.shape[0]
    acc = acc_dtype(grad_out.dtype)
    grad_x = _empty((n, grad_out.shape[1]), grad_out.dtype, grad_out)
    grad_w = None if permuted_tokens is None else _empty((n,), acc, grad_out)
    w = None if row_weights is None else row_weights.to(acc).contiguous()
    _native.ops.unpermute_backward(
        grad_out.contiguous(), None if permuted_tokens is None else permuted_tokens.contiguous(),
        sorted_indices.contiguous(), w, grad_x, grad_w,
    )
    return grad_x, (_empty((0,), acc, grad_out) if grad_w is None else grad_w)


@unpermute_backward.register_fake
def _(grad_out, permuted_tokens, sorted_indices, row_weights):
    n = sorted_indices.shape[0]
    acc = acc_dtype(grad_out.dtype)
    gw = grad_out.new_empty((0 if permuted_tokens is None else n,), dtype=acc)
    return grad_out.new_empty((n, grad_out.shape[1])), gw


def _unpermute_setup(ctx, inputs, output):
    permuted_tokens, sorted_indices, _, row_weights = inputs
    need_w = row_weights is not None and ctx.needs_input_grad[3]
    # The expert output is kept only when the weights need a gradient.
    ctx.save_for_backward(sorted_indices, row_weights, permuted_tokens if need_w else None)
    ctx.weights_dtype = None if row_weights is None else row_weights.dtype


def _unpermute_backward(ctx, grad_out):
    sorted_indices, row_weights, permuted_tokens = ctx.saved_tensors
    grad_x, grad_w = unpermute_backward(grad_out, permuted_tokens, sorted_indices, row_weights)
    gx = grad_x if ctx.needs_input_grad[0] else None
    gw = grad_w.to(ctx.weights_dtype) if permuted_tokens is not None else None
    return gx, None, None, gw


unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


@_op("row_weights")
def row_weights(probs: Tensor, sorted_indices: Tensor, row_counts: Tensor, acc: torch.dtype) -> Tensor:
    """w[r] = probs[sorted_indices[r], expert(r)] (0 for padding rows), in dtype ``acc``."""
    w = _empty((sorted_indices.shape[0],), acc, probs)
    _native.ops.row_weights(probs.contiguous(), sorted_indices.contiguous(), row_counts.contiguous(), w)
    return w


@row_weights.register_fake
def _(probs, sorted_indices, row_counts, acc):
    return probs.new_empty((sorted_indices.shape[0],), dtype=acc)


def _row_weights_setup(ctx, inputs, output):
    probs, sorted_indices, row_counts, _ = inputs
    ctx.save_for_backward(sorted_indices, row_counts)
    ctx.shape = tuple(probs.shape)
    ctx.probs_dtype = probs.dtype


def _row_weights_backward(ctx, grad_w):
    sorted_indices, row_counts = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad_w is None:
        return None, None, None, None
    grad = scatter_rows(grad_w.to(ctx.probs_dtype), sorted_indices, row_counts, *ctx.shape)
    return grad, None, None, None


row_weights.register_autograd(_row_weights_backward, setup_context=_row_weights_setup)


@_op("scatter_rows")
def scatter_rows(values: Tensor, sorted_indices: Tensor, row_counts: Tensor, num_tokens: int, num_experts: int) -> Tensor:
    """Dense [T, E]: values[r] at (sorted_indices[r], expert(r)), zeros elsewhere."""
    out = _empty((num_tokens, num_experts), values.dtype, values)
    _native.ops.scatter_rows_to_dense(values.contiguous(), sorted_indices.contiguous(), row_counts.contiguous(), out)
    return out


@scatter_rows.register_fake
def _(values, sorted_indices, row_counts, num_tokens, num_experts):
    return values.new_empty((num_tokens, num_experts))


@_op("sort_chunks")
def sort_chunks(input: Tensor, split_sizes: Tensor, sorted_idxs: Tensor) -> Tensor:
    """Rows split into chunks of ``split_sizes``, written in the chunk order ``sorted_idxs``."""
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    _native.ops.sort_chunks(input.contiguous(), split_sizes.contiguous(), sorted_idxs.contiguous(), out)
    return out


@sort_chunks.register_fake
def _(input, split_sizes, sorted_idxs):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _sort_chunks_setup(ctx, inputs, output):
    _, split_sizes, sorted_idxs = inputs
    ctx.save_for_backward(split_sizes, sorted_idxs)


def _sort_chunks_backward(ctx, grad):
    split_sizes, sorted_idxs = ctx.saved_tensors
    # The backward is the inverse chunk order over the output's chunk sizes.
    out_sizes = split_sizes[sorted_idxs]
    inverse = torch.argsort(sorted_idxs)
    return sort_chunks(grad, out_sizes, inverse), None, None


sort_chunks.register_autograd(_sort_chunks_backward, setup_context=_sort_chunks_setup)
