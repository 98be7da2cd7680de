"""MindSpore (issue 5): the AOT C entry points (through ctypes, always) and, where mindspore is
installed, the ops on MindSpore tensors and ``ops.Custom(func_type="aot")``: the same results as
moerail's torch ops (which the other tests check against Megatron-Core)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import moerail
from moerail.integrations import mindspore as msi

try:
    import mindspore as ms

    MS_WHY = None
except Exception as e:  # noqa: BLE001 - any import failure means: not testable here
    ms = None
    MS_WHY = f"mindspore not importable here: {type(e).__name__}: {e}"


def _routing(t=12, e=6, k=2, h=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    probs, routing_map = moerail.topk_route(logits, k)
    return torch.randn(t, h, generator=g), probs, routing_map


class _Aot:
    """Calls an entry point as MindSpore does: arrays of pointers, ranks, shapes and dtype names."""

    def __init__(self):
        self.lib = ctypes.CDLL(msi.aot_library_path())
        self.lib.moerail_aot_last_error.restype = ctypes.c_char_p

    def __call__(self, name, arrays, dtype_names=None):
        n = len(arrays)
        params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
        ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
        shape_arrs = [(ctypes.c_int64 * max(1, a.ndim))(*a.shape) for a in arrays]
        shapes = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in shape_arrs])
        names = dtype_names or [str(a.dtype) for a in arrays]
        dtypes = (ctypes.c_char_p * n)(*[s.encode() for s in names])
        fn = getattr(self.lib, f"moerail_aot_{name}")
        fn.restype = ctypes.c_int
        return fn(n, params, ndims, shapes, dtypes, None, None)

    def error(self):
        return self.lib.moerail_aot_last_error().decode()


def test_aot_permute_and_unpermute_match_the_torch_ops():
    aot = _Aot()
    x, probs, rmap = _routing()
    ref = moerail.permute(x, rmap, probs)
    n = int(rmap.sum())
    permuted = np.zeros((n, x.shape[1]), np.float32)
    pprobs = np.zeros(n, np.float32)
    idx = np.zeros(n, np.int64)
    rc = aot("permute_with_probs", [x.numpy(), rmap.numpy(), probs.numpy(), permuted, pprobs, idx])
    assert rc == 0, aot.error()
    assert np.array_equal(permuted, ref[0].numpy())
    assert np.array_equal(pprobs, ref[1].numpy())
    assert np.array_equal(idx, ref[2].numpy())
    out = np.zeros(x.shape, np.float32)
    rc = aot("unpermute_weighted", [permuted, idx, pprobs, out])
    assert rc == 0, aot.error()
    assert np.array_equal(out, moerail.unpermute(ref[0], ref[2], x.shape, permuted_probs=ref[1]).numpy())
    rows = np.zeros((n, x.shape[1]), np.float32)
    assert aot("gather_rows", [x.numpy(), idx, rows]) == 0
    assert np.array_equal(rows, ref[0].numpy())


@pytest.mark.parametrize("case", ["dtype", "rows", "index", "count"])
def test_aot_bad_arguments_fail_cleanly(case):
    aot = _Aot()
    x, probs, rmap = _routing()
    n = int(rmap.sum())
    permuted = np.full((n, x.shape[1]), 7.0, np.float32)
    idx = np.full(n, 3, np.int64)
    args = [x.numpy(), rmap.numpy(), permuted, idx]
    names = None
    if case == "dtype":
        names = ["float32", "complex64", "float32", "int64"]
    elif case == "rows":
        args[2] = np.full((n + 1, x.shape[1]), 7.0, np.float32)
    elif case == "index":
        out = np.full(x.shape, 7.0, np.float32)
        bad = np.full(n, 10_000, np.int64)
        assert aot("unpermute", [permuted, bad, out]) != 0
        assert "sorted_indices" in aot.error()
        assert (out == 7.0).all()
        return
    elif case == "count":
        assert aot("permute", args[:3]) != 0
        assert "expected 4" in aot.error() or "param" in aot.error()
        return
    assert aot("permute", args, names) != 0
    msg = aot.error()
    assert msg and any(a in msg for a in ("routing_map", "permuted", "sorted_indices")), msg
    assert (args[2] == 7.0).all() and (idx == 3).all()


@pytest.mark.skipif(ms is None, reason=MS_WHY or "")
def test_ops_on_mindspore_tensors_match_torch():
    x, probs, rmap = _routing(seed=3)
    logits = torch.randn(12, 6, generator=torch.Generator().manual_seed(9))
    p_ms, m_ms = msi.topk_route(ms.Tensor(logits.numpy()), 2)
    p_t, m_t = moerail.topk_route(logits, 2)
    assert np.array_equal(p_ms.asnumpy(), p_t.numpy()) and np.array_equal(m_ms.asnumpy(), m_t.numpy())
    out = msi.permute(ms.Tensor(x.numpy()), ms.Tensor(rmap.numpy()), ms.Tensor(probs.numpy()))
    ref = moerail.permute(x, rmap, probs)
    for a, b in zip(out, ref):
        if b is None:
            assert a is None
        else:
            assert np.array_equal(a.asnumpy(), b.numpy())
    back = msi.unpermute(out[0], out[2], x.shape, permuted_probs=out[1])
    assert np.array_equal(back.asnumpy(), moerail.unpermute(ref[0], ref[2], x.shape, permuted_probs=ref[1]).numpy())
    with pytest.raises(TypeError, match="tokens"):
        msi.permute(x, ms.Tensor(rmap.numpy()))


@pytest.mark.skipif(ms is None, reason=MS_WHY or "")
def test_custom_aot_op_in_mindspore():
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    x, probs, rmap = _routing(seed=4)
    n = int(rmap.sum())
    h = x.shape[1]
    op = msi.aot_op("permute", out_shape=((n, h), (n,)), out_dtype=(ms.float32, ms.int64))
    permuted, idx = op(ms.Tensor(x.numpy()), ms.Tensor(rmap.numpy()))
    ref = moerail.permute(x, rmap)
    assert np.array_equal(permuted.asnumpy(), ref[0].numpy())
    assert np.array_equal(idx.asnumpy(), ref[2].numpy())
    un = msi.aot_op("unpermute", out_shape=tuple(x.shape), out_dtype=ms.float32)
    back = un(permuted, idx)
    assert np.array_equal(back.asnumpy(), moerail.unpermute(ref[0], ref[2], x.shape).numpy())
