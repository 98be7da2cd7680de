"""pytest plugin for ``benches/gpu_check.py`` (loaded with ``-p gpu_check_plugin``).

* ``MOERAIL_GPU_CHECK_RESULTS=path``: every test's outcome is appended to ``path`` as one JSON
  line the moment it is known, so a run killed at its stage's time limit still reports what ran.
* ``MOERAIL_GPU_CHECK_MEGATRON=1``: Megatron-LM's MoE unit tests, unpacked from their release
  tarball, import a few helpers that are not in that tarball nor in the megatron-core wheel
  (``tests.test_utils...download_unit_tests_dataset``, ``tests.unit_tests.dist_checkpointing``,
  ``megatron.training.initialize._set_random_seed``). Minimal stand-ins are registered for those
  names only; test files that need more of Megatron-LM's ``megatron.training`` are left out by the
  caller and reported as such.
* ``MOERAIL_GPU_CHECK_WITH_MOERAIL=1``: before any test module is imported,
  ``moerail.integrations.megatron.patch_moe_utils()`` rebinds Megatron's ``moe_utils`` functions to
  moerail's everywhere, and every ``MoELayer`` built routes with ``MoerailTopKRouter``
  (``MOERAIL_GPU_CHECK_DISPATCHER=1``: also moerail's dispatcher, via ``use_moerail``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import types

_RESULTS = os.environ.get("MOERAIL_GPU_CHECK_RESULTS")
_seen: dict = {}


def _write(rec: dict) -> None:
    if not _RESULTS:
        return
    with open(_RESULTS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _short(longrepr) -> str:
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return str(longrepr[2])
    text = str(longrepr)
    return text[-1500:]


def pytest_collectreport(report):
    if report.failed:
        _write({"nodeid": report.nodeid or "<collection>", "outcome": "error", "when": "collect",
                "message": _short(report.longrepr)})


def pytest_runtest_logreport(report):
    nodeid = report.nodeid
    if report.when == "setup" and report.skipped:
        _write({"nodeid": nodeid, "outcome": "skipped", "when": "setup", "message": _short(report.longrepr)})
    elif report.failed:
        _write({"nodeid": nodeid, "outcome": "failed" if report.when == "call" else "error", "when": report.when,
                "message": _short(report.longrepr), "duration": report.duration})
    elif report.when == "call":
        outcome = "skipped" if report.skipped else "passed"
        _write({"nodeid": nodeid, "outcome": outcome, "when": "call", "duration": report.duration,
                "message": _short(report.longrepr) if report.skipped else ""})


# ------------------------------------------------------------------------------------------------
# Megatron-LM's MoE unit tests
# ------------------------------------------------------------------------------------------------


class _TempNamedDir:
    """Megatron-LM's ``tests.unit_tests.dist_checkpointing.TempNamedDir``: a named directory that
    exists for the ``with`` block (single process here, so ``sync`` has nothing to wait for)."""

    def __init__(self, name, sync: bool = True, ignore_cleanup_errors: bool = False):
        self.name = str(name)
        self.ignore_cleanup_errors = ignore_cleanup_errors

    def __enter__(self):
        os.makedirs(self.name, exist_ok=True)
        return self.name

    def __exit__(self, *exc):
        shutil.rmtree(self.name, ignore_errors=True)
        return False

    def cleanup(self):
        shutil.rmtree(self.name, ignore_errors=True)


def _set_random_seed(seed_, data_parallel_random_init=False, te_rng_tracker=False, inference_rng_tracker=False,
                     use_cudagraphable_rng=False, **_):
    """Megatron-LM's ``megatron.training.initialize._set_random_seed`` (the seeds of Python, numpy,
    torch and Megatron's model-parallel CUDA RNG tracker, per pipeline and data-parallel rank)."""
    import inspect

    import numpy as np
    import torch
    from megatron.core import mpu, tensor_parallel

    if seed_ is None or seed_ <= 0:
        raise ValueError(f"Seed ({seed_}) should be a positive integer.")
    seed = seed_ + 100 * mpu.get_pipeline_model_parallel_rank()
    if data_parallel_random_init:
        seed += 10 * mpu.get_data_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.device_count() > 0:
        fn = tensor_parallel.model_parallel_cuda_manual_seed
        params = inspect.signature(fn).parameters
        kw = {k: v for k, v in dict(te_rng_tracker=te_rng_tracker, inference_rng_tracker=inference_rng_tracker,
                                     use_cudagraphable_rng=use_cudagraphable_rng).items() if k in params}
        fn(seed, **kw)


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    m.__path__ = []  # a package, so submodules can be registered under it
    sys.modules[name] = m
    return m


def _download_and_extract_asset(*args, **kwargs):
    raise ImportError("no test data download on this machine (gpu_check: offline)")


def _install_megatron_stubs() -> None:
    import importlib.util
    import typing

    if not hasattr(typing, "override"):
        # megatron-core 0.19's megatron.training needs Python 3.12 (its wheel says so); the CPU
        # rehearsal collects its tests on an older Python: the decorator does nothing at run time.
        typing.override = lambda f: f
    try:
        from megatron.core import utils as mcore_utils

        te_min = mcore_utils.is_te_min_version

        def is_te_min_version(*args, **kwargs):
            """Megatron 0.16's check compares ``None`` with a version when Transformer Engine is not
            installed (its CI always has it); without TE no TE version is new enough."""
            try:
                return te_min(*args, **kwargs)
            except TypeError:
                if mcore_utils.get_te_version() is None:
                    return False
                raise

        mcore_utils.is_te_min_version = is_te_min_version
    except ImportError:
        pass

    _module("tests.test_utils")
    _module("tests.test_utils.python_scripts")
    _module("tests.test_utils.python_scripts.download_unit_tests_dataset",
            download_and_extract_asset=_download_and_extract_asset)
    _module("tests.unit_tests.dist_checkpointing", TempNamedDir=_TempNamedDir)
    if importlib.util.find_spec("megatron.training") is None:
        _module("megatron.training")
        _module("megatron.training.initialize", _set_random_seed=_set_random_seed)


def _install_moerail() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.moe import moe_layer
        from megatron.core.transformer.moe.router import TopKRouter

    from moerail.integrations import megatron as mi

    mi.patch_moe_utils()
    router_cls = mi.MoerailTopKRouter
    dispatcher = os.environ.get("MOERAIL_GPU_CHECK_DISPATCHER", "") not in ("", "0")
    init = moe_layer.MoELayer.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if dispatcher and getattr(self.token_dispatcher, "tp_size", 1) == 1 and \
                type(self.token_dispatcher).__name__ == "MoEAlltoAllTokenDispatcher":
            mi.use_moerail(self)
        elif type(getattr(self, "router", None)) is TopKRouter:
            self.router.__class__ = router_cls  # same state, moerail's routing functions

    moe_layer.MoELayer.__init__ = __init__
    print(f"gpu_check: moerail on (patch_moe_utils, MoerailTopKRouter{', dispatcher' if dispatcher else ''})",
          file=sys.stderr)


# At import (``-p`` imports the plugin before any conftest.py is loaded): Megatron's conftests
# import the helpers stood in for here.
if os.environ.get("MOERAIL_GPU_CHECK_MEGATRON", "") not in ("", "0"):
    _install_megatron_stubs()


def pytest_configure(config):
    if os.environ.get("MOERAIL_GPU_CHECK_WITH_MOERAIL", "") not in ("", "0"):
        _install_moerail()
