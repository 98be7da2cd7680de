"""moerail's MindSpeed feature against MindSpeed's published source (not a stand-in): the snapshot
``../shared/third_party/mindspeed-028de58c.tar.gz`` (relative to the clone; ``MOERAIL_MINDSPEED_TARBALL``
overrides) is unpacked into a temporary folder at test time and imported for real; only the
Ascend-only modules (``torch_npu``, ``torchair``, ``acl``, ``tbe``) are stood in for
(``tests/mindspeed_real/ascend_standin.py``). Each scenario runs in a fresh process
(``tests/mindspeed_real/run_checks.py``), since importing ``mindspeed.megatron_adaptor`` parses the
command line and patches Megatron-Core process-wide.

Shown: ``MoerailFeature`` subclasses MindSpeed's own ``MindSpeedFeature`` and joins its 88 features
in ``MindSpeedFeaturesManager``; ``--moerail-*`` parse with MindSpeed's ``get_mindspeed_args`` beside
its MoE options (``--moe-token-dispatcher-type``, ``--moe-tp-extend-ep``,
``--moe-alltoall-overlap-comm``, ...) and validate beside its MoE features (an incompatible pair is
refused with moerail's message); importing ``mindspeed.megatron_adaptor`` applies the patches through
``MindSpeedPatchesManager`` into Megatron's ``moe_utils``, into the modules that imported them by
name (Megatron's router and token dispatchers, MindSpeed's own MoE token dispatcher) and onto
``MoELayer.__init__``; MindSpeed's ``remove_patches`` undoes them.

Not exercised without NPUs: the features MindSpeed applies by default (its adaptation of Megatron
to Ascend: apex / TransformerEngine replaced by NPU kernels, ``torch.cuda`` mapped to ``torch.npu``);
and applying its grouped-GEMM / TP-extend-EP MoE patches, whose package imports a ``moe_utils``
function megatron-core 0.16 no longer has (they are parsed and validated only).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARBALL = pathlib.Path(os.environ.get("MOERAIL_MINDSPEED_TARBALL",
                                      ROOT.parent / "shared" / "third_party" / "mindspeed-028de58c.tar.gz"))
CHECKS = ROOT / "tests" / "mindspeed_real" / "run_checks.py"

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def mindspeed_dir(tmp_path_factory):
    if not TARBALL.exists():
        pytest.skip(f"MindSpeed's source snapshot is not at {TARBALL} (set MOERAIL_MINDSPEED_TARBALL to it)")
    dest = tmp_path_factory.mktemp("mindspeed")
    with tarfile.open(TARBALL) as tar:
        tar.extractall(dest, filter="data")
    (pkg,) = [p.parent.parent for p in dest.glob("*/mindspeed/__init__.py")]
    return pkg


def run(mindspeed_dir, scenario: str) -> dict:
    r = subprocess.run([sys.executable, str(CHECKS), str(mindspeed_dir), scenario], capture_output=True, text=True,
                       timeout=180, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(line[-1][7:])
    assert "error" not in res, res["error"]
    assert res["mindspeed_file"].startswith(str(mindspeed_dir)), "the real MindSpeed was imported"
    assert res["feature_is_mindspeed_feature"] and res["feature_base"] == \
        "mindspeed.features_manager.feature.MindSpeedFeature"
    assert res["feature_last"] and res["features"] > 50, "moerail joins MindSpeed's own feature list"
    return res


def test_ops_patches_land_where_megatron_and_mindspeed_call_them(mindspeed_dir):
    res = run(mindspeed_dir, "ops")
    assert res["args"]["moerail_ops"] == "all" and res["args"]["moe_token_dispatcher_type"] == "alltoall"
    assert res["validated"]
    want = {"permute", "unpermute", "sort_chunks_by_idxs", "topk_routing_with_score_function",
            "switch_load_balancing_loss_func", "z_loss_func"}
    assert want <= set(res["moe_utils_patched"])
    assert {f"megatron.core.transformer.moe.moe_utils.{n}" for n in want} <= set(res["applied"])
    assert set(res["applied"]) <= set(res["patches_info"]), "registered through MindSpeedPatchesManager"
    assert res["megatron_dispatcher_permute"] and res["megatron_router_topk"]
    # MindSpeed's own MoE token dispatcher, imported before the patches, calls moerail's functions.
    assert res["early_module"] == "mindspeed.core.transformer.moe.token_dispatcher"
    assert {"permute", "unpermute", "sort_chunks_by_idxs"} <= set(res["early_module_names"])
    assert res["permute_runs_moerail"]
    assert res["moe_layer_init_strategy"] is None
    assert res["restored"], "MindSpeed's remove_patches restores Megatron's functions"


def test_dispatcher_decorates_moe_layer_init(mindspeed_dir):
    res = run(mindspeed_dir, "dispatcher")
    assert (res["args"]["moerail_dispatcher"], res["args"]["moerail_expert_placement"]) == ("2dh", "refine")
    assert res["validated"]
    assert res["applied"] == ["megatron.core.transformer.moe.moe_layer.MoELayer.__init__"]
    assert res["moe_layer_init_strategy"] == ["2dh", "refine"]
    assert res["moe_utils_patched"] == []
    assert res["restored"]
    # What MindSpeed cannot apply here: its NPU adaptation.
    assert {"MegatronBasicFeature", "TransformerEngineBasicFeature", "RequirementsBasicFeature"} <= \
        set(res["not_applied"])


def test_parses_next_to_mindspeeds_moe_options_and_refuses_a_conflict(mindspeed_dir):
    res = run(mindspeed_dir, "conflict")
    assert res["args"]["moe_alltoall_overlap_comm"] is True and res["args"]["moerail_dispatcher"] == "auto"
    assert "MoEAlltoAllOverLapFeature" in res["moe_features"] and "MoETpExtendEpFeature" in res["moe_features"]
    assert not res["validated"]
    assert "--moerail-dispatcher and --moe-alltoall-overlap-comm are incompatible" in res["validate_error"]


def test_ops_beside_tp_extend_ep(mindspeed_dir):
    res = run(mindspeed_dir, "tp_extend_ep")
    a = res["args"]
    assert a["moe_tp_extend_ep"] and a["moe_permutation_async_comm"] and a["moerail_ops"] == "all"
    assert a["moe_token_dispatcher_type"] == "alltoall_seq"
    assert res["validated"], res.get("validate_error")


def test_a_subset_of_ops(mindspeed_dir):
    res = run(mindspeed_dir, "subset")
    assert res["args"]["moerail_ops"] == "permute,unpermute"
    assert res["moe_utils_patched"] == ["permute", "unpermute"]


def test_a_target_another_feature_replaced_is_left_to_it(mindspeed_dir):
    res = run(mindspeed_dir, "taken")
    assert "megatron.core.transformer.moe.moe_utils.permute" not in res["applied"]
    assert res["permute_is"] == "their_permute" and "unpermute" in res["moe_utils_patched"]
