"""Deprecated: moved to :mod:`moerail.backends.hccl`. Removed in the next release."""

from __future__ import annotations

from ._deprecated import forward_to, module_dir, warn_moved
from .backends import hccl as _new

__all__ = list(_new.__all__)

__getattr__ = forward_to(__name__, ["moerail.backends.hccl"])
__dir__ = module_dir(_new)

warn_moved(__name__, "moerail.backends.hccl")
