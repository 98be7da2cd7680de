"""Smoke test of an *installed* moerail (a wheel or an sdist build), run outside the repository.

    python tools/smoke.py [--expect-version 0.1.0]

Checks that ``moerail`` comes from site-packages (not a source tree), then runs the README's first
example (router -> permute -> experts -> unpermute, forward and backward) and compares it with
plain torch formulas of the same routing, ``moerail plan`` (a simulation and a small search),
``moerail doctor --json`` and ``moerail --version``. Prints ``SMOKE OK`` last. Used by
``tools/check_dist.py`` (``make test``) and by the release workflow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

README_EXAMPLE = """\
import torch, moerail

T, H, E, K = 64, 32, 8, 2                                     # tokens, hidden size, experts, top-k
hidden = torch.randn(T, H, requires_grad=True)
router = torch.nn.Linear(H, E, bias=False)
experts = torch.nn.Parameter(torch.randn(E, H, H) / H**0.5)   # one H x H matrix per expert

probs, routing_map = moerail.topk_route(router(hidden), topk=K)           # [T, E] each
permuted, permuted_probs, sorted_indices, _, tokens_per_expert = moerail.permute(
    hidden, routing_map, probs, num_out_tokens=T * K)                     # rows grouped by expert
chunks = permuted.split(tokens_per_expert.tolist())
expert_out = torch.cat([x @ experts[e] for e, x in enumerate(chunks)]) * permuted_probs[:, None]
out = moerail.unpermute(expert_out, sorted_indices, hidden.shape)         # [T, H]
out.sum().backward()                                                      # grads reach hidden, router, experts
print(out.shape, tokens_per_expert.tolist())
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect-version", default=None)
    a = ap.parse_args(argv)

    import torch

    import moerail

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    where = Path(moerail.__file__).resolve()
    assert site in where.parents, f"moerail imported from {where}, not from this environment's {site}"
    if a.expect_version:
        assert moerail.__version__ == a.expect_version, (moerail.__version__, a.expect_version)

    # The README's first example, verbatim (tests/test_readme.py keeps the two the same).
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(README_EXAMPLE, "README.md: first example", "exec"), ns)
    T, H, E, K = (ns[k] for k in ("T", "H", "E", "K"))
    hidden, experts, logits = ns["hidden"], ns["experts"], ns["router"](ns["hidden"])
    out, routing_map, tokens_per_expert = ns["out"], ns["routing_map"], ns["tokens_per_expert"]

    # The same in torch formulas (Megatron's default router: softmax over the top-k logits).
    top_logits, ref_idx = torch.topk(logits.detach().float(), K, dim=-1)
    ref_probs = torch.softmax(top_logits, -1)
    assert torch.equal(routing_map, torch.zeros(T, E, dtype=torch.bool).scatter_(1, ref_idx, True))
    want = torch.zeros(T, H)
    for k in range(K):
        want += torch.einsum("th,thg->tg", hidden.detach(), experts.detach()[ref_idx[:, k]]) * ref_probs[:, k:k + 1]
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-5)
    assert tokens_per_expert.sum().item() == T * K and hidden.grad is not None and experts.grad is not None
    print(f"ops OK: moerail {moerail.__version__} from {where.parent}")

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "moerail", *args], capture_output=True, text=True)
        return r.returncode, r.stdout, r.stderr

    rc, out_s, err = cli("--version")
    assert rc == 0 and moerail.__version__ in out_s, (rc, out_s, err)
    rc, out_s, err = cli("plan", "--model", "Mixtral-8x7B", "--cluster", "H100-SXM", "--devices", "64",
                         "--gbs", "512", "--tp", "2", "--pp", "4", "--ep", "8", "--json")
    assert rc == 0, err
    rep = json.loads(out_s)
    assert rep["time"]["step_s"] > 0 and 0 < rep["time"]["mfu"] < 1, rep["time"]
    rc, out_s, err = cli("plan", "--model", "Mixtral-8x7B", "--cluster", "H100-SXM", "--devices", "64",
                         "--gbs", "512", "--top", "3", "--quiet")
    assert rc == 0 and "--tensor-model-parallel-size" in out_s, (rc, out_s, err)
    print("plan OK")
    rc, out_s, err = cli("doctor", "--json", "--no-probe")
    assert rc == 0, err
    doc = json.loads(out_s)
    assert doc["moerail"]["version"] == moerail.__version__, doc["moerail"]
    print("doctor OK")
    print("SMOKE OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
