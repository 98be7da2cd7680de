"""The GPU check (``benches/gpu_check.sh``), both halves:

* GPU tests that tests/test_cuda_kernels.py does not have, run by the check's first stage on a GPU
  (each skips, with the reason, where torch sees none): a CUDA-graph capture of router + permute +
  unpermute replaying to the eager run's bits, ``torch.compile`` of the same step forward and
  backward, the on-disk kernel cache (filled, reused, a corrupt entry rebuilt), the value checks
  on and off (``MOERAIL_DEVICE_CHECKS``), and Megatron-Core's own functions on the same CUDA tensors.
* The rehearsal: the bundle ``make gpu-bundle`` made is installed with ``pip --no-index`` into a
  temporary directory and the check runs on this machine without a GPU, so a packaging mistake
  shows here and not in the first GPU window: every GPU stage must say ``skipped`` with a reason,
  its dry run must find no problem (the memory stage's runs every arm once on the CPU at a tiny
  size), and the summary line must be printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import moerail

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = "no CUDA GPU here (torch.cuda.is_available() is False); the GPU check runs this on a GPU machine"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


def _inputs(t=256, h=128, e=32, k=4, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64).float().cuda()
    x = torch.randn(t, h, generator=g).to(dtype).cuda()
    return logits, x, k


def _step(logits, x, k):
    """Router -> permute -> expert work -> unpermute: the shapes are static (num_out_tokens)."""
    probs, rmap = moerail.topk_route(logits, k, score_function="sigmoid", scaling_factor=2.0)
    rows, row_probs, si = moerail.permute(x, rmap, probs=probs, num_out_tokens=x.shape[0] * k)[:3]
    y = rows * 1.5
    return moerail.unpermute(y, si, restore_shape=x.shape, probs=probs, routing_map=rmap), probs, rmap, rows


def _same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max diff {(a.double() - b.double()).abs().max().item()}"


@cuda
def test_cuda_graph_of_router_permute_unpermute_replays_same_bits():
    logits, x, k = _inputs()
    eager = _step(logits, x, k)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch recommends
        _step(logits, x, k)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _step(logits, x, k)
    for replay in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for a, b, what in zip(captured, eager, ["output", "probs", "routing_map", "rows"]):
            _same(a, b, f"replay {replay}: {what}")
    # New inputs copied into the captured ones: the replay is the eager run on them.
    logits2, x2, _ = _inputs(seed=1)
    logits.copy_(logits2)
    x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    for a, b, what in zip(captured, _step(logits2, x2, k), ["output", "probs", "routing_map", "rows"]):
        _same(a, b, f"replay on new inputs: {what}")


@cuda
def test_torch_compile_of_router_permute_unpermute_same_bits():
    logits, x, k = _inputs(t=128, h=64, e=16, k=2, seed=2)

    def loss(logits, x):
        out = _step(logits, x, k)[0]
        return out.float().square().sum()

    args = [a.clone().requires_grad_() for a in (logits, x)]
    ref = loss(*args)
    ref.backward()
    cargs = [a.clone().requires_grad_() for a in (logits, x)]
    compiled = torch.compile(loss, dynamic=False)
    got = compiled(*cargs)
    got.backward()
    torch.cuda.synchronize()
    # The loss's own reduction is compiled (inductor may sum in another order); moerail's ops are
    # opaque custom ops, so the gradients that flow through them are the eager bits.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    _same(cargs[1].grad, args[1].grad, "grad tokens")
    torch.testing.assert_close(cargs[0].grad, args[0].grad, rtol=1e-5, atol=1e-7)
    _same(torch.compile(lambda a, b: _step(a, b, k)[0], dynamic=False)(logits, x), _step(logits, x, k)[0],
          "compiled forward")


_CHILD = textwrap.dedent("""
    import json, os, sys, torch, moerail
    out = sys.argv[1]
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(192, 32, generator=g).cuda()
    x = torch.randn(192, 96, generator=g).bfloat16().cuda()
    grad = torch.randn(192, 96, generator=g).bfloat16().cuda()
    res = {}
    checks = os.environ["MOERAIL_DEVICE_CHECKS"] != "0"
    torch.cuda.synchronize()
    lg = logits.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    probs, rmap = moerail.topk_route(lg, 4)
    rows, _, si = moerail.permute(xg, rmap, probs=probs, num_out_tokens=192 * 4)[:3]
    torch.cuda.synchronize()
    if not checks:
        torch.cuda.set_sync_debug_mode("error")  # no host sync in the router and the combine
    probs2, rmap2 = moerail.topk_route(logits, 4)
    y = moerail.unpermute(rows, si, restore_shape=x.shape, probs=probs, routing_map=rmap)
    torch.cuda.set_sync_debug_mode(0)
    (y * grad).float().sum().backward()
    res["synced_free"] = not checks
    if checks:
        bad = torch.zeros(192, 2, dtype=torch.int64, device="cuda")
        bad[:, 1] = 1
        bad[7, 1] = 99
        try:
            moerail.permute_by_indices(x, bad, 32)
            res["bad_index_raised"] = False
        except ValueError:
            res["bad_index_raised"] = True
    torch.save({"probs": probs.detach().cpu(), "rmap": rmap.cpu(), "probs2": probs2.cpu(), "rows": rows.detach().cpu(),
                "y": y.detach().cpu(), "grad_x": xg.grad.cpu(), "grad_logits": lg.grad.cpu()}, out)
    print(json.dumps(res))
""")


def _child(tmp_path, name, cache, checks):
    env = dict(os.environ, MOERAIL_CACHE_DIR=str(cache), MOERAIL_DEVICE_CHECKS="1" if checks else "0",
               MOERAIL_QUIET="1")
    out = tmp_path / f"{name}.pt"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), torch.load(out)


@cuda
def test_kernel_cache_and_device_checks_on_and_off(tmp_path):
    """First process: an empty ``MOERAIL_CACHE_DIR`` is filled (one module image per kernel file
    used), value checks on (a bad expert id raises). One cached image is then corrupted. Second
    process, checks off: the router and the combine make no host sync, the outputs and gradients are
    the first run's bits, the corrupt image is rebuilt and every other one is loaded, not rewritten."""
    cache = tmp_path / "cache"
    r1, a = _child(tmp_path, "on", cache, True)
    assert r1["bad_index_raised"]
    images = sorted(p for p in cache.iterdir() if p.suffix in (".cubin", ".ptx"))
    assert images, f"no kernel images written to {cache}: {list(cache.iterdir())}"
    mtimes = {p.name: p.stat().st_mtime_ns for p in images}
    bad = images[0]
    size = bad.stat().st_size
    bad.write_bytes(b"not a module image")
    time.sleep(0.05)
    r2, b = _child(tmp_path, "off", cache, False)
    assert r2["synced_free"]
    for key in a:
        _same(b[key], a[key], key)
    assert bad.stat().st_size == size, "the corrupt cache entry was not rebuilt"
    for p in images[1:]:
        assert p.stat().st_mtime_ns == mtimes[p.name], f"{p.name} was rewritten, not loaded from the cache"


@cuda
@pytest.mark.megatron
def test_megatron_functions_on_the_same_cuda_tensors(mcore):
    """Megatron-Core's own router, permute and unpermute on the same CUDA tensors as moerail's:
    the same selections and permuted rows bit for bit (fp32 logits), probabilities and the combine
    within rounding (Megatron's unpermute sums with atomics on a GPU: no fixed order)."""
    t, e, k, h = 2048, 64, 8, 256
    g = torch.Generator().manual_seed(40)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64).float().cuda()
    x = torch.randn(t, h, generator=g).bfloat16().cuda()
    for sf in ("softmax", "sigmoid"):
        ours = moerail.topk_route(logits, k, score_function=sf)
        theirs = mcore.topk_routing_with_score_function(logits, k, use_pre_softmax=False, score_function=sf)
        _same(ours[1], theirs[1], f"{sf} routing_map vs Megatron")
        torch.testing.assert_close(ours[0], theirs[0], rtol=2e-6, atol=1e-7)
    probs, rmap = moerail.topk_route(logits, k)
    n = int(rmap.sum())
    xo = x.clone().requires_grad_()
    xt = x.clone().requires_grad_()
    ours = moerail.permute(xo, rmap, probs=probs, num_out_tokens=n)
    theirs = mcore.permute(xt, rmap, probs=probs, num_out_tokens=n)
    for i, what in enumerate(["rows", "permuted probs", "sorted_indices"]):
        _same(ours[i].detach(), theirs[i].detach(), f"{what} vs Megatron on CUDA")
    back_o = moerail.unpermute(ours[0], ours[2], x.shape, probs=probs.float(), routing_map=rmap)
    back_t = mcore.unpermute(theirs[0], theirs[2], x.shape, probs=probs.float(), routing_map=rmap)
    torch.testing.assert_close(back_o.float(), back_t.float(), rtol=1.6e-2, atol=1e-2)
    go = torch.randn(t, h, generator=g).bfloat16().cuda()
    (back_o * go).sum().backward()
    (back_t * go).sum().backward()
    torch.testing.assert_close(xo.grad.float(), xt.grad.float(), rtol=1.6e-2, atol=1e-2)


def test_memory_stage_dry_run(tmp_path):
    """The memory stage's script on the CPU at its tiny size, with this checkout's moerail and
    megatron-core (the rehearsal below runs it from the bundle): every arm takes a step, moerail's
    plans reproduce keep-all's bits and hold what the planner predicted, and the simulator's weights,
    gradients and optimizer state are the model's bytes."""
    pytest.importorskip("megatron.core")
    out = tmp_path / "memory.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MOERAIL_QUIET="1")
    r = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_check_support" / "memory_gpu.py"), str(out),
                        "--dry"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert not res["measured"] and not res["failed"], res["failed"]
    arms = res["arms"]
    assert {"keep", "megatron layernorm", "megatron moe", "megatron full"} <= set(arms)
    ours = {k: a for k, a in arms.items() if k.startswith("moerail")}
    assert len(ours) + sum(k.startswith("moerail") for k in res["refused"]) == 6, res["refused"]
    for name, a in ours.items():
        assert a["max_diff"] == 0.0, name
        assert abs(a["peak_saved_bytes"] - a["predicted_peak_bytes"]) <= 0.1 * a["peak_saved_bytes"], (name, a)
    sim = res["simulator"]
    for part in ("weights", "gradients", "optimizer"):
        assert sim["predicted"][part] == sim["measured"][part], (part, sim)
    md = out.with_suffix(".md").read_text()
    assert "| moerail @ full |" in md and "Not run: megatron moe_act+layernorm" in md


# ------------------------------------------------------------------------------------------------
# The rehearsal on this machine
# ------------------------------------------------------------------------------------------------


def _bundle() -> Path:
    env = os.environ.get("MOERAIL_GPU_BUNDLE")
    b = Path(env) if env else ROOT / "gpu-bundle"
    if not (b / "manifest.json").is_file():
        if env:  # `make test` names the bundle it just built: it must be there
            pytest.fail(f"MOERAIL_GPU_BUNDLE={env}: no manifest.json (make gpu-bundle failed?)")
        pytest.skip("no gpu-bundle/manifest.json: run `make gpu-bundle` (make test does)")
    return b


def test_rehearsal_bundle_manifest():
    b = _bundle()
    man = json.loads((b / "manifest.json").read_text())
    kinds = {f["kind"] for f in man["files"]}
    assert {"moerail-wheel", "megatron-core-wheel"} <= kinds
    assert sorted(f["version"] for f in man["files"] if f["kind"] == "megatron-core-wheel")[0].startswith("0.16")
    assert any(f["version"].startswith("0.19") for f in man["files"] if f["kind"] == "megatron-core-wheel")
    (wheel,) = [f for f in man["files"] if f["kind"] == "moerail-wheel"]
    assert wheel["abi_tag"] == "abi3" and wheel["platform_tag"].endswith("x86_64"), wheel
    for f in man["files"]:
        assert (b / f["name"]).stat().st_size == f["bytes"], f["name"]
        if f["kind"] == "megatron-core-wheel":
            assert f["python_tag"] in ("cp312", "py3"), f  # the GPU machine's Python
    assert man["total_bytes"] == sum(f["bytes"] for f in man["files"])
    assert man["total_bytes"] < 64 * 2**20, f"bundle is {man['total_bytes'] / 2**20:.1f} MiB"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run benches/gpu_check.sh itself")
def test_rehearsal_gpu_check_without_gpu(tmp_path):
    b = _bundle()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PIP_NO_INDEX="1", PYTHON=sys.executable)
    env.pop("MOERAIL_MEGATRON_PATH", None)
    env.pop("PIP_FIND_LINKS", None)
    out = tmp_path / "out"
    t = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / "benches" / "gpu_check.sh"), str(out), "--bundle", str(b)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    secs = time.monotonic() - t
    tail = r.stdout[-4000:] + r.stderr[-4000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("GPU-CHECK SUMMARY:")]
    assert len(lines) == 1, tail
    assert r.returncode == 0, tail
    res = json.loads((out / "results.json").read_text())
    st = res["stages"]
    assert st["setup"]["status"] == "passed", st["setup"]
    assert set(st) == {"setup", "moerail-tests", "sanitizer", "megatron-tests", "bench", "memory"}
    for name in ("moerail-tests", "sanitizer", "megatron-tests", "bench", "memory"):
        assert st[name]["status"] == "skipped" and "no CUDA GPU" in st[name]["reason"], (name, st[name])
        assert not st[name].get("dry_run_problems"), (name, st[name]["dry_run_problems"])
    # The dry runs really looked: the GPU tests and Megatron's MoE tests were collected against the
    # installed bundle (with moerail switched on for Megatron's), the sanitizer cases listed.
    assert "GPU tests collected" in st["moerail-tests"]["reason"]
    dry = next(iter(st["moerail-tests"]["dry_run"].values()))
    assert dry["collected"] >= 100, dry
    # (A clone without ../shared/third_party bundles no Megatron tests: the manifest says so.)
    for v, d in st["megatron-tests"].get("versions", {}).items():
        assert d["runs"]["with moerail"]["collected"] >= 20, (v, d["runs"]["with moerail"])
    assert "12 kernel cases" in st["sanitizer"]["reason"]
    bench_md = (out / "bench.md").read_text()
    assert "Not measured" in bench_md
    # The memory stage's dry run took every arm through a round on the CPU: Megatron's settings (its
    # refusal of moe_act on SequentialMLP experts recorded), moerail's profile, plans at the budgets
    # those reached, run by the executor to keep-all's bits, and the simulator's comparison.
    mem = st["memory"]
    assert {"keep", "megatron layernorm", "megatron moe", "megatron full"} <= set(mem["arms"]), mem
    ours = [k for k in mem["arms"] if k.startswith("moerail")]
    assert len(ours) + sum(k.startswith("moerail") for k in mem["refused"]) == 6, mem
    assert ours and all(mem["arms"][k]["max_diff"] == 0.0 for k in ours), mem["arms"]
    assert "moe_act" in mem["refused"]["megatron moe_act+layernorm"]
    assert mem["simulator"]["predicted"]["weights"] == mem["simulator"]["measured"]["weights"], mem["simulator"]
    assert "Activation memory on one GPU" in bench_md and "dry run on the CPU" in bench_md
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.md", "results.json", "log.txt", "bench.md", "bench.json"} <= set(files)
    print(f"\nrehearsal: {secs:.0f} s; {lines[0]}")
