"""A tiny MoE transformer layer in plain PyTorch (attention with dropout, a router that logs an aux
loss and counts tokens per expert only when grad is on — as Megatron's does —, moerail's permute /
unpermute, an "exchange" that counts its calls, experts with fc1 / activation / fc2, a shared
expert), and the glue that puts a :class:`moerail.memory.executor.Executor` on it: the reference
model of the executor's unit tests (not a test module)."""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F

import moerail
from moerail.memory.executor import Executor
from moerail.memory.plan import Action

TRACKER: Dict[str, torch.Tensor] = {}


class _AttachAux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, probs, aux):
        ctx.save_for_backward(aux)
        return probs

    @staticmethod
    def backward(ctx, g):
        (aux,) = ctx.saved_tensors
        return g, torch.ones_like(aux)


class _Exchange(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        _Exchange.calls += 1
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.clone()


class Router(torch.nn.Module):
    def __init__(self, h, e, k, layer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(e, h) * 0.3)
        self.k, self.e, self.layer = k, e, layer
        self.register_buffer("tokens", torch.zeros(e))

    def forward(self, x):
        logits = F.linear(x.reshape(-1, x.shape[-1]), self.weight)
        probs, rmap = moerail.topk_route(logits, self.k)
        if torch.is_grad_enabled():
            self.tokens += rmap.sum(0)
            aux = (torch.softmax(logits, -1).mean(0) * rmap.float().mean(0)).sum() * self.e * 1e-2
            TRACKER.setdefault("aux", torch.zeros(8))
            TRACKER["aux"][self.layer] += aux.detach()
            probs = _AttachAux.apply(probs, aux)
        return probs, rmap


class Dispatcher:
    def dispatch_preprocess(self, x, rmap, probs):
        self.shape, self.rmap = x.shape, rmap
        res = moerail.permute(x.reshape(-1, x.shape[-1]), rmap, probs)
        self.sorted_indices = res[2]
        self.tokens_per_expert = rmap.sum(0)
        return res[0], res[1]

    def token_dispatch(self, rows, probs):
        return _Exchange.apply(rows), probs * 1.0

    def dispatch_postprocess(self, rows, probs):
        return rows, self.tokens_per_expert, probs

    def combine_preprocess(self, y):
        return y

    def token_combine(self, y):
        return _Exchange.apply(y)

    def combine_postprocess(self, y):
        out = moerail.unpermute(y, self.sorted_indices, (math.prod(self.shape[:-1]), self.shape[-1]),
                                routing_map=self.rmap)
        return out.reshape(self.shape)


class Expert(torch.nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.linear_fc1 = torch.nn.Linear(h, f)
        self.linear_fc2 = torch.nn.Linear(f, h)
        self.activation_func = F.gelu

    def forward(self, x, p=None):
        y = self.activation_func(self.linear_fc1(x))
        if p is not None:
            y = y * p.unsqueeze(-1)
        return self.linear_fc2(y)


class Attention(torch.nn.Module):
    def __init__(self, h, heads=2):
        super().__init__()
        self.qkv = torch.nn.Linear(h, 3 * h)
        self.proj = torch.nn.Linear(h, h)
        self.heads = heads

    def forward(self, x):
        s, b, h = x.shape
        q, k, v = self.qkv(x).reshape(s, b, 3, self.heads, h // self.heads).permute(2, 1, 3, 0, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h // self.heads), -1)
        att = F.dropout(att, 0.2, self.training)  # RNG inside a recomputed region
        o = (att @ v).permute(2, 0, 1, 3).reshape(s, b, h)
        return self.proj(o)


class MoE(torch.nn.Module):
    def __init__(self, h, e, k, f, layer, shared=True):
        super().__init__()
        self.router = Router(h, e, k, layer)
        self.local_experts = torch.nn.ModuleList(Expert(h, f) for _ in range(e))
        self.shared_experts = Expert(h, f) if shared else None
        self.token_dispatcher = Dispatcher()

    def forward(self, x):
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        probs, rmap = self.router(x)
        td = self.token_dispatcher
        rows, p = td.dispatch_preprocess(x, rmap, probs)
        rows, p = td.token_dispatch(rows, p)
        rows, tpe, p = td.dispatch_postprocess(rows, p)
        sizes = tpe.tolist()
        outs = [ex(r, q) for ex, r, q in zip(self.local_experts, rows.split(sizes), p.split(sizes))]
        y = td.combine_preprocess(torch.cat(outs))
        y = td.token_combine(y)
        y = td.combine_postprocess(y)
        return y + shared if shared is not None else y


class Layer(torch.nn.Module):
    def __init__(self, h, e, k, f, layer, shared=True):
        super().__init__()
        self.layer = layer
        self.input_layernorm = torch.nn.LayerNorm(h)
        self.self_attention = Attention(h)
        self.pre_mlp_layernorm = torch.nn.LayerNorm(h)
        self.mlp = MoE(h, e, k, f, layer, shared)

    def forward(self, x):
        x = x + self.self_attention(self.input_layernorm(x))
        return x + self.mlp(self.pre_mlp_layernorm(x))


class Model(torch.nn.Module):
    def __init__(self, layers=2, h=16, e=4, k=2, f=32, shared=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList(Layer(h, e, k, f, i, shared) for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _tracker_guard():
    snap = {k: v.clone() for k, v in TRACKER.items()}

    def restore():
        for k in list(TRACKER):
            if k not in snap:
                del TRACKER[k]
            else:
                TRACKER[k].copy_(snap[k])

    return restore


def attach(ex: Executor, model: Model) -> Executor:
    """The tiny model's counterpart of ``apply_memory_plan``'s wrapping."""
    ex.state_guards.append(_tracker_guard)
    for layer in model.layers:
        i = layer.layer
        layer.forward = ex.layer(layer.forward, i, owner=layer.mlp.token_dispatcher, buffers_of=layer)
        for name, group in (("input_layernorm", "attn"), ("pre_mlp_layernorm", "mlp")):
            m = getattr(layer, name)
            m.forward = ex.region(m.forward, "layernorm", group, buffers_of=m)
        a = layer.self_attention
        a.forward = ex.region(a.forward, "attention", "attn")
        a.register_forward_hook(lambda mod, inp, out: ex.group_output(out, "attn"))
        mlp = layer.mlp
        mlp.register_forward_hook(lambda mod, inp, out: ex.group_output(out, "mlp"))
        mlp.router.forward = ex.region(mlp.router.forward, "router", "mlp", buffers_of=mlp.router)
        td = mlp.token_dispatcher
        td.dispatch_preprocess = ex.region(td.dispatch_preprocess, "permute", "mlp", owner=td,
                                           also=(("expert_fc1", Action.RECOMPUTE_EXCHANGE),))
        for name in ("token_dispatch", "dispatch_postprocess"):
            setattr(td, name, ex.region(getattr(td, name), "expert_fc1", "mlp", owner=td, tag_as="permute",
                                        actions=(Action.RECOMPUTE_EXCHANGE,)))
        td.combine_preprocess = ex.region(td.combine_preprocess, "unpermute", "mlp", owner=td)
        td.token_combine = ex.tag(td.token_combine, "unpermute")
        td.combine_postprocess = ex.region(td.combine_postprocess, "unpermute", "mlp", owner=td)
        for e in mlp.local_experts:
            e.forward = ex.tag(e.forward, "expert_act")
            e.linear_fc1.forward = ex.region(e.linear_fc1.forward, "expert_fc1", "mlp")
            e.activation_func = ex.region(e.activation_func, "expert_act", "mlp")
            e.linear_fc2.forward = ex.region(e.linear_fc2.forward, "expert_fc2", "mlp")
        if mlp.shared_experts is not None:
            s = mlp.shared_experts
            s.forward = ex.region(s.forward, "shared_expert", "mlp")
    return ex


def run(model: Model, micro: int = 2, seed: int = 5, interleave: bool = True) -> Dict[str, object]:
    """Forwards of ``micro`` micro-batches, then their backwards in reverse order (as a pipeline
    stage keeps several in flight). Returns outputs, input and parameter gradients, the tracker and
    the router counts."""
    TRACKER.clear()
    for layer in model.layers:
        layer.mlp.router.tokens.zero_()
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xs, outs, ws = [], [], []
    pending: List = []
    for _ in range(micro):
        x = torch.randn(8, 2, 16, generator=g, requires_grad=True)
        w = torch.randn(8, 2, 16, generator=g)
        y = model(x)
        xs.append(x)
        ws.append(w)
        outs.append(y.detach().clone())
        if interleave:
            pending.append((y * w).sum())
        else:
            (y * w).sum().backward()
    for loss in reversed(pending):
        loss.backward()
    return {
        "out": torch.stack(outs),
        "xgrad": torch.stack([x.grad for x in xs]),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "tracker": {k: v.clone() for k, v in TRACKER.items()},
        "tokens": torch.stack([layer.mlp.router.tokens.clone() for layer in model.layers]),
    }
