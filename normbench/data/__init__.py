"""Datasets by name. Each family lives in its own module; this one only dispatches.

A dataset is held as tensors (on the training device once `.to(device)` is called) and
offers two views: an endless, resumable training stream of augmented batches, and the
validation set in fixed order.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

from normbench.errors import UserError


@dataclass
class Batch:
    x: torch.Tensor  # images (N,C,H,W) float, or tokens (N,T) long
    y: torch.Tensor  # labels (N,) or next tokens (N,T)
    mask: torch.Tensor | None = None  # (N,T) bool, True on real tokens; None: all real

    @property
    def size(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data."""

    kind: str  # "image" or "text"
    num_classes: int  # classes for images, vocabulary size for text
    in_channels: int = 3
    image_size: int = 32
    seq_len: int = 0  # context length for text
    unit: str = "char"  # text: what a token is, "char" or "word" (names the bits metric)


# name -> (module, builder); the options each reads are typed in normbench/config/schema.py.
BUILDERS = {
    "shapes": ("normbench.data.synthetic", "shapes_dataset"),
    "cifar10": ("normbench.data.images", "cifar_dataset"),
    "cifar100": ("normbench.data.images", "cifar_dataset"),
    "imagefolder": ("normbench.data.images", "imagefolder_dataset"),
    "synthetic_text": ("normbench.data.synthetic_text", "synthetic_text_dataset"),
    "tinyshakespeare": ("normbench.data.corpus", "tinyshakespeare_dataset"),
    "text": ("normbench.data.corpus", "text_dataset"),
}


def dataset_builder(name: str):
    """The function that builds dataset `name` from its options (CIFAR's is told which one)."""
    if name not in BUILDERS:
        from normbench.config.tree import config_options

        raise UserError(f"unknown dataset '{name}'",
                        f"use one of: {', '.join(config_options('dataset'))}")
    module, function = BUILDERS[name]
    builder = getattr(importlib.import_module(module), function)
    return functools.partial(builder, name) if name.startswith("cifar") else builder


def build_dataset(name: str, **options):
    """Construct a dataset by name from plain keyword options (the `dataset:` config)."""
    options.pop("kind", None)  # what the dataset is, for the checks; not a loading option
    return dataset_builder(name)(**options)
