"""Core MoE ops on CPU: moerail against Megatron-Core's own ``moe_utils`` functions, in the same run.

Every op is timed against its Megatron-Core counterpart (the unfused CPU path) on the same inputs,
and every moerail result is checked against Megatron's (or an fp64 reference) before its timing is
reported: a mismatch prints ``MISMATCH`` in place of the speedup, so a wrong fast path cannot score.

The dispatch ops (permute, unpermute, sort_chunks) are measured twice: in this process (torch's
default CPU allocator, which hands large tensors out as fresh ``mmap`` pages, so each call pays the
kernel's page faults on its output), and in a child process started with ``THP_MEM_ALLOC_ENABLE=1``
(torch's switch for 2 MiB-aligned allocations with transparent huge pages), where writing fresh
memory costs far less and the kernels themselves show.

Run it through the harness: ``python benches/run_all.py --only ops [--quick]``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import moerail  # noqa: E402

TITLE = "Core MoE ops on CPU vs Megatron-Core"

EP = 8  # expert-parallel ranks assumed by the sort_chunks_by_idxs case
CAPACITY_FACTOR = 1.0
AUX_COEFF = 1e-2
Z_COEFF = 1e-3

# Speed targets: (label, op key, minimum speedup over Megatron-Core, configs it applies to).
SPEEDUP_TARGETS = [
    ("permute with probs", "permute", 5.0, ("a", "b", "c")),
    ("unpermute with probs", "unpermute_probs", 10.0, ("a", "b", "c")),
    ("router top-k, plain", "router", 5.0, ("a", "c")),
    ("router top-k, group-limited", "router", 5.0, ("b",)),
]
MEMCPY_TARGET = 0.5  # permute: at least this fraction of the machine's memcpy bandwidth


class Config(NamedTuple):
    key: str
    tokens: int
    hidden: int
    experts: int
    topk: int
    dtype: torch.dtype
    score_function: str = "softmax"
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    scaling_factor: Optional[float] = None
    expert_bias: bool = False

    def describe(self) -> str:
        s = f"T={self.tokens}, H={self.hidden}, E={self.experts}, k={self.topk}, {_dtype_name(self.dtype)}"
        s += f", {self.score_function}"
        if self.num_groups:
            s += f", groups {self.num_groups}/{self.group_topk}"
        if self.expert_bias:
            s += " + expert bias"
        if self.scaling_factor:
            s += f", scaling {self.scaling_factor}"
        return s


def configs(quick: bool) -> List[Config]:
    """The three benchmark configurations (``quick``: the same shapes of routing, small sizes)."""
    t_ab, t_c = (256, 1024) if quick else (4096, 16384)
    h_a, h_b, h_c = (256, 512, 128) if quick else (2048, 7168, 1024)
    return [
        Config("a", t_ab, h_a, 64, 8, torch.bfloat16),
        Config("b", t_ab, h_b, 256, 8, torch.bfloat16, "sigmoid", 8, 4, 2.5, True),
        Config("c", t_c, h_c, 128, 2, torch.float32),
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}.get(dtype, str(dtype))


def _mcore():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core as mc
        from megatron.core.transformer.moe import moe_utils
    return mc.__version__, moe_utils


def _time(fn: Callable[[], object], quick: bool) -> float:
    """Median seconds of ``fn()``: one untimed call, then as many timed calls as fit ~1 s (3 to 25)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    budget = 0.05 if quick else 1.0
    repeat = max(3, min(25, int(budget / max(first, 1e-6))))
    return _common.timeit(fn, warmup=0, repeat=repeat)


# ----------------------------------------------------------------------------------------------
# Inputs and correctness checks
# ----------------------------------------------------------------------------------------------


def _inputs(cfg: Config, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(cfg.tokens, cfg.hidden, generator=g).to(cfg.dtype)
    logits = torch.randn(cfg.tokens, cfg.experts, generator=g).to(cfg.dtype)
    bias = (0.1 * torch.randn(cfg.experts, generator=g)) if cfg.expert_bias else None
    return tokens, logits, bias


def _route_kwargs(cfg: Config, bias) -> dict:
    return dict(
        num_groups=cfg.num_groups,
        group_topk=cfg.group_topk,
        scaling_factor=cfg.scaling_factor,
        score_function=cfg.score_function,
        expert_bias=bias,
    )


def _rtol(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(dtype, 1e-5)


def _check_route(cfg: Config, logits, bias, mc_out, mr_out) -> Optional[str]:
    """Tie-invariant comparison of two (probs [T, E], routing_map [T, E]) results.

    A row counts as agreeing if both pick the same experts, or experts whose selection keys are
    equal within fp32 rounding (ties, which Megatron's ``torch.topk`` breaks arbitrarily). At most
    0.1% of rows may disagree beyond that (fp32 near-ties of group sums); probs must match on rows
    with the same experts.
    """
    (mc_p, mc_m), (mr_p, mr_m) = mc_out, mr_out
    if mr_m.dtype != torch.bool or mr_m.shape != mc_m.shape:
        return f"routing_map {mr_m.dtype} {tuple(mr_m.shape)}"
    if not bool((mr_m.sum(1) == cfg.topk).all()):
        return "a row does not select exactly k experts"
    if cfg.score_function == "softmax":
        key = logits.float()
    else:
        key = torch.sigmoid(logits.float()) + (0 if bias is None else bias)
    same = (mc_m == mr_m).all(1)
    k = cfg.topk
    sel_mc = key.masked_fill(~mc_m, float("-inf")).topk(k, dim=1).values
    sel_mr = key.masked_fill(~mr_m, float("-inf")).topk(k, dim=1).values
    tie_ok = torch.isclose(sel_mc, sel_mr, rtol=1e-6, atol=0).all(1)
    bad = int((~(same | tie_ok)).sum())
    if bad > max(1, cfg.tokens // 1000):
        return f"{bad} of {cfg.tokens} rows pick different experts"
    if not torch.allclose(mr_p[same].float(), mc_p[same].float(), rtol=_rtol(cfg.dtype), atol=1e-6):
        return "probs differ"
    if not bool((mr_p[~mr_m] == 0).all()):
        return "probs nonzero outside the routing map"
    return None


def _check_unpermute(out, permuted, sorted_indices, weights, num_tokens) -> Optional[str]:
    """Against the fp64 sum: error within one rounding of the output dtype plus fp32 accumulation.
    Checked in blocks of columns to bound the fp64 copies' memory."""
    u = {torch.bfloat16: 2**-8, torch.float16: 2**-11}.get(out.dtype, 2**-24)
    copies = int(torch.bincount(sorted_indices, minlength=num_tokens).max()) if num_tokens else 0
    w = None if weights is None else weights.double().unsqueeze(1)
    worst = 0.0
    for c0 in range(0, permuted.shape[1], 256):
        x = permuted[:, c0 : c0 + 256].double()
        terms = x if w is None else x * w
        ref = torch.zeros(num_tokens, x.shape[1], dtype=torch.float64).index_add_(0, sorted_indices, terms)
        mag = torch.zeros_like(ref).index_add_(0, sorted_indices, terms.abs())
        tol = u * ref.abs() + (copies + 1) * 2**-24 * mag + 1e-30
        err = (out[:, c0 : c0 + 256].double() - ref).abs()
        if not bool((err <= tol).all()):
            worst = max(worst, float((err / tol).max()))
    if worst:
        return f"error vs fp64 up to {worst:.2f}x the one-rounding bound"
    return None


def _check_dropping(mc_out, mr_out, probs) -> Optional[str]:
    """Tie-invariant: each expert keeps the same multiset of probs and the same number of tokens."""
    (mc_p, mc_m), (mr_p, mr_m) = mc_out, mr_out
    if not torch.equal(mc_m.sum(0), mr_m.sum(0)):
        return "tokens kept per expert differ"
    if not torch.equal(mr_p, probs * mr_m):
        return "probs are not probs * kept"
    if not torch.equal(mc_p.sort(dim=0).values, mr_p.sort(dim=0).values):
        return "kept probs differ"
    return None


def _close(a, b, rtol) -> bool:
    return torch.allclose(a.float(), b.float(), rtol=rtol, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------

Row = Dict[str, object]  # op, cfg, mc, mr (seconds), bytes (effective, or None), check (None or str)


def _row(op: str, cfg: Config, mc: float, mr: float, check: Optional[str], nbytes: Optional[int] = None) -> Row:
    return {"op": op, "cfg": cfg.key, "mc": mc, "mr": mr, "check": check, "bytes": nbytes}


def measure_router(cfg: Config, mu, quick: bool) -> List[Row]:
    _, logits, bias = _inputs(cfg)
    kw = _route_kwargs(cfg, bias)
    rows = []

    def mc_route(lg):
        return mu.topk_routing_with_score_function(lg, cfg.topk, **kw)

    def mr_route(lg):
        return moerail.topk_route(lg, cfg.topk, **kw)

    # Megatron-Core 0.16 rounds sigmoid scores to the logits' dtype before selecting; moerail selects
    # in fp32. The check compares with Megatron run on the same logits in fp32.
    ref = mc_route(logits.float())
    ref = (ref[0].to(cfg.dtype), ref[1])
    mr_out = mr_route(logits)
    check = _check_route(cfg, logits, bias, ref, mr_out)
    rows.append(_row("router", cfg, _time(lambda: mc_route(logits), quick), _time(lambda: mr_route(logits), quick), check))
    if cfg.dtype != torch.float32:
        differ = int((mc_route(logits)[1] != mr_out[1]).any(dim=1).sum())
        differ_fp32 = int((ref[1] != mr_out[1]).any(dim=1).sum())
        rows[-1]["info"] = (
            f"({cfg.key}): moerail's experts differ from Megatron-Core's on {differ} of {cfg.tokens} rows with "
            f"{_dtype_name(cfg.dtype)} logits, on {differ_fp32} with the same logits in fp32"
        )

    grad = torch.randn(cfg.tokens, cfg.experts, generator=torch.Generator().manual_seed(1)).to(cfg.dtype)

    def fwd_bwd(route, lg0):
        lg = lg0.detach().requires_grad_()
        probs, _ = route(lg)
        probs.backward(grad)
        return lg.grad

    g_ref = fwd_bwd(mc_route, logits.float())
    g_mr = fwd_bwd(mr_route, logits)
    same = (ref[1] == mr_out[1]).all(1)
    check_bwd = check
    if check is None and not _close(g_mr[same], g_ref[same], 4 * _rtol(cfg.dtype)):
        check_bwd = "logits grad differs"
    rows.append(
        _row(
            "router_fwd_bwd",
            cfg,
            _time(lambda: fwd_bwd(mc_route, logits), quick),
            _time(lambda: fwd_bwd(mr_route, logits), quick),
            check_bwd,
        )
    )
    return rows


def measure_dropping(cfg: Config, mu, quick: bool) -> Row:
    _, logits, bias = _inputs(cfg)
    probs, rmap = moerail.topk_route(logits, cfg.topk, **_route_kwargs(cfg, bias))
    args = (probs, rmap, cfg.topk, CAPACITY_FACTOR)
    check = _check_dropping(mu.apply_router_token_dropping(*args), moerail.apply_token_dropping(*args), probs)
    return _row(
        "token_dropping",
        cfg,
        _time(lambda: mu.apply_router_token_dropping(*args), quick),
        _time(lambda: moerail.apply_token_dropping(*args), quick),
        check,
    )


def measure_losses(cfg: Config, mu, quick: bool) -> List[Row]:
    _, logits, _ = _inputs(cfg)
    t, e, k, sf = cfg.tokens, cfg.experts, cfg.topk, cfg.score_function

    def mc_aux(lg0):
        lg = lg0.detach().requires_grad_()
        rmap, scores = mu.compute_routing_scores_for_aux_loss(lg, k, sf)
        loss = mu.switch_load_balancing_loss_func(scores, rmap.sum(dim=0), t, k, e, AUX_COEFF)
        loss.backward()
        return loss, lg.grad

    def mr_aux(lg0):
        lg = lg0.detach().requires_grad_()
        _, scores, tpe = moerail.routing_scores_for_aux_loss(lg, k, sf, return_tokens_per_expert=True)
        loss = moerail.switch_load_balancing_loss(scores, tpe, t, k, e, AUX_COEFF)
        loss.backward()
        return loss, lg.grad

    def mc_z(lg0):
        lg = lg0.detach().requires_grad_()
        loss = mu.z_loss_func(lg, Z_COEFF)
        loss.backward()
        return loss, lg.grad

    def mr_z(lg0):
        lg = lg0.detach().requires_grad_()
        loss = moerail.z_loss(lg, Z_COEFF)
        loss.backward()
        return loss, lg.grad

    rows = []
    for op, mc_fn, mr_fn in (("aux_loss", mc_aux, mr_aux), ("z_loss", mc_z, mr_z)):
        # Reference in fp32 (Megatron 0.16 takes the sigmoid and logsumexp in the logits' dtype).
        (l_ref, g_ref), (l_mr, g_mr) = mc_fn(logits.float()), mr_fn(logits)
        check = None
        if not _close(l_mr, l_ref, max(1e-4, _rtol(l_mr.dtype))):
            check = f"loss {float(l_mr):.6g} vs {float(l_ref):.6g}"
        elif not _close(g_mr, g_ref.to(cfg.dtype), 4 * _rtol(cfg.dtype)):
            check = "logits grad differs"
        rows.append(_row(op, cfg, _time(lambda f=mc_fn: f(logits), quick), _time(lambda f=mr_fn: f(logits), quick), check))
    return rows


def measure_dispatch(cfg: Config, mu, quick: bool, threads: bool = False) -> List[Row]:
    """permute (with probs), unpermute (with and without probs), sort_chunks_by_idxs; with
    ``threads``, moerail's permute and unpermute with probs again on one thread."""
    tokens, logits, bias = _inputs(cfg)
    probs, rmap = moerail.topk_route(logits, cfg.topk, **_route_kwargs(cfg, bias))
    n = int(rmap.sum())
    esize = tokens.element_size()
    t, h = tokens.shape
    rows = []

    # permute: rows bit-identical to Megatron's.
    mc_out = mu.permute(tokens, rmap, probs=probs, num_out_tokens=n)[:3]
    mr_out = moerail.permute(tokens, rmap, probs=probs, num_out_tokens=n)[:3]
    check = None
    for name, a, b in zip(("permuted tokens", "permuted probs", "sorted_indices"), mc_out, mr_out):
        if not torch.equal(a, b):
            check = f"{name} differ from Megatron's"
            break
    del mr_out
    permuted, permuted_probs, sorted_indices = mc_out
    rows.append(
        _row(
            "permute",
            cfg,
            _time(lambda: mu.permute(tokens, rmap, probs=probs, num_out_tokens=n), quick),
            _time(lambda: moerail.permute(tokens, rmap, probs=probs, num_out_tokens=n), quick),
            check,
            2 * n * h * esize,
        )
    )

    # unpermute with probs [T, E] (the probs-weighted combine) and without.
    shape = tokens.shape
    out = moerail.unpermute(permuted, sorted_indices, shape, probs=probs, routing_map=rmap)
    check = _check_unpermute(out, permuted, sorted_indices, permuted_probs, t)
    rows.append(
        _row(
            "unpermute_probs",
            cfg,
            _time(lambda: mu.unpermute(permuted, sorted_indices, shape, probs=probs, routing_map=rmap), quick),
            _time(lambda: moerail.unpermute(permuted, sorted_indices, shape, probs=probs, routing_map=rmap), quick),
            check,
            (n + t) * h * esize,
        )
    )
    out = moerail.unpermute(permuted, sorted_indices, shape)
    check = _check_unpermute(out, permuted, sorted_indices, None, t)
    del out
    rows.append(
        _row(
            "unpermute",
            cfg,
            _time(lambda: mu.unpermute(permuted, sorted_indices, shape), quick),
            _time(lambda: moerail.unpermute(permuted, sorted_indices, shape), quick),
            check,
            (n + t) * h * esize,
        )
    )

    # sort_chunks_by_idxs: chunks [rank][local expert] (as received after the all-to-all) ->
    # [local expert][rank], with the permuted probs alongside.
    local = cfg.experts // EP
    split_sizes = rmap.sum(dim=0)
    sorted_idxs = torch.tensor([r * local + le for le in range(local) for r in range(EP)])
    mc_sc = mu.sort_chunks_by_idxs(permuted, split_sizes, sorted_idxs, probs=permuted_probs)
    mr_sc = moerail.sort_chunks_by_idxs(permuted, split_sizes, sorted_idxs, probs=permuted_probs)
    check = None if torch.equal(mc_sc[0], mr_sc[0]) and torch.equal(mc_sc[1], mr_sc[1]) else "output differs"
    del mc_sc, mr_sc
    rows.append(
        _row(
            "sort_chunks",
            cfg,
            _time(lambda: mu.sort_chunks_by_idxs(permuted, split_sizes, sorted_idxs, probs=permuted_probs), quick),
            _time(lambda: moerail.sort_chunks_by_idxs(permuted, split_sizes, sorted_idxs, probs=permuted_probs), quick),
            check,
            2 * n * h * esize,
        )
    )

    if threads:
        all_threads = moerail.get_num_threads()
        one = {}
        moerail.set_num_threads(1)
        try:
            one["permute"] = _time(lambda: moerail.permute(tokens, rmap, probs=probs, num_out_tokens=n), quick)
            one["unpermute_probs"] = _time(
                lambda: moerail.unpermute(permuted, sorted_indices, shape, probs=probs, routing_map=rmap), quick
            )
        finally:
            moerail.set_num_threads(all_threads)
        for r in rows:
            if r["op"] in one:
                r["mr_1t"] = one[r["op"]]
                r["threads"] = all_threads
    return rows


def fresh_memory_floor(cfg: Config, quick: bool) -> Tuple[float, float, int]:
    """Seconds to allocate-and-write a tensor the size of permute's output, and to write the same
    bytes into memory already touched: the page-fault cost every fresh output pays."""
    rows = cfg.tokens * cfg.topk
    nbytes = rows * cfg.hidden * torch.empty((), dtype=cfg.dtype).element_size()
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    fresh = _time(lambda: torch.empty(nbytes, dtype=torch.uint8).fill_(0), quick)
    touched = _time(lambda: dst.fill_(0), quick)
    return fresh, touched, nbytes


def measure_dispatch_all(quick: bool) -> dict:
    _, mu = _mcore()
    cfgs = configs(quick)
    rows = []
    for cfg in cfgs:
        rows += measure_dispatch(cfg, mu, quick, threads=cfg.key == "a")
    fresh, touched, nbytes = fresh_memory_floor(cfgs[0], quick)
    return {"rows": rows, "floor": {"fresh": fresh, "touched": touched, "bytes": nbytes}}


def _dispatch_in_child(quick: bool) -> Tuple[Optional[dict], str]:
    """The dispatch measurements in a child process with ``THP_MEM_ALLOC_ENABLE=1`` (read by torch
    once, at start-up)."""
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1")
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--dispatch-worker"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

OP_NAMES = {
    "router": "router top-k, forward",
    "router_fwd_bwd": "router top-k, forward + backward",
    "token_dropping": f"token dropping (capacity factor {CAPACITY_FACTOR}, probs policy)",
    "aux_loss": "aux-loss scores + switch loss, fwd + bwd",
    "z_loss": "z-loss, fwd + bwd",
    "permute": "permute with probs",
    "unpermute_probs": "unpermute with probs",
    "unpermute": "unpermute without probs",
    "sort_chunks": f"sort_chunks_by_idxs (EP={EP} x local experts, with probs)",
}


def _speedup(r: Row) -> Optional[float]:
    return None if r["check"] is not None else r["mc"] / r["mr"]


def _fmt_speedup(r: Row) -> str:
    s = _speedup(r)
    return f"**MISMATCH** ({r['check']})" if s is None else f"{s:.1f}x"


def _table(rows: List[Row], memcpy: float, with_bw: bool) -> str:
    header = ["op", "config", "Megatron-Core ms", "moerail ms", "speedup"]
    if with_bw:
        header += ["GB/s Megatron / moerail", "moerail % of memcpy"]
    out = []
    for r in rows:
        line = [OP_NAMES[r["op"]], r["cfg"], _common.ms(r["mc"]), _common.ms(r["mr"]), _fmt_speedup(r)]
        if with_bw:
            if r["bytes"]:
                gb_mc, gb_mr = r["bytes"] / r["mc"] / 1e9, r["bytes"] / r["mr"] / 1e9
                line += [f"{gb_mc:.1f} / {gb_mr:.1f}", f"{100 * gb_mr / memcpy:.0f}%"]
            else:
                line += ["", ""]
        out.append(line)
    return _common.table(header, out)


def _threads_line(rows: List[Row]) -> str:
    parts = []
    for r in rows:
        if "mr_1t" in r:
            parts.append(
                f"{OP_NAMES[r['op']]} {_common.ms(r['mr_1t'])} ms on 1 thread, {_common.ms(r['mr'])} ms on "
                f"{r['threads']} ({r['mr_1t'] / r['mr']:.2f}x)"
            )
    return "; ".join(parts)


def _targets(by_mode: Dict[str, List[Row]], memcpy: float) -> str:
    modes = list(by_mode)

    def verdict(op, cfg_key, fn):
        cells = []
        for mode in modes:
            r = next((x for x in by_mode[mode] if x["op"] == op and x["cfg"] == cfg_key), None)
            cells.append("(not re-measured)" if r is None else fn(r))
        return cells

    def speed(threshold):
        def f(r):
            s = _speedup(r)
            if s is None:
                return "missed (mismatch)"
            return f"{'met' if s >= threshold else 'missed'} ({s:.1f}x)"

        return f

    def bw(r):
        if r["check"] is not None:
            return "missed (mismatch)"
        frac = r["bytes"] / r["mr"] / 1e9 / memcpy
        return f"{'met' if frac >= MEMCPY_TARGET else 'missed'} ({100 * frac:.0f}%)"

    out = []
    for label, op, threshold, keys in SPEEDUP_TARGETS:
        for key in keys:
            out.append([f"{label} >= {threshold:.0f}x Megatron-Core", key] + verdict(op, key, speed(threshold)))
        if op == "permute":
            for key in keys:
                out.append([f"permute >= {100 * MEMCPY_TARGET:.0f}% of memcpy bandwidth", key] + verdict(op, key, bw))
    return _common.table(["target", "config"] + modes, out)


def run(quick: bool = False) -> str:
    mc_version, mu = _mcore()
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    memcpy = _common.memcpy_bandwidth(32 << 20 if quick else 256 << 20)
    cfgs = configs(quick)

    main_rows: List[Row] = []
    for cfg in cfgs:
        print(f"[bench_ops] config {cfg.key}: {cfg.describe()}", flush=True)
        main_rows += measure_router(cfg, mu, quick)
        main_rows.append(measure_dropping(cfg, mu, quick))
        main_rows += measure_losses(cfg, mu, quick)
    order = ["router", "router_fwd_bwd", "token_dropping", "aux_loss", "z_loss"]
    main_rows.sort(key=lambda r: (order.index(r["op"]), r["cfg"]))

    print("[bench_ops] dispatch ops, default allocator", flush=True)
    default = measure_dispatch_all(quick)
    print("[bench_ops] dispatch ops, child process with THP_MEM_ALLOC_ENABLE=1", flush=True)
    thp, thp_err = _dispatch_in_child(quick)

    def sort_rows(rows):
        d_order = ["permute", "unpermute_probs", "unpermute", "sort_chunks"]
        return sorted(rows, key=lambda r: (d_order.index(r["op"]), r["cfg"]))

    by_mode = {"default allocator": main_rows + sort_rows(default["rows"])}
    if thp is not None:
        by_mode["THP allocator"] = sort_rows(thp["rows"])

    def floor_line(floor):
        gb = floor["bytes"] / 1e9
        return (
            f"allocating and writing {floor['bytes'] / 2**20:.0f} MiB (permute's output at (a)) takes "
            f"{_common.ms(floor['fresh'])} ms ({gb / floor['fresh']:.1f} GB/s written) against "
            f"{_common.ms(floor['touched'])} ms into memory already touched ({gb / floor['touched']:.1f} GB/s)"
        )

    cfg_lines = [f"- ({c.key}) {c.describe()}" for c in cfgs]
    n_mismatch = sum(r["check"] is not None for rows in by_mode.values() for r in rows)
    parts = [
        f"Each op is timed against Megatron-Core {mc_version}'s own function from "
        "`megatron.core.transformer.moe.moe_utils` (the unfused CPU path) on the same inputs, in the same "
        f"run{' (**quick run: small sizes, not representative**)' if quick else ''}. Configurations:",
        "",
        *cfg_lines,
        "",
        "Method: median wall time after one untimed call (3 to 25 timed calls, as many as fit about one "
        "second). torch and moerail use all "
        f"{torch.get_num_threads()} / {moerail.get_num_threads()} threads. Routing inputs are standard-normal "
        "logits (expert bias ~ N(0, 0.1)); the dispatch ops use moerail's routing of the same logits for both "
        f"libraries. This machine's memcpy bandwidth, measured in this run by `_common.memcpy_bandwidth()` "
        f"(torch copy into memory already touched, bytes read + written): **{memcpy:.1f} GB/s**.",
        "",
        "Correctness is checked inside the bench before a timing is reported (a failure prints MISMATCH "
        "instead of a speedup): permute rows, permuted probs and sorted indices `torch.equal` to Megatron's; "
        "sort_chunks_by_idxs `torch.equal`; unpermute within one rounding of the output dtype (plus fp32 "
        "accumulation) of an fp64 sum; router selections equal to Megatron's run in fp32 up to exact ties "
        "(at most 0.1% of rows may differ on fp32 near-ties), probs and logits gradients close; token dropping "
        "keeps the same number of tokens and the same multiset of probs per expert; losses and their "
        f"gradients close to Megatron's in fp32. Mismatches in this run: **{n_mismatch}**.",
        "",
        "### Router, token dropping, losses",
        "",
        _table(main_rows, memcpy, with_bw=False),
        "",
        "### Dispatch: permute, unpermute, sort_chunks_by_idxs",
        "",
        "Byte accounting (effective GB/s): permute and sort_chunks_by_idxs move 2 x N x H x element size "
        "(each of the N = T x k output rows is read once from its source and written once), unpermute "
        "(N + T) x H x element size (N rows read, T rows written); index, probs and routing-map traffic "
        "(under 1%) is not counted. The same accounting as the memcpy figure, so the ratio is the fraction "
        "of memcpy bandwidth.",
        "",
        "Default allocator (this process: large outputs are fresh `mmap` pages, each call pays the page "
        f"faults): {floor_line(default['floor'])}.",
        "",
        _table(sort_rows(default["rows"]), memcpy, with_bw=True),
        "",
        f"Threads at (a), default allocator: {_threads_line(default['rows'])}.",
        "",
    ]
    if thp is not None:
        parts += [
            "With `THP_MEM_ALLOC_ENABLE=1` (child process; torch allocates large tensors 2 MiB-aligned with "
            f"transparent huge pages, so fresh outputs fault far less): {floor_line(thp['floor'])}.",
            "",
            _table(sort_rows(thp["rows"]), memcpy, with_bw=True),
            "",
            f"Threads at (a), THP allocator: {_threads_line(thp['rows'])}.",
            "",
        ]
    else:
        parts += [f"The THP-allocator measurement failed: {thp_err}", ""]
    parts += [
        "### Speed targets",
        "",
        "From the numbers above (router targets use the router forward rows; plain top-k is (a) and (c), "
        "group-limited is (b)).",
        "",
        _targets(by_mode, memcpy),
        "",
        "Notes:",
        "",
        "- Megatron-Core 0.16.1 computes sigmoid scores in fp32 and rounds them to the logits' dtype before "
        "adding the expert bias and selecting (`torch.sigmoid(logits.float()).type_as(logits)`); moerail "
        "keeps fp32 until the final probs (as 0.17+ does). At bf16 the selected experts therefore differ on "
        "near-tie rows; the router check compares with Megatron run on fp32 logits. Rows routed differently "
        "in this run: " + "; ".join(r["info"] for r in main_rows if "info" in r) + ".",
        "- Megatron's permute is `masked_select` + `index_select` and its unpermute without probs a "
        "`scatter_add_`: already memory-bound torch kernels, so their ratio to moerail is set mostly by "
        "temporaries and the page faults of fresh outputs, not by arithmetic.",
        "- The machine must be quiet: with other processes on its cores, torch's OpenMP threads (which spin "
        "while waiting) stall for a scheduler tick in each parallel region, which inflates Megatron-Core's "
        "times far more than moerail's (rayon) and overstates the speedups. Load average (1 min) at the start "
        f"and end of this bench: {load_start:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.",
        "",
        f"Bench wall time: {time.perf_counter() - t_start:.0f} s.",
    ]
    return "\n".join(parts)


def _worker(argv: List[str]) -> None:
    result = measure_dispatch_all(quick="--quick" in argv)
    print(json.dumps(result))


if __name__ == "__main__":
    if "--dispatch-worker" in sys.argv:
        _worker(sys.argv[1:])
    else:
        print(run(quick="--quick" in sys.argv))
