"""moerail as a MindSpeed feature, against a minimal stand-in of MindSpeed's published feature
interface (``tests/mindspeed_standin``: MindSpeed cannot be installed outside Ascend environments).
Where MindSpeed's published source is at hand (``../shared/third_party``), the tests marked
``covered_by_real_source`` skip: ``tests/test_mindspeed_real.py`` shows the same against it; the
others (option edge cases, moerail without its dispatcher, MindSpeed not importable) stay here.

The launch-script recipe is exercised as documented: ``enable()`` appends the feature to
``MindSpeedFeaturesManager.FEATURES_LIST``, then importing ``mindspeed.megatron_adaptor`` parses the
command line and applies the features' patches to the real megatron-core.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import pytest
import torch

import moerail
from conftest import make_routing
from moerail.integrations import megatron as mi
from moerail.integrations import mindspeed as ms

pytestmark = pytest.mark.megatron

STANDIN = os.path.join(os.path.dirname(__file__), "mindspeed_standin")
# Where MindSpeed's published source is at hand, tests/test_mindspeed_real.py shows the same against it.
_REAL = os.environ.get("MOERAIL_MINDSPEED_TARBALL", os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "third_party", "mindspeed-028de58c.tar.gz"))
covered_by_real_source = pytest.mark.skipif(
    os.path.exists(_REAL), reason="shown against MindSpeed's real source in tests/test_mindspeed_real.py")


@pytest.fixture
def mindspeed(monkeypatch, mcore):
    """The stand-in on sys.path, with a fresh feature list and no patches; cleaned up after."""
    monkeypatch.syspath_prepend(STANDIN)
    for name in [m for m in sys.modules if m == "mindspeed" or m.startswith("mindspeed.")]:
        monkeypatch.delitem(sys.modules, name)
    fm = importlib.import_module("mindspeed.features_manager")
    pu = importlib.import_module("mindspeed.patch_utils")
    assert os.path.dirname(fm.__file__).startswith(STANDIN)
    yield fm
    fm.MindSpeedFeaturesManager.remove_patches()
    pu.MindSpeedPatchesManager.patches_info.clear()
    for name in [m for m in sys.modules if m == "mindspeed" or m.startswith("mindspeed.")]:
        del sys.modules[name]


def launch(monkeypatch, fm, argv):
    """What a launch script does: enable, then import the adaptor with these options; returns
    the parsed MindSpeed arguments, validated as Megatron's validate_args wrapper does."""
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    feature = ms.enable()
    importlib.import_module("mindspeed.megatron_adaptor")
    args = importlib.import_module("mindspeed.args_utils").get_mindspeed_args()
    fm.MindSpeedFeaturesManager.pre_validate_features_args(args)
    fm.MindSpeedFeaturesManager.post_validate_features_args(args)
    fm.MindSpeedFeaturesManager.validate_features_args(args)
    return feature, args


def test_feature_follows_the_published_interface(mindspeed):
    from mindspeed.features_manager.feature import MindSpeedFeature

    cls = ms.MoerailFeature
    assert issubclass(cls, MindSpeedFeature) and cls.__name__ == "MoerailFeature"
    f = cls()
    assert f.feature_name == "moerail_ops" and f.optimization_level == 2 and not f.default_patches
    for hook in ("register_args", "pre_validate_args", "validate_args", "post_validate_args",
                 "pre_register_patches", "register_patches", "incompatible_check", "dependency_check"):  # fmt: skip
        assert callable(getattr(f, hook))
    parser = argparse.ArgumentParser()
    f.register_args(parser)
    a = parser.parse_args([])
    assert (a.moerail_ops, a.moerail_dispatcher, a.moerail_expert_placement) == (None, None, None)
    assert parser.parse_args(["--moerail-ops"]).moerail_ops == "all"
    assert parser.parse_args(["--moerail-ops", "permute,unpermute"]).moerail_ops == "permute,unpermute"
    for s in ms.DISPATCHER_STRATEGIES:
        assert parser.parse_args(["--moerail-dispatcher", s]).moerail_dispatcher == s
    with pytest.raises(SystemExit):
        parser.parse_args(["--moerail-dispatcher", "ring"])
    ns = argparse.Namespace(optimization_level=2, moerail_ops=None, moerail_dispatcher=None, moerail_expert_placement=None)
    assert not f.is_need_apply(ns)
    assert f.is_need_apply(argparse.Namespace(**{**vars(ns), "moerail_ops": "all"}))
    assert not f.is_need_apply(argparse.Namespace(**{**vars(ns), "moerail_ops": "all", "optimization_level": 1}))


@covered_by_real_source
def test_enable_then_import_the_adaptor_patches_moe_utils(mindspeed, monkeypatch, mcore):
    from megatron.core.transformer.moe import router, token_dispatcher

    originals = {n: getattr(mcore, n) for n in mi.MOE_UTILS_FUNCTIONS if hasattr(mcore, n)}
    feature, args = launch(monkeypatch, mindspeed, ["--moerail-ops", "--tensor-model-parallel-size", "2"])
    assert mindspeed.MindSpeedFeaturesManager.FEATURES_LIST[-1] is feature
    assert ms.enable() is feature, "enabling twice adds one feature"
    assert args.moerail_ops == "all"
    assert set(feature.registered) == {f"{ms.MOE_UTILS_MODULE}.{n}" for n in originals}
    for n, orig in originals.items():
        assert getattr(mcore, n).__moerail_original__ is orig, n
    assert router.topk_routing_with_score_function.__moerail_original__ is originals["topk_routing_with_score_function"]
    assert token_dispatcher.permute.__moerail_original__ is originals["permute"]
    # the patched functions run moerail's ops
    mi.patch_stats(reset=True)
    _, probs, rmap = make_routing(24, 6, 2)
    x = torch.randn(24, 4)
    out = token_dispatcher.permute(x, rmap, num_out_tokens=48)
    assert torch.equal(out[0], moerail.permute(x, rmap, num_out_tokens=48)[0])
    assert mi.patch_stats()["permute"]["moerail"] == 1
    # MindSpeed's remove_patches undoes them
    mindspeed.MindSpeedFeaturesManager.remove_patches()
    for n, orig in originals.items():
        assert getattr(mcore, n) is orig, n
    assert token_dispatcher.permute is originals["permute"]


@covered_by_real_source
def test_subset_of_ops(mindspeed, monkeypatch, mcore):
    orig_z = mcore.z_loss_func
    feature, _ = launch(monkeypatch, mindspeed, ["--moerail-ops=permute,unpermute"])
    assert set(feature.registered) == {f"{ms.MOE_UTILS_MODULE}.permute", f"{ms.MOE_UTILS_MODULE}.unpermute"}
    assert mcore.z_loss_func is orig_z and hasattr(mcore.permute, "__moerail_original__")


def test_not_applied_without_options(mindspeed, monkeypatch, mcore):
    orig = mcore.permute
    feature, args = launch(monkeypatch, mindspeed, [])
    assert not feature.is_need_apply(args) and not hasattr(feature, "registered")
    assert mcore.permute is orig


@covered_by_real_source
def test_a_target_another_feature_replaced_is_left_to_it(mindspeed, monkeypatch, mcore):
    from mindspeed.patch_utils import MindSpeedPatchesManager

    def their_permute(*a, **k):
        return "theirs"

    MindSpeedPatchesManager.register_patch(f"{ms.MOE_UTILS_MODULE}.permute", their_permute)
    feature, _ = launch(monkeypatch, mindspeed, ["--moerail-ops"])
    assert f"{ms.MOE_UTILS_MODULE}.permute" not in feature.registered
    assert mcore.permute is their_permute
    assert hasattr(mcore.unpermute, "__moerail_original__")


def test_validation(mindspeed):
    f = ms.MoerailFeature()

    def ns(**kw):
        base = dict(optimization_level=2, moerail_ops=None, moerail_dispatcher=None, moerail_expert_placement=None)
        return argparse.Namespace(**{**base, **kw})

    f.validate_args(ns())
    f.validate_args(argparse.Namespace(hidden_size=8))  # a TransformerConfig-like object: left alone
    with pytest.raises(ValueError, match="unknown functions"):
        f.validate_args(ns(moerail_ops="permute,not_an_op"))
    with pytest.raises(AssertionError, match="incompatible"):  # MindSpeed's NPU-fused permute patches the same targets
        f.validate_args(ns(moerail_ops="all", moe_permute_fusion=True))
    f.validate_args(ns(moerail_ops="z_loss_func", moe_permute_fusion=True))
    with pytest.raises(AssertionError, match="requires --moerail-dispatcher"):
        f.validate_args(ns(moerail_expert_placement="refine"))
    with pytest.raises(ValueError, match="moerail-dispatcher"):
        f.validate_args(ns(moerail_dispatcher="ring"))


def test_dispatcher_without_the_dispatcher_class_is_a_clear_error(mindspeed, monkeypatch):
    monkeypatch.delattr(moerail, "AllToAllDispatcher", raising=False)
    f = ms.MoerailFeature()
    args = argparse.Namespace(optimization_level=2, moerail_ops=None, moerail_dispatcher="auto", moerail_expert_placement=None)
    with pytest.raises(ImportError, match="moerail.AllToAllDispatcher"):
        f.validate_args(args)
    wrapped = ms.moe_layer_init_wrapper_for("auto")(lambda self: None)
    with pytest.raises(ImportError, match="moerail.AllToAllDispatcher"):
        wrapped(object())


@covered_by_real_source
def test_dispatcher_patch_decorates_moe_layer_init(mindspeed, monkeypatch):
    """The option decorates MoELayer.__init__ so every built layer is handed to use_moerail (a
    recording stand-in here; use_moerail itself is tested against stock Megatron on gloo ranks)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    calls = []
    monkeypatch.setattr(moerail, "AllToAllDispatcher", type("AllToAllDispatcher", (), {}), raising=False)
    monkeypatch.setattr(mi, "use_moerail", lambda layer, **kw: calls.append((layer, kw)), raising=False)
    orig_init = MoELayer.__init__
    feature, args = launch(
        monkeypatch, mindspeed, ["--moerail-dispatcher", "2dh", "--moerail-expert-placement", "refine"]
    )
    assert (args.moerail_dispatcher, args.moerail_expert_placement) == ("2dh", "refine")
    assert MoELayer.__init__ is not orig_init and MoELayer.__init__.__wrapped__ is orig_init
    assert MoELayer.__init__.__moerail_strategy__ == ("2dh", "refine")

    class Layer:
        def __init__(self, x):
            self.x = x

    Layer.__init__ = ms.moe_layer_init_wrapper_for("2dh", "refine")(Layer.__init__)
    layer = Layer(3)
    assert layer.x == 3 and calls == [(layer, {"strategy": "2dh"})]
    assert layer.moerail_expert_placement == "refine"
    mindspeed.MindSpeedFeaturesManager.remove_patches()
    assert MoELayer.__init__ is orig_init
    with pytest.raises(AssertionError, match="incompatible"):
        feature.validate_args(argparse.Namespace(moerail_ops=None, moerail_dispatcher="auto", moerail_expert_placement=None, moe_alltoall_overlap_comm=True))


def test_enable_after_the_adaptor_is_refused(mindspeed, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"])
    importlib.import_module("mindspeed.megatron_adaptor")  # the features were applied without moerail
    with pytest.raises(RuntimeError, match="before importing"):
        ms.enable()


def test_without_mindspeed_the_feature_has_the_same_interface(monkeypatch):
    for name in [m for m in sys.modules if m == "mindspeed" or m.startswith("mindspeed.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mindspeed", None)  # not importable
    cls = ms.feature_class()
    assert cls.__mro__[2] is ms._FeatureBase
    f = cls()
    parser = argparse.ArgumentParser()
    f.register_args(parser)
    assert f.is_need_apply(parser.parse_args(["--moerail-ops"]))
