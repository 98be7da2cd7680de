"""Stand-in of ``mindspeed.patch_utils``: ``MindSpeedPatchesManager``."""

import importlib
import sys
import types
from typing import Dict


def _dummy(name):
    def dummy_function(*args, **kwargs):
        raise RuntimeError(f"function {name} does not exist")

    return dummy_function


def _module_dicts():
    for mod in list(sys.modules.values()):
        d = getattr(mod, "__dict__", None) if isinstance(mod, types.ModuleType) else None
        if isinstance(d, dict):
            yield d


def _resolve(path: str, create_dummy: bool):
    """(owner, attribute name) of a dotted target; the owner is a module or a class."""
    owner_path, attr = path.rsplit(".", 1)
    parts = owner_path.split(".")
    obj = None
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
            continue
        except ModuleNotFoundError:
            pass
        if obj is not None and hasattr(obj, parts[i - 1]):
            obj = getattr(obj, parts[i - 1])
            continue
        if not create_dummy:
            raise ModuleNotFoundError(f"no module {name}")
        mod = types.ModuleType(name)
        sys.modules[name] = mod
        if obj is not None:
            setattr(obj, parts[i - 1], mod)
        obj = mod
    if not hasattr(obj, attr):
        if not create_dummy:
            raise RuntimeError(f"{owner_path} has no {attr}")
        setattr(obj, attr, _dummy(path))
    return obj, attr


class Patch:
    def __init__(self, target, new_func, create_dummy):
        self.target = target
        self.create_dummy = create_dummy
        self.patch_func = None
        self.wrappers = []
        self.owner = self.attr = self.orig_func = self.final_func = None
        self.is_applied = False
        self.set_patch_func(new_func if new_func is not None else _dummy(target))

    def set_patch_func(self, new_func, force_patch=False):
        if getattr(new_func, "__name__", "").endswith(("wrapper", "decorator")):
            if new_func not in self.wrappers:
                self.wrappers.append(new_func)
        else:
            if self.patch_func is not None and not force_patch:
                raise RuntimeError(f"the patch of {self.target} exists")
            self.patch_func = new_func
        self.is_applied = False

    def apply_patch(self):
        if self.is_applied:
            return
        owner, attr = _resolve(self.target, self.create_dummy)
        current = getattr(owner, attr)
        if self.owner is None:
            self.owner, self.attr, self.orig_func = owner, attr, current
        final = self.patch_func if self.patch_func is not None else self.orig_func
        for w in self.wrappers:
            final = w(final)
        setattr(owner, attr, final)
        for d in _module_dicts():
            if d.get(attr) is current:
                d[attr] = final
        self.final_func = final
        self.is_applied = True

    def remove_patch(self):
        if self.owner is None:
            return
        for d in _module_dicts():
            if d.get(self.attr) is self.final_func:
                d[self.attr] = self.orig_func
        setattr(self.owner, self.attr, self.orig_func)
        self.patch_func = self.final_func = None
        self.wrappers.clear()
        self.is_applied = False


class MindSpeedPatchesManager:
    patches_info: Dict[str, Patch] = {}

    @staticmethod
    def register_patch(orig_func_name, new_func=None, force_patch=False, create_dummy=False):
        info = MindSpeedPatchesManager.patches_info
        if orig_func_name not in info:
            info[orig_func_name] = Patch(orig_func_name, new_func, create_dummy)
        else:
            info[orig_func_name].set_patch_func(new_func, force_patch)

    @staticmethod
    def apply_patches():
        for patch in MindSpeedPatchesManager.patches_info.values():
            patch.apply_patch()

    @staticmethod
    def remove_patches():
        for patch in MindSpeedPatchesManager.patches_info.values():
            patch.remove_patch()
