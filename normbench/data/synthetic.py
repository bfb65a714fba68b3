"""Embedded synthetic data, generated deterministically from a seed (no files, no network).

`shapes`: ten classes of drawn shapes. Each image varies the shape's colour, size,
position and rotation, the background colour and its gradient, and adds pixel noise, so
that colour and position carry no label information and a model must learn the outline.
"""

from __future__ import annotations

import math

import torch

from normbench.data.images import ImageDataset

SHAPE_CLASSES = ("disk", "ring", "square", "frame", "triangle",
                 "plus", "cross", "diamond", "half_disk", "two_dots")


def _inside(label: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed "inside" score of class `label` at coordinates (u, v) in shape units.

    > 0 means inside; the magnitude is the distance to the edge in shape units (roughly),
    which gives a soft, anti-aliased edge once scaled to pixels.
    """
    name = SHAPE_CLASSES[label]
    r = torch.sqrt(u * u + v * v)
    box = torch.maximum(u.abs(), v.abs())

    def arm(a, b):
        return torch.minimum(0.28 - a.abs(), 0.95 - b.abs())

    if name == "disk":
        return 1.0 - r
    if name == "ring":
        return torch.minimum(r - 0.55, 1.0 - r)
    if name == "square":
        return 0.85 - box
    if name == "frame":
        return torch.minimum(box - 0.5, 0.9 - box)
    if name == "triangle":  # apex up
        return torch.minimum(v + 0.75, 0.75 - v - 1.7 * u.abs())
    if name == "plus":
        return torch.maximum(arm(u, v), arm(v, u))
    if name == "cross":
        ud, vd = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
        return torch.maximum(arm(ud, vd), arm(vd, ud))
    if name == "diamond":
        return 1.0 - (u.abs() + v.abs())
    if name == "half_disk":
        return torch.minimum(1.0 - r, v + 0.1)
    # two dots
    return torch.maximum(0.42 - torch.sqrt((u - 0.5) ** 2 + v * v),
                         0.42 - torch.sqrt((u + 0.5) ** 2 + v * v))


def render_shapes(n: int, seed: int, size: int = 32, noise: float = 0.05,
                  labels: torch.Tensor | None = None):
    """Render `n` images (uint8, (n,3,size,size)) and labels from one seed (`labels`: these
    classes instead of drawn ones; the other draws stay the same)."""
    # The largest buffer first: a size beyond memory is refused at once, before the
    # per-image draws fill gigabytes.
    score = torch.empty(n, size, size)
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    drawn = torch.randint(0, len(SHAPE_CLASSES), (n,), generator=g)
    labels = drawn if labels is None else labels
    radius = (0.18 + 0.17 * rand(n)) * size  # pixels
    cx = 0.5 * size + (rand(n) - 0.5) * (size - 2 * radius)
    cy = 0.5 * size + (rand(n) - 0.5) * (size - 2 * radius)
    angle = (rand(n) - 0.5) * (math.pi / 6)  # +-15 degrees
    fg = rand(n, 3)
    bg = rand(n, 3)
    # Keep the shape visible: push the foreground away from the background where close.
    close = (fg - bg).abs().sum(1) < 0.6
    fg[close] = 1.0 - bg[close]
    # The shape is the brighter of the two: colours vary freely, contrast polarity does not
    # (with both polarities the task is learnable, but far slower to start learning).
    darker = fg.sum(1) < bg.sum(1)
    fg[darker], bg[darker] = bg[darker], fg[darker].clone()
    grad_dir = rand(n) * 2 * math.pi

    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx = (xs - cx[:, None, None]) / radius[:, None, None]  # (n, H, W)
    dy = (ys - cy[:, None, None]) / radius[:, None, None]
    c, s = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    v = -v  # image rows grow downwards; shapes are defined with v up
    for label in range(len(SHAPE_CLASSES)):  # ten vectorized passes, one per class
        pick = labels == label
        score[pick] = _inside(label, u[pick], v[pick])
    # Soft edge about one pixel wide.
    alpha = (score * radius[:, None, None]).clamp(-0.5, 0.5) + 0.5  # (n, H, W)

    ramp = (torch.cos(grad_dir)[:, None, None] * (xs / size - 0.5)
            + torch.sin(grad_dir)[:, None, None] * (ys / size - 0.5))  # (n, H, W)
    background = bg[:, :, None, None] * (1.0 + 0.5 * ramp[:, None])
    img = alpha[:, None] * fg[:, :, None, None] + (1 - alpha[:, None]) * background
    img = img + noise * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


def shapes_dataset(n_train: int = 5000, n_val: int = 1000, image_size: int = 32,
                   noise: float = 0.05, seed: int = 0, augment: bool = True) -> ImageDataset:
    """The default image dataset: deterministic in `seed`, independent of the training seed."""
    tx, ty = render_shapes(n_train, seed=2 * seed, size=image_size, noise=noise)
    vx, vy = render_shapes(n_val, seed=2 * seed + 1, size=image_size, noise=noise)
    return ImageDataset(tx, ty, vx, vy, len(SHAPE_CLASSES), augment=augment, name="shapes")


def write_shapes_folder(root, n_train: int, n_val: int, min_size: int = 64, max_size: int = 300,
                        seed: int = 0, quality: int = 90, progress=None) -> dict[str, int]:
    """The shapes as an image folder of JPEGs (train/ and val/, one subfolder per class), at
    mixed sizes and aspect ratios between `min_size` and `max_size` px, the classes in turn
    (each gets n // 10 or one more): data for the streaming path without a download.
    Deterministic in `seed`; returns the files per split.
    `progress(k)`: called with the number of files just written."""
    from pathlib import Path

    from torchvision.io import encode_jpeg, write_file
    from torchvision.transforms.v2.functional import resize

    root = Path(root)
    written = {}
    for split, n, split_seed in (("train", n_train, 2 * seed), ("val", n_val, 2 * seed + 1)):
        for name in SHAPE_CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(split_seed)
        sides = torch.randint(min_size, max_size + 1, (n, 2), generator=g)  # (height, width)
        # Drawn at 64 px (the shapes' outlines need no more), then resized to each file's size.
        images, labels = render_shapes(n, seed=split_seed, size=64,  # every class, in turn
                                       labels=torch.arange(n) % len(SHAPE_CLASSES))
        for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            data = encode_jpeg(resize(image, sides[index].tolist(), antialias=True), quality=quality)
            write_file(str(root / split / SHAPE_CLASSES[label] / f"{index:06d}.jpg"), data)
            if progress:
                progress(1)
        written[split] = n
    return written
