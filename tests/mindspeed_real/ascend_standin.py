"""Stand-ins for the Ascend-only modules MindSpeed imports (``torch_npu`` and its ``contrib``,
``torchair``, ``acl``, ``tbe``), and nothing else: any module under these names imports as an empty
package whose attributes are further empty stand-ins (calling one returns None). MindSpeed's own
code, Megatron-Core and torch are the real ones."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

ASCEND_ONLY = ("torch_npu", "torchair", "acl", "tbe", "npu_bridge")


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _StandIn(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value

    def __call__(self, *args, **kwargs):
        return None


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ASCEND_ONLY:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StandIn(spec.name)
        m.__path__ = []
        m.__file__ = f"/ascend-standin/{spec.name.replace('.', '/')}/__init__.py"
        return m

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
