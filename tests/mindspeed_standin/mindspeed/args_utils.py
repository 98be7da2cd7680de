"""Stand-in of ``mindspeed.args_utils.get_mindspeed_args``: the features' options from sys.argv."""

import argparse

from mindspeed.features_manager import MindSpeedFeaturesManager

_ARGS = None


def get_mindspeed_args(get_defaults=False):
    global _ARGS
    if _ARGS is not None and not get_defaults:
        return _ARGS
    parser = argparse.ArgumentParser(description="MindSpeed Arguments", allow_abbrev=False)
    MindSpeedFeaturesManager.register_features_args(parser)
    args, _ = parser.parse_known_args([] if get_defaults else None)
    if not get_defaults:
        _ARGS = args
    return args
