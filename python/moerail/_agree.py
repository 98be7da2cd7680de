"""The fixed-size first collective of every exchange moerail starts.

Before any collective whose size depends on the configuration (the dispatcher's count vectors,
a migration's buffers, the load tracker's count matrix), the ranks all-gather one header of
:data:`HEADER_LEN` int64 values: a tag, this rank's status (0: ready, 1: its arguments failed),
a hash of its configuration and the length of what comes next. The header has the same size on
every rank, so a misconfigured rank cannot make gloo / NCCL fail a size check (SIGABRT) or leave
its peers waiting on a message of another size: every rank reads the same headers and raises the
same error.
"""

from __future__ import annotations

import zlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch

HEADER_LEN = 4
_TAG = 0x6D6F6572  # "moer"


def config_hash(*items) -> int:
    """A 32-bit hash of ``repr(items)`` (stable across processes, unlike ``hash``)."""
    return zlib.crc32(repr(items).encode())


def header(status: int, cfg_hash: int, length: int) -> torch.Tensor:
    return torch.tensor([_TAG, int(status), int(cfg_hash), int(length)], dtype=torch.int64)


def check_headers(gathered: torch.Tensor, what: str, fields: str, own_error: Optional[BaseException],
                  noun: Tuple[str, str] = ("", "")) -> None:
    """Raises on every rank alike unless all ``gathered [W, HEADER_LEN]`` headers agree: this
    rank's own argument error first, then the ranks that failed, then a configuration or length
    mismatch (``fields`` names what the hash covers; ``noun`` qualifies the arguments and the
    configuration in the messages)."""
    g = gathered.to("cpu", torch.int64)
    tags = g[:, 0].tolist()
    if own_error is not None:
        raise own_error
    bad_tag = [r for r, t in enumerate(tags) if t != _TAG]
    if bad_tag:
        raise RuntimeError(f"{what}: rank(s) {bad_tag} sent no moerail header (a different collective or version)")
    bad = (g[:, 1] != 0).nonzero().flatten().tolist()
    if bad:
        raise RuntimeError(f"{what}: rank(s) {bad} rejected their {noun[0] + ' ' if noun[0] else ''}arguments (see their errors)")
    hashes, lengths = g[:, 2].tolist(), g[:, 3].tolist()
    if len(set(hashes)) != 1 or len(set(lengths)) != 1:
        raise RuntimeError(
            f"{what}: the ranks disagree on the {noun[1] + ' ' if noun[1] else ''}configuration ({fields}): per-rank hashes {hashes}, "
            f"per-rank lengths {lengths}"
        )


def agree(
    gather: Callable[[torch.Tensor], torch.Tensor],
    what: str,
    fields: str,
    cfg_hash: int,
    length: int,
    own_error: Optional[BaseException] = None,
    noun: Tuple[str, str] = ("", ""),
) -> None:
    """Exchanges this rank's header through ``gather`` (a ``[HEADER_LEN]`` tensor -> ``[W,
    HEADER_LEN]`` all-gather) and checks them (:func:`check_headers`)."""
    h = header(0 if own_error is None else 1, cfg_hash if own_error is None else 0, length if own_error is None else 0)
    check_headers(gather(h), what, fields, own_error, noun)


def all_gather_fixed(dist, group, timeout=None, device: Optional[torch.device] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gather for :func:`agree` over ``group`` with ``torch.distributed`` (``timeout``: a
    ``timedelta``; the wait raises moerail's message when it passes)."""

    def gather(h: torch.Tensor) -> torch.Tensor:
        v = h.to(device) if device is not None else h
        parts: List[torch.Tensor] = [torch.empty_like(v) for _ in range(dist.get_world_size(group))]
        work = dist.all_gather(parts, v, group=group, async_op=True)
        try:
            ok = work.wait(timeout) if timeout is not None else work.wait()
        except RuntimeError as e:
            raise RuntimeError(f"moerail: a peer rank failed or left during the configuration check: {e}") from e
        if ok is False:
            raise RuntimeError(f"moerail: the configuration check did not finish within {timeout}")
        return torch.stack(parts).cpu()

    return gather


def shapes_key(tensors: Sequence[torch.Tensor]):
    return tuple((tuple(t.shape), str(t.dtype)) for t in tensors)
