"""The stubs of moerail._native are generated (tools/gen_stubs.py) and must match the build."""

import ast
import importlib
import inspect
import pathlib
import subprocess
import sys
import types

import moerail._native as native

ROOT = pathlib.Path(__file__).resolve().parent.parent
STUBS = ROOT / "python" / "moerail" / "_native"
SUBMODULES = ["util", "ops", "ep", "balance", "parallel", "memory", "sim", "cuda", "ascend"]


def _stub_functions(path: pathlib.Path) -> dict:
    """{name: [(parameter, has default)]} of the top-level functions of a stub file."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            args = node.args.args
            n_defaults = len(node.args.defaults)
            out[node.name] = [(a.arg, i >= len(args) - n_defaults) for i, a in enumerate(args)]
    return out


def _built_functions(mod: types.ModuleType) -> dict:
    out = {}
    for name, fn in vars(mod).items():
        # Built functions only: test stand-ins (mindspeed_standin) may plant Python functions
        # in every loaded module.
        if isinstance(fn, types.BuiltinFunctionType):
            params = inspect.signature(fn).parameters.values()
            out[name] = [(p.name, p.default is not inspect.Parameter.empty) for p in params]
    return out


def test_native_is_the_compiled_extension_not_the_stub_folder():
    # python/moerail/_native/ holds only .pyi files: it must not shadow the extension module.
    assert native.__file__ is not None and native.__file__.endswith((".so", ".pyd")), native.__file__
    assert callable(native.ops.router_forward)


def test_every_function_has_one_home():
    """Every binding lives in the submodule that mirrors its core module, and nowhere else: no
    flat alias on ``moerail._native``, no name in two submodules."""
    assert _built_functions(native) == {}
    seen = set()
    for sub in SUBMODULES:
        mod = importlib.import_module(f"moerail._native.{sub}")
        assert mod is getattr(native, sub)
        assert mod.__name__ == f"moerail._native.{sub}"
        assert all(
            fn.__module__ == mod.__name__ for fn in vars(mod).values() if isinstance(fn, types.BuiltinFunctionType)
        )
        for name in _built_functions(mod):
            assert name not in seen, name
            seen.add(name)


def test_stubs_match_the_built_bindings():
    for sub in SUBMODULES:
        built = _built_functions(getattr(native, sub))
        stub = _stub_functions(STUBS / f"{sub}.pyi")
        assert set(stub) == set(built), (sub, sorted(set(stub) ^ set(built)))
        for name in built:
            assert stub[name] == built[name], (sub, name, stub[name], built[name])
    init = (STUBS / "__init__.pyi").read_text()
    for sub in SUBMODULES:
        assert f"from . import {sub} as {sub}\n" in init, sub


def test_stubs_are_up_to_date():
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_stubs.py"), "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
