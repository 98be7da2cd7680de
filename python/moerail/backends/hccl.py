"""HCCL executor for the dispatcher's exchange plans on Ascend NPUs.

moerail plans, HCCL moves: :class:`HcclExchange` turns rows per peer (what a plan's stage
matrix holds for this rank) into HCCL's counts and displacements in elements and calls
``HcclAlltoAllV`` on the current NPU stream, through ``libhccl.so`` loaded at run time (the copy
torch_npu already loaded; see ``moerail doctor``). Every count and displacement is checked
against the tensors before HCCL is called.

Its ``exchange(buf, send_rows, recv_rows)`` has the shape of ``AllToAllDispatcher``'s exchange
step, so a dispatcher can use it in place of ``torch.distributed.all_to_all_single``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import _native

__all__ = ["HcclExchange"]


def _npu_stream(t: torch.Tensor) -> int:
    npu = getattr(torch, "npu", None)
    if t.device.type == "npu" and npu is not None:
        return int(npu.current_stream(t.device).npu_stream)
    return 0


def _default_device() -> torch.device:
    """Where a header goes when the caller's buffer is not a tensor: the current NPU, else the host."""
    npu = getattr(torch, "npu", None)
    if npu is not None and getattr(npu, "is_available", lambda: False)():
        return torch.device("npu", npu.current_device())
    return torch.device("cpu")


def _hccl_missing() -> Optional[str]:
    """Why ``libhccl.so`` cannot be used here (None: it can)."""
    st = _native.ascend.ascend_status(False)
    if "hccl" in st:
        return None
    return str(st.get("hccl_error", "libhccl.so not found"))


class HcclExchange:
    """An HCCL communicator over ``n_ranks`` ranks and the exchange steps that use it.

    Build it with :meth:`from_group` (the root info travels over an existing
    ``torch.distributed`` group), or directly from the root's ``root_info``
    (:meth:`root_info` on rank 0).
    """

    def __init__(self, n_ranks: int, rank: int, root_info: bytes):
        self.comm = _native.ascend.HcclComm(n_ranks, rank, root_info)

    @staticmethod
    def root_info() -> bytes:
        return _native.ascend.HcclComm.root_info()

    @classmethod
    def from_group(cls, group=None) -> HcclExchange:
        """A communicator over the ranks of ``group`` (rank ``i`` of the group is HCCL rank
        ``i``). Collective: every rank of ``group`` calls it. Each rank first checks that it can
        load HCCL, and the group's first rank makes the root info; what every rank found is
        all-gathered before any rank calls ``HcclCommInitRootInfo``, so a rank without HCCL makes
        every rank raise the same error instead of leaving the others waiting in HCCL."""
        import torch.distributed as dist

        rank, n = dist.get_rank(group), dist.get_world_size(group)
        try:
            mine = (None, cls.root_info()) if rank == 0 else (_hccl_missing(), None)
        except Exception as e:  # noqa: BLE001 - sent to every rank, raised on all of them below
            mine = (f"{type(e).__name__}: {e}", None)
        found: List[tuple] = [(None, None)] * n
        dist.all_gather_object(found, mine, group=group)
        bad = {r: why for r, (why, _) in enumerate(found) if why}
        if bad:
            raise RuntimeError("HCCL executor: not available on rank(s) "
                               + "; ".join(f"{r}: {why}" for r, why in sorted(bad.items())))
        return cls(n, rank, found[0][1])

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def n_ranks(self) -> int:
        return self.comm.n_ranks

    def exchange(self, buf: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int],
                 stream: Optional[int] = None, check: bool = True) -> torch.Tensor:
        """Rows ``buf[sum(send_rows[:p]) : ...]`` go to peer ``p``; returns the rows received,
        packed in peer order (``sum(recv_rows)`` rows).

        With ``check`` (the default), the ranks first all-gather a fixed-size header (status, a
        hash of the row size and dtype, every rank's send and receive rows: ``4 + 2 * n_ranks``
        int64), and every rank raises the same error unless each rank sends every peer exactly
        the rows that peer expects, of the same size and dtype: HCCL never sees counts that
        disagree, and a rank whose arguments failed makes its peers raise instead of waiting.
        ``AllToAllDispatcher`` passes ``check=False``: its ranks agreed on the plan already."""
        error = None
        try:
            if not isinstance(buf, torch.Tensor):
                raise TypeError(f"buf: expected a torch.Tensor, got {type(buf).__name__}")
            if buf.dim() < 1:
                raise ValueError("buf: expected rows (at least one dimension)")
            send_rows = self._rows(send_rows, "send_rows")
            recv_rows = self._rows(recv_rows, "recv_rows")
            buf = buf.contiguous()
            row = buf[0].numel() if buf.shape[0] else int(torch.Size(buf.shape[1:]).numel())
            if sum(send_rows) != buf.shape[0]:
                raise ValueError(f"send_rows: sum to {sum(send_rows)}, but buf has {buf.shape[0]} rows")
        except (TypeError, ValueError) as e:
            if not check:
                raise
            error = e
        if check:
            self._agree(buf, send_rows, recv_rows, error, stream)
        sc, sd = _native.ascend.hccl_counts_from_rows(send_rows, row)
        rc, rd = _native.ascend.hccl_counts_from_rows(recv_rows, row)
        out = torch.empty((sum(recv_rows), *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
        self.comm.alltoallv(buf, sc, sd, out, rc, rd, _npu_stream(buf) if stream is None else stream)
        return out

    def _agree(self, buf, send_rows, recv_rows, error: Optional[BaseException], stream: Optional[int]) -> None:
        """The fixed-size header before an exchange (see :meth:`exchange`); raises on every rank alike."""
        from .. import _agree

        n = self.n_ranks
        ok = error is None
        device = buf.device if isinstance(buf, torch.Tensor) else _default_device()
        cfg = _agree.config_hash(tuple(buf.shape[1:]), str(buf.dtype)) if ok else 0
        rows = (list(send_rows) + list(recv_rows)) if ok else [0] * (2 * n)
        mine = torch.cat([_agree.header(0 if ok else 1, cfg, n if ok else 0), torch.tensor(rows, dtype=torch.int64)])
        g = self.all_gather(mine.to(device), stream).cpu()
        _agree.check_headers(g[:, : _agree.HEADER_LEN], "HCCL exchange", "row shape, dtype", error)
        sends, recvs = g[:, _agree.HEADER_LEN : _agree.HEADER_LEN + n], g[:, _agree.HEADER_LEN + n :]
        bad = (sends != recvs.t()).nonzero().tolist()
        if bad:
            pairs = "; ".join(f"rank {p} sends rank {q} {int(sends[p, q])} rows, rank {q} expects {int(recvs[q, p])}"
                              for p, q in bad[:4])
            raise RuntimeError(f"HCCL exchange: the ranks' send_rows and recv_rows disagree: {pairs}"
                               + (f" (and {len(bad) - 4} more)" if len(bad) > 4 else ""))

    def _rows(self, rows: Sequence[int], name: str) -> List[int]:
        """One non-negative int per rank."""
        try:
            out = [int(r) for r in rows]
        except (TypeError, ValueError):
            raise TypeError(f"{name}: expected a sequence of ints (rows per rank)") from None
        if len(out) != self.n_ranks:
            raise ValueError(f"{name}: expected {self.n_ranks} entries (one per rank), got {len(out)}")
        if any(r < 0 for r in out):
            raise ValueError(f"{name}: row counts must be non-negative, got {out}")
        return out

    def all_gather(self, t: torch.Tensor, stream: Optional[int] = None) -> torch.Tensor:
        t = t.contiguous()
        out = torch.empty((self.n_ranks, *t.shape), dtype=t.dtype, device=t.device)
        self.comm.allgather(t, out, _npu_stream(t) if stream is None else stream)
        return out

    def close(self) -> None:
        self.comm.close()
