"""Deprecated: moved to :mod:`moerail.ops` (the module is :mod:`moerail.ops.router`). Removed in the
next release."""

from __future__ import annotations

from ._deprecated import forward_to, module_dir, warn_moved
from .ops import router as _new

__all__ = list(_new.__all__)

__getattr__ = forward_to(__name__, ["moerail.ops.router"])
__dir__ = module_dir(_new)

warn_moved(__name__, "moerail.ops")
