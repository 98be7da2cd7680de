"""Module paths that moved, kept for one release: each old module warns when imported and
re-exports the objects from where they live now (the same objects, not copies)."""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, Sequence


def warn_moved(old: str, new: str) -> None:
    """The ``DeprecationWarning`` of an old module, pointing at the code that imported it."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; import from {new} instead",
        DeprecationWarning,
        stacklevel=3,
    )


def forward_to(old: str, modules: Sequence[str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for the old module: any other name it had (private helpers
    included) is looked up in the modules that hold it now."""

    def __getattr__(name: str):
        if not name.startswith("__"):
            for m in modules:
                mod = importlib.import_module(m)
                if name in vars(mod):
                    return vars(mod)[name]
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__


def module_dir(*modules) -> Callable[[], list]:
    """A module ``__dir__`` for the old module: the names of the modules that hold its objects now."""

    def __dir__() -> list:
        return sorted({n for m in modules for n in vars(m) if not n.startswith("__")})

    return __dir__
