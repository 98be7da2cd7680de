"""Run by tests/test_mindspeed_real.py in a fresh process: ``python run_checks.py MINDSPEED_DIR
SCENARIO`` with MindSpeed's published source unpacked at MINDSPEED_DIR (its ``mindspeed/``
package). Prints one JSON object: what MindSpeed's own features manager, argument handling and patch
manager did with ``MoerailFeature``.

The launch-script recipe: ``moerail.integrations.mindspeed.enable()``, then MindSpeed's
``get_mindspeed_args()`` parses the command line with every feature's ``register_args`` (all of
MindSpeed's features, moerail's among them), then ``import mindspeed.megatron_adaptor`` applies the
features' patches through ``MindSpeedFeaturesManager`` / ``MindSpeedPatchesManager``. Left out of
the applied list: the features whose patches apply by default (``default_patches``: MindSpeed's
adaptation of Megatron to NPUs: apex and TransformerEngine replaced by NPU kernels, ``torch.cuda``
mapped to ``torch.npu``), which need the Ascend software stack.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))

SCENARIOS = {
    # MindSpeed's MoE options next to moerail's; MindSpeed's own MoE features are not applied
    # (their options are off) but parse and validate beside moerail.
    "ops": ["--moerail-ops", "--moe-token-dispatcher-type", "alltoall", "--num-experts", "8",
            "--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "1"],
    "subset": ["--moerail-ops=permute,unpermute", "--moe-token-dispatcher-type", "alltoall"],
    # Another feature registered its own permute first: moerail leaves that target to it.
    "taken": ["--moerail-ops", "--moe-token-dispatcher-type", "alltoall"],
    "dispatcher": ["--moerail-dispatcher", "2dh", "--moerail-expert-placement", "refine",
                   "--moe-token-dispatcher-type", "alltoall", "--num-experts", "8",
                   "--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "1"],
    "conflict": ["--moerail-dispatcher", "auto", "--moe-alltoall-overlap-comm", "--moe-token-dispatcher-type",
                 "alltoall", "--num-experts", "8", "--expert-model-parallel-size", "2",
                 "--tensor-model-parallel-size", "1", "--moe-grouped-gemm"],
    "tp_extend_ep": ["--moerail-ops", "--moe-tp-extend-ep", "--moe-permutation-async-comm", "--moe-grouped-gemm",
                     "--moe-token-dispatcher-type", "alltoall_seq", "--num-experts", "8",
                     "--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2"],
}
# Parsed and validated only: applying MindSpeed's grouped-GEMM / TP-extend-EP patches imports its
# moe_feature package, written for an older megatron-core (it imports moe_utils.topk_softmax_with_capacity).
VALIDATE_ONLY = ("conflict", "tp_extend_ep")
MEGATRON_DEFAULTS = dict(moe_expert_capacity_factor=None, n_shared_experts=None, moe_shared_expert_intermediate_size=None,
                         moe_shared_expert_overlap=False, use_ascend_mc2=False, moe_ffn_hidden_size=None,
                         ffn_hidden_size=32, moe_grouped_gemm=False, moe_permutation_async_comm=False)


def main(mindspeed_dir: str, scenario: str) -> dict:
    warnings.simplefilter("ignore")
    sys.path.insert(0, HERE)
    import ascend_standin

    ascend_standin.install()
    sys.path.insert(0, mindspeed_dir)
    sys.argv = ["pretrain_gpt.py", *SCENARIOS[scenario]]
    out: dict = {}

    import megatron.core.transformer.moe.moe_utils as moe_utils
    import mindspeed.features_manager as fm
    from mindspeed.features_manager.feature import MindSpeedFeature
    from mindspeed.patch_utils import MindSpeedPatchesManager

    import moerail.integrations.mindspeed as ms
    from moerail.integrations import megatron as mi

    manager = fm.MindSpeedFeaturesManager
    out["mindspeed_file"] = fm.__file__
    out["features"] = len(manager.FEATURES_LIST)
    originals = {n: getattr(moe_utils, n) for n in mi.MOE_UTILS_FUNCTIONS if hasattr(moe_utils, n)}
    # A MindSpeed MoE module that imports moe_utils' functions by name, imported before the patches.
    try:
        early = importlib.import_module("mindspeed.core.transformer.moe.token_dispatcher")
        out["early_module"] = early.__name__
    except Exception as e:  # noqa: BLE001
        early = None
        out["early_module_error"] = f"{type(e).__name__}: {e}"

    if scenario == "taken":
        def their_permute(*args, **kwargs):
            return "theirs"

        MindSpeedPatchesManager.register_patch(f"{ms.MOE_UTILS_MODULE}.permute", their_permute)
    feature = ms.enable()
    out["feature_is_mindspeed_feature"] = isinstance(feature, MindSpeedFeature)
    out["feature_base"] = f"{type(feature).__mro__[2].__module__}.{type(feature).__mro__[2].__qualname__}"
    out["feature_last"] = manager.FEATURES_LIST[-1] is feature
    from mindspeed.args_utils import get_mindspeed_args

    args = get_mindspeed_args()  # MindSpeed's argument handling, every feature's options
    out["args"] = {k: v for k, v in vars(args).items() if k.startswith(("moerail", "moe_")) or k == "optimization_level"}
    # Megatron's own options (MindSpeed's parser keeps them as strings; Megatron's parses numbers).
    for k, v in vars(args).items():
        if isinstance(v, str) and v.isdigit():
            setattr(args, k, int(v))
    # MindSpeed's validation hooks of its MoE features and moerail's, on these arguments.
    for k, v in MEGATRON_DEFAULTS.items():
        if not hasattr(args, k):
            setattr(args, k, v)
    if not hasattr(args, "num_experts"):
        args.num_experts = None
    moe_features = [f for f in manager.FEATURES_LIST if type(f).__module__.startswith("mindspeed.features_manager.moe")]
    out["moe_features"] = sorted(type(f).__name__ for f in moe_features)
    try:
        for f in [*moe_features, feature]:
            f.validate_args(args)
        out["validated"] = True
    except Exception as e:  # noqa: BLE001
        out["validated"] = False
        out["validate_error"] = f"{type(e).__name__}: {e}"
        return out
    if scenario in VALIDATE_ONLY:
        return out
    # The NPU adaptation (default patches) needs the Ascend stack: not applied here.
    out["not_applied"] = sorted(type(f).__name__ for f in manager.FEATURES_LIST if f.default_patches)
    manager.set_features_list([f for f in manager.FEATURES_LIST if not f.default_patches])
    import mindspeed.megatron_adaptor  # noqa: F401  (applies the features' patches)

    out["applied"] = sorted(getattr(feature, "registered", {}))
    out["patches_info"] = sorted(k for k in MindSpeedPatchesManager.patches_info if "moerail" in repr(
        MindSpeedPatchesManager.patches_info[k].patch_func) or "moe" in k)
    out["moe_utils_patched"] = sorted(n for n, f in originals.items()
                                      if getattr(getattr(moe_utils, n), "__moerail_original__", None) is f)
    from megatron.core.transformer.moe import router, token_dispatcher

    out["permute_is"] = getattr(moe_utils.permute, "__name__", "?")
    out["megatron_dispatcher_permute"] = hasattr(token_dispatcher.permute, "__moerail_original__")
    out["megatron_router_topk"] = hasattr(router.topk_routing_with_score_function, "__moerail_original__")
    if early is not None:
        out["early_module_names"] = sorted(n for n in originals if hasattr(getattr(early, n, None),
                                                                           "__moerail_original__"))
    try:
        late = importlib.import_module("mindspeed.core.transformer.moe.moe_utils")
        out["late_module_names"] = sorted(n for n in originals if hasattr(getattr(late, n, None),
                                                                         "__moerail_original__"))
    except Exception as e:  # noqa: BLE001
        out["late_module_error"] = f"{type(e).__name__}: {e}"
    if out["megatron_dispatcher_permute"]:
        import torch

        import moerail

        mi.patch_stats(reset=True)
        logits = torch.randn(24, 6)
        _, rmap = moerail.topk_route(logits, 2)
        x = torch.randn(24, 4)
        got = early.permute(x, rmap, num_out_tokens=48) if early is not None else token_dispatcher.permute(
            x, rmap, num_out_tokens=48)
        out["permute_runs_moerail"] = mi.patch_stats()["permute"]["moerail"] == 1 and torch.equal(
            got[0], moerail.permute(x, rmap, num_out_tokens=48)[0])
    from megatron.core.transformer.moe.moe_layer import MoELayer

    out["moe_layer_init_strategy"] = getattr(MoELayer.__init__, "__moerail_strategy__", None)
    manager.remove_patches()
    out["restored"] = all(getattr(moe_utils, n) is f for n, f in originals.items()) and not hasattr(
        MoELayer.__init__, "__moerail_strategy__")
    return out


if __name__ == "__main__":
    try:
        res = main(sys.argv[1], sys.argv[2])
    except Exception:  # noqa: BLE001
        res = {"error": traceback.format_exc()}
    print("RESULT " + json.dumps(res, default=str))
