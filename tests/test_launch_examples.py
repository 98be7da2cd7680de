"""The launch examples (``examples/launch``) run as a user runs them, with Megatron-LM's and
MindSpeed-LLM's ``pretrain_gpt.py`` replaced by stubs that report what the real ones would see:
moerail switched on before the model is built (Megatron-Core's own ``moe_utils`` rebound, the
MindSpeed feature registered and applied), and the command line passed through. ``torchrun`` is a
stand-in that runs the script once. The Megatron-LM example's layout is the one ``moerail plan``
prints for the command its comment gives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import moerail
from moerail import cli

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "examples" / "launch"
STANDIN = ROOT / "tests" / "mindspeed_standin"

TORCHRUN = """#!/usr/bin/env bash
# torchrun stand-in: drop torchrun's own options, run the script once as rank 0 of 1.
while [[ $# -gt 0 && "$1" != *.py ]]; do shift; done
export RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1
exec "{python}" "$@"
"""

MEGATRON_STUB = """
import sys
from megatron.core.transformer.moe import moe_utils, token_dispatcher
from megatron.core.transformer.moe.moe_layer import MoELayer
from moerail.integrations import megatron as mi
assert mi.is_patched(), "moe_utils not patched"
assert token_dispatcher.permute is moe_utils.permute and hasattr(moe_utils.permute, "__moerail_impl__")
print("STUB OK", "dispatcher-wrapped" if hasattr(MoELayer.__init__, "__wrapped__") else "ops-only",
      " ".join(sys.argv[1:]))
"""

MINDSPEED_STUB = """
import sys
import mindspeed.megatron_adaptor  # noqa: F401  (MindSpeed-LLM imports it first: applies the features)
from mindspeed.features_manager import MindSpeedFeaturesManager
from megatron.core.transformer.moe import moe_utils
assert any(type(f).__name__ == "MoerailFeature" for f in MindSpeedFeaturesManager.FEATURES_LIST)
assert hasattr(moe_utils.permute, "__moerail_impl__"), "--moerail-ops did not patch moe_utils"
print("STUB OK", " ".join(sys.argv[1:]))
"""


@pytest.fixture
def env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(TORCHRUN.format(python=sys.executable))
    (bin_dir / "torchrun").chmod(0o755)
    pkg = os.path.dirname(os.path.dirname(moerail.__file__))
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=os.pathsep.join(filter(None, [pkg, os.environ.get("PYTHONPATH")])),
                DATA_PATH="/data/none", TOKENIZER_MODEL="/tok/none", TOKENIZER_PATH="/tok/none", NNODES="1")


def _array(script: str, name: str) -> list:
    body = re.search(rf"^{name}=\((.*?)^\)", script, re.S | re.M).group(1)
    return [w.strip('"') for w in body.split()]


def test_megatron_lm_launch_switches_moerail_on(tmp_path, env):
    pytest.importorskip("megatron.core")
    mlm = tmp_path / "Megatron-LM"
    mlm.mkdir()
    (mlm / "pretrain_gpt.py").write_text(MEGATRON_STUB)
    r = subprocess.run(["bash", str(LAUNCH / "megatron_lm_mixtral_8x7b.sh"), "--extra-flag"], env=dict(env, MEGATRON_LM=str(mlm)),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("STUB OK")][-1]
    assert line.startswith("STUB OK dispatcher-wrapped --num-layers 32") and line.endswith("--extra-flag")
    r = subprocess.run([sys.executable, str(LAUNCH / "moerail_pretrain_gpt.py"), "--x"], cwd=mlm,
                       env={k: v for k, v in env.items() if k != "MOERAIL_DISPATCHER"}, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and "STUB OK ops-only --x" in r.stdout, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(LAUNCH / "moerail_pretrain_gpt.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1 and "MEGATRON_LM: no pretrain_gpt.py" in r.stderr


def test_megatron_lm_launch_layout_is_what_plan_prints(capsys):
    script = (LAUNCH / "megatron_lm_mixtral_8x7b.sh").read_text()
    cmd = re.search(r"^#\s+moerail (plan .*)$", script, re.M).group(1).split()
    assert cli.main([*cmd, "--json", "--quiet", "--top", "1"]) == 0
    flags = json.loads(capsys.readouterr().out)["megatron_flags"]
    assert _array(script, "LAYOUT") == flags
    cfg, ignored = moerail.sim.parse_megatron_args(" ".join(_array(script, "MODEL") + flags))
    assert cfg["model"]["num_moe_experts"] == 8 and cfg["layout"]["expert_model_parallel_size"] == 8


def test_mindspeed_llm_launch_enables_the_feature(tmp_path, env):
    pytest.importorskip("megatron.core")
    msl = tmp_path / "MindSpeed-LLM"
    msl.mkdir()
    (msl / "pretrain_gpt.py").write_text(MINDSPEED_STUB)
    e = dict(env, MINDSPEED_LLM=str(msl), PYTHONPATH=os.pathsep.join([str(STANDIN), env["PYTHONPATH"]]))
    r = subprocess.run(["bash", str(LAUNCH / "mindspeed_llm_mixtral_8x7b.sh")], env=e, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("STUB OK")][-1]
    assert "--moerail-ops --moerail-dispatcher auto --moerail-expert-placement refine" in line
