"""Deprecated: moved to :mod:`moerail.ep` (``plan_all_to_all``, ``AllToAllPlan`` and ``STRATEGIES`` in
:mod:`moerail.ep.plan`, ``AllToAllDispatcher`` in :mod:`moerail.ep.dispatcher`). Removed in the next release."""

from __future__ import annotations

from . import ep as _new
from ._deprecated import forward_to, module_dir, warn_moved

__all__ = list(_new.__all__)

__getattr__ = forward_to(__name__, ["moerail.ep.plan", "moerail.ep.dispatcher", "moerail.ep.autograd"])
__dir__ = module_dir(_new.plan, _new.dispatcher, _new.autograd)

warn_moved(__name__, "moerail.ep")
