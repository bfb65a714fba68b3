"""Normalization layers: one registry keyed by (name, layout), the families that register
into it, and every BatchNorm statistic (`normbench.norms.stats`).

Importing this package imports every family module, which is what registers them: a new
family module is imported here.
"""

from normbench.norms.batch import GhostBatchNorm2d, StepBatchNorm, TimeBatchNorm, TokenBatchNorm
from normbench.norms.power import PowerNorm2d, StepPowerNorm, TimePowerNorm, TokenPowerNorm
from normbench.norms.registry import (
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
    register,
    registered,
)
from normbench.norms.renorm import (
    BatchRenorm2d,
    StepBatchRenorm,
    TimeBatchRenorm,
    TokenBatchRenorm,
)
from normbench.norms.sample import (
    FeatureGroupNorm,
    FeatureLayerNorm,
    Identity,
    ImageGroupNorm,
    ImageLayerNorm,
    InvalidGroupNorm,
)
from normbench.norms.scaling import (
    FeatureDynamicTanh,
    FeatureRMSNorm,
    FilterResponseNorm,
    ImageDynamicTanh,
    ImageInstanceNorm,
    ImageRMSNorm,
)
from normbench.norms.weight import WeightNormOnly, apply_weight_norm

__all__ = [
    "LAYOUTS", "BatchRenorm2d", "FeatureDynamicTanh", "FeatureGroupNorm", "FeatureLayerNorm",
    "FeatureRMSNorm", "FilterResponseNorm", "GhostBatchNorm2d", "Identity", "ImageDynamicTanh",
    "ImageGroupNorm", "ImageInstanceNorm", "ImageLayerNorm", "ImageRMSNorm", "InvalidGroupNorm",
    "Norm", "NormFactory", "NormSpec", "PowerNorm2d", "StepBatchNorm", "StepBatchRenorm",
    "StepPowerNorm", "TimeBatchNorm", "TimeBatchRenorm", "TimePowerNorm", "TokenBatchNorm",
    "TokenBatchRenorm", "TokenPowerNorm", "UnbuildableNorm", "check_norms",
    "create_norm", "make_norm_factory", "make_spec", "norm_class", "norm_names", "norm_options",
    "register", "registered", "WeightNormOnly", "apply_weight_norm",
]
