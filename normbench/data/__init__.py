"""Datasets by name. Each family lives in its own module; this one only dispatches.

A dataset is held as tensors (on the training device once `.to(device)` is called) and
offers two views: an endless, resumable training stream of augmented batches, and the
validation set in fixed order.
"""

from __future__ import annotations

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


IMAGE_DATASETS = ("shapes", "cifar10", "cifar100", "imagefolder")
TEXT_DATASETS = ("synthetic_text", "tinyshakespeare", "text")
DATASETS = IMAGE_DATASETS + TEXT_DATASETS


def build_dataset(name: str, **options):
    """Construct a dataset by name from plain keyword options (the `dataset:` config)."""
    options = {k: v for k, v in options.items() if k != "name"}
    if name == "shapes":
        from normbench.data.synthetic import shapes_dataset

        return shapes_dataset(**options)
    if name in ("cifar10", "cifar100"):
        from normbench.data.images import cifar_dataset

        return cifar_dataset(name, **options)
    if name == "imagefolder":
        from normbench.data.images import imagefolder_dataset

        return imagefolder_dataset(**options)
    if name == "synthetic_text":
        from normbench.data.synthetic_text import synthetic_text_dataset

        return synthetic_text_dataset(**options)
    if name == "tinyshakespeare":
        from normbench.data.text import tinyshakespeare_dataset

        return tinyshakespeare_dataset(**options)
    if name == "text":
        from normbench.data.text import text_dataset

        return text_dataset(**options)
    raise UserError(f"unknown dataset '{name}'", f"use one of: {', '.join(DATASETS)}")
