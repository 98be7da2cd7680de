"""Shared test set-up.

The reference is Megatron-Core's own ``moe_utils``. ``make test`` runs the suite against the
installed megatron-core (0.16 on Python 3.11: 3-tuple ``permute``) and then runs the tests marked
``megatron`` again with ``MOERAIL_MEGATRON_PATH`` pointing at an unpacked megatron-core 0.19
(5-tuple, argsort-based ``permute``), so both APIs are compared for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

_alt = os.environ.get("MOERAIL_MEGATRON_PATH")
if _alt:
    sys.path.insert(0, _alt)

import pytest  # noqa: E402
import torch  # noqa: E402

import moerail  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "megatron: compares moerail with megatron-core's own functions")


def pytest_report_header(config):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import megatron.core as mc

        where = os.path.dirname(mc.__file__)
        return f"megatron-core {mc.__version__} ({where}); torch {torch.__version__}; moerail {moerail.__version__}"
    except Exception as e:  # pragma: no cover
        return f"megatron-core not importable: {e}"


@pytest.fixture(scope="session")
def mcore():
    """Megatron-Core's ``moe_utils`` module (the reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.moe import moe_utils
    return moe_utils


@pytest.fixture(scope="session")
def mcore_api(mcore):
    from moerail.integrations.megatron import megatron_api

    return megatron_api(mcore)


@pytest.fixture
def restore_threads():
    n = moerail.get_num_threads()
    yield
    moerail.set_num_threads(n)


def make_routing(num_tokens, num_experts, topk, *, seed=0, dtype=torch.float32):
    """A random tie-free routing: (logits, probs [T, E], routing_map [T, E])."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g, dtype=torch.float64).to(dtype)
    probs, routing_map = moerail.topk_route(logits, topk)
    return logits, probs, routing_map


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (at least the smallest normal spacing)."""
    a = x.abs().double().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


@pytest.fixture(scope="session")
def ascend_standin(tmp_path_factory) -> Path:
    """A folder whose ``lib64`` holds the CANN/HCCL stand-in (the C library of
    rust/moerail-device/tests/ascend_standin, the same prototypes as acl.h / hccl.h) built as
    ``libascendcl.so`` and ``libhccl.so``."""
    src = Path(__file__).resolve().parent.parent / "rust" / "moerail-device" / "tests" / "ascend_standin" / "standin.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler (cc) to build the CANN/HCCL stand-in")
    d = tmp_path_factory.mktemp("ascend")
    (d / "lib64").mkdir()
    for name in ("libascendcl.so", "libhccl.so"):
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "lib64" / name), str(src)], check=True)
    return d
