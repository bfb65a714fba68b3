"""Image data on disk for tests: a miniature CIFAR-10 in its on-disk format, and an image
folder with train/ and val/ splits."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import torch
import torchvision


def write_cifar10_fixture(root, n_per_batch=20):
    """A miniature CIFAR-10 in its on-disk format (python pickles in cifar-10-batches-py/)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)  # torchvision reads str keys
        files[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return files


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def install_cifar10_fixture(root, monkeypatch, **options):
    """`write_cifar10_fixture` into `root`, with torchvision's checksums pointed at its files
    (so CIFAR10's integrity check accepts them); returns what the writer returns."""
    files = write_cifar10_fixture(root, **options)
    folder = root / "cifar-10-batches-py"
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")]
                                            for i in range(1, 6)])
    monkeypatch.setattr(cls, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / "batches.meta")})
    return files


def write_imagefolder(root, classes=("cat", "dog", "owl"), per_class=4):
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = torch.full((3, 20, 28), 40 * k + i, dtype=torch.uint8)
                torchvision.io.write_png(img, str(folder / f"{i}.png"))
