"""Models by name. The norm is resolved here, once, into a factory the model passes down;
models call whatever it builds as `norm(x, mask=None)` and never see the norm's name."""

from __future__ import annotations

from torch import nn

from normbench.data import DataInfo
from normbench.errors import UserError
from normbench.models.external import EXTERNAL, NATIVE, build_external
from normbench.norms import NormSpec, apply_weight_norm, check_norms, make_norm_factory

MODELS = ("resnet", "transformer", "lstm", *EXTERNAL)
# Which data kinds each model can read; anything else is an impossible pair.
COMPATIBLE = {"resnet": ("image",), "transformer": ("text", "image"), "lstm": ("text", "image"),
              **{name: ("image",) for name in EXTERNAL}}


def compatible_pairs_text() -> str:
    return "; ".join(f"model={m} with {'/'.join(kinds)} datasets" for m, kinds in COMPATIBLE.items())


def _length(value, info: DataInfo, key: str) -> int:
    """A sequence model's maximum length: `value` if set, else the dataset's context."""
    if info.kind != "text":
        return value or 0
    if value is None:
        return info.seq_len
    if value < info.seq_len:
        raise UserError(f"{key}={value} is shorter than dataset.seq_len={info.seq_len}",
                        f"leave {key} unset (null) or make it at least {info.seq_len}")
    return value


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
    if name in EXTERNAL:  # weight norm included
        return build_external({"name": name, **options}, norm, info)
    if norm.name == NATIVE:
        raise UserError(f"norm=native keeps a model's own norms, and model={name} is "
                        "normbench's own, built for the norm you choose",
                        "pick a norm (normbench list), or use norm=native with "
                        "model=torchvision, timm or custom")
    if name == "resnet":
        from normbench.models.resnet import CifarResNet

        make_norm = make_norm_factory(norm, "images")
        model = CifarResNet(make_norm, num_classes=info.num_classes,
                            in_channels=info.in_channels, conv_bias=not make_norm.recentres,
                            **options)
    elif name == "transformer":
        from normbench.models.transformer import Transformer

        context = _length(options.pop("context", None), info, "model.context")
        model = Transformer(make_norm_factory(norm, "tokens"), task=info.kind,
                            num_classes=info.num_classes, context=context,
                            in_channels=info.in_channels, image_size=info.image_size, **options)
    elif name == "lstm":
        from normbench.models.lstm import LSTM

        # Images are read row by row: one step per row unless model.t_max says otherwise.
        t_max = _length(options.pop("t_max", None), info, "model.t_max")
        if info.kind == "image":
            t_max = t_max or info.image_size
        model = LSTM(make_norm_factory(norm, "steps", t_max=t_max), task=info.kind,
                     num_classes=info.num_classes, t_max=t_max, in_channels=info.in_channels,
                     image_size=info.image_size, **options)
    check_norms(model)
    if norm.weight_norm:
        apply_weight_norm(model)
    return model
