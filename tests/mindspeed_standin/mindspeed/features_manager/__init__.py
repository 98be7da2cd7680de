"""Stand-in of ``mindspeed.features_manager``: the manager, with one built-in feature that adds
``--optimization-level`` (MindSpeed's basic requirements feature does)."""

from mindspeed.features_manager.feature import MindSpeedFeature
from mindspeed.features_manager.features_manager import MindSpeedFeaturesManager


class OptimizationLevelFeature(MindSpeedFeature):
    def __init__(self):
        super().__init__("optimization-level", optimization_level=0)

    def register_args(self, parser):
        parser.add_argument("--optimization-level", type=int, choices=[0, 1, 2], default=2)


def create_features_list():
    return [OptimizationLevelFeature()]


MindSpeedFeaturesManager.set_features_list(create_features_list())

__all__ = ["MindSpeedFeature", "MindSpeedFeaturesManager"]
