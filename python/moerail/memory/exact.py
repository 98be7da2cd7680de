"""The held-bytes model of profiled costs: what a plan leaves on the device, as the size of a union
of the storages a keep-all step saved, and the plan with the least added time under a budget.

``moerail.memory.profile`` records (:class:`~moerail.memory.executor.SaveTrace`) which storages each
module's forward saved, each region's inputs, the outputs a recompute frees and what it saves
inside; this module applies the executor's rules to them for any per-layer assignment of actions:

* a *kept* module's saved storages stay; a *swapped* module's go to the host (those a swap moves:
  dense, on the device, over ``min_swap_bytes``) and come back, one device copy per saved view,
  when the backward of their group starts (with the next group's, one group ahead);
* a *recomputed* module's region drops everything saved inside it, holds its inputs, and frees the
  outputs it owns at the end of the layer's forward (whoever else saved them); when its group's
  backward starts it saves the same storages again and refills its outputs;
* a layer *recomputed whole* holds only its inputs, and rebuilds all it saved at its backward.

A storage the forward let go again before it ended (every save of it in a part of the graph
nothing used, e.g. a top-k's indices whose values went unused) is not held, except while the
recompute region that saves it replays. Neighbouring
modules interact through the union: a recompute's inputs that another recompute's
outputs are count nothing, a storage two modules saved stays while either keeps it. The peak is
the largest of: the end of the forward (everything held, the bytes saved outside the layers
before and after them), each layer's forward before it frees its recomputed outputs, and each
group's backward start (the layers before it held, its own kept bytes, its replays and swap-ins);
with ``k`` micro-batches in flight, ``k - 1`` whole ones under it. The added time is what the
profile measured per layer and action: a recompute's replay (its hooks included), a swap's cost
to the step (on CPU ranks the copies run on the cores that compute), a whole layer's replay.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from .plan import MODULES, Action

__all__ = ["evaluate", "search", "in_flight"]

WHOLE = "whole"


def in_flight(costs) -> int:
    """Micro-batches whose activations are alive at once on this stage (1F1B: ``p - rank``)."""
    if costs.pipeline_size <= 1:
        return 1
    return max(1, min(costs.num_microbatches, costs.pipeline_size - costs.pipeline_rank))


def _size(nb: Mapping[int, int], ids) -> int:
    return sum(nb.get(i, 0) for i in ids)


class _Layer:
    """One layer of one micro-batch in the trace, indexed for the set arithmetic."""

    def __init__(self, key: str, mb: Mapping[str, Any]) -> None:
        self.key = key
        self.inputs = set(mb["layers"][key]["inputs"])
        # A storage the forward let go again (``dropped``) is not held at the end of the forward, nor
        # when a whole layer's replay is over; a recompute region's replay saves it again (``inside``)
        # while the group's other bytes are held, and the model counts it there.
        dropped = set(mb.get("dropped", ()))
        self.saves = [s for s in mb["saves"] if f"{s['layer'][0]}:{s['layer'][1]}" == key and s["sid"] not in dropped]
        self.regions = [r for r in mb["regions"] if f"{r['layer'][0]}:{r['layer'][1]}" == key]
        self.all_saved = {s["sid"] for s in self.saves}

    def sets(self, acts) -> dict:
        if acts == WHOLE:
            return {"held": set(self.inputs), "freed": set(), "fwd": set(self.inputs),
                    "bm": self.all_saved | self.inputs, "ba": set(), "swap_m": 0, "swap_a": 0, "host": 0}
        active = [r for r in self.regions
                  if acts.get(r["module"], "keep") in r["actions"] or any(acts.get(m) == a for m, a in r["also"])]
        # A save made inside an active region is dropped (the same storage saved elsewhere stays).
        calls = {r["call"] for r in active}
        kept: Dict[int, set] = {}
        swapped: Dict[str, Dict[str, int]] = {"attn": {}, "mlp": {}}
        for s in self.saves:
            if calls.intersection(s["calls"]):
                continue
            if acts.get(s["module"]) == "swap" and s["swappable"]:
                swapped[s["group"] or "mlp"][s["view"]] = s["view_bytes"]
                continue
            kept.setdefault(s["sid"], set()).add(s["group"])
        by = {g: {"in": set(), "out": set(), "inside": set()} for g in ("attn", "mlp")}
        for r in active:
            b = by[r["group"]]
            b["in"].update(r["inputs"])
            b["out"].update(r["outputs"])
            b["inside"].update(r["inside"])
        inputs = by["attn"]["in"] | by["mlp"]["in"]
        freed = by["attn"]["out"] | by["mlp"]["out"]
        kept_all = set(kept)
        kept_attn = {i for i, gs in kept.items() if "attn" in gs or None in gs}
        sw_m, sw_a = sum(swapped["mlp"].values()), sum(swapped["attn"].values())
        return {
            "held": (kept_all | inputs) - freed,
            "freed": freed,
            "fwd": kept_all | inputs,
            "bm": (kept_all | inputs | by["mlp"]["inside"] | by["mlp"]["out"]) - by["attn"]["out"],
            "ba": kept_attn | by["attn"]["in"] | by["attn"]["inside"] | by["attn"]["out"],
            "swap_m": sw_m + sw_a,  # the attention group's come back one group ahead
            "swap_a": sw_a,
            "swap_mlp_only": sw_m,
            "host": sw_m + sw_a,
        }


class Model:
    """The trace of ``costs.saved_tensors`` indexed per micro-batch and layer."""

    def __init__(self, costs) -> None:
        st = costs.saved_tensors
        self.costs = costs
        self.keys = [f"{lc.layer}:{lc.vpp_stage}" for lc in costs.layers]
        self.mbs = []
        for mb in st["microbatches"]:
            if not all(k in mb["layers"] for k in self.keys):
                continue  # a partial micro-batch (a forward without grad, a trailing save)
            order = sorted(self.keys, key=lambda k: mb["layers"][k]["order"])
            nb = {int(k): v for k, v in mb["bytes"].items()}
            dropped = set(mb.get("dropped", ()))
            layers = {k: _Layer(k, mb) for k in order}
            pre, post = set(mb["pre"]) - dropped, set(mb["post"]) - dropped
            # A storage more than one layer (or the bytes outside the layers) names, e.g. the attention
            # mask every layer's input holds, is counted once in the search's sums: with the bytes
            # outside the layers before them, held all along (never less than it is).
            seen, shared = set(pre | post), set()
            for lay in layers.values():
                mine = lay.all_saved | lay.inputs | {i for r in lay.regions for f in ("inputs", "outputs", "inside")
                                                     for i in r[f]}
                shared |= mine & seen
                seen |= mine
            self.mbs.append({"bytes": nb, "order": order, "layers": layers, "pre": pre, "post": post,
                             "shared": shared, "layer_bytes": {i: (0 if i in shared else v) for i, v in nb.items()}})
        if not self.mbs:
            raise ValueError("costs: saved_tensors holds no complete micro-batch of this device's layers")
        self.seconds: Mapping[str, Mapping[str, float]] = st.get("seconds", {})
        self.k = in_flight(costs)

    # -- options ----------------------------------------------------------------------------------

    def choices(self, key: str, allow_swap: bool, allow_recompute: bool, allow_exchange: bool) -> List[Dict[str, List[str]]]:
        """Per module of the layer, the actions the trace says it can take."""
        out: Dict[str, List[str]] = {}
        for mb in self.mbs:
            lay = mb["layers"][key]
            for s in lay.saves:
                if s["module"] is not None:
                    acts = out.setdefault(s["module"], ["keep"])
                    if allow_swap and s["swappable"] and "swap" not in acts:
                        acts.append("swap")
            for r in lay.regions:
                acts = out.setdefault(r["module"], ["keep"])
                for a in r["actions"]:
                    ok = allow_exchange if a == Action.RECOMPUTE_EXCHANGE.value else allow_recompute
                    if ok and a not in acts:
                        acts.append(a)
        return {m: out[m] for m in MODULES if m in out}

    def seconds_of(self, key: str, acts) -> float:
        sec = self.seconds.get(key, {})
        if acts == WHOLE:
            return float(sec.get("layer:recompute", 0.0))
        return float(sum(sec.get(f"{m}:{a}", 0.0) for m, a in acts.items() if a != "keep"))

    def option_tables(self, key: str, options: _Options) -> np.ndarray:
        """``_vector_sizes`` of every assignment in ``options`` in every micro-batch:
        ``[micro-batch, option, (held, forward, mlp backward, attention backward, mlp swap-ins, host)]``
        (the storages other layers share left out: ``pre_post`` counts them)."""
        return np.stack([_vector_sizes(mb["layers"][key], mb["layer_bytes"], options) for mb in self.mbs])

    def layer_sizes(self, key: str, acts) -> np.ndarray:
        """(held, forward, mlp backward, attention backward, mlp swap-ins, host): bytes of this layer
        alone, per micro-batch (rows), the storages other layers share left out."""
        rows = []
        for mb in self.mbs:
            nb = mb["layer_bytes"]
            s = mb["layers"][key].sets(acts)
            rows.append((_size(nb, s["held"]), _size(nb, s["fwd"]), _size(nb, s["bm"]) + s["swap_m"],
                         _size(nb, s["ba"]) + s["swap_a"], s.get("swap_mlp_only", 0), s["host"]))
        return np.array(rows, dtype=np.float64)

    def layer_summary(self, key: str, acts) -> Tuple[float, ...]:
        """(held, forward, mlp backward, attention backward, mlp swap-ins, host, seconds): bytes of
        this layer alone, the largest over micro-batches."""
        vals = np.maximum(self.layer_sizes(key, acts).max(axis=0), 0.0)
        return (*vals, self.seconds_of(key, acts))

    # -- the exact evaluation -----------------------------------------------------------------------

    def evaluate(self, assignment: Mapping[str, Any]) -> dict:
        """The peak (static bytes included), host bytes and added seconds of an assignment
        ``{layer_key: {module: action}}`` or ``{layer_key: WHOLE}``."""
        peak_one = end_max = 0.0
        host = 0.0
        where = ""
        for mb in self.mbs:
            nb = mb["bytes"]

            def size(x, nb=nb):
                return _size(nb, x)

            sets = {k: mb["layers"][k].sets(assignment.get(k, {})) for k in mb["order"]}
            held_all = set(mb["pre"]) | mb["post"]
            freed_all = set()
            for k in mb["order"]:
                held_all |= sets[k]["held"]
                freed_all |= sets[k]["freed"]
            end = size(held_all - freed_all)
            end_max = max(end_max, end)
            cands = [(end, "end of the forward")]
            before, freed_before = set(mb["pre"]), set()
            prev = None
            for k in mb["order"]:
                s = sets[k]
                cands.append((size((before | s["fwd"]) - freed_before), f"layer {k.split(':')[0]} forward"))
                cands.append((size((before | s["bm"]) - freed_before) + s["swap_m"],
                              f"layer {k.split(':')[0]} MLP backward"))
                if assignment.get(k) != WHOLE:
                    look = prev.get("swap_mlp_only", 0) if prev is not None else 0
                    cands.append((size((before | s["ba"]) - freed_before) + s["swap_a"] + look,
                                  f"layer {k.split(':')[0]} attention backward"))
                before = before | s["held"]
                freed_before = freed_before | s["freed"]
                prev = s
            best = max(cands)
            if best[0] > peak_one:
                peak_one, where = best
            host = max(host, sum(s["host"] for s in sets.values()))
        k = self.k
        added = sum(self.seconds_of(key, assignment.get(key, {})) * self.costs.num_microbatches
                    for key in self.keys)
        peak = self.costs.static_bytes + (k - 1) * end_max + peak_one
        return {"peak_bytes": peak, "activation_bytes": k * end_max, "activation_bytes_keep_all":
                k * self._keep_end(), "transient_bytes": peak_one - end_max, "host_bytes": host * k,
                "added_seconds": added, "recompute_seconds": added, "exchange_seconds": 0.0,
                "swap_exposed_seconds": 0.0, "peak_at": where, "model": "saved tensors"}

    def _keep_end(self) -> float:
        out = 0.0
        for mb in self.mbs:
            ids = set(mb["pre"]) | mb["post"]
            for lay in mb["layers"].values():
                ids |= lay.all_saved
            out = max(out, sum(mb["bytes"].get(i, 0) for i in ids))
        return out

    def pre_post(self) -> Tuple[np.ndarray, np.ndarray]:
        """Per micro-batch, the bytes saved outside the layers before them (with the storages
        several layers share) and after them."""
        pre = [sum(mb["bytes"].get(i, 0) for i in mb["pre"] | mb["shared"]) for mb in self.mbs]
        post = [sum(mb["bytes"].get(i, 0) for i in mb["post"] - mb["shared"]) for mb in self.mbs]
        return np.array(pre, dtype=np.float64), np.array(post, dtype=np.float64)


class _Options:
    """Every assignment of ``choices`` (module -> its actions) as a matrix of action codes."""

    def __init__(self, choices: Mapping[str, List[str]]) -> None:
        self.names = list(choices)
        self.acts = [list(choices[m]) for m in self.names]
        sizes = [len(a) for a in self.acts]
        self.codes = np.indices(sizes).reshape(len(sizes), -1).T if sizes else np.zeros((1, 0), dtype=int)

    def __len__(self) -> int:
        return len(self.codes)

    def is_(self, module: str, action: str) -> np.ndarray:
        if module not in self.names or action not in self.acts[self.names.index(module)]:
            return np.full(len(self), action == "keep")
        i = self.names.index(module)
        return self.codes[:, i] == self.acts[i].index(action)

    def __getitem__(self, row: int) -> Dict[str, str]:
        return {m: a[c] for m, a, c in zip(self.names, self.acts, self.codes[row]) if a[c] != "keep"}

    def seconds(self, sec: Mapping[str, float]) -> np.ndarray:
        out = np.zeros(len(self))
        for i, m in enumerate(self.names):
            per = np.array([float(sec.get(f"{m}:{a}", 0.0)) if a != "keep" else 0.0 for a in self.acts[i]])
            out += per[self.codes[:, i]]
        return out


def _vector_sizes(lay: _Layer, nb: Mapping[int, int], opts) -> np.ndarray:
    """(held, forward, mlp backward, attention backward, mlp swap-ins, host) for each option: what
    ``_Layer.sets`` computes, for all options at once."""
    sids = sorted(lay.all_saved | lay.inputs | {i for r in lay.regions for f in ("inputs", "outputs", "inside")
                                                 for i in r[f]})
    at = {s: j for j, s in enumerate(sids)}
    b = np.array([nb.get(s, 0) for s in sids], dtype=np.float64)
    n = len(opts)
    if isinstance(opts, _Options):
        is_ = opts.is_
    else:
        def is_(m, a):
            return np.array([o.get(m, "keep") == a for o in opts])

    R = lay.regions
    act = np.zeros((n, len(R)), dtype=bool)
    for j, r in enumerate(R):
        v = np.zeros(n, dtype=bool)
        for a in r["actions"]:
            v |= is_(r["module"], a)
        for m, a in r["also"]:
            v |= is_(m, a)
        act[:, j] = v

    def mat(field, which):
        M = np.zeros((len(R), len(sids)))
        for j, r in enumerate(R):
            if which is None or r["group"] == which:
                M[j, [at[i] for i in r[field]]] = 1
        return M

    actf = act.astype(np.float64)

    def hit(field, which=None):
        return (actf @ mat(field, which)) > 0

    SV = lay.saves
    sv_sid = np.array([at[s["sid"]] for s in SV], dtype=int)
    C = np.zeros((len(R), len(SV)))
    for j, r in enumerate(R):
        for k, sv in enumerate(SV):
            if r["call"] in sv["calls"]:
                C[j, k] = 1
    swap_ok = np.array([s["swappable"] for s in SV], dtype=bool)
    swap_of = {m: is_(m, "swap") for m in {s["module"] for s in SV}}
    sw = np.zeros((n, len(SV)), dtype=bool)
    for j, s in enumerate(SV):
        sw[:, j] = swap_of[s["module"]] & swap_ok[j]
    live = (actf @ C) == 0
    sw &= live
    kp = live & ~sw

    def to_sid(mask, cols):
        M = np.zeros((len(SV), len(sids)))
        M[cols, sv_sid[cols]] = 1
        return (mask.astype(np.float64) @ M) > 0

    allc = np.arange(len(SV))
    attn_c = np.array([j for j, s in enumerate(SV) if s["group"] in ("attn", None)], dtype=int)
    kept_all = to_sid(kp, allc)
    kept_attn = to_sid(kp, attn_c)
    views: Dict[str, int] = {}
    for s in SV:
        views.setdefault(s["view"], len(views))

    def swapped_bytes(group):
        cols = [j for j, s in enumerate(SV) if (s["group"] or "mlp") == group]
        V = np.zeros((len(SV), len(views)))
        vb = np.zeros(len(views))
        for j in cols:
            V[j, views[SV[j]["view"]]] = 1
            vb[views[SV[j]["view"]]] = SV[j]["view_bytes"]
        return ((sw.astype(np.float64) @ V) > 0) @ vb

    sw_m, sw_a = swapped_bytes("mlp"), swapped_bytes("attn")
    in_a, in_m = hit("inputs", "attn"), hit("inputs", "mlp")
    out_a, out_m = hit("outputs", "attn"), hit("outputs", "mlp")
    ins_a, ins_m = hit("inside", "attn"), hit("inside", "mlp")
    fwd = kept_all | in_a | in_m
    held = fwd & ~(out_a | out_m)
    bm = (fwd | ins_m | out_m) & ~out_a
    ba = kept_attn | in_a | ins_a | out_a
    return np.stack([held @ b, fwd @ b, bm @ b + sw_m + sw_a, ba @ b + sw_a, sw_m, sw_m + sw_a], axis=1)


def _pareto(points: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Indices of the rows no other row is <= in every column (the first of equal rows kept).
    In lexicographic order no row is dominated by a later one, so each chunk of rows is checked
    against the rows kept before it at once, then among itself."""
    order = np.lexsort(points.T[::-1])
    kept: List[int] = []
    kept_pts = np.zeros((0, points.shape[1]))
    for start in range(0, len(order), chunk):
        ids = order[start:start + chunk]
        pts = points[ids]
        if len(kept_pts):
            dom = np.zeros(len(ids), dtype=bool)
            for k0 in range(0, len(kept_pts), 2048):
                q = kept_pts[k0:k0 + 2048]
                dom |= (q[None, :, :] <= pts[:, None, :]).all(axis=2).any(axis=1)
            ids, pts = ids[~dom], pts[~dom]
        mine: List[int] = []
        for r in range(len(ids)):
            if mine and (pts[mine] <= pts[r]).all(axis=1).any():
                continue
            mine.append(r)
        kept.extend(ids[mine].tolist())
        kept_pts = np.concatenate([kept_pts, pts[mine]])
    return np.array(kept, dtype=int)


def evaluate(costs, assignment) -> dict:
    return Model(costs).evaluate(assignment)


def search(costs, budget: float, *, allow_swap: bool = True, allow_recompute: bool = True,
           allow_exchange: bool = True, frontier_limit: int = 2048):
    """The assignment with the least added seconds whose peak fits ``budget``: every per-layer
    assignment of the actions the trace allows (and the whole-layer recompute), their frontier,
    then the layers combined in forward order (sum of held bytes, the largest candidate so far),
    the winner evaluated exactly. The combination runs twice: on each layer's largest bytes over
    the micro-batches, and micro-batch by micro-batch (``_per_microbatch``: the routing that fills
    one layer's experts need not fill the next one's in the same micro-batch, so the largest of
    each layer added up can be well above any micro-batch's peak); the cheaper plan that the exact
    evaluation keeps under ``budget`` wins. Returns ``(assignment, evaluation,
    exact)``; ``None`` for the assignment when no plan fits (the evaluation is then the least peak
    reachable)."""
    model = Model(costs)
    order = model.mbs[0]["order"]
    per_layer, tables = [], []
    for key in order:
        options = _Options(model.choices(key, allow_swap and costs.host_bytes > 0, allow_recompute, allow_exchange))
        tab = model.option_tables(key, options)
        vals = np.concatenate([np.maximum(tab.max(axis=0), 0.0), options.seconds(model.seconds.get(key, {}))[:, None]],
                              axis=1)
        opts: List[Any] = list(range(len(options)))
        if allow_recompute:
            vals = np.concatenate([vals, np.array([model.layer_summary(key, WHOLE)])])
            tab = np.concatenate([tab, model.layer_sizes(key, WHOLE)[:, None, :]], axis=1)
            opts.append(WHOLE)
        # What the combination reads: held, max(forward, MLP backward), attention backward (it
        # meets the previous layer's MLP swap-ins), MLP swap-ins, host, seconds.
        H, F, Bm, Ba, Sm, host, t = vals.T
        swaps = Sm.max() > 0
        red = np.stack([H, np.maximum(F, Bm) if swaps else np.maximum.reduce([F, Bm, Ba]), Ba if swaps else 0 * Ba,
                        Sm, host, t], axis=1)
        cols = [c for c in range(6) if red[:, c].max() > red[:, c].min()]
        keep = _pareto(red[:, cols]) if cols else np.array([int(np.argmin(t))])
        per_layer.append(([opts[i] if opts[i] == WHOLE else options[opts[i]] for i in keep], vals[keep]))
        tables.append(tab[:, keep, :])
    pre_mb, post_mb = model.pre_post()
    # Each layer's largest bytes over the micro-batches, as one micro-batch.
    found = [_combine(model, costs, budget, order, [o for o, _ in per_layer],
                      [v[None, :, :6] for _, v in per_layer], [v[:, 6] for _, v in per_layer],
                      pre_mb.max(keepdims=True), post_mb.max(keepdims=True), frontier_limit)]
    found.append(_per_microbatch(model, costs, budget, per_layer, tables, pre_mb, post_mb, frontier_limit))
    fits = []
    for assignment, exact in found:
        if assignment is None:
            continue
        ev = model.evaluate(assignment)
        if ev["peak_bytes"] <= budget * (1 + 1e-12):
            fits.append((ev["added_seconds"], ev["peak_bytes"], len(fits), assignment, ev, exact))
    if not fits:
        return None, _least(model, per_layer, order), all(exact for _, exact in found)
    _, _, _, assignment, ev, exact = min(fits, key=lambda f: f[:3])
    return assignment, ev, exact


def _covering(tables: List[np.ndarray], pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """The micro-batches (indices) whose bytes no other micro-batch's are at least, for every
    option of every layer and outside the layers: a plan that fits them fits the others."""
    vec = np.concatenate([pre[:, None], post[:, None]] + [t[:, :, :5].reshape(len(pre), -1) for t in tables], axis=1)
    order = np.lexsort(vec.T[::-1])[::-1]  # largest first: none is covered by a later one
    kept: List[int] = []
    for i in order:
        if kept and (vec[kept] >= vec[i]).all(axis=1).any():
            continue
        kept.append(int(i))
    return np.array(sorted(kept), dtype=int)


def _per_microbatch(model: Model, costs, budget: float, per_layer, tables: List[np.ndarray], pre: np.ndarray,
                    post: np.ndarray, frontier_limit: int, most: int = 16):
    """The layers combined micro-batch by micro-batch, as constraints added when violated: the
    combination runs on a few micro-batches (first the one with the most bytes), the plan it finds is
    checked against every micro-batch no other covers, the ones it overflows join, until it fits them
    all (then it is the cheapest plan for all of them: the few were a relaxation) or ``most`` have
    joined (``None``). A state has three numbers a micro-batch: the frontier is kept smaller with more.
    Returns ``(assignment, exact)``."""
    mbs = _covering(tables, pre, post)
    tabs, pre, post = [t[mbs] for t in tables], pre[mbs], post[mbs]
    host = [v[:, 5] for _, v in per_layer]
    index = [list(range(len(o))) for o, _ in per_layer]
    layers = list(range(len(per_layer)))
    limit = costs.static_bytes, model.k, budget * (1 + 1e-12)
    active = [int(np.argmax(pre + post + sum(t[:, :, 0].max(axis=1) for t in tabs)))]
    exact = True
    while True:
        a = np.array(active)
        got, ex = _combine(model, costs, budget, layers, index,
                           [np.concatenate([t[a, :, :5], np.broadcast_to(h[None, :, None], (len(a), len(h), 1))], axis=2)
                            for t, h in zip(tabs, host)],
                           [v[:, 6] for _, v in per_layer], pre[a], post[a], max(256, frontier_limit // len(a)))
        exact = exact and ex
        if got is None:
            return None, exact
        S, M, Sm0 = 0.0, pre, 0.0
        for n, t in enumerate(tabs):
            H, F, Bm, Ba, Sm = t[:, got[n], :5].T
            M = np.maximum.reduce([M, pre + S + F, pre + S + Bm, pre + S + Ba + Sm0])
            S, Sm0 = S + H, Sm
        end = pre + S + post
        peak = np.maximum(M, end)
        if limit[0] + peak.max() + (limit[1] - 1) * end.max() <= limit[2]:
            return {key: per_layer[n][0][got[n]] for n, key in enumerate(model.mbs[0]["order"])}, exact
        new = [m for m in dict.fromkeys((int(np.argmax(peak)), int(np.argmax(end)))) if m not in active]
        if not new or len(active) >= most:
            return None, exact
        active += new


def _combine(model: Model, costs, budget: float, order, options, bytes_, seconds, pre: np.ndarray,
             post: np.ndarray, frontier_limit: int, chunk: int = 1 << 22):
    """The layers combined in forward order: ``bytes_[layer]`` is ``[micro-batch, option, (held,
    forward, mlp backward, attention backward, mlp swap-ins, host)]``, ``seconds[layer]`` per option,
    ``pre`` / ``post`` per micro-batch. A state holds per micro-batch the bytes held so far (S), the
    largest candidate so far (M) and the last layer's MLP swap-ins, then the host bytes and seconds;
    the peak is the largest over the micro-batches. The states are combined with a layer's options
    ``chunk`` numbers at a time. Returns ``(assignment, exact)``; ``None`` for the assignment when no
    plan fits."""
    static = costs.static_bytes
    k = model.k
    r = len(pre)
    states = np.zeros((1, 3 * r + 2))
    states[0, r:2 * r] = pre
    choice: List[List[Any]] = [[]]
    exact = True
    host_binds = sum(float(v[:, :, 5].max()) for v in bytes_) * k > costs.host_bytes
    for n, (opts, vals, t) in enumerate(zip(options, bytes_, seconds)):
        last = n == len(options) - 1
        # [state, option, micro-batch]
        H, F, Bm, Ba, Sm = (vals[:, :, c].T[None] for c in range(5))
        host = vals[0, :, 5]
        step = max(1, chunk // (len(opts) * r))
        cands, idxs, found, best = [], [], 0, None
        for s0 in range(0, len(states), step):
            part = states[s0:s0 + step]
            S0, M0, Sm0 = (part[:, None, i * r:(i + 1) * r] for i in range(3))
            h0, t0 = part[:, 3 * r:3 * r + 1], part[:, 3 * r + 1:]
            S = S0 + H
            M = np.maximum.reduce([M0 + 0 * H, pre + S0 + F, pre + S0 + Bm, pre + S0 + Ba + Sm0])
            end = pre + S + post
            hh = h0 + host
            tt = t0 + t
            ok = static + np.maximum(M, end).max(axis=2) + (k - 1) * end.max(axis=2) <= budget * (1 + 1e-12)
            ok &= hh * k <= costs.host_bytes + 1e-9
            idx = np.argwhere(ok)
            if len(idx) == 0:
                continue
            idx[:, 0] += s0
            if last:
                j = int(np.argmin(tt[ok]))
                if best is None or tt[ok][j] < best[0]:
                    best = (tt[ok][j], idx[j])
                continue
            cand = np.concatenate([S[ok], M[ok], np.broadcast_to(Sm, S.shape)[ok], hh[ok][:, None],
                                   tt[ok][:, None]], axis=1)
            found += len(cand)
            if len(cand) > 8 * frontier_limit:
                first = np.argsort(cand[:, -1], kind="stable")[: 8 * frontier_limit]
                idx, cand = idx[first], cand[first]
            cands.append(cand)
            idxs.append(idx)
        if last:
            if best is None:
                return None, exact
            i, j = best[1]
            return dict(zip(order, choice[i] + [opts[j]])), exact
        if not found:
            return None, exact
        cand, idx = np.concatenate(cands), np.concatenate(idxs)
        if not host_binds:
            cand[:, 3 * r] = 0.0
        if found > 8 * frontier_limit:
            first = np.argsort(cand[:, -1], kind="stable")[: 8 * frontier_limit]
            idx, cand = idx[first], cand[first]
            exact = False
        keep = _pareto(cand)
        if len(keep) > frontier_limit:
            keep = keep[np.argsort(cand[keep, -1], kind="stable")[:frontier_limit]]
            exact = False
        choice = [choice[idx[i][0]] + [opts[idx[i][1]]] for i in keep]
        states = cand[keep]
    return None, exact


def _least(model: Model, per_layer, order) -> dict:
    """The evaluation of the assignment with the least held bytes (every layer its smallest)."""
    assignment = {}
    for key, (opts, vals) in zip(order, per_layer):
        assignment[key] = opts[int(np.argmin(vals[:, 0] + vals[:, 2]))]
    return model.evaluate(assignment)


def assignment_of(plan, costs) -> Dict[str, Any]:
    out = {}
    for lc in costs.layers:
        key = f"{lc.layer}:{lc.vpp_stage}"
        if plan.recompute_layer(lc.layer, lc.vpp_stage):
            out[key] = WHOLE
        else:
            out[key] = {m: plan.action(lc.layer, m, lc.vpp_stage).value for m in MODULES
                        if plan.action(lc.layer, m, lc.vpp_stage) is not Action.KEEP}
    return out


def rows_of(assignment: Mapping[str, Any], costs) -> List[List[str]]:
    rows = []
    for lc in costs.layers:
        a = assignment.get(f"{lc.layer}:{lc.vpp_stage}", {})
        rows.append(["recompute_layer"] * len(MODULES) if a == WHOLE else [a.get(m, "keep") for m in MODULES])
    return rows

