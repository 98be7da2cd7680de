"""The simulator's efficiencies fitted to published step times (:func:`calibrate`, :data:`PUBLISHED`,
:data:`PRIORS`, :data:`H100_CALIBRATION`)."""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .. import _native
from .config import _entries, _find_preset, resolve_config

__all__ = ["PUBLISHED", "H100_CALIBRATION", "calibrate"]


# ----------------------------------------------------------------------------- calibration

_H100_BASE = {
    "training": {
        "seq_length": 4096,
        "global_batch_size": 256,
        "micro_batch_size": 1,
        "precision": "bf16",
        "moe_expert_capacity_factor": 1.0,
        "moe_pad_expert_input_to_capacity": True,
        "moe_token_dispatcher_type": "alltoall",
        "use_distributed_optimizer": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
        "tp_comm_overlap": True,
    },
}


def _case(model: str, devices: int, tp: int, pp: int, ep: int, etp: int) -> dict:
    return {
        "model": {"preset": model},
        "cluster": {"preset": "H100-SXM", "devices": devices},
        "training": dict(_H100_BASE["training"]),
        "layout": {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "expert_model_parallel_size": ep,
            "expert_tensor_parallel_size": etp,
        },
    }


#: The published runs the H100 efficiencies are fitted on: MoE Parallel Folding (arXiv
#: 2504.14960), H100, seq 4096, GBS 256, token drop with capacity factor 1, BF16, MFU against
#: 989.5 TFLOPS with non-causal attention FLOPs (``report["time"]["mfu_noncausal"]``).
PUBLISHED: List[Dict[str, Any]] = [
    {"name": "Mixtral-8x22B TP2 CP1 PP8 EP8 ETP1 (folded), 128 H100", "mfu": 0.493,
     "config": _case("Mixtral-8x22B", 128, 2, 8, 8, 1)},
    {"name": "Mixtral-8x22B TP2 PP8 EP4 ETP2 (coupled), 128 H100", "mfu": 0.463,
     "config": _case("Mixtral-8x22B", 128, 2, 8, 4, 2)},
    {"name": "Qwen2-57B-A14B TP2 PP4 EP4 ETP1 (folded), 64 H100", "mfu": 0.390,
     "config": _case("Qwen2-57B-A14B", 64, 2, 4, 4, 1)},
    {"name": "Qwen2-57B-A14B TP2 PP4 EP4 ETP2 (coupled), 64 H100", "mfu": 0.353,
     "config": _case("Qwen2-57B-A14B", 64, 2, 4, 4, 2)},
]

#: Priors of the efficiency parameters (H100 microbenchmarks; see the Rust `sim` docs).
PRIORS: Dict[str, float] = {
    "gemm_efficiency": 0.75,
    "attention_efficiency": 0.55,
    "memory_efficiency": 0.70,
    "intra_node_comm_efficiency": 0.75,
    "kernel_overhead_us": 4.0,
}

#: The H100 efficiencies in use (the cluster preset's ``efficiency`` table: the Hopper fit on
#: ``benches/sim_validation.csv``, see :mod:`moerail.sim.validation`).
H100_CALIBRATION: Dict[str, float] = dict(_find_preset("clusters", "h100-sxm").get("efficiency") or {})

_UPPER = {
    "gemm_efficiency": 1.0,
    "attention_efficiency": 1.0,
    "memory_efficiency": 1.0,
    "intra_node_comm_efficiency": 1.0,
    "inter_node_comm_efficiency": 1.0,
    "tp_overlap_efficiency": 1.0,
    "overlap_efficiency": 1.0,
}


def _nelder_mead(f: Callable[[List[float]], float], x0: List[float], step: float = 0.1, iters: int = 400) -> List[float]:
    n = len(x0)
    pts = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(n + 1), key=lambda i: vals[i])
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < 1e-10:
            break
        cen = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        refl = [c + (c - w) for c, w in zip(cen, pts[-1])]
        fr = f(refl)
        if fr < vals[0]:
            exp = [c + 2 * (c - w) for c, w in zip(cen, pts[-1])]
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = [c + 0.5 * (w - c) for c, w in zip(cen, pts[-1])]
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                for i in range(1, n + 1):
                    pts[i] = [pts[0][j] + 0.5 * (pts[i][j] - pts[0][j]) for j in range(n)]
                    vals[i] = f(pts[i])
    return pts[min(range(n + 1), key=lambda i: vals[i])]


def calibrate(
    cases: Optional[Sequence[Mapping[str, Any]]] = None,
    priors: Optional[Mapping[str, float]] = None,
    *,
    noise: float = 0.02,
    prior_width: float = 0.15,
    metric: str = "mfu_noncausal",
) -> Dict[str, Any]:
    """Fits per-device efficiency parameters to measured runs (maximum a posteriori).

    ``cases``: dicts with ``config`` (as :func:`simulate` takes) and the measured ``mfu``
    (default: :data:`PUBLISHED`); ``priors``: parameter -> prior value (default
    :data:`PRIORS`); the objective is ``sum (log(pred/measured)/noise)^2 + sum
    (log(value/prior)/prior_width)^2``, minimised by Nelder-Mead in log space. ``metric`` is
    the report's ``time`` field compared with ``mfu``.

    Returns ``{"efficiency": {...}, "cases": [{"name", "measured", "predicted",
    "relative_error"}], "objective": float}``. Use the efficiencies in a cluster preset or a
    config's ``[cluster]`` section.
    """
    cases = list(PUBLISHED if cases is None else cases)
    if not cases:
        raise ValueError("cases: expected at least one measured run")
    pri = dict(PRIORS if priors is None else priors)
    names = list(pri)
    for k, v in pri.items():
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"priors.{k}: expected a positive number, got {v!r}")
    resolved = []
    for i, c in enumerate(cases):
        if "config" not in c or "mfu" not in c:
            raise ValueError(f"cases[{i}]: expected keys 'config' and 'mfu'")
        base = resolve_config(c["config"])
        resolved.append((c.get("name", f"case {i}"), float(c["mfu"]), base))

    def predict(eff: Mapping[str, float]) -> List[float]:
        out = []
        for _, _, base in resolved:
            cfg = {s: dict(v) for s, v in base.items()}
            cfg["cluster"].update(eff)
            rep = json.loads(_native.sim.sim_simulate(_entries(cfg)))
            out.append(rep["time"][metric])
        return out

    def decode(x: List[float]) -> Dict[str, float]:
        eff = {}
        for k, v in zip(names, x):
            val = pri[k] * math.exp(v)
            eff[k] = min(val, _UPPER.get(k, math.inf))
        return eff

    def objective(x: List[float]) -> float:
        try:
            preds = predict(decode(x))
        except ValueError:
            return 1e12
        err = sum((math.log(p / m) / noise) ** 2 for p, (_, m, _) in zip(preds, resolved))
        reg = sum((v / prior_width) ** 2 for v in x)
        return err + reg

    best = _nelder_mead(objective, [0.0] * len(names))
    eff = {k: round(v, 4) for k, v in decode(best).items()}
    preds = predict(eff)
    return {
        "efficiency": eff,
        "cases": [
            {"name": n, "measured": m, "predicted": p, "relative_error": p / m - 1.0}
            for (n, m, _), p in zip(resolved, preds)
        ],
        "objective": objective([math.log(eff[k] / pri[k]) for k in names]),
    }
