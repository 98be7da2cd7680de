"""A Megatron-Core MoE layer with moerail inside, trained on 4 CPU ranks (2 virtual nodes x 2).

Megatron-Core's own ``MoELayer`` (local spec: ``SequentialMLP`` experts, EP=4) is built as in any
Megatron model, then ``moerail.integrations.megatron.use_moerail(layer, ranks_per_node=2)`` puts
moerail's router and ``AllToAllDispatcher`` into it (Megatron's six-method dispatcher API; the
exchange strategy is planned every step). A stack of such layers with residual connections learns
a fixed random teacher; every rank prints nothing but rank 0, which shows the loss, the strategy,
the inter-node bytes per step, the aux loss Megatron tracks, and the routing load.

On CPU, Megatron-Core makes a few CUDA calls even with gloo; this example stands in for them
(``torch.cuda.current_device``, TransformerEngine's GEMM symbol in 0.16), as the tests do. On GPUs
none of that is needed.

Run: ``python examples/megatron_moe.py [--steps 60]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
import warnings
from datetime import timedelta

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import moerail  # noqa: E402
from moerail.integrations import megatron as mi  # noqa: E402


def cpu_stand_ins() -> None:
    """CUDA calls Megatron-Core makes while building a MoE layer, on a CPU-only machine."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build(args):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn, moe_ffn_hidden_size=args.ffn,
        num_attention_heads=4, num_moe_experts=args.experts, moe_router_topk=args.topk,
        expert_model_parallel_size=args.world, moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3,
        moe_router_dtype="fp32", use_cpu_initialization=True, add_bias_linear=False, params_dtype=torch.float32,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False)
    mlp = spec.submodules.mlp
    submodules = mlp.keywords["submodules"] if hasattr(mlp, "keywords") else mlp.submodules
    layers = []
    for i in range(args.layers):
        layer = MoELayer(cfg, submodules)
        layer.set_layer_number(i + 1)
        # moerail's router and dispatcher in the stock layer (same parameters, same checkpoint).
        mi.use_moerail(layer, ranks_per_node=args.ranks_per_node, strategy=args.strategy)
        layers.append(layer)
    return torch.nn.ModuleList(layers)


def worker(rank: int, args, port: int) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    moerail.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world,
                            timeout=timedelta(seconds=120))
    cpu_stand_ins()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(expert_model_parallel_size=args.world, create_gloo_process_groups=False)
    torch.manual_seed(0)  # the same non-expert weights on every rank
    model = build(args)
    experts = {id(p) for layer in model for p in layer.experts.parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(42)
    teacher = [torch.randn(args.hidden, args.hidden, generator=g) / args.hidden**0.5 for _ in range(2)]
    data = torch.Generator().manual_seed(100 + rank)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(args.seq, args.batch, args.hidden, generator=data)
        target = torch.tanh(x @ teacher[0]) @ teacher[1]
        h = x
        for layer in model:
            out, _ = layer(h)
            h = h + out
        loss = torch.nn.functional.mse_loss(h, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():  # data parallel for the router; experts already see every rank's tokens
            if p.grad is None:
                continue
            if id(p) in experts:
                p.grad /= args.world
            else:
                dist.all_reduce(p.grad)
                p.grad /= args.world
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0 and (step == 1 or step % args.log_every == 0):
            st = model[0].token_dispatcher.exchange.last_stats
            inter = sum(layer.token_dispatcher.exchange.last_stats["planned"][p]["inter_node_bytes"]
                        for layer in model for p in ("dispatch", "combine"))
            load = model[0].token_dispatcher.tokens_per_expert.tolist()
            print(f"step {step:3d}: loss {float(total) / args.world:.4f}  strategy {st['strategy']}  "
                  f"inter-node {inter / 1e3:.1f} kB/step  rank-0 tokens per local expert {load}", flush=True)
    if rank == 0:
        print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s on {args.world} ranks")
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(args, port), nprocs=args.world, start_method="spawn")


if __name__ == "__main__":
    main()
