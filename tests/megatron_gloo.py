"""Stock Megatron-Core ``MoELayer``\\ s on CPU ranks with gloo, for the integration tests.

Not a test module: ``run_scenarios(world, scenarios)`` spawns ``world`` processes, each builds
the scenarios' layers (local spec: ``SequentialMLP`` experts) and runs them three ways from the same
weights and inputs — stock Megatron, under ``patch_moe_utils()``, and with ``MoerailTopKRouter``
(nothing patched) — and reports, per scenario, the largest differences of the outputs, the input and
parameter gradients, the tracked aux losses and (where enabled) the updated expert biases.

The CUDA-only calls a stock ``MoELayer`` makes are shimmed here, in the test processes only (never
in the library): ``torch.cuda.current_device`` (CPU), the all-to-all dispatcher's class-level
``torch.cuda.Stream()`` and its device-to-host step (the split sizes become numpy, as Megatron's
D2H copy makes them), and in megatron-core 0.16.1 ``moe_utils.te_general_gemm = None`` (it is
referenced without TransformerEngine). Gloo has no uneven all-gather, so expert TP stays 1.
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
import warnings
from datetime import timedelta
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from a2a_gloo import free_port

HIDDEN = 16
FFN = 32
SEQ = 16
BATCH = 2


def install_cpu_shims() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe import token_dispatcher as td

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    td.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()

    def dtoh(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                v = getattr(self, name, None)
                if isinstance(v, torch.Tensor):
                    setattr(self, name, v.numpy())
        return tokens_per_expert

    td.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh


def _moe_submodules(spec):
    """The MoESubmodules of a GPT layer spec (``ModuleSpec`` in 0.16, ``partial`` in 0.19)."""
    mlp = spec.submodules.mlp
    return mlp.keywords["submodules"] if hasattr(mlp, "keywords") else mlp.submodules


def make_config(sc: Dict):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        moe_ffn_hidden_size=FFN,
        num_attention_heads=4,
        num_moe_experts=sc.get("experts", 8),
        moe_router_topk=sc.get("topk", 2),
        tensor_model_parallel_size=sc["tp"],
        expert_model_parallel_size=sc["ep"],
        expert_tensor_parallel_size=1,
        sequence_parallel=sc["tp"] > 1,
        moe_token_dispatcher_type=sc["dispatcher"],
        moe_router_load_balancing_type=sc.get("balance", "aux_loss"),
        moe_aux_loss_coeff=sc.get("aux", 1e-2),
        moe_z_loss_coeff=sc.get("z", 1e-3),
        moe_expert_capacity_factor=sc.get("capacity"),
        moe_pad_expert_input_to_capacity=sc.get("pad", False),
        moe_token_drop_policy=sc.get("drop_policy", "probs"),
        moe_router_score_function=sc.get("score", "softmax"),
        moe_router_enable_expert_bias=sc.get("expert_bias", False),
        moe_router_num_groups=sc.get("groups"),
        moe_router_group_topk=sc.get("group_topk"),
        moe_router_topk_scaling_factor=sc.get("scaling"),
        moe_router_pre_softmax=sc.get("pre_softmax", False),
        moe_router_dtype="fp32",
        use_cpu_initialization=True,
        add_bias_linear=False,
        params_dtype=torch.float32,
    )
    return TransformerConfig(**kw)


def build_layer(cfg, moerail_router: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from moerail.integrations import megatron as mi

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False)
    if moerail_router:
        spec = mi.with_moerail_router(spec)
    layer = MoELayer(cfg, _moe_submodules(spec))
    layer.set_layer_number(1)
    return layer


def _tracked_losses() -> Dict[str, torch.Tensor]:
    from megatron.core.transformer.moe import moe_utils

    get = getattr(moe_utils, "get_moe_layer_wise_logging_tracker", None)
    if get is None:
        return {}
    try:
        t = get()
        return {k: v["values"].detach().clone() for k, v in t.items() if isinstance(v, dict) and "values" in v}
    except Exception:  # noqa: BLE001 - another tracker layout (0.19): not compared
        return {}


def _clear_tracker() -> None:
    from megatron.core.transformer.moe import moe_utils

    clear = getattr(moe_utils, "clear_aux_losses_tracker", None)
    if clear is not None:
        try:
            clear()
        except Exception:  # noqa: BLE001
            pass


def run_layer(layer, sc: Dict, rank: int) -> Dict:
    """Forward and backward of ``micro`` micro-batches; outputs, gradients, tracked losses."""
    tp = sc["tp"]
    seq = SEQ // tp
    outs, xgrads = [], []
    layer.zero_grad(set_to_none=True)
    if sc.get("expert_bias"):
        layer.router.local_tokens_per_expert.zero_()  # a non-persistent buffer: not in the state dict
    _clear_tracker()
    for mb in range(sc.get("micro", 1)):
        g = torch.Generator().manual_seed(1000 * rank + mb)
        x = torch.randn(seq, BATCH, HIDDEN, generator=g, requires_grad=True)
        w = torch.randn(seq, BATCH, HIDDEN, generator=g)
        out, _ = layer(x)
        (out * w).sum().backward()
        outs.append(out.detach().clone())
        xgrads.append(x.grad.detach().clone())
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in layer.named_parameters()}
    res = {"out": torch.stack(outs), "xgrad": torch.stack(xgrads), "grads": grads, "tracked": _tracked_losses()}
    if sc.get("expert_bias"):
        res["counts"] = layer.router.local_tokens_per_expert.detach().clone()
    return res


def _max_err(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def compare(ref: Dict, got: Dict) -> Dict[str, float]:
    """Largest absolute difference of each result (inf: shapes or presence differ)."""
    err = {"out": _max_err(ref["out"], got["out"]), "xgrad": _max_err(ref["xgrad"], got["xgrad"])}
    if set(ref["grads"]) != set(got["grads"]):
        err["param_names"] = float("inf")
    for n, g in ref["grads"].items():
        err[f"grad:{n}"] = _max_err(g, got["grads"].get(n))
    for n, v in ref["tracked"].items():
        if n in got["tracked"]:
            err[f"tracked:{n}"] = _max_err(v, got["tracked"][n])
    for k in ("counts", "bias"):
        if k in ref:
            err[k] = _max_err(ref[k], got.get(k))
    return err


def _bias_update(layer, cfg, via: str) -> torch.Tensor:
    from megatron.core.distributed import finalize_model_grads as _fmg  # noqa: F401

    from moerail.integrations import megatron as mi

    fmg = sys.modules["megatron.core.distributed.finalize_model_grads"]
    if via == "megatron":
        fmg._update_router_expert_bias([layer], cfg)
    else:
        mi.update_expert_bias(layer, cfg.moe_router_bias_update_rate)
    return layer.router.expert_bias.detach().clone()


def run_scenario(sc: Dict, rank: int) -> Dict:
    from moerail.integrations import megatron as mi

    cfg = make_config(sc)
    torch.manual_seed(1234)
    stock_layer = build_layer(cfg, moerail_router=False)
    state = copy.deepcopy(stock_layer.state_dict())
    if sc.get("expert_bias"):
        with torch.no_grad():  # a non-zero starting bias, the same on every rank
            b = torch.linspace(-0.05, 0.05, cfg.num_moe_experts)
            stock_layer.router.expert_bias.copy_(b)
        state = copy.deepcopy(stock_layer.state_dict())

    stock = run_layer(stock_layer, sc, rank)
    if sc.get("expert_bias"):
        stock["bias"] = _bias_update(stock_layer, cfg, "megatron")

    stock_layer.load_state_dict(state)
    mi.patch_stats(reset=True)
    with mi.moe_utils_patched():
        patched = run_layer(stock_layer, sc, rank)
        if sc.get("expert_bias"):  # Megatron's finalize_model_grads step, on the patched function
            patched["bias"] = _bias_update(stock_layer, cfg, "megatron")
    patched_calls = mi.patch_stats(reset=True)

    router_layer = build_layer(cfg, moerail_router=True)
    router_layer.load_state_dict(state)
    routed = run_layer(router_layer, sc, rank)
    router_calls = mi.patch_stats(reset=True)
    if sc.get("expert_bias"):  # moerail's helper for loops without finalize_model_grads
        routed["bias"] = _bias_update(router_layer, cfg, "helper")

    disp_layer = build_layer(cfg, moerail_router=False)
    disp_layer.load_state_dict(state)
    mi.use_moerail(disp_layer, ranks_per_node=sc.get("rpn", 1), strategy=sc.get("strategy", "auto"),
                   num_chunks=sc.get("chunks", 1))
    dispatched = run_layer(disp_layer, sc, rank)
    if sc.get("expert_bias"):
        dispatched["bias"] = _bias_update(disp_layer, cfg, "helper")
    stats = disp_layer.token_dispatcher.exchange.last_stats
    migration = {}
    if sc.get("migrate"):
        # A skewed load (the same on every rank), a re-placement, the experts moved: the layer must
        # compute the same function with its experts on other ranks.
        e = cfg.num_moe_experts
        load = (torch.rand(1, e, generator=torch.Generator().manual_seed(5)) ** 4 * 1000).double()
        x = torch.randn(SEQ // sc["tp"], BATCH, HIDDEN, generator=torch.Generator().manual_seed(77 + rank))
        with torch.no_grad():
            before_out = disp_layer(x)[0]
        info = mi.update_expert_placement(disp_layer, load, None, num_nodes=max(1, cfg.expert_model_parallel_size
                                                                                 // sc.get("rpn", 1)),
                                          mode=sc.get("placement_mode", "refine"))
        with torch.no_grad():
            after_out = disp_layer(x)[0]
        migration = {"err": _max_err(before_out, after_out), "moved": int(len(info["plan"].transfers)),
                     "before": info["before"], "after": info["after"],
                     "placement": disp_layer.token_dispatcher.exchange.phy2log.tolist()}

    res = {
        "chunks": disp_layer.token_dispatcher.exchange.num_chunks,
        "hidden_seconds": disp_layer.token_dispatcher.exchange.overlap_totals["exchange_seconds"],
        "dispatcher": compare(stock, dispatched),
        "dispatcher_strategy": stats.get("strategy"),
        "dispatcher_class": type(disp_layer.token_dispatcher).__name__,
        "migration": migration,
        "patched": compare(stock, patched),
        "router": compare(stock, routed),
        "patched_calls": patched_calls,
        "router_calls": router_calls,
        "router_class": type(router_layer.router).__name__,
        "out_norm": float(stock["out"].abs().sum()),
    }
    if sc.get("expert_bias"):
        res["bias_moved"] = float((stock["bias"] - state["router.expert_bias"]).abs().max())
        res["counts_reset"] = float(router_layer.router.local_tokens_per_expert.abs().sum())
    return res


def _worker(rank: int, world: int, port: int, out_dir: str, scenarios: List[Dict]) -> None:
    results: Dict[str, Dict] = {}
    try:
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        import moerail

        moerail.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=45)
        )
        install_cpu_shims()
        from megatron.core import parallel_state as ps

        layout = None
        for sc in scenarios:
            want = (sc["tp"], sc["ep"])
            if want != layout:
                ps.destroy_model_parallel()
                ps.initialize_model_parallel(
                    tensor_model_parallel_size=sc["tp"],
                    expert_model_parallel_size=sc["ep"],
                    expert_tensor_parallel_size=1,
                    create_gloo_process_groups=False,
                )
                layout = want
            try:
                results[sc["name"]] = run_scenario(sc, rank)
            except Exception:  # noqa: BLE001 - reported per scenario
                results[sc["name"]] = {"error": traceback.format_exc()}
            dist.barrier()
        import megatron.core as mc

        results["_meta"] = {"megatron_core": mc.__version__, "where": os.path.dirname(mc.__file__)}
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        results["_fatal"] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def spawn_ranks(worker, world: int, payload, out_dir: str, timeout_s: float) -> List[Dict]:
    """Runs ``worker(rank, world, port, out_dir, payload)`` on ``world`` spawned gloo ranks and
    loads each rank's ``rank{r}.pt``; a rank that hangs is killed after ``timeout_s`` and fails
    the call instead of blocking it."""
    import time

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, out_dir, payload), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    if hung:
        raise TimeoutError(f"ranks {hung} did not finish within {timeout_s:.0f} s")
    out = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.pt")
        if not os.path.exists(path):
            raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} and no results")
        out.append(torch.load(path, weights_only=False))
    return out


def _job_worker(rank: int, world: int, port: int, out_dir: str, payload) -> None:
    body, job, deterministic = payload
    result: Dict = {}
    try:
        import logging

        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        torch.set_num_threads(1)
        if deterministic:
            torch.use_deterministic_algorithms(True)
        import moerail

        moerail.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        result = body(rank, world, job)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_job(body, world: int, job, out_dir: str, timeout_s: float, *, deterministic: bool = True) -> List[Dict]:
    """Runs ``body(rank, world, job) -> dict`` (a module-level function) on ``world`` spawned gloo
    ranks, one thread each, warnings and logging quiet (and deterministic algorithms, unless told
    otherwise); returns each rank's dict, or raises with a failing rank's traceback."""
    out = spawn_ranks(_job_worker, world, (body, job, deterministic), out_dir, timeout_s)
    for r, res in enumerate(out):
        if "error" in res:
            raise RuntimeError(f"rank {r}:\n{res['error']}")
    return out


def run_scenarios(world: int, scenarios: List[Dict], out_dir: str, timeout_s: float = 50.0) -> List[Dict]:
    """Runs the scenarios on ``world`` spawned gloo ranks; returns each rank's results."""
    out = spawn_ranks(_worker, world, scenarios, out_dir, timeout_s)
    for r, res in enumerate(out):
        if "_fatal" in res:
            raise RuntimeError(f"rank {r}:\n{res['_fatal']['error']}")
    return out
