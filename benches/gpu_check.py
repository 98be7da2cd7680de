"""Checks and measures moerail's CUDA path on one GPU machine in one prepared run.

    benches/gpu_check.sh OUTDIR [--bundle gpu-bundle] [--budget 550]

Installs the offline bundle ``make gpu-bundle`` made (moerail's abi3 wheel, megatron-core 0.16
and 0.19 wheels, Megatron-LM's MoE unit tests at those tags) into a temporary directory with
``pip --no-index`` (no network), prints ``moerail doctor --json``, then runs, each stage with its
own time limit and the next stage starting whatever the last one did:

1. ``moerail-tests``: tests/test_cuda_kernels.py, tests/test_a2a_devices.py and the GPU tests of
   tests/test_gpu_check.py on CUDA tensors (every op forward and backward against the CPU path
   and against Megatron-Core's own functions, kernel cache, ``MOERAIL_DEVICE_CHECKS`` on/off,
   CUDA-graph capture and ``torch.compile`` of router + permute + unpermute), with megatron-core
   0.16, then the Megatron comparisons again with 0.19;
2. ``sanitizer``: compute-sanitizer memcheck and racecheck over one small case of each kernel;
3. ``megatron-tests``: Megatron-LM's own MoE unit tests for each bundled megatron-core, once as
   they are and once with moerail switched on (``patch_moe_utils()`` + ``MoerailTopKRouter``),
   compared test by test (single-GPU world);
4. ``bench``: the GPU rows of benches/bench_cuda.py -> OUTDIR/bench.md and OUTDIR/bench.json;
5. ``memory``: benches/gpu_check_support/memory_gpu.py on a Megatron-Core GPT-MoE (megatron-core
   0.16, world size 1): keep-all, Megatron's recompute settings and moerail's memory plans at the
   budgets those reach (profiled, planned, run with and without swaps), each arm's saved-tensor
   peak, ``torch.cuda.max_memory_allocated``, added step time and bit-identity to keep-all; and the
   simulator's per-device memory against a Megatron training run's -> a section of OUTDIR/bench.md
   and the numbers in OUTDIR/results.json;
6. the summary: OUTDIR/summary.md, OUTDIR/results.json and one ``GPU-CHECK SUMMARY:`` line.

Without a GPU every GPU stage is reported ``skipped`` with the reason, after a dry run of what it
can check without one (the tests are collected against the installed bundle, the sanitizer cases
listed, the Megatron tests collected with moerail switched on, every memory arm run once on the CPU
at a tiny size): the rehearsal ``make test`` runs.
OUTDIR receives at most 7 files: summary.md, results.json, doctor.json, bench.md, bench.json,
log.txt (every command's output, each capped) and manifest.json (the bundle's).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "benches" / "gpu_check_support"
# Seconds per stage on an H100; they sum to 530 s with the set-up (one 600 s window with room for the
# start and the clean-up), and no stage runs past the run's overall budget (--budget).
LIMITS = {"setup": 45, "moerail-tests": 135, "sanitizer": 70, "megatron-tests": 135, "bench": 45, "memory": 100}
LOG_CAP = 1_500_000  # bytes of output kept per command in log.txt
MOERAIL_TEST_FILES = ["tests/test_cuda_kernels.py", "tests/test_a2a_devices.py", "tests/test_gpu_check.py"]
MOERAIL_TEST_FILTER = "not emulator and not rehearsal"


class Check:
    def __init__(self, out: Path, bundle: Path, budget: float, work: Optional[Path]):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget
        self.out = out
        self.bundle = bundle
        self.work = work or Path(tempfile.mkdtemp(prefix="moerail-gpu-check-"))
        self.log = open(out / "log.txt", "w")
        self.results: Dict[str, dict] = {"stages": {}}
        self.has_gpu = False
        self.python = sys.executable
        self.site = self.work / "site"
        self.mcore: Dict[str, Path] = {}  # megatron-core version -> its --target directory
        self.cache = self.work / "kernel-cache"
        self.lock = threading.Lock()

    def side_by_side(self, jobs: Dict[str, tuple]) -> Dict[str, dict]:
        """``{name: (fn, args...)}`` run at the same time (each a subprocess on the one GPU; the
        machine has cores to spare): a stage's runs then share its whole time limit."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(jobs))) as ex:
            futs = {k: ex.submit(*job) for k, job in jobs.items()}
            return {k: f.result() for k, f in futs.items()}

    # -- running commands ----------------------------------------------------------------------

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, what: str, cmd: List[str], timeout: float, env: Optional[dict] = None,
            cwd: Optional[Path] = None) -> dict:
        """Runs ``cmd`` in its own process group, killed (the whole group) after ``timeout``
        seconds; its output goes to log.txt (capped). Returns rc, timed_out, seconds, output."""
        timeout = max(1.0, min(timeout, self.left()))
        head = f"\n===== {what} (limit {timeout:.0f} s)\n$ {' '.join(map(str, cmd))}\n"
        t = time.monotonic()
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=env, cwd=str(cwd or ROOT), start_new_session=True)
        timed_out = False
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = p.communicate()
        text = out.decode(errors="replace")
        kept = text if len(text) <= LOG_CAP else "[... cut ...]\n" + text[-LOG_CAP:]
        secs = time.monotonic() - t
        with self.lock:  # commands of one stage may run side by side
            self.log.write(head + kept)
            self.log.write(f"\n----- {what}: rc={p.returncode}{' TIMED OUT' if timed_out else ''} in {secs:.1f} s\n")
            self.log.flush()
        return {"rc": p.returncode, "timed_out": timed_out, "seconds": round(secs, 1), "output": text}

    def env(self, *paths: Path, **extra) -> dict:
        env = dict(os.environ)
        for k in ("PYTHONPATH", "MOERAIL_MEGATRON_PATH", "MOERAIL_CUDA_EMULATOR"):
            env.pop(k, None)
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
        env.update(MOERAIL_QUIET="1", MOERAIL_CACHE_DIR=str(self.cache), PYTHONDONTWRITEBYTECODE="1",
                   PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
        env.pop("PIP_FIND_LINKS", None)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def stage(self, name: str, fn) -> dict:
        t = time.monotonic()
        print(f"gpu_check: stage {name} ...", flush=True)
        if self.left() < 5:
            res = {"status": "skipped", "reason": "out of time (the run's budget is spent)"}
        else:
            try:
                res = fn(min(LIMITS[name], self.left()))
            except Exception as e:  # a stage's own bug must not stop the others
                import traceback

                self.log.write(f"\n===== {name}: exception\n{traceback.format_exc()}")
                res = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.monotonic() - t, 1)
        self.results["stages"][name] = res
        print(f"gpu_check: stage {name}: {res['status']}" + (f" ({res['reason']})" if res.get("reason") else ""),
              flush=True)
        return res

    # -- set-up --------------------------------------------------------------------------------

    def setup(self, limit: float) -> dict:
        end = time.monotonic() + limit
        man_path = self.bundle / "manifest.json"
        if not man_path.is_file():
            return {"status": "failed", "reason": f"no bundle manifest at {man_path} (run `make gpu-bundle`)"}
        man = json.loads(man_path.read_text())
        shutil.copy(man_path, self.out / "manifest.json")
        bad = []
        for f in man["files"]:
            p = self.bundle / f["name"]
            if not p.is_file():
                bad.append(f"{f['name']}: missing")
            elif hashlib.sha256(p.read_bytes()).hexdigest() != f["sha256"]:
                bad.append(f"{f['name']}: sha256 differs from the manifest")
        if bad:
            return {"status": "failed", "reason": "bundle: " + "; ".join(bad)}
        pyver = "{}.{}".format(*sys.version_info[:2])
        installs = {}
        for f in man["files"]:
            if f["kind"] == "moerail-wheel":
                target = self.site
            elif f["kind"] == "megatron-core-wheel":
                target = self.work / f"mcore-{f['version']}"
                self.mcore[f["version"]] = target
            else:
                continue
            cmd = [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--disable-pip-version-check",
                   "--no-compile", "--target", target]
            note = ""
            tag = f.get("python_tag", "")
            if tag.startswith("cp3") and tag != "cp" + pyver.replace(".", ""):
                # A wheel built for another Python (megatron-core's are cp312): the rehearsal on a
                # different Python installs it for that Python (only its dataset helper is compiled).
                want = tag[2] + "." + tag[3:]
                cmd += ["--python-version", want, "--implementation", "cp", "--only-binary=:all:",
                        "--platform", f["platform_tag"].split(".")[-1], "--ignore-requires-python"]
                note = f"installed for Python {want} on Python {pyver}"
            r = self.run(f"install {f['name']}", cmd + [self.bundle / f["name"]], end - time.monotonic(),
                         env=self.env())
            if r["rc"] != 0:
                return {"status": "failed", "reason": f"pip install --no-index {f['name']} failed (rc {r['rc']})"}
            installs[f["name"]] = str(target) + (f" ({note})" if note else "")
        where = self.run("which moerail", [self.python, "-c", "import moerail; print(moerail.__file__)"],
                         end - time.monotonic(), env=self.env(self.site))
        if where["rc"] != 0 or not where["output"].strip().splitlines()[-1].startswith(str(self.site)):
            return {"status": "failed", "reason": f"moerail does not import from the bundle: {where['output'][-300:]}"}
        doctor = self.run("moerail doctor --json", [self.python, "-m", "moerail", "doctor", "--json"],
                          end - time.monotonic(), env=self.env(self.site))
        try:
            text = doctor["output"]
            rep = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
        except ValueError:
            return {"status": "failed", "reason": "moerail doctor --json printed no JSON"}
        (self.out / "doctor.json").write_text(json.dumps(rep, indent=1))
        print(json.dumps(rep), flush=True)
        probe = self.run("torch's view of the GPU", [self.python, "-c", (
            "import json, torch; a = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'torch_cuda': torch.version.cuda, 'cuda_available': a, 'device_count': torch.cuda.device_count() if a "
            "else 0, 'device': torch.cuda.get_device_name() if a else None}))")], end - time.monotonic(), env=self.env())
        torch_info = json.loads(probe["output"].strip().splitlines()[-1])
        self.has_gpu = bool(torch_info["cuda_available"])
        cuda = rep.get("cuda", {})
        drv = cuda.get("driver", {})
        nvrtc = cuda.get("nvrtc", {})
        self.results["machine"] = {
            "gpu": torch_info["device"] or "none",
            "gpus": torch_info["device_count"],
            "driver": (f"{drv['version'] // 1000}.{drv['version'] % 1000 // 10}" if "version" in drv
                       else cuda.get("driver_error", "not found")),
            "torch": f"{torch_info['torch']} (CUDA {torch_info['torch_cuda']})",
            "nvrtc": "{}.{}".format(*nvrtc["version"]) if nvrtc else cuda.get("nvrtc_error", "not found"),
            "python": rep.get("python"),
            "moerail": rep.get("moerail", {}).get("version"),
        }
        m = self.results["machine"]
        print(f"gpu_check: GPU {m['gpu']}, driver {m['driver']}, torch {m['torch']}, NVRTC {m['nvrtc']}, "
              f"Python {m['python']}", flush=True)
        return {"status": "passed", "installed": installs, "megatron_core": sorted(self.mcore),
                "bundle_bytes": man["total_bytes"]}

    def no_gpu(self) -> str:
        return "no CUDA GPU (torch.cuda.is_available() is False)"

    # -- stage 1 -------------------------------------------------------------------------------

    def _pytest(self, what: str, args: List[str], env: dict, timeout: float, cwd: Path = ROOT,
                collect_only: bool = False) -> dict:
        results = self.work / f"results-{re.sub(r'[^A-Za-z0-9.]+', '-', what)}.jsonl"
        results.unlink(missing_ok=True)
        env = dict(env, MOERAIL_GPU_CHECK_RESULTS=str(results))
        env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env["PYTHONPATH"]])
        cmd = [self.python, "-m", "pytest", "-p", "gpu_check_plugin", "-p", "no:cacheprovider", "-q", "-rfEs"]
        if collect_only:
            cmd.append("--collect-only")
        elif _has_module(self.python, "pytest_timeout", env):
            cmd += ["--timeout", "120"]
        r = self.run(what, cmd + args, timeout, env=env, cwd=cwd)
        tests: Dict[str, dict] = {}
        if results.is_file():
            for line in results.read_text().splitlines():
                rec = json.loads(line)
                prev = tests.get(rec["nodeid"])
                if prev is None or prev["outcome"] == "passed":  # a teardown error overrides a pass
                    tests[rec["nodeid"]] = rec
        counts = collections.Counter(t["outcome"] for t in tests.values())
        res = {"rc": r["rc"], "timed_out": r["timed_out"], "seconds": r["seconds"],
               "passed": counts["passed"], "failed": counts["failed"] + counts["error"], "skipped": counts["skipped"],
               "tests": tests}
        if collect_only:
            m = re.search(r"(\d+) tests? collected", r["output"]) or re.search(r"collected (\d+) item", r["output"])
            res["collected"] = int(m.group(1)) if m else sum(1 for ln in r["output"].splitlines() if "::" in ln)
            res["collection_errors"] = [t["nodeid"] + ": " + t["message"][-300:] for t in tests.values()
                                        if t["outcome"] == "error"]
            if r["rc"] not in (0, 5) and not res["collection_errors"]:
                res["collection_errors"] = [f"pytest rc {r['rc']}: {r['output'][-500:]}"]
        return res

    def moerail_tests(self, limit: float) -> dict:
        end = time.monotonic() + limit
        versions = sorted(self.mcore, key=_vkey)
        if not versions:
            return {"status": "failed", "reason": "no megatron-core in the bundle"}
        first = versions[0]
        base = [*MOERAIL_TEST_FILES, "-k", MOERAIL_TEST_FILTER]
        runs = {}
        if not self.has_gpu:
            runs[f"collect (megatron-core {first})"] = self._pytest(
                "moerail GPU tests (collect only)", base, self.env(self.site, self.mcore[first]),
                end - time.monotonic(), collect_only=True)
            c = next(iter(runs.values()))
            return {"status": "skipped", "reason": f"{self.no_gpu()}; dry run: {c['collected']} GPU tests collected "
                    f"against the installed bundle, {len(c['collection_errors'])} collection errors",
                    "dry_run": _strip(runs), "dry_run_problems": c["collection_errors"]}
        jobs = {f"megatron-core {first}": (
            self._pytest, f"moerail GPU tests, megatron-core {first}", base,
            self.env(self.site, self.mcore[first], MOERAIL_MEGATRON_PATH=self.mcore[first]), end - time.monotonic())}
        for v in versions[1:]:
            jobs[f"megatron-core {v} (-m megatron)"] = (
                self._pytest, f"moerail GPU tests, megatron-core {v}", [*base, "-m", "megatron"],
                self.env(self.site, self.mcore[v], MOERAIL_MEGATRON_PATH=self.mcore[v]), end - time.monotonic())
        runs.update(self.side_by_side(jobs))
        failed = sum(r["failed"] for r in runs.values())
        timed_out = [k for k, r in runs.items() if r["timed_out"]]
        ok = failed == 0 and not timed_out and all(r["rc"] in (0, 5) for r in runs.values())
        res = {"status": "passed" if ok else "failed", "runs": runs,
               "passed": sum(r["passed"] for r in runs.values()), "failed": failed,
               "skipped": sum(r["skipped"] for r in runs.values())}
        if timed_out:
            res["reason"] = "timed out: " + ", ".join(timed_out)
        return res

    # -- stage 2 -------------------------------------------------------------------------------

    def sanitizer(self, limit: float) -> dict:
        end = time.monotonic() + limit
        tool = shutil.which("compute-sanitizer")
        for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if not tool and d and Path(d, "bin", "compute-sanitizer").is_file():
                tool = str(Path(d, "bin", "compute-sanitizer"))
        cases = SUPPORT / "sanitize_cases.py"
        env = self.env(self.site)
        if not self.has_gpu:
            r = self.run("sanitizer cases (dry)", [self.python, cases, "--dry"], end - time.monotonic(), env=env)
            n = len(re.findall(r"^case: ", r["output"], re.M))
            problems = [] if r["rc"] == 0 else [f"sanitize_cases.py --dry rc {r['rc']}: {r['output'][-500:]}"]
            return {"status": "skipped", "reason": f"{self.no_gpu()}; compute-sanitizer "
                    f"{'at ' + tool if tool else 'not found'}; dry run: {n} kernel cases listed",
                    "dry_run_problems": problems}
        if not tool:
            return {"status": "skipped", "reason": "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"}
        tools = {}
        for name in ("memcheck", "racecheck"):
            extra = ["--leak-check", "no"] if name == "memcheck" else []
            cmd = [tool, "--tool", name, "--kernel-name", "kns=moerail_", "--print-limit", "20", *extra,
                   self.python, cases]
            share = (end - time.monotonic()) / (2 if name == "memcheck" else 1)
            r = self.run(f"compute-sanitizer {name}", cmd, share, env=env)
            if re.search(r"(?i)(unrecognized|unknown|invalid).{0,40}kernel-name", r["output"]):
                cmd.remove("--kernel-name")
                cmd.remove("kns=moerail_")
                r = self.run(f"compute-sanitizer {name} (no kernel filter)", cmd, share, env=env)
            ran = len(re.findall(r"^ran: ", r["output"], re.M))
            if name == "memcheck":
                m = re.search(r"ERROR SUMMARY: (\d+) error", r["output"])
                findings = int(m.group(1)) if m else None
            else:
                m = re.search(r"RACECHECK SUMMARY: (\d+) hazard", r["output"])
                findings = int(m.group(1)) if m else (0 if ran and r["rc"] == 0 else None)
            tools[name] = {"findings": findings, "cases_run": ran, "rc": r["rc"], "timed_out": r["timed_out"],
                           "seconds": r["seconds"],
                           "report": "\n".join(ln for ln in r["output"].splitlines() if ln.startswith("=====")
                                               or "ERROR" in ln or "hazard" in ln.lower())[-4000:]}
        total = [t["findings"] for t in tools.values()]
        ok = all(f == 0 for f in total) and all(t["rc"] == 0 and not t["timed_out"] for t in tools.values())
        return {"status": "passed" if ok else "failed", "tool": tool, "tools": tools,
                "findings": sum(f for f in total if f is not None)}

    # -- stage 3 -------------------------------------------------------------------------------

    def megatron_tests(self, limit: float) -> dict:
        end = time.monotonic() + limit
        man = json.loads((self.bundle / "manifest.json").read_text())
        tarballs = {f["for_megatron_core"]: self.bundle / f["name"] for f in man["files"] if f["kind"] == "megatron-tests"}
        plan = []
        missing = []
        for v in sorted(self.mcore, key=_vkey):
            tb = tarballs.get(".".join(v.split(".")[:2]))
            if tb is None:
                missing.append(f"megatron-core {v}: no test tarball in the bundle")
            else:
                plan.append((v, tb))
        if not plan:
            why = "; ".join(missing) or "no megatron-core in the bundle"
            return {"status": "skipped", "reason": why if self.has_gpu else f"{self.no_gpu()}; {why}"}
        versions = {}
        modes = [("with moerail", "1")] if not self.has_gpu else [("as is", "0"), ("with moerail", "1")]
        jobs = {}
        for v, tb in plan:
            src = self.work / f"megatron-tests-{v}"
            shutil.rmtree(src, ignore_errors=True)
            src.mkdir(parents=True)
            with tarfile.open(tb) as t:
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                t.extractall(src, **kw)
            (top,) = [p for p in src.iterdir() if p.is_dir()]
            moe = top / "tests" / "unit_tests" / "transformer" / "moe"
            left_out = {}
            for f in sorted(moe.glob("test_*.py")):
                training = self.mcore[v] / "megatron" / "training"
                needs = sorted(m for m in set(re.findall(r"from megatron\.training\.(\w+)", f.read_text()))
                               if m != "initialize" and not (training / m).is_dir()
                               and not (training / f"{m}.py").is_file())
                if needs:
                    left_out[f.name] = "imports megatron.training." + ", ".join(needs) + \
                        f" (Megatron-LM's training code, not in the megatron-core {v} wheel)"
            args = [str(moe.relative_to(top)), "--rootdir", str(top), "-o", "addopts=",
                    *[a for name in left_out for a in ("--ignore", str((moe / name).relative_to(top)))]]
            for mode, flag in modes:
                env = self.env(self.site, self.mcore[v], MOERAIL_GPU_CHECK_MEGATRON="1",
                               MOERAIL_GPU_CHECK_WITH_MOERAIL=flag, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), CUDA_DEVICE_MAX_CONNECTIONS="1")
                jobs[(v, mode)] = (self._pytest, f"Megatron-LM {v} MoE tests, {mode}", args, env,
                                   end - time.monotonic() - 2, top, not self.has_gpu)
            versions[v] = {"tests_from": tb.name, "left_out": left_out, "runs": {}}
        for (v, mode), r in self.side_by_side(jobs).items():
            versions[v]["runs"][mode] = r
        for v in versions:
            runs = versions[v]["runs"]
            if self.has_gpu:
                a, b = runs["as is"]["tests"], runs["with moerail"]["tests"]
                both = a.keys() & b.keys()  # a run cut at the time limit: compare what both ran
                pa = {k for k in both if a[k]["outcome"] == "passed"}
                pb = {k for k in both if b[k]["outcome"] == "passed"}
                skips = collections.Counter(t["message"][:160] for t in a.values() if t["outcome"] == "skipped")
                versions[v]["compare"] = {
                    "same_passes": pa == pb, "compared": len(both), "pass_as_is_only": sorted(pa - pb), "pass_with_moerail_only": sorted(pb - pa),
                    "skipped_reasons": dict(skips.most_common(12)),
                }
        if not self.has_gpu:
            problems = [f"{v}: {e}" for v, d in versions.items() for r in d["runs"].values()
                        for e in r["collection_errors"]]
            got = ", ".join(f"{v}: {d['runs']['with moerail']['collected']} tests" for v, d in versions.items())
            return {"status": "skipped", "reason": f"{self.no_gpu()} (Megatron's tests set a CUDA device); dry run with "
                    f"moerail switched on collected {got}, {len(problems)} collection errors",
                    "versions": _strip(versions), "dry_run_problems": problems, "missing": missing}
        same = all(d["compare"]["same_passes"] for d in versions.values())
        timed_out = [f"{v} {m}" for v, d in versions.items() for m, r in d["runs"].items() if r["timed_out"]]
        res = {"status": "passed" if same and not timed_out else "failed", "versions": _strip(versions),
               "missing": missing}
        if not same:
            res["reason"] = "a test passes one way only: " + "; ".join(
                f"{v}: as is only {d['compare']['pass_as_is_only'][:5]}, with moerail only "
                f"{d['compare']['pass_with_moerail_only'][:5]}" for v, d in versions.items()
                if not d["compare"]["same_passes"])
        elif timed_out:
            res["reason"] = "timed out: " + ", ".join(timed_out)
        return res

    # -- stage 4 -------------------------------------------------------------------------------

    def bench(self, limit: float) -> dict:
        v = sorted(self.mcore, key=_vkey)[-1]
        cmd = [self.python, SUPPORT / "bench_gpu.py", *([] if self.has_gpu else ["--dry"]), self.out]
        r = self.run("GPU benchmark rows", cmd, limit, env=self.env(self.site, self.mcore[v]))
        data = json.loads((self.out / "bench.json").read_text()) if (self.out / "bench.json").is_file() else {}
        if not self.has_gpu:
            problems = [] if r["rc"] == 0 and data else [f"bench_gpu.py --dry rc {r['rc']}: {r['output'][-500:]}"]
            return {"status": "skipped", "reason": f"{self.no_gpu()}; bench.md says so", "dry_run_problems": problems}
        if r["rc"] != 0 or not data.get("measured"):
            return {"status": "failed", "reason": "timed out" if r["timed_out"] else f"rc {r['rc']}"}
        return {"status": "passed", "megatron_core": v,
                "ratios": {row["op"]: row["speedup"] for row in data["rows"]},
                "of_copy_pct": {row["op"]: row["of_copy_pct"] for row in data["rows"] if row["of_copy_pct"]}}

    # -- stage 5 -------------------------------------------------------------------------------

    def memory(self, limit: float) -> dict:
        v = sorted(self.mcore, key=_vkey)[0]  # 0.16: the version moerail's memory integration is tested on
        data_path = self.work / "memory.json"
        data_path.unlink(missing_ok=True)
        # The script stops its timed rounds early enough to write its results inside the limit.
        cmd = [self.python, SUPPORT / "memory_gpu.py", data_path, "--time-limit", f"{max(10.0, limit - 20):.0f}",
               *([] if self.has_gpu else ["--dry"])]
        r = self.run("activation memory", cmd, limit, env=self.env(self.site, self.mcore[v]))
        data = json.loads(data_path.read_text()) if data_path.is_file() else {}
        md = data_path.with_suffix(".md")
        if md.is_file():
            with open(self.out / "bench.md", "a") as f:
                f.write("\n" + md.read_text())
        problems = []
        if r["rc"] != 0 or "arms" not in data:
            why = "timed out" if r["timed_out"] else f"rc {r['rc']}"
            problems.append(f"memory_gpu.py {why}: {(data.get('error') or r['output'])[-800:]}")
        arms = {k: {f: a[f] for f in ("peak_saved_bytes", "peak_alloc_above_start", "added_s", "max_diff",
                                        "predicted_peak_bytes", "predicted_added_s")}
                for k, a in data.get("arms", {}).items()}
        failed = data.get("failed", {})
        problems += [f"{k}: {tb.strip().splitlines()[-1]}" for k, tb in failed.items()]
        res = {"megatron_core": v, "arms": arms, "refused": data.get("refused", {}), "failed": failed,
               "simulator": data.get("simulator"), "rounds": data.get("rounds"), "profile_s": data.get("profile_s")}
        if not self.has_gpu:
            return dict(res, status="skipped", dry_run_problems=problems,
                        reason=f"{self.no_gpu()}; dry run on the CPU at a tiny size: {len(arms)} arms ran "
                        f"{data.get('rounds', 0)} round(s), {len(data.get('refused', {}))} refused; bench.md says so")
        if problems and not arms:
            return dict(res, status="failed", reason=problems[0][:300])
        # moerail's plans must give keep-all's bits; Megatron's own settings are reported as measured.
        differ = [k for k, a in arms.items() if k.startswith("moerail") and a["max_diff"] != 0.0]
        res["status"] = "failed" if differ or problems else "passed"
        if problems or differ:
            res["reason"] = "; ".join(problems + (["not bit-identical to keep-all: " + ", ".join(differ)]
                                                  if differ else []))[:600]
        return res

    # -- summary -------------------------------------------------------------------------------

    def summary(self) -> str:
        st = self.results["stages"]
        parts = []
        mt = st.get("moerail-tests", {})
        if mt.get("status") in ("passed", "failed") and "runs" in mt:
            parts.append(f"moerail GPU tests {mt['passed']} passed / {mt['failed']} failed / {mt['skipped']} skipped")
        else:
            parts.append(f"moerail GPU tests {mt.get('status', 'not run')}")
        mg = st.get("megatron-tests", {})
        if mg.get("status") in ("passed", "failed") and "versions" in mg:
            for v, d in mg["versions"].items():
                r = d["runs"]
                parts.append(f"Megatron {v} MoE tests as is {r['as is']['passed']}/{r['as is']['failed']}, "
                             f"with moerail {r['with moerail']['passed']}/{r['with moerail']['failed']} "
                             f"(passed/failed; same passes: {'yes' if d['compare']['same_passes'] else 'NO'})")
        else:
            parts.append(f"Megatron MoE tests {mg.get('status', 'not run')}")
        sz = st.get("sanitizer", {})
        if "tools" in sz:
            parts.append("sanitizer " + ", ".join(f"{k} {v['findings'] if v['findings'] is not None else '?'} findings"
                                                  for k, v in sz["tools"].items()))
        else:
            parts.append(f"sanitizer {sz.get('status', 'not run')}")
        b = st.get("bench", {})
        if b.get("ratios"):
            parts.append("bench speed-ups vs Megatron " + ", ".join(f"{k} {v:.2f}x" for k, v in b["ratios"].items()))
        else:
            parts.append(f"bench {b.get('status', 'not run')}")
        mem = st.get("memory", {})
        if mem.get("status") in ("passed", "failed") and mem.get("arms"):
            keep = mem["arms"]["keep"]["peak_saved_bytes"]
            parts.append("memory saved-tensor peak vs keep-all " + ", ".join(
                f"{k} {a['peak_saved_bytes'] / keep:.2f} ({a['added_s'][1] * 1e3:+.1f} ms)"
                for k, a in mem["arms"].items() if k != "keep"))
            sim = mem.get("simulator") or {}
            if sim.get("measured", {}).get("max_memory_allocated"):
                meas, pred = sim["measured"]["max_memory_allocated"], sim["predicted"]["total"]
                parts.append(f"simulator memory {(pred - meas) / meas * 100:+.0f}% vs max_memory_allocated")
        else:
            parts.append(f"memory {mem.get('status', 'not run')}")
        skipped = [k for k, v in st.items() if v.get("status") == "skipped"]
        failed = [k for k, v in st.items() if v.get("status") == "failed"]
        parts.append(f"stages failed: {', '.join(failed) or 'none'}; skipped: {', '.join(skipped) or 'none'}")
        parts.append(f"{time.monotonic() - self.t0:.0f} s")
        return "GPU-CHECK SUMMARY: " + "; ".join(parts)

    def write(self, line: str) -> None:
        self.results["summary"] = line
        self.results["seconds"] = round(time.monotonic() - self.t0, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        m = self.results.get("machine", {})
        md = ["# moerail GPU check", "",
              f"Machine: GPU {m.get('gpu', '?')} x{m.get('gpus', '?')}, driver {m.get('driver', '?')}, torch "
              f"{m.get('torch', '?')}, NVRTC {m.get('nvrtc', '?')}, Python {m.get('python', '?')}, moerail "
              f"{m.get('moerail', '?')}. Total {self.results['seconds']} s.", "",
              "| stage | status | seconds | detail |", "|---|---|---|---|"]
        for name, s in self.results["stages"].items():
            md.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {s.get('reason', '')} |")
        mg = self.results["stages"].get("megatron-tests", {})
        for v, d in mg.get("versions", {}).items():
            md += ["", f"## Megatron-LM MoE unit tests for megatron-core {v} ({d['tests_from']})", ""]
            for mode, r in d["runs"].items():
                if "collected" in r:
                    md.append(f"- {mode}: dry run, {r['collected']} tests collected, "
                              f"{len(r['collection_errors'])} collection errors ({r['seconds']} s)")
                    continue
                md.append(f"- {mode}: {r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
                          f"{', TIMED OUT' if r['timed_out'] else ''} ({r['seconds']} s)")
            for f, why in d["left_out"].items():
                md.append(f"- not run: {f}: {why}")
            c = d.get("compare")
            if c:
                md.append(f"- same tests pass both ways: {'yes' if c['same_passes'] else 'NO'}")
                for k in ("pass_as_is_only", "pass_with_moerail_only"):
                    for t in c[k][:20]:
                        md.append(f"  - {k.replace('_', ' ')}: `{t}`")
                for why, n in c["skipped_reasons"].items():
                    md.append(f"- skipped x{n}: {why}")
        md += ["", "```", line, "```", ""]
        (self.out / "summary.md").write_text("\n".join(md))


def _strip(runs):
    """``runs`` without the per-test records of passing tests (results.json stays small): failures,
    errors and skips are kept with their messages."""
    if isinstance(runs, dict):
        out = {}
        for k, v in runs.items():
            if k == "tests" and isinstance(v, dict):
                out[k] = {n: t for n, t in v.items() if t["outcome"] != "passed"}
                out["passed_tests"] = sorted(n for n, t in v.items() if t["outcome"] == "passed")
            else:
                out[k] = _strip(v)
        return out
    return runs


def _vkey(v: str):
    return tuple(int(x) if x.isdigit() else 0 for x in v.split("."))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_module(python: str, name: str, env: dict) -> bool:
    r = subprocess.run([python, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"],
                       env=env, capture_output=True, timeout=60)
    return r.returncode == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--bundle", type=Path, default=ROOT / "gpu-bundle", help="the folder `make gpu-bundle` wrote")
    ap.add_argument("--budget", type=float, default=550, help="seconds for the whole run (default 550)")
    ap.add_argument("--workdir", type=Path, help="where to install the bundle (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args(argv)
    a.outdir.mkdir(parents=True, exist_ok=True)
    c = Check(a.outdir.resolve(), a.bundle.resolve(), a.budget, a.workdir)
    try:
        setup = c.stage("setup", c.setup)
        for name, fn in (("moerail-tests", c.moerail_tests), ("sanitizer", c.sanitizer),
                         ("megatron-tests", c.megatron_tests), ("bench", c.bench), ("memory", c.memory)):
            if setup["status"] != "passed":
                c.results["stages"][name] = {"status": "skipped", "reason": "set-up failed: " + setup["reason"]}
                continue
            c.stage(name, fn)
    finally:
        line = c.summary()
        c.write(line)
        c.log.close()
        if not a.keep and a.workdir is None:
            shutil.rmtree(c.work, ignore_errors=True)
        print(line, flush=True)
    return 0 if all(s["status"] != "failed" for s in c.results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
