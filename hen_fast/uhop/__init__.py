"""U-Hop (uniform memory retrieval): learn a feature map that separates the stored patterns
(Stage I), then retrieve in its kernel space (Stage II). See the README's "U-Hop" section."""

from .baselines import BASELINES, baseline_retrieve
from .feature_map import FeatureMap, fit_feature_map
from .layer import UHopHopfieldLayer, fit_uhop
from .loss import separation_loss
from .retrieval import projected_bank, retrieve

__all__ = [
    "BASELINES",
    "FeatureMap",
    "UHopHopfieldLayer",
    "baseline_retrieve",
    "fit_feature_map",
    "fit_uhop",
    "projected_bank",
    "retrieve",
    "separation_loss",
]
