"""Swap and offload copies on this stage's step timeline, as each implementation issues them.

The planner's bound (``moerail_core::memory``) charges a swap only what the compute between a
layer's forward and its backward cannot hide, as if the copy back started as early as it may.
Neither executor does that. This module replays the stage's schedule (Megatron-Core's 1F1B or
interleaved order of forward and backward chunks) and, in each backward, the host-to-device
copies as the implementation issues them on one copy stream, and counts the time the backward
waits for them. The planner prices moerail's swaps by the same issue order, each layer's copies
alone on the link (:func:`moerail.memory.simcosts.costs_to_core` passes it this module's
segments); this replay, every copy on one link, is what it is checked against:

* **moerail's executor** (:mod:`.executor`): a group (``attn``: input norm and attention; ``mlp``:
  pre-MLP norm and the MoE block) starts copying its own swapped tensors back when its backward
  starts, last saved first, and those of the next ``prefetch_groups`` groups of the same model
  chunk in backward order (``lookahead=1``; one group by default); with ``lookahead=2`` the
  chunk's last group (its first layer's attention) also starts copying back the first group (the
  last layer's MLP) of the next backward chunk, when that chunk has run its forward, and those
  bytes stay on the device through the forward between the two backwards (``ahead_bytes``, with
  what copies of later layers hold beside the running layer's own). The executor learns the
  schedule's order of backward chunks in its first step; this replays the steps after it.
* **Megatron-Core's fine-grained activation offloading** (``PipelineOffloadManager`` and
  ``ChunkOffloadHandler`` in ``megatron.core.pipeline_parallel.fine_grained_activation_offload``):
  each offloaded module is a group per layer and micro-batch, committed at the module's output
  (``group_offload``); a backward reaching a group's start reloads the top of the chunk's stack of
  offloaded groups (the previous one in forward order), a group's commit waits for its reload; when
  the stack is empty the last group of the next backward chunk is reloaded ahead
  (``pre_reload_last_layer``). After the first iteration the first group of each name in backward
  order stays on the device (the offload margin), ``activation_offload_fraction`` keeps the later
  groups of every chunk, and only tensors of at least ``min_offloaded_tensor_size`` elements move.

A layer's backward is divided among its parts in proportion to their forward time (the costs'
per-module rebuild and exchange times; the attention projections take what those leave). Waits on
other stages are not modelled: every window is the compute alone, for both implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .costs import LayerCosts, MemoryCosts
from .plan import check_prefetch

__all__ = ["SEGMENTS", "MEGATRON_OFFLOAD_GROUPS", "schedule_ops", "segment_seconds", "executor_swap_wait",
           "megatron_offload_groups", "megatron_offload_wait", "attention_parts",
           "core_attention_seconds"]

# The parts of a transformer layer in forward order.
SEGMENTS: Tuple[str, ...] = (
    "input_norm", "qkv_down", "mla_up_proj", "core_attn", "attn_proj", "pre_mlp_norm", "router", "dispatch",
    "expert_fc1", "moe_act", "expert_fc2", "combine", "shared_expert",
)  # fmt: skip
_S = {n: i for i, n in enumerate(SEGMENTS)}
# moerail's executor groups: the segments of each (the group's backward starts at its last one).
_ATTN_SEGS = range(_S["input_norm"], _S["attn_proj"] + 1)
_MLP_SEGS = range(_S["pre_mlp_norm"], _S["shared_expert"] + 1)

# Megatron-Core's offload groups this model covers: (group start segment, commit after segment).
MEGATRON_OFFLOAD_GROUPS: Dict[str, Tuple[int, int]] = {
    # The input norm's group closes after the attention's residual add (``self_attn_bda``).
    "attn_norm": (_S["input_norm"], _S["attn_proj"]),
    # The QKV projections (with MLA its down projections, their norms and the up projections),
    # committed at the queries, keys and values.
    "qkv_linear": (_S["qkv_down"], _S["mla_up_proj"]),
    "core_attn": (_S["core_attn"], _S["core_attn"]),
    "attn_proj": (_S["attn_proj"], _S["attn_proj"]),
    # The pre-MLP norm's group closes after the MLP's residual add (``mlp_bda``), the layer's end.
    "mlp_norm": (_S["pre_mlp_norm"], _S["shared_expert"]),
    "expert_fc1": (_S["expert_fc1"], _S["expert_fc1"]),
    # moe_act's group closes after linear_fc2 (its commit is on fc2's output).
    "moe_act": (_S["moe_act"], _S["expert_fc2"]),
}


def schedule_ops(costs: MemoryCosts) -> List[Tuple[bool, int, int]]:
    """This stage's forward (``True``) and backward chunks in Megatron-Core's order:
    ``(forward, model chunk, micro-batch)``."""
    p, r, v, m = costs.pipeline_size, costs.pipeline_rank, costs.virtual_pipeline_size, costs.num_microbatches
    if v == 1:
        w = min(p - r - 1, m)
        ops = [(True, 0, i) for i in range(w)]
        for i in range(m - w):
            ops += [(True, 0, w + i), (False, 0, i)]
        return ops + [(False, 0, m - w + i) for i in range(w)]
    total = m * v
    # With as many micro-batches as stages Megatron runs every forward first.
    w = total if m == p else min((p - r - 1) * 2 + (v - 1) * p, total)

    def fwd(k):
        return (True, (k % (p * v)) // p, (k // (p * v)) * p + k % p)

    def bwd(k):
        return (False, v - 1 - (k % (p * v)) // p, (k // (p * v)) * p + k % p)

    ops = [fwd(k) for k in range(w)]
    for i in range(total - w):
        ops += [fwd(w + i), bwd(i)]
    return ops + [bwd(k) for k in range(total - w, total)]


def core_attention_seconds(costs: MemoryCosts) -> Optional[float]:
    """Core attention's forward seconds per layer and micro-batch where the costs come from the
    simulator (whose ``attention`` module is the whole attention, its recompute a replay of it);
    ``None`` otherwise."""
    if not isinstance(costs, MemoryCosts):
        raise TypeError(f"costs: expected a MemoryCosts, got {type(costs).__name__}")
    meta = costs.meta if isinstance(costs.meta, Mapping) else {}
    core = meta.get("core_attn_recompute")
    return None if core is None else float(core[1])


def segment_seconds(lc: LayerCosts, core_attention: Optional[float] = None) -> List[float]:
    """The backward seconds of each of :data:`SEGMENTS` for one layer and micro-batch;
    ``core_attention``: core attention's forward seconds (:func:`core_attention_seconds`), where the
    ``attention`` module's recompute time is the whole module's (by default that time)."""
    mod = lc.modules
    t = {n: 0.0 for n in SEGMENTS}

    def rc(name):
        c = mod.get(name)
        return 0.0 if c is None else c.recompute_seconds

    t["input_norm"] = t["pre_mlp_norm"] = 0.5 * rc("layernorm")
    t["mla_up_proj"] = rc("mla_up_proj")
    t["core_attn"] = rc("attention") if core_attention is None or "attention" not in mod else core_attention
    t["router"] = rc("router")
    fc1 = mod.get("expert_fc1")
    if fc1 is not None:
        t["expert_fc1"] = fc1.recompute_seconds
        t["expert_fc2"] = 0.5 * fc1.recompute_seconds  # half of a gated fc1's GEMM
        t["dispatch"] = t["combine"] = fc1.exchange_seconds
    t["moe_act"] = rc("expert_act")
    t["shared_expert"] = rc("shared_expert")
    known = sum(t.values())
    rest = lc.forward_seconds - known
    if rest >= 0:
        t["qkv_down"] = t["attn_proj"] = 0.5 * rest
        scale = lc.backward_seconds / lc.forward_seconds if lc.forward_seconds > 0 else 0.0
    else:
        scale = lc.backward_seconds / known if known > 0 else 0.0
    return [t[n] * scale for n in SEGMENTS]


def _chunks(costs: MemoryCosts) -> Dict[int, List[int]]:
    out: Dict[int, List[int]] = {}
    for i, lc in enumerate(costs.layers):
        out.setdefault(lc.vpp_stage, []).append(i)
    return out


def _chunk_forward_seconds(costs: MemoryCosts, chunks) -> Dict[int, float]:
    return {c: sum(costs.layers[i].forward_seconds for i in idx) for c, idx in chunks.items()}


# --------------------------------------------------------------------------------- moerail's executor

def _executor_items(lc: LayerCosts, actions: Mapping[str, str]) -> Dict[int, float]:
    """Bytes a layer's swaps bring back, by the segment whose backward first reads them."""
    need: Dict[int, float] = {}

    def add(seg, b):
        if b > 0:
            need[_S[seg]] = need.get(_S[seg], 0.0) + b

    for m, a in actions.items():
        if a != "swap" or m not in lc.modules:
            continue
        c = lc.modules[m]
        if m == "layernorm":  # the two norms' outputs: read by the q/kv projections and the MoE block
            add("qkv_down", 0.5 * c.saved_bytes)
            add("shared_expert", 0.5 * c.saved_bytes)
        elif m == "expert_fc1":  # the dispatched rows (fc1's input) and fc1's output (the activation's)
            add("expert_fc1", c.exchange_bytes)
            add("moe_act", c.saved_bytes - c.exchange_bytes)
        else:
            seg = {"attention": "attn_proj", "mla_up_proj": "core_attn", "router": "router",
                   "permute": "dispatch", "expert_act": "expert_fc2", "expert_fc2": "expert_fc2",
                   "unpermute": "combine", "shared_expert": "shared_expert"}[m]  # fmt: skip
            add(seg, c.saved_bytes)
    return need


def executor_swap_wait(costs: MemoryCosts, rows: Sequence[Sequence[str]], modules: Sequence[str],
                       link_bytes_per_second: Optional[float] = None, trace: Optional[list] = None,
                       lookahead: int = 1, prefetch_groups: int = 1) -> dict:
    """Seconds a step's backward waits for the swap-ins of moerail's executor for the plan ``rows``
    (per layer of ``costs``, an action name per module of ``modules``), its ``lookahead`` and
    ``prefetch_groups`` as the executor's (lookahead 1: the next ``prefetch_groups`` groups of the
    same model chunk in backward order; 2: and the next backward chunk's first group at a chunk's
    last): ``wait_seconds``, ``moved_bytes`` and ``ahead_bytes``, the most that copies ahead hold
    on the device beyond what the planner's peak counts: those ahead of the next backward chunk,
    through the forward before it, and with ``prefetch_groups`` >= 2, at a group's backward start,
    the bytes copied back for groups of later layers beyond the running layer's own (the
    planner's transient counts a layer's own swapped bytes in full).
    ``trace``, when a list, receives ``("start", key, layer, group)`` when a group's backward starts
    and ``("issue", key, layer, group)`` when a group's copies back are started, ``key`` being
    ``(model chunk, micro-batch)`` of the group's chunk."""
    check_prefetch(lookahead, prefetch_groups)
    link = costs.host_link_bytes_per_second if link_bytes_per_second is None else link_bytes_per_second
    chunks = _chunks(costs)
    core = core_attention_seconds(costs)
    segs = [segment_seconds(lc, core) for lc in costs.layers]
    items = [_executor_items(lc, dict(zip(modules, row))) for lc, row in zip(costs.layers, rows)]
    fwd = _chunk_forward_seconds(costs, chunks)
    st = {"t": 0.0, "link_free": 0.0, "wait": 0.0, "moved": 0.0, "ahead": 0.0}

    def group_bytes(li, group_segs):
        return sum(items[li].get(s, 0.0) for s in group_segs)

    def issue(key, ready, li, group_segs):
        issued = False
        for s in reversed(group_segs):  # last saved, first used
            b = items[li].get(s, 0.0)
            if b > 0 and (li, s) not in ready:
                st["link_free"] = max(st["t"], st["link_free"]) + b / link
                ready[(li, s)] = st["link_free"]
                st["moved"] += b
                issued = True
        if issued and trace is not None:
            trace.append(("issue", key, costs.layers[li].layer, "mlp" if group_segs is _MLP_SEGS else "attn"))

    ops = schedule_ops(costs)
    backward_ops = [(c, mb) for f, c, mb in ops if not f]
    forward_done: set = set()
    early: Dict[Tuple[int, int], Dict[Tuple[int, int], float]] = {}  # copies ahead, per chunk run
    n_back = 0
    for forward, c, mb in ops:
        if forward:
            forward_done.add((c, mb))
            st["t"] += fwd[c]
            continue
        key = (c, mb)
        n_back += 1
        after = backward_ops[n_back] if n_back < len(backward_ops) else None
        ready: Dict[Tuple[int, int], float] = early.pop(key, {})
        # The chunk's groups in backward order: the last layer's mlp, its attn, the layer before's...
        groups = [(li, g) for li in reversed(chunks[c]) for g in (_MLP_SEGS, _ATTN_SEGS)]
        for j, (li, group_segs) in enumerate(groups):
            if trace is not None:
                trace.append(("start", key, costs.layers[li].layer, "mlp" if group_segs is _MLP_SEGS else "attn"))
            issue(key, ready, li, group_segs)
            if lookahead:
                for h in range(j + 1, min(j + 1 + prefetch_groups, len(groups))):
                    issue(key, ready, *groups[h])
            if lookahead >= 2 and j == len(groups) - 1 and after is not None and after in forward_done:
                nxt = early.setdefault(after, {})
                before = st["moved"]
                issue(after, nxt, chunks[after[0]][-1], _MLP_SEGS)
                st["ahead"] = max(st["ahead"], st["moved"] - before)
            if prefetch_groups >= 2:
                # On the device now: this group and those after it whose copies back started.
                held = sum(group_bytes(*groups[h]) for h in range(j, len(groups))
                           if any((groups[h][0], s) in ready for s in groups[h][1]))  # fmt: skip
                held += sum(items[i].get(s, 0.0) for e in early.values() for i, s in e)
                own = group_bytes(li, _MLP_SEGS) + group_bytes(li, _ATTN_SEGS)
                st["ahead"] = max(st["ahead"], held - own)
            for s in reversed(group_segs):
                done = ready.get((li, s))
                if done is not None and done > st["t"]:
                    st["wait"] += done - st["t"]
                    st["t"] = done
                st["t"] += segs[li][s]
    return {"wait_seconds": st["wait"], "moved_bytes": st["moved"], "ahead_bytes": st["ahead"]}


# ------------------------------------------------------------------------------ Megatron's offload

_RUN, _COMMIT, _START = 0, 1, 2


@dataclass
class _Group:
    name: str
    layer: int  # index into costs.layers
    start: int
    commit: int
    moved: float  # bytes copied out and back
    freed: float  # device bytes the offload frees
    # Where the freed bytes are in the layer's costs: (module, bytes, whether the module's recompute
    # frees them too), "" for the layer's other saved bytes.
    sources: Tuple[Tuple[str, float, bool], ...] = ()
    offload: bool = True


def attention_parts(costs: MemoryCosts) -> Tuple[float, float]:
    """Per layer and micro-batch, two parts of the ``attention`` module's saved bytes as the
    simulator counts them: ``(qkv_internal, qkv_output)``, the bytes saved inside the QKV
    projections besides the input norm's output (MLA's compressed latents and their norms'
    outputs, the q / k norms) and, without MLA, the queries, keys and values core attention saves
    (with MLA they are ``mla_up_proj``'s: 0 here). Megatron's ``qkv_linear`` offload moves the
    first, its ``core_attn`` offload frees the second; ``(0, 0)`` for costs that do not come from
    the simulator (the attention's bytes are then core attention's)."""
    if not isinstance(costs, MemoryCosts):
        raise TypeError(f"costs: expected a MemoryCosts, got {type(costs).__name__}")
    meta = costs.meta if isinstance(costs.meta, Mapping) else {}
    internal = float(meta.get("qkv_internal_bytes") or 0.0)
    output = float(meta.get("qkv_output_bytes") or 0.0)
    if any("mla_up_proj" in lc.modules for lc in costs.layers):
        output = 0.0
    return internal, output


def megatron_offload_groups(lc: LayerCosts, offload: Sequence[str], li: int = 0,
                            parts: Tuple[float, float] = (0.0, 0.0)) -> List[_Group]:
    """The offload groups Megatron-Core forms in one layer for ``offload`` (its
    ``offload_modules``), in the order their forwards commit them, with the bytes each moves and
    frees. ``attn_norm`` and ``mlp_norm`` move the two norms' inputs (the layer's input and the
    residual stream after attention, each the size of ``input_bytes``, among the layer's other
    saved bytes); ``qkv_linear`` the input norm's output (half of what ``layernorm``'s recompute
    drops) and what else the QKV projections save; ``core_attn`` copies what core attention saved
    (the queries, keys and values and its output) but frees only the queries, keys and values (it
    releases those; the output projection still holds the output, which ``attn_proj`` offloads);
    ``expert_fc1`` moves the dispatched rows, ``moe_act`` fc1's output (what the activation saved).
    ``parts``: :func:`attention_parts`, the bytes of the QKV projections and of the queries, keys
    and values among the ``attention`` module's."""
    mod = lc.modules
    out = []

    def b(name):
        c = mod.get(name)
        return 0.0 if c is None else c.saved_bytes

    other = lc.other_saved_bytes
    # The attention's bytes: what its QKV projections save inside, the queries, keys and values
    # (without MLA), and core attention's output and statistics.
    inside = min(parts[0], b("attention"))
    qkv_out = min(parts[1], b("attention") - inside)
    core = b("attention") - inside - qkv_out
    for name in ("attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm", "expert_fc1", "moe_act"):
        if name not in offload:
            continue
        if name in ("attn_norm", "mlp_norm"):
            moved = freed = min(lc.input_bytes or 0.0, other)
            other -= freed
            sources = (("", freed, False),)
        elif name == "qkv_linear":
            norm_out = min(lc.input_bytes or 0.0, 0.5 * b("layernorm"))
            moved = freed = norm_out + inside
            sources = (("layernorm", norm_out, True), ("attention", inside, False))
        elif name == "core_attn":
            if "mla_up_proj" in mod:
                qkv = b("mla_up_proj")
                sources = (("mla_up_proj", qkv, True),)
            else:
                qkv = qkv_out
                sources = (("attention", qkv, False),)
            moved, freed = qkv + core, qkv
        elif name == "attn_proj":
            moved = freed = core
            sources = (("attention", freed, True),)
        elif name == "expert_fc1":
            c = mod.get("expert_fc1")
            moved = freed = 0.0 if c is None else c.exchange_bytes
            sources = (("expert_fc1", freed, True),)
        else:
            c = mod.get("expert_fc1")
            moved = freed = 0.0 if c is None else c.saved_bytes - c.exchange_bytes
            sources = (("expert_fc1", freed, True),)
        if moved <= 0:
            continue
        s, e = MEGATRON_OFFLOAD_GROUPS[name]
        out.append(_Group(name, li, s, e, moved, freed, tuple(x for x in sources if x[1] > 0)))
    out.sort(key=lambda g: (g.commit, g.start))
    return out


def megatron_offload_wait(costs: MemoryCosts, offload: Sequence[str], *, fraction: float = 1.0,
                          link_bytes_per_second: Optional[float] = None,
                          trace: Optional[list] = None) -> dict:
    """Megatron-Core's fine-grained activation offloading of ``offload`` on this stage, replayed
    over one step after its first (warm-up) iteration: ``wait_seconds`` (the backward's waits for
    reloads, including reloads the compute stream does itself when nothing reloaded a group
    ahead), ``freed_bytes_by_layer`` (per layer of ``costs``: what a chunk frees, after
    ``activation_offload_fraction``), ``margin_bytes`` (what the offload margin keeps on the device
    in the first backward chunk) and ``ahead_bytes`` (the most the reloads ahead of the next chunk
    hold on the device while other chunks run their forward). ``trace``, when a list, receives
    the backward's events in order: ``("commit", key, layer, name)`` and ``("reload", key, layer,
    name)``, ``key`` being ``(model chunk, micro-batch)``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected a value in [0, 1], got {fraction!r}")
    link = costs.host_link_bytes_per_second if link_bytes_per_second is None else link_bytes_per_second
    chunks = _chunks(costs)
    core = core_attention_seconds(costs)
    segs = [segment_seconds(lc, core) for lc in costs.layers]
    fwd = _chunk_forward_seconds(costs, chunks)
    ops = schedule_ops(costs)
    parts = attention_parts(costs)
    # One chunk's groups in forward commit order (every micro-batch of a model chunk alike); the
    # manager's own list (offload_groups) is in start order.
    per_chunk: Dict[int, List[_Group]] = {}
    started: Dict[int, List[int]] = {}
    for c, idx in chunks.items():
        gs = []
        for li in idx:
            gs += megatron_offload_groups(costs.layers[li], offload, li, parts)
        per_chunk[c] = gs
        started[c] = sorted(range(len(gs)), key=lambda k: (costs.layers[gs[k].layer].layer, gs[k].start, gs[k].commit))
        # activation_offload_fraction: the groups started last in the chunk stay.
        eligible = [k for k in started[c] if gs[k].moved > 0]
        drop = int(len(eligible) * (1 - fraction))
        for k in reversed(eligible):
            if drop <= 0:
                break
            gs[k].offload = False
            drop -= 1
    freed_by_layer = [0.0] * len(costs.layers)
    for gs in per_chunk.values():
        for g in gs:
            if g.offload:
                freed_by_layer[g.layer] += g.freed
    # A chunk's backward as events at segment boundaries, in backward order: a commit waits for its
    # group, a segment's backward runs (consecutive ones merged), a group's start reloads.
    events: Dict[int, List[Tuple[int, float]]] = {}
    for c, gs in per_chunk.items():
        starts: Dict[Tuple[int, int], int] = {}
        commits: Dict[Tuple[int, int], List[int]] = {}
        for k, g in enumerate(gs):
            starts[(g.layer, g.start)] = starts.get((g.layer, g.start), 0) + 1
            commits.setdefault((g.layer, g.commit), []).append(k)
        ev: List[Tuple[int, float]] = []
        for li in reversed(chunks[c]):
            for s in range(len(SEGMENTS) - 1, -1, -1):
                ev += [(_COMMIT, k) for k in reversed(commits.get((li, s), ()))]
                if ev and ev[-1][0] == _RUN:
                    ev[-1] = (_RUN, ev[-1][1] + segs[li][s])
                else:
                    ev.append((_RUN, segs[li][s]))
                ev += [(_START, 0)] * starts.get((li, s), 0)
        events[c] = ev
    backward_ops = [(c, mb) for f, c, mb in ops if not f]
    # The offload margin: in the first backward chunk, the group of each name started last (the
    # first of its name in backward order) is never offloaded.
    keep_first: set = set()
    margin_bytes = 0.0
    if backward_ops:
        first_c = backward_ops[0][0]
        seen = set()
        for k in reversed(started[first_c]):
            g = per_chunk[first_c][k]
            if g.offload and g.name not in seen:
                seen.add(g.name)
                keep_first.add(k)
                margin_bytes += g.freed

    def name_last(c):  # per name, the group of the chunk started last
        last = {}
        for k in started[c]:
            last[per_chunk[c][k].name] = k
        return set(last.values())

    stacks: Dict[Tuple[int, int], List[int]] = {}
    reloaded: Dict[Tuple[int, int], Dict[int, float]] = {}
    forward_done = set()
    t = 0.0
    link_free = 0.0
    wait = 0.0
    moved = 0.0
    ahead = 0.0
    n_back = 0

    def note(*ev):
        if trace is not None:
            trace.append(ev)

    copied: set = set()  # groups the compute stream already copied back itself

    def reload(owner, k):
        nonlocal link_free, moved
        g = per_chunk[owner[0]][k]
        note("reload", owner, costs.layers[g.layer].layer, g.name)
        if (owner, k) in copied:  # its tensors are back already: nothing left to copy
            return
        start = max(t, link_free)
        link_free = start + g.moved / link
        reloaded[owner][k] = link_free
        moved += g.moved

    for forward, c, mb in ops:
        key = (c, mb)
        gs = per_chunk[c]
        nxt = backward_ops[n_back] if n_back < len(backward_ops) else None
        if forward:
            keep = set(keep_first) if key == backward_ops[0] else set()
            if nxt == key:  # this chunk's backward comes next: its last group of each name stays
                keep |= name_last(c)
            stacks[key] = [k for k, g in enumerate(gs) if g.offload and k not in keep]
            reloaded[key] = {}
            forward_done.add(key)
            t += fwd[c]
            continue
        n_back += 1
        after = backward_ops[n_back] if n_back < len(backward_ops) else None
        for kind, x in events[c]:
            if kind == _RUN:
                t += x
            elif kind == _COMMIT:  # before its segment's backward
                k = x
                note("commit", key, costs.layers[gs[k].layer].layer, gs[k].name)
                if k in reloaded[key]:
                    done = reloaded[key].pop(k)
                    if done > t:
                        wait += done - t
                        t = done
                elif k in stacks[key]:  # nothing reloaded it ahead: the compute stream copies
                    end = max(t, link_free) + gs[k].moved / link
                    wait += end - t
                    t = link_free = end
                    moved += gs[k].moved
                    copied.add((key, k))  # it stays on the stack (Megatron pops it later)
            else:  # a group starts: after its segment's backward
                st = stacks[key]
                if st:
                    reload(key, st.pop())
                elif after is not None and after in forward_done and stacks.get(after):
                    reload(after, stacks[after].pop())
                    ahead = max(ahead, sum(per_chunk[after[0]][k2].freed for k2 in reloaded[after]))
    return {
        "wait_seconds": wait,
        "moved_bytes": moved,
        "freed_bytes_by_layer": freed_by_layer,
        "margin_bytes": margin_bytes,
        "ahead_bytes": ahead,
    }
