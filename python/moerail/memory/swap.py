"""The swap path: saved tensors copied to a host pool and back, each swap-in ordered after its own
swap-out.

* On a GPU (or NPU) the copies run on a side stream into pinned host buffers. The swap-out waits
  (``wait_event``) for the compute stream to have produced the tensor, the source is tied to the
  side stream (``record_stream``) so the allocator cannot hand its memory out before the copy has
  read it, and an event marks the end of the copy. The swap-in is enqueued on the same side stream
  after ``wait_event(swap-out done)`` and ends in its own event, which the compute stream waits on
  before the backward reads the tensor.
* On the CPU two copy threads (one for swap-outs, one for swap-ins, as a GPU has a copy engine each
  way) do the copies: the swap-out is a future; the swap-in job first waits on that future
  (``result()``), then copies; the backward waits on the swap-in's future.

No global synchronisation is ever used: each tensor carries its own event / future pair.
``throttle_s`` slows every copy (a sleep in the copy thread, ``torch.cuda._sleep`` on the side
stream) for the stress tests: a swap-in then always finds its swap-out still running.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional

import torch

__all__ = ["HostPool", "SwappedTensor"]


class HostPool:
    """Host buffers for swapped tensors, at most ``capacity_bytes`` in use (pinned on accelerators).
    Freed buffers are kept by size and handed out again (no pinned allocation in the steady state)."""

    def __init__(self, capacity_bytes: int, *, pin: bool) -> None:
        self.capacity = int(capacity_bytes)
        self.pin = pin
        self.used = 0
        self.peak = 0
        self.refused_bytes = 0  # bytes that stayed on the device because the pool was full
        self._free: Dict[int, List[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Optional[torch.Tensor]:
        with self._lock:
            if self.used + nbytes > self.capacity:
                self.refused_bytes += nbytes
                return None
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            bucket = self._free.get(nbytes)
            if bucket:
                return bucket.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self.used -= buf.numel()
            self._free.setdefault(buf.numel(), []).append(buf)


def _host_view(buf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return buf.view(t.dtype).as_strided(t.shape, t.stride())


def storage_nbytes_needed(t: torch.Tensor) -> int:
    """Bytes of a dense, non-overlapping tensor's elements (its strides kept)."""
    return t.numel() * t.element_size()


class SwappedTensor:
    """One saved tensor living in the host pool between its forward and its backward."""

    __slots__ = ("shape", "stride", "dtype", "device", "pool", "buf", "out_done", "in_done", "dev", "_swapper",
                 "_src", "counter", "_count_key", "__weakref__")

    def __init__(self, t: torch.Tensor, buf: torch.Tensor, pool: HostPool, swapper: Swapper) -> None:
        self.shape, self.stride, self.dtype, self.device = t.shape, t.stride(), t.dtype, t.device
        self.pool, self.buf, self._swapper = pool, buf, swapper
        self.in_done = None
        self.dev: Optional[torch.Tensor] = None
        self._src = t
        self.counter = None  # a SavedTensorCounter: the device copy counts from its swap-in on
        self._count_key = None
        self.out_done = swapper.swap_out(self, t)

    # -- the backward side ------------------------------------------------------------------------

    def prefetch(self) -> None:
        """Starts the copy back (after this tensor's own swap-out); returns at once."""
        if self.in_done is None and self.dev is None:
            if self.counter is not None:
                n = 1
                for d in self.shape:
                    n *= d
                self._count_key = self.counter.add_bytes(n * self.dtype.itemsize)
            self.in_done = self._swapper.swap_in(self)

    def get(self) -> torch.Tensor:
        """The tensor, back on its device: waits for this tensor's swap-in (which waited for its
        swap-out)."""
        if self.dev is None:
            self.prefetch()
            self.dev = self._swapper.wait_in(self)
            self.in_done = None
            self.pool.give(self.buf)
            self.buf = None
        return self.dev

    def wait_out(self) -> None:
        """Blocks until the swap-out has read the source (a producer that frees the source's
        storage itself calls this first)."""
        self._swapper.wait_out(self)

    def __del__(self):
        key = getattr(self, "_count_key", None)
        if key is not None:
            try:
                self.counter._release(key)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
        buf = getattr(self, "buf", None)
        if buf is not None:
            try:
                self._swapper.wait_out(self)
                self.pool.give(buf)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


class Swapper:
    """The copy engine: a side stream on accelerators, a thread pool on the CPU."""

    def __init__(self, device: torch.device, *, throttle_s: float = 0.0, prefetch_delay_s: float = 0.0) -> None:
        self.device = device
        self.throttle_s = float(throttle_s)
        self.prefetch_delay_s = float(prefetch_delay_s)
        self.accel = device.type != "cpu"
        # How often a swap-in found its swap-out still running, and a backward found its swap-in still
        # running (the waits that keep the data right; the stress tests make both happen).
        self.stats = {"in_waited_on_out": 0, "backward_waited_on_in": 0}
        if self.accel:
            mod = getattr(torch, device.type)
            self._mod = mod
            # Device-to-host and host-to-device copies on their own streams (their own copy engines):
            # only the per-tensor events order a swap-in after its swap-out.
            self.stream = mod.Stream(device=device)
            self.in_stream = mod.Stream(device=device)
        else:
            self._out_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moerail-swap-out")
            self._in_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moerail-swap-in")

    def _sleep_on_stream(self) -> None:
        if self.throttle_s > 0 and self.device.type == "cuda":
            torch.cuda._sleep(int(self.throttle_s * 1e9))  # ~1 GHz cycles: throttle_s of spinning

    def swap_out(self, st: SwappedTensor, t: torch.Tensor):
        host = _host_view(st.buf, t)
        if self.accel:
            t = t.detach()
            ready = self._mod.Event()
            ready.record(self._mod.current_stream(self.device))
            with self._mod.stream(self.stream), torch.no_grad():
                self.stream.wait_event(ready)
                self._sleep_on_stream()
                host.copy_(t, non_blocking=True)
                t.record_stream(self.stream)
                done = self._mod.Event()
                done.record(self.stream)
            st._src = None  # record_stream keeps the memory until the side stream is past the copy
            return done

        t = t.detach()

        def job():
            if self.throttle_s:
                time.sleep(self.throttle_s)
            with torch.no_grad():
                host.copy_(t)
            st._src = None
            return True

        return self._out_pool.submit(job)

    def wait_out(self, st: SwappedTensor) -> None:
        if isinstance(st.out_done, Future):
            st.out_done.result()
        elif st.out_done is not None:
            st.out_done.synchronize()

    def swap_in(self, st: SwappedTensor):
        if self.accel:
            dev = torch.empty_strided(st.shape, st.stride, dtype=st.dtype, device=st.device)
            alloc = self._mod.Event()
            alloc.record(self._mod.current_stream(self.device))
            if not st.out_done.query():
                self.stats["in_waited_on_out"] += 1
            with self._mod.stream(self.in_stream), torch.no_grad():
                self.in_stream.wait_event(st.out_done)  # this tensor's own swap-out
                self.in_stream.wait_event(alloc)
                self._sleep_on_stream()
                dev.copy_(_host_view(st.buf, dev), non_blocking=True)
                dev.record_stream(self.in_stream)
                done = self._mod.Event()
                done.record(self.in_stream)
            return (dev, done)
        out_done = st.out_done
        buf = st.buf

        def job():
            if not out_done.done():
                self.stats["in_waited_on_out"] += 1
            out_done.result()  # this tensor's own swap-out first
            if self.prefetch_delay_s:
                time.sleep(self.prefetch_delay_s)
            if self.throttle_s:
                time.sleep(self.throttle_s)
            dev = torch.empty_strided(st.shape, st.stride, dtype=st.dtype, device=st.device)
            with torch.no_grad():
                dev.copy_(_host_view(buf, dev))
            return dev

        return self._in_pool.submit(job)

    def wait_in(self, st: SwappedTensor) -> torch.Tensor:
        if self.accel:
            dev, done = st.in_done
            if not done.query():
                self.stats["backward_waited_on_in"] += 1
            self._mod.current_stream(self.device).wait_event(done)
            return dev
        if not st.in_done.done():
            self.stats["backward_waited_on_in"] += 1
        return st.in_done.result()

    def close(self) -> None:
        if not self.accel:
            self._out_pool.shutdown(wait=True)
            self._in_pool.shutdown(wait=True)
