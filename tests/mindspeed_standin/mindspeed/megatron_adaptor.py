"""Stand-in of ``mindspeed.megatron_adaptor``: importing it applies every feature's patches."""

from mindspeed.args_utils import get_mindspeed_args
from mindspeed.features_manager.features_manager import MindSpeedFeaturesManager


def patch_features():
    args = get_mindspeed_args()
    MindSpeedFeaturesManager.apply_features_pre_patches(args)
    MindSpeedFeaturesManager.apply_features_patches(args)


patch_features()
