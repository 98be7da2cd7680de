"""The executor: carries out a :class:`~moerail.memory.plan.MemoryPlan` on a PyTorch model, exactly.

A model is seen as *layers* (one forward call of a transformer layer is a :class:`LayerRun`), each
with two *groups* (``"attn"``: input norm and attention; ``"mlp"``: pre-MLP norm and the MoE
block) whose backward starts at a known autograd node (the group output's ``grad_fn``), and
*modules* inside them (``plan.MODULES``) whose saved tensors a plan decides. The framework glue
(:func:`moerail.integrations.megatron.apply_memory_plan`, or a test's own block) tells the executor
where those are with three calls: :meth:`Executor.layer` wraps a layer's forward,
:meth:`Executor.tag` marks a module's forward (its saved tensors are attributed to it) and
:meth:`Executor.region` wraps a callable whose output may be discarded and recomputed;
:meth:`Executor.group_output` names the tensor whose backward starts a group.

The actions:

* **keep** — nothing happens (autograd keeps what it saved).
* **swap** — a ``saved_tensors_hooks`` pack hook sends each saved tensor of the module (not
  parameters, not tensors under ``min_swap_bytes``, only dense ones) to the host pool
  (:mod:`.swap`); the group's backward start prefetches it (and the next groups', ``lookahead``:
  the next ``prefetch_groups`` groups of the same model chunk run in backward order, and with
  ``lookahead=2`` at a chunk run's last group
  the first group of the next chunk run's backward), the unpack hook waits for that tensor's own
  swap-in, which waited for its own swap-out.
* **recompute** — an output-discarding checkpoint. The region runs once in the forward with grad
  enabled (so Megatron's aux-loss logging and the expert-bias token counts happen there, once, as
  without the plan) but with a pack hook that drops every saved tensor; its differentiable outputs
  are handed on through :class:`_Replay`, and at the end of the layer's forward (every consumer
  has saved what it needs by then) their storage is freed. When the group's backward starts, the
  regions are replayed in forward order, each with the CPU / accelerator RNG states and the
  owner's attributes (a token dispatcher's split sizes, sorted indices, routing map) as they were
  in the forward, and the storage is refilled; the replay's gradient graph serves the backward.
  Non-differentiable outputs (routing map, sorted indices, tokens per expert) are never dropped:
  the consumers keep using the forward's; a replay that would compute different ones raises.
  Buffers of the replayed module and registered *state guards* (Megatron's aux-loss tracker) are
  restored after each replay, so nothing is counted twice.
* **recompute_exchange** — the exchange and the dispatcher's post-processing are recompute regions:
  the dispatched expert inputs are dropped and the exchange runs again when the group's backward
  starts, with the forward's split sizes / route. Every rank of the expert-parallel group reaches
  that point at the same autograd node of the same micro-batch (same plan, same graph, the same
  schedule in a pipeline stage), so the replayed collectives pair up as the forward's did.
* **recompute_layer** (a whole layer) — one such region over the layer's forward (passed to
  :meth:`Executor.layer` with the token dispatcher as ``owner`` and the layer as ``buffers_of``):
  the module regions and tags inside step aside, only the layer's inputs are held, and the
  backward of its outputs replays the whole layer (exchanges included) with the forward's RNG
  states and dispatcher attributes; buffers and the aux-loss tracker are restored after it.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .plan import MODULES, Action, MemoryPlan, check_prefetch
from .swap import HostPool, SwappedTensor, Swapper

__all__ = ["Executor", "LayerRun", "SavedTensorCounter", "GROUPS"]

GROUPS = ("attn", "mlp")


# ------------------------------------------------------------------------------------------------
# Counting saved tensors exactly
# ------------------------------------------------------------------------------------------------


class _Held:
    """What the pack hook gives autograd for a kept tensor while a counter is on: the tensor and
    its counter entry, released when autograd frees the saved variable."""

    __slots__ = ("t", "counter", "key", "__weakref__")

    def __init__(self, t: torch.Tensor, counter: SavedTensorCounter, key) -> None:
        self.t, self.counter, self.key = t, counter, key

    def __del__(self):
        c = getattr(self, "counter", None)
        if c is not None:
            c._release(self.key)


class _Bytes:
    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def nbytes(self) -> int:
        return self.n


class SavedTensorCounter:
    """The bytes of the tensors autograd holds for the backward, counted exactly through the
    ``saved_tensors_hooks`` of the executor: each distinct storage once (a tensor saved by several
    ops, or a view of another saved tensor, is not counted twice), at its current size (a storage an
    output-discarding checkpoint freed counts 0 until it is refilled), parameters left out.

    ``current`` / ``peak`` in bytes; ``reset_peak()`` starts a new window (e.g. a step);
    ``by_tag`` the bytes each ``(layer, module)`` tag first saved in the window (for profiling)."""

    def __init__(self) -> None:
        self._live: Dict[int, list] = {}  # key -> [storage, refs, tag]
        self._key = 0
        self.peak = 0
        self.by_tag: Dict[Tuple[Any, str], int] = {}
        self._ident_key: Dict[int, int] = {}
        # Called with (tensor, tag) for every tensor held (profiling: the executor's save trace); a
        # function it returns is called when autograd frees that saved tensor.
        self.observer: Optional[Callable[[torch.Tensor, Any], Optional[Callable[[], None]]]] = None

    @property
    def current(self) -> int:
        return sum(e[0].nbytes() for e in self._live.values())

    def reset_peak(self) -> None:
        self.peak = self.current
        self.by_tag = {}

    def sample(self) -> int:
        c = self.current
        if c > self.peak:
            self.peak = c
        return c

    def add(self, t: torch.Tensor, tag) -> Optional[int]:
        st = t.untyped_storage()
        if st.nbytes() == 0:
            return None
        # The storage's identity, not its address: a storage an output-discarding checkpoint freed
        # and refilled has a new address, and a freed one's address may be given to another.
        ident = st._cdata
        key = self._ident_key.get(ident)
        if key is not None and key in self._live:
            self._live[key][1] += 1
            return key
        self._key += 1
        key = self._key
        self._live[key] = [st, 1, tag, ident]
        self._ident_key[ident] = key
        if tag is not None:
            self.by_tag[tag] = self.by_tag.get(tag, 0) + st.nbytes()
        self.sample()
        return key

    def add_bytes(self, nbytes: int, tag=None) -> int:
        """Counts ``nbytes`` held by something that is not a saved tensor yet (a swap-in's buffer on
        the device from the moment it is requested); ``_release(key)`` ends it."""
        self._key += 1
        self._live[self._key] = [_Bytes(nbytes), 1, tag, None]
        self.sample()
        return self._key

    def _release(self, key) -> None:
        e = self._live.get(key)
        if e is None:
            return
        e[1] -= 1
        if e[1] <= 0:
            del self._live[key]
            if e[3] is not None and self._ident_key.get(e[3]) == key:
                del self._ident_key[e[3]]

    def hooks(self, params: Iterable[torch.Tensor] = ()):
        """A ``saved_tensors_hooks`` context that counts every tensor saved inside it (parameters
        left out): put it around a whole step to measure any model, with or without a plan
        (recomputations in the backward, e.g. Megatron's own, are counted too)."""
        ptrs = {p.untyped_storage().data_ptr() for p in params}

        def pack(t):
            if isinstance(t, torch.nn.Parameter) or t.untyped_storage().data_ptr() in ptrs:
                return t
            return self.hold(t, None)

        return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)

    def hold(self, t: torch.Tensor, tag) -> Any:
        on_free = self.observer(t, tag) if self.observer is not None else None
        key = self.add(t, tag)
        if key is None:
            return t
        held = _Held(t, self, key)
        if on_free is not None:
            weakref.finalize(held, on_free).atexit = False
        return held


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (any order of dimensions): a copy with the same strides fills
    exactly ``numel`` elements."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _unpack(obj):
    if isinstance(obj, _Held):
        return obj.t
    if isinstance(obj, SwappedTensor):
        return obj.get()
    return obj


def _dropped(obj):
    raise RuntimeError(
        "moerail.memory: a recomputed region's first-pass graph was used in the backward; the region's "
        "output must reach the backward only through its replay")


# ------------------------------------------------------------------------------------------------
# Output-discarding checkpoints
# ------------------------------------------------------------------------------------------------


def _tensors_in(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [x for o in obj for x in _tensors_in(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _tensors_in(o)]
    return []


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and type(obj) is not tuple and hasattr(obj, "_fields"):
        return type(obj)(*[_map_tensors(o, fn) for o in obj])
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _rng_state(devices, extra=()) -> dict:
    st = {"cpu": torch.get_rng_state(), "extra": [get() for get, _ in extra]}
    for d in devices:
        mod = getattr(torch, d.type, None)
        if mod is not None and hasattr(mod, "get_rng_state"):
            st[d] = mod.get_rng_state(d)
    return st


def _set_rng_state(st: dict, extra=()) -> None:
    torch.set_rng_state(st["cpu"])
    for d, s in st.items():
        if d not in ("cpu", "extra"):
            getattr(torch, d.type).set_rng_state(s, d)
    for (_, set_), s in zip(extra, st["extra"]):
        set_(s)


class _Replay(torch.autograd.Function):
    """Hands a region's first-pass outputs on; its backward runs the replay's graph."""

    @staticmethod
    def forward(ctx, region, anchor, *inputs):
        ctx.region = region
        outs = tuple(region.diff_outs)
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        region = ctx.region
        region.ensure_replayed()
        outs, gs = [], []
        for o, g in zip(region.replay_outs, grads):
            if g is not None and o.requires_grad:
                outs.append(o)
                gs.append(g)
        if outs:
            torch.autograd.backward(outs, gs)
        grads_in = tuple(x.grad for x in region.replay_inputs)
        region.finish()
        return (None, None, *grads_in)


@dataclass
class _Region:
    executor: Executor
    run: LayerRun
    module: str
    group: str
    fn: Callable
    replay_fn: Callable
    args: tuple
    kwargs: dict
    rng: dict
    owner: Any
    owner_state: Optional[dict]
    buffers_of: Optional[torch.nn.Module]
    # Aliases of the outputs' storages without their autograd history: the outputs' grad_fn (the
    # _Replay node) holds this region, so holding the outputs themselves would make a reference cycle
    # through autograd's C++ graph that Python's collector cannot free (every step's regions, their
    # inputs and RNG states would stay).
    diff_outs: List[torch.Tensor] = field(default_factory=list)
    nondiff_outs: List[torch.Tensor] = field(default_factory=list)
    discard: List[torch.Tensor] = field(default_factory=list)
    nbytes: List[int] = field(default_factory=list)
    input_tokens: list = field(default_factory=list)
    grad_inputs: List[torch.Tensor] = field(default_factory=list)
    replay_outs: Optional[List[torch.Tensor]] = None
    replay_inputs: Optional[List[torch.Tensor]] = None
    done: bool = False

    def ensure_replayed(self) -> None:
        if self.replay_outs is not None:
            return
        ex = self.executor
        chunk = self.run.chunk
        if chunk is not None and not chunk.backward_started:
            ex._chunk_backward_starts(chunk)
        t0, c0 = time.perf_counter(), time.process_time()
        detached = {}

        def det(x):
            if id(x) not in detached:
                detached[id(x)] = x.detach().requires_grad_(x.requires_grad)
            return detached[id(x)]

        args = _map_tensors(self.args, det)
        kwargs = _map_tensors(self.kwargs, det)
        self.replay_inputs = [det(x) for x in self.grad_inputs]
        current_rng = _rng_state(ex._rng_devices, ex.rng_sources)
        current_state = dict(self.owner.__dict__) if self.owner is not None else None
        bufs = []
        if self.buffers_of is not None:
            bufs = [(b, b.detach().clone()) for b in self.buffers_of.buffers()]
        restores = [g() for g in ex.state_guards]
        saved_ptrs = set()

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            saved_ptrs.add(ptr)
            if ex.counter is not None and not isinstance(t, torch.nn.Parameter) and ptr not in ex._param_ptrs:
                return ex.counter.hold(t, None)
            return t

        ex._replaying += 1
        try:
            _set_rng_state(self.rng, ex.rng_sources)
            if self.owner is not None:
                self.owner.__dict__.clear()
                self.owner.__dict__.update(self.owner_state)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
                out = self.replay_fn(*args, **kwargs)
        finally:
            ex._replaying -= 1
            _set_rng_state(current_rng, ex.rng_sources)
            if self.owner is not None:
                self.owner.__dict__.clear()
                self.owner.__dict__.update(current_state)
            with torch.no_grad():
                for b, v in bufs:
                    b.copy_(v)
            for r in restores:
                r()
        new = _tensors_in(out)
        new_diff = [t for t in new if t.requires_grad]
        new_nondiff = [t for t in new if not t.requires_grad]
        if len(new_diff) != len(self.diff_outs) or len(new_nondiff) != len(self.nondiff_outs):
            raise RuntimeError(f"moerail.memory: the replay of {self.module} returned other outputs than its forward")
        for a, b in zip(self.nondiff_outs, new_nondiff):
            if a.shape != b.shape or not torch.equal(a, b):
                raise RuntimeError(
                    f"moerail.memory: the replay of {self.module} in layer {self.run.layer} computed other routing "
                    "or split sizes than its forward (a non-deterministic op in the region?); refusing to go on "
                    "with gradients that would not match the forward")
        with torch.no_grad():
            for o, n, nb in zip(self.diff_outs, new_diff, self.nbytes):
                if nb is None:
                    continue
                if n.shape != o.shape or n.dtype != o.dtype:
                    raise RuntimeError(f"moerail.memory: the replay of {self.module} changed an output's shape")
                st = o.untyped_storage()
                st.resize_(nb)
                # A fresh alias of the storage: the copy leaves the version counter of the tensor the
                # consumers saved as it was.
                torch.empty(0, dtype=o.dtype, device=o.device).set_(st, 0, o.shape, o.stride()).copy_(n)
                # The replay's own copy is needed only if an op of the replay saved it.
                if n.untyped_storage().data_ptr() not in saved_ptrs and n._base is None and n.is_contiguous():
                    n.untyped_storage().resize_(0)
        self.replay_outs = new_diff
        dt = time.perf_counter() - t0
        ex.stats["recompute_seconds"] += dt
        if ex.replay_seconds is not None:
            key = (self.run.layer, self.run.vpp_stage)
            ex.replay_seconds[key] = ex.replay_seconds.get(key, 0.0) + dt
        if ex.replay_cpu_seconds is not None:
            key = (self.run.layer, self.run.vpp_stage)
            ex.replay_cpu_seconds[key] = ex.replay_cpu_seconds.get(key, 0.0) + time.process_time() - c0
        ex.stats["replays"] += 1
        if ex.counter is not None:
            ex.counter.sample()

    def finish(self) -> None:
        self.done = True
        self.args = self.kwargs = None
        self.replay_outs = self.replay_inputs = None
        self.owner_state = None
        self.diff_outs, self.nondiff_outs, self.discard, self.grad_inputs = [], [], [], []
        if self.executor.counter is not None:
            for k in self.input_tokens:
                if k is not None:
                    self.executor.counter._release(k)
        self.input_tokens = []


# ------------------------------------------------------------------------------------------------
# The save trace (profiling): which storages each module saved, for the exact held-bytes model
# ------------------------------------------------------------------------------------------------


class SaveTrace:
    """Records, during keep-all steps, what the held-bytes model of :mod:`.exact` needs, per
    micro-batch: every storage saved for the backward (its bytes, the layer, module and group whose
    forward saved it, the view's bytes and whether a swap would move it), every call of a region
    (the module and actions that make it recompute, its inputs, the outputs it would free and the
    storages saved inside it), every layer call's inputs, and the bytes saved outside the layers
    before the first layer (``pre``) and after the last (``post``), and the storages autograd freed
    again before the micro-batch's forward was over (``dropped``: every save of them was in a part of
    the graph the forward let go, e.g. a top-k whose values nothing uses, for its indices). Storages
    are named by small ints, kept alive while the trace lives (so no address is reused)."""

    def __init__(self, executor: Executor) -> None:
        self.ex = executor
        self.microbatches: List[dict] = []
        self.cur: Optional[dict] = None
        self.state = "backward"
        self._ids: Dict[int, int] = {}
        self._alive: List[Any] = []
        self.open: List[Tuple[int, List[int]]] = []  # (call, storages saved inside) of the region calls running
        self.calls = 0

    def _new_microbatch(self) -> None:
        self.cur = {"bytes": {}, "saves": [], "regions": [], "layers": {}, "pre": [], "post": [], "dropped": []}
        self.microbatches.append(self.cur)
        self._saves_held: Dict[int, int] = {}

    def _held(self, i: int):
        """Counts a save of storage ``i`` in the current micro-batch; returns what to call when
        autograd frees it: a storage whose saves were all freed before the forward ended (the
        backward starts with the loss, after the saves of the last layer, ``post``) is dropped."""
        mb, held = self.cur, self._saves_held
        held[i] = held.get(i, 0) + 1
        if i in mb["dropped"]:
            mb["dropped"].remove(i)

        def freed() -> None:
            if self.cur is not mb or self.state not in ("pre", "layers"):
                return
            held[i] -= 1
            if held[i] == 0:
                mb["dropped"].append(i)

        return freed

    def sid(self, t: torch.Tensor) -> Optional[int]:
        st = t.untyped_storage()
        n = st.nbytes()
        if n == 0:
            return None
        ptr = st.data_ptr()
        i = self._ids.get(ptr)
        if i is None:
            i = self._ids[ptr] = len(self._ids)
            self._alive.append(st)
        if self.cur is not None:
            self.cur["bytes"][i] = n
        return i

    def _sids(self, obj) -> List[int]:
        ex = self.ex
        out = []
        for x in _tensors_in(obj):
            if x.untyped_storage().data_ptr() in ex._param_ptrs or isinstance(x, torch.nn.Parameter):
                continue
            i = self.sid(x)
            if i is not None and i not in out:
                out.append(i)
        return out

    def on_save(self, t: torch.Tensor, tag) -> Optional[Callable[[], None]]:
        ex = self.ex
        if ex._replaying:
            return None
        run = ex._run
        if run is None:
            if self.cur is None or self.state == "backward":
                self._new_microbatch()
                self.state = "pre"
            i = self.sid(t)
            if i is None:
                return None
            self.cur["pre" if self.state == "pre" else "post"].append(i)
            if self.state != "pre":
                self.state = "post"
            return self._held(i)
        i = self.sid(t)
        if i is None:
            return None
        module = self.ex._tags[-1][1] if self.ex._tags and self.ex._tags[-1][0] is run else None
        group = ex._group_of(module) if module is not None else None
        nbytes = t.numel() * t.element_size()
        swappable = t.device == ex.device and nbytes >= ex.min_swap_bytes and _dense(t)
        view = (i, t.storage_offset(), tuple(t.shape), t.stride(), str(t.dtype), t._version)
        self.cur["saves"].append({"sid": i, "layer": [run.layer, run.vpp_stage], "module": module, "group": group,
                                  "view": repr(view), "view_bytes": nbytes, "swappable": bool(swappable),
                                  "calls": [c for c, _ in self.open]})
        for _, inside in self.open:
            inside.append(i)
        return self._held(i)

    def on_layer(self, layer: int, vpp_stage: int, args, kwargs) -> None:
        key = f"{layer}:{vpp_stage}"
        if self.cur is None or self.state in ("backward", "post") or key in self.cur["layers"]:
            self._new_microbatch()
        self.state = "layers"
        self.cur["layers"][key] = {"inputs": self._sids((args, kwargs)), "order": len(self.cur["layers"])}

    def on_region(self, run: LayerRun, module: str, group: str, actions, also, args, kwargs, out,
                  call: int, inside: List[int]) -> None:
        ex = self.ex
        outs = _tensors_in(out)
        diff = [t for t in outs if t.requires_grad]
        inputs = _tensors_in((args, kwargs))
        keep_ptrs = {x.untyped_storage().data_ptr() for x in inputs} | ex._param_ptrs
        if diff and not inside and all(t.untyped_storage().data_ptr() in keep_ptrs for t in diff):
            return  # no region: the graph is whole (see Executor.region)
        own = []
        for d in diff:
            st = d.untyped_storage()
            if (st.data_ptr() not in keep_ptrs and d.storage_offset() == 0 and d.is_contiguous()
                    and st.nbytes() == d.numel() * d.element_size() and d._base is None):
                i = self.sid(d)
                if i is not None:
                    own.append(i)
        self.cur["regions"].append({
            "layer": [run.layer, run.vpp_stage], "module": module, "group": group,
            "actions": [a.value for a in actions], "also": [[m, a.value] for m, a in also],
            "inputs": self._sids((args, kwargs)) if diff else [], "outputs": own,
            "inside": sorted(set(inside)), "call": call})

    def to_dict(self) -> dict:
        return {"microbatches": self.microbatches}


# ------------------------------------------------------------------------------------------------
# Layer runs and the executor
# ------------------------------------------------------------------------------------------------


class ChunkRun:
    """One forward call of one model chunk (one micro-batch): its layer runs, consecutive layers of
    one virtual pipeline stage. ``first``: its first layer's run (whose attention backward is the
    chunk's last group); ``last``: its last one (whose MLP backward is the chunk's first)."""

    __slots__ = ("vpp_stage", "first", "last", "backward_started", "__weakref__")

    def __init__(self, vpp_stage: int, first: Optional[LayerRun]) -> None:
        # Weak references: the layer runs hold their chunk run, not the other way round (a chunk
        # run whose graph was dropped without a backward goes with it).
        self.vpp_stage = vpp_stage
        self.first = weakref.ref(first) if first is not None else _none
        self.last = self.first
        self.backward_started = False


def _none():
    return None


class LayerRun:
    """One forward call of one layer (one micro-batch): its regions and swapped tensors per group."""

    def __init__(self, executor: Executor, layer: int, vpp_stage: int, prev: Optional[LayerRun]) -> None:
        self.executor, self.layer, self.vpp_stage, self.prev = executor, layer, vpp_stage, prev
        self.regions: Dict[str, List[_Region]] = {g: [] for g in GROUPS}
        self.swapped: Dict[str, List[SwappedTensor]] = {g: [] for g in GROUPS}
        self.triggered: Dict[str, bool] = {g: False for g in GROUPS}
        self.has_trigger: Dict[str, bool] = {g: False for g in GROUPS}
        self._dedup: Dict[tuple, tuple] = {}
        self.in_forward = True
        self.chunk: Optional[ChunkRun] = None


    def action(self, module: str) -> Action:
        return self.executor.action(self.layer, module, self.vpp_stage)

    def backward_starts(self, group: str) -> None:
        """The group's backward is about to run: prefetch its swapped tensors (and the next
        group's), then replay its recompute regions in forward order."""
        if self.triggered[group]:
            return
        self.triggered[group] = True
        ex = self.executor
        if ex.trace is not None:
            ex.trace.state = "backward"
        chunk = self.chunk
        if chunk is not None and not chunk.backward_started:
            ex._chunk_backward_starts(chunk)
        # Last saved, first used: the copies back go in reverse forward order.
        for st in reversed(self.swapped[group]):
            st.prefetch()
        if ex.lookahead:
            nxt: Tuple[Optional[LayerRun], str] = (self, group)
            for _ in range(ex.prefetch_groups):
                nxt = (nxt[0], "attn") if nxt[1] == "mlp" else (nxt[0].prev, "mlp")
                if nxt[0] is None:
                    break
                for st in reversed(nxt[0].swapped[nxt[1]]):
                    st.prefetch()
            if ex.lookahead >= 2 and group == "attn" and chunk is not None and chunk.first() is self:
                # The chunk run's last group: the first group of the next backward chunk run.
                after = ex._next_backward_chunk(chunk)
                run = after.last() if after is not None else None
                if run is not None and run.swapped["mlp"]:
                    ex.stats["chunk_prefetches"] += 1
                    for st in reversed(run.swapped["mlp"]):
                        st.prefetch()
        for r in self.regions[group]:
            r.ensure_replayed()
        self.swapped[group] = []

    def end_forward(self) -> None:
        """Every consumer in the layer has saved what it needs: free the recomputed outputs of the
        groups whose backward start is known."""
        self.in_forward = False
        self._dedup = {}
        ex = self.executor
        for g in GROUPS:
            if not self.has_trigger[g]:
                continue  # no known backward start: keep (nothing would refill the storage in time)
            for r in self.regions[g]:
                for i, o in enumerate(r.discard):
                    if o is None:
                        continue
                    for st in ex._pending_swaps_of(o):
                        st.wait_out()  # the swap-out reads this storage: let it finish first
                    o.untyped_storage().resize_(0)
                    r.discard[i] = None
        if ex.counter is not None:
            ex.counter.sample()


class Executor:
    """Carries out ``plan`` on the layers registered with it (see the module docstring).

    ``device``: where the activations live (the swap engine's device); ``min_swap_bytes``: saved
    tensors smaller than this stay on the device; ``throttle_s`` / ``prefetch_delay_s``: slow every
    copy / delay every swap-in (stress tests; also ``MOERAIL_SWAP_THROTTLE_S``); ``lookahead``: what
    a group's backward start prefetches besides its own swapped tensors (0: nothing; 1: the next
    ``prefetch_groups`` groups of the same model chunk run in backward order; 2: that, and at a
    chunk run's last group the first group of the next chunk run's backward, which then stays on
    the device through the forward between them); both default to the plan's, those its
    predictions assume; ``count``: keep a
    :class:`SavedTensorCounter` (``executor.counter``); ``params``: tensors never swapped (the
    model's parameters)."""

    def __init__(self, plan: Optional[MemoryPlan], *, device=None, min_swap_bytes: int = 1 << 16,
                 throttle_s: Optional[float] = None, prefetch_delay_s: float = 0.0,
                 lookahead: Optional[int] = None, prefetch_groups: Optional[int] = None,
                 count: bool = False, params: Iterable[torch.Tensor] = ()) -> None:
        import os

        if plan is not None and not isinstance(plan, MemoryPlan):
            raise TypeError(f"plan: expected a moerail.memory.MemoryPlan, got {type(plan).__name__}")
        if isinstance(min_swap_bytes, bool) or not isinstance(min_swap_bytes, int) or min_swap_bytes < 0:
            raise ValueError(f"min_swap_bytes: expected an int >= 0, got {min_swap_bytes!r}")
        if throttle_s is None:
            throttle_s = float(os.environ.get("MOERAIL_SWAP_THROTTLE_S", "0") or 0)
        if throttle_s < 0 or prefetch_delay_s < 0:
            raise ValueError("throttle_s / prefetch_delay_s: expected seconds >= 0")
        self.plan = plan
        self._actions: Dict[Tuple[int, int], Dict[str, Action]] = {}
        self._whole: set = set()
        if plan is not None:
            for lp in plan.layers:
                self._actions[(lp.layer, lp.vpp_stage)] = dict(lp.actions)
            self._whole = {(lp.layer, lp.vpp_stage) for lp in plan.layers if lp.recompute_layer}
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.min_swap_bytes = min_swap_bytes
        # Settings not given follow the plan (and set_plan's later plans).
        self._from_plan = (lookahead is None, prefetch_groups is None)
        if lookahead is None:
            lookahead = plan.lookahead if plan is not None else 1
        if prefetch_groups is None:
            prefetch_groups = plan.prefetch_groups if plan is not None else 1
        check_prefetch(lookahead, prefetch_groups)
        self.lookahead, self.prefetch_groups = lookahead, prefetch_groups
        # Model chunk runs (forward order) whose backward has not started, the one being run forward
        # and the (layer, vpp stage) of the last layer forward; the virtual pipeline stages of the
        # chunk runs' backward starts in this step and in the last whole step (the schedule's
        # order, learned), and the stages seen.
        self._pending_chunks: List[weakref.ref] = []
        self._chunk: Optional[ChunkRun] = None
        self._last_key: Optional[Tuple[int, int]] = None
        self._order_now: List[int] = []
        self._order_learned: Optional[List[int]] = None
        self._stages: set = set()
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self._rng_devices = [self.device] if self.device.type != "cpu" else []
        self.counter: Optional[SavedTensorCounter] = SavedTensorCounter() if count else None
        host = plan.host_bytes if plan is not None else 0
        self.pool = HostPool(host, pin=self.device.type != "cpu")
        self._swapper: Optional[Swapper] = None
        self._throttle, self._prefetch_delay = throttle_s, prefetch_delay_s
        self._tags: List[Tuple[Optional[LayerRun], str]] = []
        self._run: Optional[LayerRun] = None
        self._last_run: Optional[LayerRun] = None
        self._replaying = 0
        self._pending_out: Dict[int, list] = {}
        # Callables returning a restore closure, called around every replay (e.g. Megatron's
        # aux-loss tracker): state a replay must not change.
        self.state_guards: List[Callable[[], Callable[[], None]]] = []
        # (get, set) pairs of further RNG states a replay must see as the forward saw them (e.g.
        # Megatron's model-parallel CUDA RNG tracker).
        self.rng_sources: List[Tuple[Callable[[], Any], Callable[[Any], None]]] = []
        self.stats = {"swapped_bytes": 0, "swapped_tensors": 0, "recompute_seconds": 0.0, "replays": 0,
                      "regions": 0, "chunk_prefetches": 0}
        self.timing: Optional[Dict[Tuple[int, str], float]] = None  # profile: forward seconds per tag
        # profile: per (layer, vpp stage) [saved bytes its forwards left, forward seconds, calls,
        # input bytes]
        self.layer_stats: Optional[Dict[Tuple[int, int], list]] = None
        # profile: the save trace of keep-all steps, and the seconds of the replays per (layer, vpp
        # stage), wall-clock and this process's CPU time
        self.trace: Optional[SaveTrace] = None
        self.replay_seconds: Optional[Dict[Tuple[int, int], float]] = None
        self.replay_cpu_seconds: Optional[Dict[Tuple[int, int], float]] = None
        self._anchor = torch.empty(0, requires_grad=True)

    # -- plan ---------------------------------------------------------------------------------------

    def set_plan(self, plan: MemoryPlan) -> None:
        """Another plan for the same wrapped model (e.g. after profiling with keep-all), from the next
        layer forward on. Micro-batches already in flight finish under the actions they started with.
        The executor's ``lookahead`` / ``prefetch_groups``, where not given to it, become the plan's."""
        if not isinstance(plan, MemoryPlan):
            raise TypeError(f"plan: expected a moerail.memory.MemoryPlan, got {type(plan).__name__}")
        self.plan = plan
        self._actions = {(lp.layer, lp.vpp_stage): dict(lp.actions) for lp in plan.layers}
        self._whole = {(lp.layer, lp.vpp_stage) for lp in plan.layers if lp.recompute_layer}
        self.pool.capacity = plan.host_bytes
        if self._from_plan[0]:
            self.lookahead = plan.lookahead
        if self._from_plan[1]:
            self.prefetch_groups = plan.prefetch_groups

    def action(self, layer: int, module: str, vpp_stage: int = 0) -> Action:
        acts = self._actions.get((layer, vpp_stage))
        return acts.get(module, Action.KEEP) if acts else Action.KEEP

    def recomputes_layer(self, layer: int, vpp_stage: int = 0) -> bool:
        """Whether the plan recomputes ``layer`` whole."""
        return (layer, vpp_stage) in self._whole

    @property
    def swapper(self) -> Swapper:
        if self._swapper is None:
            self._swapper = Swapper(self.device, throttle_s=self._throttle, prefetch_delay_s=self._prefetch_delay)
        return self._swapper

    def close(self) -> None:
        if self._swapper is not None:
            self._swapper.close()

    # -- the hooks ----------------------------------------------------------------------------------

    def _pack(self, t: torch.Tensor):
        run, module = self._tags[-1] if self._tags else (self._run, None)
        ptr = t.untyped_storage().data_ptr()
        if isinstance(t, torch.nn.Parameter) or ptr in self._param_ptrs:
            return t
        tag = (run.layer, module) if run is not None and module is not None else None
        if (run is not None and module is not None and run.action(module) is Action.SWAP and not self._replaying
                and t.device == self.device and t.numel() * t.element_size() >= self.min_swap_bytes
                and _dense(t) and t.untyped_storage().nbytes() > 0):
            # The same tensor saved by several ops goes once. The weak reference makes sure it is that
            # tensor (a later one at the same address, after the first was freed, is another).
            key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
            hit = run._dedup.get(key)
            if hit is not None and hit[1]() is t:
                return hit[0]
            nbytes = t.numel() * t.element_size()
            buf = self.pool.take(nbytes)
            if buf is not None:
                st = SwappedTensor(t, buf, self.pool, self.swapper)
                st.counter = self.counter
                run._dedup[key] = (st, weakref.ref(t))
                run.swapped[self._group_of(module)].append(st)
                self._pending_out.setdefault(ptr, []).append(st)
                self.stats["swapped_bytes"] += nbytes
                self.stats["swapped_tensors"] += 1
                if self.counter is not None and tag is not None:
                    self.counter.by_tag[tag] = self.counter.by_tag.get(tag, 0) + t.untyped_storage().nbytes()
                return st
        if self.counter is not None:
            return self.counter.hold(t, tag)
        return t

    def _in_chunk(self, run: LayerRun, layer: int, vpp_stage: int, whole: bool = False) -> None:
        """Puts a layer run into its model chunk run: the one being run forward when the previous
        layer forward was the layer before in the same virtual pipeline stage, else a new one. A
        whole-layer recompute is nobody's first / last run (it has no swapped tensors)."""
        chunk = self._chunk
        if chunk is None or chunk.backward_started or self._last_key != (layer - 1, vpp_stage):
            chunk = ChunkRun(vpp_stage, None if whole else run)
            self._chunk = chunk
            self._pending_chunks.append(weakref.ref(chunk))
            self._stages.add(vpp_stage)
        else:
            chunk.last = _none if whole else weakref.ref(run)
        run.chunk = chunk
        self._last_key = (layer, vpp_stage)

    def _live_pending(self) -> List[ChunkRun]:
        live = [c for c in (w() for w in self._pending_chunks) if c is not None and not c.backward_started]
        self._pending_chunks = [weakref.ref(c) for c in live]
        return live

    def _chunk_backward_starts(self, chunk: ChunkRun) -> None:
        """Notes the start of a chunk run's backward; when no chunk run is left waiting for its
        backward, the step's order is learned."""
        chunk.backward_started = True
        if self._chunk is chunk:
            self._chunk = None
        self._order_now.append(chunk.vpp_stage)
        if not self._live_pending():
            self._order_learned, self._order_now = self._order_now, []

    def _next_backward_chunk(self, chunk: ChunkRun) -> Optional[ChunkRun]:
        """The chunk run whose backward follows ``chunk``'s, among those run forward already. Within
        a virtual pipeline stage backwards follow the forwards' order (both of Megatron-Core's
        schedules do so); which stage comes next is the last step's order at this point of the
        step, or, with one stage only, the oldest. ``None`` when unknown (the first step of an
        interleaved schedule): a guess that is wrong only prefetches earlier than needed, never
        changes a result, but holds device memory longer."""
        live = self._live_pending()
        if not live:
            return None
        pos = len(self._order_now) - 1
        learned = self._order_learned
        if learned is not None and 0 <= pos < len(learned) - 1 and learned[pos] == chunk.vpp_stage:
            want = learned[pos + 1]
        elif len(self._stages) == 1:
            want = live[0].vpp_stage
        else:
            return None
        return next((c for c in live if c.vpp_stage == want), None)

    def _pending_swaps_of(self, t: torch.Tensor) -> List[SwappedTensor]:
        return self._pending_out.pop(t.untyped_storage().data_ptr(), [])

    def _group_of(self, module: str) -> str:
        # Swapped tensors of the pre-MLP norm are prefetched with the MLP group; the input norm's with
        # attention: tag() records which one is active.
        if module == "layernorm":
            return self._norm_group
        return "attn" if module in ("attention", "mla_up_proj") else "mlp"

    _norm_group = "attn"

    # -- what the glue calls ------------------------------------------------------------------------

    def layer(self, fn: Callable, layer: int, vpp_stage: int = 0, *, owner: Any = None,
              buffers_of: Optional[torch.nn.Module] = None) -> Callable:
        """Wraps a layer's forward: a :class:`LayerRun` per call, the pack hooks around it. For a
        layer the plan recomputes whole, one output-discarding region over the whole forward (the
        modules' own regions and tags step aside); ``owner``: the object whose attributes the forward
        changes (the token dispatcher), installed as they were for the replay and restored after it;
        ``buffers_of``: the module whose buffers the replay must not change (the layer)."""
        ex = self

        def forward(*args, **kwargs):
            if not torch.is_grad_enabled() or ex._replaying:
                return fn(*args, **kwargs)
            measure = ex.layer_stats is not None and ex.counter is not None
            if measure:
                before, t0 = ex.counter.current, time.perf_counter()
            if (layer, vpp_stage) in ex._whole:
                out = ex._whole_layer(fn, layer, vpp_stage, owner, buffers_of, args, kwargs)
            else:
                prev = ex._last_run
                if prev is not None and (prev.layer != layer - 1 or prev.vpp_stage != vpp_stage):
                    prev = None
                run = LayerRun(ex, layer, vpp_stage, prev)
                ex._in_chunk(run, layer, vpp_stage)
                if ex.trace is not None:
                    ex.trace.on_layer(layer, vpp_stage, args, kwargs)
                outer = ex._run
                ex._run = run
                try:
                    with torch.autograd.graph.saved_tensors_hooks(ex._pack, _unpack):
                        out = fn(*args, **kwargs)
                finally:
                    ex._run = outer
                run.end_forward()
                ex._last_run = run
                ex._pending_out = {}
            if measure:
                if ex.device.type == "cuda":
                    torch.cuda.synchronize(ex.device)
                st = ex.layer_stats.setdefault((layer, vpp_stage), [0, 0.0, 0, 0])
                st[0] += ex.counter.current - before
                st[1] += time.perf_counter() - t0
                st[2] += 1
                # The layer's input (what a whole-layer recompute holds): its differentiable inputs.
                st[3] += sum({x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()
                              for x in _tensors_in((args, kwargs)) if x.requires_grad}.values())
            return out

        return forward

    def _whole_layer(self, fn, layer, vpp_stage, owner, buffers_of, args, kwargs):
        """Whole-layer recompute: the forward runs once keeping nothing (inner regions and tags see
        no layer run and step aside), its inputs stay, and the backward runs it again with the
        forward's RNG states and the owner's attributes as they were, then differentiates that."""
        ex = self
        rng = _rng_state(ex._rng_devices, ex.rng_sources)
        state = dict(owner.__dict__) if owner is not None else None
        outer = ex._run
        ex._run = None
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: None, _dropped):
                out = fn(*args, **kwargs)
        finally:
            ex._run = outer
        outs = _tensors_in(out)
        diff = [t for t in outs if t.requires_grad]
        if not diff:
            return out
        run = LayerRun(ex, layer, vpp_stage, None)
        ex._in_chunk(run, layer, vpp_stage, whole=True)
        region = _Region(ex, run, "layer", "mlp", fn, fn, args, kwargs, rng, owner, state, buffers_of)
        region.diff_outs = [t.detach() for t in diff]
        region.nondiff_outs = [t for t in outs if not t.requires_grad]
        # The outputs stay: they are the next layer's input (kept there, or by whatever follows).
        region.discard = [None] * len(diff)
        region.nbytes = [None] * len(diff)
        inputs = _tensors_in((args, kwargs))
        if ex.counter is not None:
            region.input_tokens = [ex.counter.add(x, (layer, "layer")) for x in inputs
                                   if x.untyped_storage().data_ptr() not in ex._param_ptrs]
        seen = set()
        for x in inputs:
            if x.requires_grad and id(x) not in seen:
                seen.add(id(x))
                region.grad_inputs.append(x)
        res = _Replay.apply(region, ex._anchor, *region.grad_inputs)
        res = list(res) if isinstance(res, tuple) else [res]
        region.diff_outs = [t.detach() for t in res]
        ex.stats["regions"] += 1
        ex._last_run = None
        ex._pending_out = {}
        if ex.counter is not None:
            ex.counter.sample()
        it = iter(res)
        return _map_tensors(out, lambda t: next(it) if t.requires_grad else t)

    @contextlib.contextmanager
    def _tagged(self, module: str, group: Optional[str] = None):
        run = self._run
        self._tags.append((run, module))
        saved_norm = self._norm_group
        if group is not None:
            self._norm_group = group
        t0 = time.perf_counter() if self.timing is not None and run is not None else None
        try:
            yield run
        finally:
            self._tags.pop()
            self._norm_group = saved_norm
            if t0 is not None:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                key = (run.layer, module)
                # Nested tags (fc1 inside an expert tagged expert_act) are charged to the inner one.
                self.timing[key] = self.timing.get(key, 0.0) + time.perf_counter() - t0
                if len(self._tags) and self._tags[-1][1] != module:
                    outer = (self._tags[-1][0].layer if self._tags[-1][0] else None, self._tags[-1][1])
                    self.timing[outer] = self.timing.get(outer, 0.0) - (time.perf_counter() - t0)

    def tag(self, fn: Callable, module: str, group: Optional[str] = None) -> Callable:
        """Wraps ``fn`` so the tensors it saves are attributed to ``module`` (and swapped if the plan
        says so). ``group`` (for the norms): whose backward start prefetches them."""
        if module not in MODULES:
            raise ValueError(f"module: unknown module {module!r}; expected one of {', '.join(MODULES)}")
        ex = self

        def tagged(*args, **kwargs):
            if ex._run is None:
                return fn(*args, **kwargs)
            with ex._tagged(module, group):
                return fn(*args, **kwargs)

        return tagged

    def region(self, fn: Callable, module: str, group: str, *, actions=(Action.RECOMPUTE,), owner=None,
               buffers_of: Optional[torch.nn.Module] = None, replay: Optional[Callable] = None,
               tag_as: Optional[str] = None, also=()) -> Callable:
        """Wraps ``fn`` (a module's forward or a dispatcher method) as an output-discarding checkpoint
        used when the plan gives ``module`` one of ``actions``; otherwise ``fn`` is only tagged.
        ``owner``: the object whose attributes ``fn`` reads and writes (installed as they were in the
        forward for the replay); ``buffers_of``: a module whose buffers the replay must not change;
        ``replay(owner_state_after_forward)``: returns the function the replay calls instead of ``fn``
        (e.g. an exchange with the forward's route); ``tag_as``: the module its saved tensors are
        attributed to when that is not ``module`` (the exchange, decided by ``expert_fc1``'s
        ``recompute_exchange``, saves as ``permute``); ``also``: further ``(module, action)`` pairs
        that make the region recompute (the local permute is replayed with the exchange, so that the
        exchange's input is not held either)."""
        if group not in GROUPS:
            raise ValueError(f"group: expected one of {GROUPS}, got {group!r}")
        tag_module = tag_as or module
        tagged = self.tag(fn, tag_module, group if tag_module == "layernorm" else None)
        ex = self
        actions = tuple(Action(a) for a in actions)
        also = tuple((m, Action(a)) for m, a in also)

        def wrapped(*args, **kwargs):
            run = ex._run
            if (run is None or ex._replaying or not torch.is_grad_enabled()
                    or (run.action(module) not in actions and not any(run.action(m) is a for m, a in also))):
                if ex.trace is None or run is None or ex._replaying or not torch.is_grad_enabled():
                    return tagged(*args, **kwargs)
                inside: List[int] = []
                ex.trace.calls += 1
                call = ex.trace.calls
                ex.trace.open.append((call, inside))
                try:
                    out = tagged(*args, **kwargs)
                finally:
                    ex.trace.open.pop()
                ex.trace.on_region(run, module, group, actions, also, args, kwargs, out, call, inside)
                return out
            rng = _rng_state(ex._rng_devices, ex.rng_sources)
            state = dict(owner.__dict__) if owner is not None else None
            dropped = []

            def drop(t):
                dropped.append(True)

            with ex._tagged(tag_module, group if tag_module == "layernorm" else None):
                with torch.autograd.graph.saved_tensors_hooks(drop, _dropped):
                    out = fn(*args, **kwargs)
            outs = _tensors_in(out)
            diff = [t for t in outs if t.requires_grad]
            if not diff:
                return out
            inputs = _tensors_in((args, kwargs))
            keep_ptrs = {x.untyped_storage().data_ptr() for x in inputs} | ex._param_ptrs
            if not dropped and all(t.untyped_storage().data_ptr() in keep_ptrs for t in diff):
                # Nothing was saved and every output aliases an input (a view, a pass-through): the
                # graph is whole, and holding the inputs for a replay would only add memory.
                return out
            region = _Region(ex, run, module, group, fn, fn, args, kwargs, rng, owner, state, buffers_of)
            if replay is not None:
                region.replay_fn = replay(dict(owner.__dict__) if owner is not None else None)
            region.diff_outs = [t.detach() for t in diff]
            region.nondiff_outs = [t for t in outs if not t.requires_grad]
            for d in region.diff_outs:
                st = d.untyped_storage()
                own = (st.data_ptr() not in keep_ptrs and d.storage_offset() == 0 and d.is_contiguous()
                       and st.nbytes() == d.numel() * d.element_size() and d._base is None)
                region.discard.append(d if own else None)
                region.nbytes.append(st.nbytes() if own else None)
            if ex.counter is not None:
                region.input_tokens = [ex.counter.add(x, (run.layer, tag_module)) for x in inputs
                                       if x.untyped_storage().data_ptr() not in ex._param_ptrs]
            seen = set()
            for x in inputs:
                if x.requires_grad and id(x) not in seen:
                    seen.add(id(x))
                    region.grad_inputs.append(x)
            # The anchor makes the outputs require grad even when no input does (the parameters
            # inside the region get theirs from the replay).
            res = _Replay.apply(region, ex._anchor, *region.grad_inputs)
            res = list(res) if isinstance(res, tuple) else [res]
            region.diff_outs = [t.detach() for t in res]
            for i, d in enumerate(region.discard):
                if d is not None:
                    region.discard[i] = region.diff_outs[i]
            run.regions[group].append(region)
            ex.stats["regions"] += 1
            it = iter(res)
            return _map_tensors(out, lambda t: next(it) if t.requires_grad else t)

        return wrapped

    def group_output(self, out, group: str):
        """Marks the output of a group's forward (a tensor, or a tuple whose first item is one): its
        ``grad_fn`` starts the group's backward (prefetch and replay)."""
        run = self._run
        t = out[0] if isinstance(out, (tuple, list)) else out
        if run is None or not isinstance(t, torch.Tensor) or t.grad_fn is None:
            return out
        run.has_trigger[group] = True
        t.grad_fn.register_prehook(lambda grads, run=run, group=group: run.backward_starts(group))
        return out
