"""Normalization layers: one registry keyed by (name, layout), the families that register
into it, and every BatchNorm statistic (`normbench.norms.stats`).

Importing this package imports every family module, which is what registers them: a new
family module is imported here.
"""

# The import order is the registration order, which `normbench list` and the error for an
# unknown norm follow: the mission's four first, then the rest by family.
from normbench.norms.registry import (  # noqa: I001
    LAYOUTS,
    Norm,
    NormFactory,
    NormSpec,
    UnbuildableNorm,
    check_norms,
    create_norm,
    make_norm_factory,
    make_spec,
    norm_class,
    norm_names,
    norm_options,
    norm_options_class,
    register,
    registered,
)
from normbench.norms.batch import GhostBatchNorm2d, StepBatchNorm, TimeBatchNorm, TokenBatchNorm
from normbench.norms.layer import FeatureLayerNorm, ImageLayerNorm
from normbench.norms.group import FeatureGroupNorm, ImageGroupNorm, InvalidGroupNorm
from normbench.norms.none import Identity
from normbench.norms.instance import ImageInstanceNorm
from normbench.norms.rms import FeatureRMSNorm, ImageRMSNorm
from normbench.norms.batch_renorm import (
    BatchRenorm2d,
    StepBatchRenorm,
    TimeBatchRenorm,
    TokenBatchRenorm,
)
from normbench.norms.power import PowerNorm2d, StepPowerNorm, TimePowerNorm, TokenPowerNorm
from normbench.norms.frn import FilterResponseNorm
from normbench.norms.dyt import FeatureDynamicTanh, ImageDynamicTanh
from normbench.norms.weight import WeightNormOnly, apply_weight_norm

__all__ = [
    "LAYOUTS", "BatchRenorm2d", "FeatureDynamicTanh", "FeatureGroupNorm", "FeatureLayerNorm",
    "FeatureRMSNorm", "FilterResponseNorm", "GhostBatchNorm2d", "Identity", "ImageDynamicTanh",
    "ImageGroupNorm", "ImageInstanceNorm", "ImageLayerNorm", "ImageRMSNorm", "InvalidGroupNorm",
    "Norm", "NormFactory", "NormSpec", "PowerNorm2d", "StepBatchNorm", "StepBatchRenorm",
    "StepPowerNorm", "TimeBatchNorm", "TimeBatchRenorm", "TimePowerNorm", "TokenBatchNorm",
    "TokenBatchRenorm", "TokenPowerNorm", "UnbuildableNorm", "check_norms",
    "create_norm", "make_norm_factory", "make_spec", "norm_class", "norm_names", "norm_options",
    "norm_options_class",    "register", "registered", "WeightNormOnly", "apply_weight_norm",
]
