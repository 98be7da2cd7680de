"""The simulator against a table of published MoE training runs (:func:`load_table`,
:func:`row_config`, :func:`predict`, :func:`fit`, :func:`cross_validate`).

The table (``benches/sim_validation.csv`` in the source tree) holds one published run a row:
its source (paper and table, or repository, file and commit), the stated settings (model,
device, precision, sequence, batch, layout, pipeline layout, dispatcher, token dropping or
balance, recomputation, overlaps), the published throughput and the FLOPs convention it was
counted under. A row the source contradicts itself on has ``status`` ``excluded`` and says why.

Efficiencies are per device family (Hopper: H100, H800, H200; Blackwell: B200, GB200; Ascend),
never per run: :func:`fit` fits one family's parameters on the rows of that family it is given;
:func:`cross_validate` refits with each row (leave-one-out) or each source (leave-one-source-out)
held out and predicts the held-out rows from the rest.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from .. import _native
from .calibration import PRIORS, _nelder_mead
from .config import _entries, _find_preset, resolve_config

__all__ = [
    "fits_on",
    "routed_unbalanced",
    "FAMILIES",
    "FIT_PARAMETERS",
    "FIT_PRIORS",
    "PRIOR_WIDTH",
    "IMBALANCE_PRIOR",
    "IMBALANCE_PRIOR_WIDTH",
    "load_table",
    "row_config",
    "predict",
    "fit",
    "fit_imbalance",
    "cross_validate",
    "microbatches_per_pipeline",
    "pipeline_fill_bound",
]

#: Device family of each cluster preset: the unit the efficiencies are fitted per.
FAMILIES: Dict[str, str] = {
    "H100-SXM": "hopper",
    "H800": "hopper",
    "H200": "hopper",
    "B200": "blackwell",
    "GB200": "blackwell",
    "Ascend-800T-A2": "ascend",
}

#: The efficiency parameters fitted per family (the others keep their priors).
FIT_PARAMETERS = [*PRIORS, "fp8_gemm_efficiency", "inter_node_comm_efficiency", "overlap_efficiency"]

#: Priors: the H100 microbenchmark values of :data:`PRIORS`, and FP8 GEMMs at 0.55 of the FP8
#: peak (Transformer Engine's FP8 GEMMs run ~1.5x its BF16 ones on H100: 0.75 * 1.5 / 2).
FIT_PRIORS = {**PRIORS, "fp8_gemm_efficiency": 0.55, "inter_node_comm_efficiency": 0.8, "overlap_efficiency": 0.8}

#: Width (log space) of the Gaussian prior per family: tight where the priors were measured on
#: that silicon (Hopper), loose where they were not (Blackwell, Ascend).
PRIOR_WIDTH = {"hopper": 0.15, "blackwell": 0.5, "ascend": 0.5}

#: Prior of the one routing parameter, ``moe_expert_load_imbalance`` of dropless runs on real
#: routing (the busiest expert-parallel rank's load over the mean): balanced, the value every
#: other row runs at. It is global (routing statistics do not depend on the device) and fitted,
#: like the efficiencies, on the rows a cross-validation fold keeps (:func:`fit_imbalance`).
IMBALANCE_PRIOR = 1.0
#: Width (log space) of its Gaussian prior: loose, as no source this table cites measures it.
IMBALANCE_PRIOR_WIDTH = 0.5

_METRICS = ("mfu_noncausal", "tflops_per_device", "tokens_per_s_per_device")

_RECOMPUTE_MODULES = {"layernorm", "moe_act", "mla_up_proj", "core_attn", "mlp", "moe", "shared_experts"}

_OVERLAPS = {
    "tp_comm": "tp_comm_overlap",
    "ep_overlap": "overlap_moe_expert_parallel_comm",
    "shared_overlap": "moe_shared_expert_overlap",
}


def load_table(path: Union[str, pathlib.Path]) -> List[Dict[str, str]]:
    """Reads the validation table; checks every row names its source and a known metric."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("id", "source", "reference", "model", "cluster", "metric", "published", "flops_convention", "status"):
            if not (r.get(k) or "").strip():
                raise ValueError(f"{path}: row {r.get('id')!r}: column {k!r} is empty")
        if r["metric"] not in _METRICS:
            raise ValueError(f"{path}: row {r['id']}: metric {r['metric']!r} (expected one of {_METRICS})")
    return rows


def _value(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def row_config(row: Mapping[str, str], efficiency: Optional[Mapping[str, float]] = None) -> Dict[str, dict]:
    """The simulator configuration of one table row (``efficiency`` overrides the preset's)."""
    i = lambda k: int(row[k])  # noqa: E731
    training: Dict[str, Any] = {
        "seq_length": i("seq_length"),
        "global_batch_size": i("global_batch_size"),
        "micro_batch_size": i("micro_batch_size"),
        "precision": row["precision"],
        "moe_token_dispatcher_type": row["dispatcher"],
        "use_distributed_optimizer": True,
        "overlap_grad_reduce": True,
        "overlap_param_gather": True,
    }
    if row["balance"] == "capacity" and row["dispatcher"] != "flex":
        # Token drop at capacity factor 1 with padding. With the flex (DeepEP / HybridEP)
        # dispatcher, which does not pad, balanced routing at capacity factor 1 moves exactly
        # the dropless load, so such rows are simulated dropless.
        training.update(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)
    rc = row["recompute"].strip()
    if rc.startswith("selective:"):
        mods = rc.split(":", 1)[1].split("+")
        unknown = set(mods) - _RECOMPUTE_MODULES
        if unknown:
            raise ValueError(f"row {row['id']}: recompute modules {sorted(unknown)}")
        training.update(recompute_granularity="selective", recompute_modules=mods)
    elif rc.startswith("full:"):
        _, method, n = rc.split(":")
        training.update(recompute_granularity="full", recompute_method=method, recompute_num_layers=int(n))
    elif rc != "none":
        raise ValueError(f"row {row['id']}: recompute {rc!r}")
    for flag in filter(None, row["overlap"].split("+")):
        training[_OVERLAPS[flag]] = True
    tp, ep, etp = i("tp"), i("ep"), i("etp")
    layout: Dict[str, Any] = {
        "tensor_model_parallel_size": tp,
        "context_parallel_size": i("cp"),
        "pipeline_model_parallel_size": i("pp"),
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": etp,
    }
    if i("vpp") > 1:
        layout["virtual_pipeline_model_parallel_size"] = i("vpp")
    if row["pipeline_layout"].strip():
        layout["pipeline_model_parallel_layout"] = row["pipeline_layout"].strip()
    for item in filter(None, row["settings"].split(";")):
        k, v = item.split("=", 1)
        k, v = k.strip(), _value(v)
        if k == "moe_tp_extend_ep":
            # MindSpeed's --moe-tp-extend-ep: the experts are split over the TP x EP ranks with
            # no expert tensor parallelism, i.e. EP = tp * ep, ETP = 1 in Megatron's folding.
            if v:
                layout["expert_model_parallel_size"] = tp * ep
                layout["expert_tensor_parallel_size"] = 1
        elif k == "cuda_graph_scope":
            training[k] = str(v).split("+")
        elif k in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split"):
            layout[k] = v
        else:
            training[k] = v
    cluster: Dict[str, Any] = {"preset": row["cluster"], "devices": i("devices")}
    if efficiency:
        cluster.update(efficiency)
    return {"model": {"preset": row["model"]}, "cluster": cluster, "training": training, "layout": layout}


def family(row: Mapping[str, str]) -> str:
    return FAMILIES[_find_preset("clusters", row["cluster"])["name"]]


class _Row:
    """One row resolved once (presets looked up), simulated with any efficiencies."""

    def __init__(self, row: Mapping[str, str]):
        self.row = row
        self.id = row["id"]
        self.family = family(row)
        self.metric = row["metric"]
        self.published = float(row["published"])
        self.base = resolve_config(row_config(row))

    def report(self, eff: Mapping[str, float], imbalance: float = IMBALANCE_PRIOR) -> dict:
        cfg = {s: dict(v) for s, v in self.base.items()}
        cfg["cluster"].update(eff)
        if routed_unbalanced(self.row):
            cfg["training"]["moe_expert_load_imbalance"] = imbalance
        return json.loads(_native.sim.sim_simulate(_entries(cfg)))

    def predict(self, eff: Mapping[str, float], imbalance: float = IMBALANCE_PRIOR) -> float:
        return self.report(eff, imbalance)["time"][self.metric]


def _resolve(rows: Iterable[Union[Mapping[str, str], _Row]]) -> List[_Row]:
    return [r if isinstance(r, _Row) else _Row(r) for r in rows]


def predict(
    rows: Sequence[Mapping[str, str]],
    efficiency: Mapping[str, Mapping[str, float]],
    imbalance: float = IMBALANCE_PRIOR,
) -> List[Dict[str, Any]]:
    """Predicted metric of each row with ``efficiency[family]`` (and ``imbalance`` as the expert load
    imbalance of the dropless rows on real routing); relative errors."""
    if not (isinstance(imbalance, (int, float)) and imbalance >= 1.0):
        raise ValueError(f"imbalance: the busiest rank's load over the mean, >= 1 (got {imbalance!r})")
    out = []
    for r in _resolve(rows):
        rep = r.report(efficiency.get(r.family, {}), imbalance)
        p = rep["time"][r.metric]
        out.append({"id": r.id, "family": r.family, "published": r.published, "predicted": p,
                    "error": p / r.published - 1.0, "report": rep})
    return out


def fit(
    rows: Sequence[Union[Mapping[str, str], _Row]],
    *,
    noise: float = 0.03,
    prior_width: Optional[float] = None,
    iters: int = 300,
    start: Optional[Mapping[str, float]] = None,
) -> Dict[str, float]:
    """Fits one family's :data:`FIT_PARAMETERS` (maximum a posteriori, as :func:`calibrate`) on
    ``rows``; with no rows the priors come back."""
    res = _resolve(rows)
    fams = {r.family for r in res}
    if len(fams) > 1:
        raise ValueError(f"rows: one device family at a time (got {sorted(fams)})")
    pri = {k: FIT_PRIORS[k] for k in FIT_PARAMETERS}
    if not res:
        return dict(pri)
    if prior_width is None:
        prior_width = PRIOR_WIDTH[res[0].family]
    names = list(pri)

    def decode(x: Sequence[float]) -> Dict[str, float]:
        eff = {}
        for k, v in zip(names, x):
            val = pri[k] * math.exp(v)
            eff[k] = min(val, 1.0) if k.endswith("efficiency") else val
        return eff

    def objective(x: Sequence[float]) -> float:
        eff = decode(x)
        try:
            err = sum((math.log(r.predict(eff) / r.published) / noise) ** 2 for r in res)
        except ValueError:
            return 1e12
        return err + sum((v / prior_width) ** 2 for v in x)

    x0 = [math.log(start[k] / pri[k]) for k in names] if start else [0.0] * len(names)
    best = _nelder_mead(objective, x0, step=0.05 if start else 0.1, iters=iters)
    return {k: round(v, 4) for k, v in decode(best).items()}


def routed_unbalanced(row: Mapping[str, str]) -> bool:
    """Whether a row ran dropless on real routing (neither token drop nor forced balance), so that
    the busiest expert-parallel rank carries more than the mean load."""
    return row["balance"] == "dropless"


def fits_on(row: Mapping[str, str]) -> bool:
    """Whether the efficiencies may be fitted on a row: not when it ran dropless on real routing,
    whose load imbalance no source publishes; such rows fit the one routing parameter instead
    (:func:`fit_imbalance`)."""
    return not routed_unbalanced(row)


def fit_imbalance(
    rows: Sequence[Union[Mapping[str, str], _Row]],
    efficiency: Mapping[str, Mapping[str, float]],
    *,
    noise: float = 0.03,
    prior: float = IMBALANCE_PRIOR,
    prior_width: float = IMBALANCE_PRIOR_WIDTH,
) -> float:
    """Fits the expert load imbalance (busiest expert-parallel rank over the mean, >= 1) of dropless
    training on real routing: maximum a posteriori over those of ``rows`` that ran so, each
    predicted with its family's ``efficiency``, a log-normal prior around ``prior``; with no such
    rows the prior comes back."""
    res = [r for r in _resolve(rows) if routed_unbalanced(r.row)]
    if not res:
        return prior

    def objective(x: float) -> float:
        imb = prior * math.exp(x)
        err = sum((math.log(r.predict(efficiency.get(r.family, {}), imb) / r.published) / noise) ** 2 for r in res)
        return err + (x / prior_width) ** 2

    # Golden-section search on log(imbalance / prior) over [0, log 3]: the objective is unimodal
    # there (each predicted throughput falls monotonically with the imbalance).
    lo, hi = math.log(1.0 / prior), math.log(3.0 / prior)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = objective(a), objective(b)
    while hi - lo > 1e-4:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = objective(b)
    best = min((objective(lo), lo), (fa, a), (fb, b), (objective(hi), hi))[1]
    return round(prior * math.exp(best), 4)


def cross_validate(rows: Sequence[Mapping[str, str]], *, iters: int = 300) -> Dict[str, Any]:
    """In-sample fit, leave-one-out and leave-one-source-out over the rows with status ``ok``.

    The efficiencies are fitted per family on the rows :func:`fits_on` admits; the expert load
    imbalance (:func:`fit_imbalance`) on the dropless rows on real routing, with the efficiencies of
    the same fold. A held-out row is predicted from parameters fitted without it (leave-one-out) or
    without its source (leave-one-source-out).

    Returns ``{"fitted": {family: eff}, "imbalance": float, "rows": [{id, source, family,
    published, in_sample, loo, loso, imbalance_loo, imbalance_loso}]}`` (relative errors of the
    predicted metric; the imbalances are those the row was predicted with)."""
    res = [r for r in _resolve(rows) if r.row["status"] == "ok"]
    fams = sorted({r.family for r in res})
    fitting = [r for r in res if fits_on(r.row)]
    unbalanced = [r for r in res if routed_unbalanced(r.row)]
    fitted = {f: fit([r for r in fitting if r.family == f], iters=iters) for f in fams}
    imbalance = fit_imbalance(unbalanced, fitted)
    out = []
    loso_cache: Dict[tuple, Dict[str, float]] = {}
    loso_imb: Dict[str, float] = {}
    for r in res:
        same = [o for o in fitting if o.family == r.family]
        ins = r.predict(fitted[r.family], imbalance) / r.published - 1.0
        loo_eff = fit([o for o in same if o is not r], iters=iters, start=fitted[r.family])
        loo_imb = fit_imbalance([o for o in unbalanced if o is not r], {**fitted, r.family: loo_eff})
        loo = r.predict(loo_eff, loo_imb) / r.published - 1.0
        src = r.row["source"]
        for f in {r.family} | {o.family for o in unbalanced}:
            if (f, src) not in loso_cache:
                loso_cache[(f, src)] = fit([o for o in fitting if o.family == f and o.row["source"] != src],
                                           iters=iters, start=fitted[f])
        if src not in loso_imb:
            loso_imb[src] = fit_imbalance([o for o in unbalanced if o.row["source"] != src],
                                          {o.family: loso_cache[(o.family, src)] for o in unbalanced})
        loso = r.predict(loso_cache[(r.family, src)], loso_imb[src]) / r.published - 1.0
        out.append({"id": r.id, "source": src, "family": r.family, "model": r.row["model"],
                    "published": r.published, "in_sample": ins, "loo": loo, "loso": loso,
                    "imbalance_loo": loo_imb, "imbalance_loso": loso_imb[src]})
    return {"fitted": fitted, "imbalance": imbalance, "rows": out}


#: Columns that fix a run's layout and per-micro-batch work (two rows equal in all of them differ
#: only in the number of micro-batches each pipeline runs a step).
_SAME_LAYOUT = ("source", "model", "cluster", "precision", "seq_length", "micro_batch_size", "tp", "cp", "pp", "vpp",
                "ep", "etp", "pipeline_layout", "dispatcher", "balance", "recompute", "overlap", "settings", "metric")


def _positive_int(row: Mapping[str, str], column: str) -> int:
    """``row[column]`` as an int >= 1, or a ValueError naming the row and the column."""
    try:
        v = int(row[column])
    except (KeyError, TypeError, ValueError):
        v = None
    if v is None or v < 1:
        raise ValueError(f"row {row.get('id')!r}: column {column!r}: expected an integer >= 1, got {row.get(column)!r}")
    return v


def microbatches_per_pipeline(row: Mapping[str, str]) -> int:
    """Micro-batches each pipeline runs a step: global batch / (micro-batch x data-parallel size)."""
    if not isinstance(row, Mapping):
        raise TypeError(f"row: expected a mapping of the table's columns, got {type(row).__name__}")
    tp, cp, pp = (_positive_int(row, k) for k in ("tp", "cp", "pp"))
    dp, rest = divmod(_positive_int(row, "devices"), tp * cp * pp)
    if rest or dp < 1:
        raise ValueError(f"row {row['id']}: devices {row['devices']} is not a multiple of tp*cp*pp = {tp * cp * pp}")
    m, rest = divmod(_positive_int(row, "global_batch_size"), _positive_int(row, "micro_batch_size") * dp)
    if rest or m < 1:
        raise ValueError(f"row {row['id']}: global_batch_size {row['global_batch_size']} is not a multiple of "
                         f"micro_batch_size x data-parallel size ({row['micro_batch_size']} x {dp})")
    return m


def pipeline_fill_bound(rows: Sequence[Mapping[str, str]]) -> List[Dict[str, Any]]:
    """The most pipeline fill and drain the published numbers allow, where the table runs one layout
    at several micro-batch counts.

    A step of ``m`` micro-batches takes ``(m + b) * t + c``: ``t`` the time of one micro-batch on the
    binding stage, ``b`` the fill and drain in units of ``t`` (1F1B without virtual stages:
    ``pp - 1``; interleaved over ``v`` chunks: ``(pp - 1) / v``), ``c`` what a step costs once
    (exposed data-parallel communication, optimizer). At a fixed layout the throughput per device
    is proportional to ``m / step``. For two runs of one layout with ``m_s < m_l`` micro-batches,
    on at least as many devices for ``m_s`` (so ``c_s >= c_l``: the same per-step work on the same
    devices; along a sweep, a larger data-parallel group, whose exchanges outgrow its smaller optimizer
    shard), the ratio ``r`` of their published numbers bounds ``b`` whatever ``t``
    and ``c`` are: ``b <= m_s * m_l * (1 - r) / (r * m_l - m_s)`` (infinite when ``r <= m_s / m_l``).

    Returns one entry a pair: the pairs on the same device count (``c_s = c_l`` exactly) and, per
    layout, the pair of its fewest and most micro-batches; each with ``ids``, ``devices``,
    ``microbatches``, ``ratio``, ``bound``, ``one_f_one_b`` (the row's schedule: ``(pp - 1) / vpp``)
    and ``non_interleaved`` (``pp - 1``)."""
    groups: Dict[tuple, List[Mapping[str, str]]] = {}
    for r in rows:
        if not isinstance(r, Mapping):
            raise TypeError(f"rows: expected mappings of the table's columns, got {type(r).__name__}")
        if r.get("status", "ok") != "ok":
            continue
        missing = [k for k in _SAME_LAYOUT + ("published",) if k not in r]
        if missing:
            raise ValueError(f"rows: row {r.get('id')!r} lacks the column(s) {missing}")
        groups.setdefault(tuple(r[k] for k in _SAME_LAYOUT), []).append(r)
    out: List[Dict[str, Any]] = []
    for rs in groups.values():
        ms = {r["id"]: microbatches_per_pipeline(r) for r in rs}
        if len(set(ms.values())) < 2:
            continue
        fewest = min(rs, key=lambda r: (ms[r["id"]], -int(r["devices"])))
        most = max(rs, key=lambda r: (ms[r["id"]], -int(r["devices"])))
        pairs = [(a, b) for a in rs for b in rs if ms[a["id"]] < ms[b["id"]] and a["devices"] == b["devices"]]
        if (fewest, most) not in pairs:
            pairs.append((fewest, most))
        for a, b in pairs:
            if int(a["devices"]) < int(b["devices"]):
                continue
            m_s, m_l = ms[a["id"]], ms[b["id"]]
            r = float(a["published"]) / float(b["published"])
            den = r * m_l - m_s
            bound = math.inf if den <= 0 else max(0.0, m_s * m_l * (1.0 - r) / den)
            pp, vpp = int(a["pp"]), max(1, int(a["vpp"]))
            out.append({"ids": (a["id"], b["id"]), "devices": (int(a["devices"]), int(b["devices"])),
                        "microbatches": (m_s, m_l), "ratio": r, "bound": bound, "pp": pp, "vpp": vpp,
                        "one_f_one_b": (pp - 1) / vpp, "non_interleaved": pp - 1})
    return out
