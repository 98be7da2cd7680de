"""A stand-in for the two fused MoE ops of ``torch_npu`` that moerail's NPU path calls, written from
their published formulas (CANN's aclnnMoeTokenPermute / aclnnMoeTokenPermuteWithRoutingMap
docs) and run on CPU tensors. Each call is recorded in ``calls``.

No Ascend hardware exists here. These ops let the tests check moerail's glue: the arguments it
passes, and the conversion of the *inverse* index they return back to Megatron's
sorted_indices.

Not a real torch_npu: importing it initialises nothing.
"""

import torch

__version__ = "standin"
calls = []


def npu_moe_token_permute_with_routing_map(tokens, routing_map, probs=None, num_out_tokens=None,
                                           drop_and_pad=False):
    """dropAndPad=false:
    sortedIndicesFirst = arange(T).expand(E, -1).masked_select(routingMap.T)
    sortedIndicesOut = argsort(sortedIndicesFirst)
    topK = numOutTokens // T; permuteTokensOut[sortedIndicesOut[i]] = tokens[i // topK]
    permuteProbsOut = probs.T.masked_select(routingMap.T)
    """
    calls.append(("npu_moe_token_permute_with_routing_map", num_out_tokens, drop_and_pad, probs is not None))
    assert not drop_and_pad, "moerail does not call the drop_and_pad form"
    t, e = routing_map.shape
    n_out = t if num_out_tokens is None else num_out_tokens
    topk = n_out // t
    first = torch.arange(t).expand(e, -1).masked_select(routing_map.t())
    inverse = torch.argsort(first, stable=True).to(torch.int32)
    out = torch.empty((topk * t, tokens.shape[1]), dtype=tokens.dtype)
    i = torch.arange(topk * t)
    out[inverse[i].long()] = tokens[i // topk]
    pp = None if probs is None else probs.t().masked_select(routing_map.t())
    return out, pp, inverse


def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
    """paddedMode=false:
    sortedIndicesFirst = argsort(flatten(indices)); sortedIndicesOut = argsort(sortedIndicesFirst)
    permuteTokensOut[sortedIndicesOut[i]] = tokens[i // topK] (the first num_out_tokens rows)
    """
    calls.append(("npu_moe_token_permute", num_out_tokens, padded_mode))
    assert not padded_mode
    topk = 1 if indices.dim() == 1 else indices.shape[1]
    flat = indices.reshape(-1)
    first = torch.argsort(flat, stable=True)
    inverse = torch.argsort(first, stable=True).to(torch.int32)
    n = flat.numel() if not num_out_tokens else num_out_tokens
    out = torch.empty((flat.numel(), tokens.shape[1]), dtype=tokens.dtype)
    i = torch.arange(flat.numel())
    out[inverse[i].long()] = tokens[i // topk]
    return out[:n], inverse
