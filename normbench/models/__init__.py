"""Models by name. The norm is resolved here, once, into a factory the model passes down."""

from __future__ import annotations

from torch import nn

from normbench.data import DataInfo
from normbench.errors import UserError
from normbench.norms import NormSpec, check_norms, norm_factory

MODELS = ("resnet",)
# Which data kinds each model can read; anything else is an impossible pair.
COMPATIBLE = {"resnet": ("image",)}


def compatible_pairs_text() -> str:
    return "; ".join(f"model={m} with {'/'.join(kinds)} datasets" for m, kinds in COMPATIBLE.items())


def build_model(options: dict, norm: NormSpec, info: DataInfo) -> nn.Module:
    """Build the model `options["name"]` (the `model:` config) for data described by `info`,
    with norm `norm` everywhere it goes."""
    options = dict(options)
    name = options.pop("name")
    if name not in COMPATIBLE:
        raise UserError(f"unknown model '{name}'", f"use one of: {', '.join(MODELS)}")
    if info.kind not in COMPATIBLE[name]:
        raise UserError(f"model={name} cannot read {info.kind} data",
                        f"pick a matching pair: {compatible_pairs_text()}")
    if name == "resnet":
        from normbench.models.resnet import CifarResNet

        model = CifarResNet(norm_factory(norm, "image"), num_classes=info.num_classes,
                            in_channels=info.in_channels, conv_bias=not norm.recentres,
                            **options)
    check_norms(model)
    return model
