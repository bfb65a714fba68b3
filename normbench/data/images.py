"""Image datasets held as uint8 tensors, with augmentation applied to whole batches.

As in airbench, the dataset lives on the training device as one tensor; a batch is an
index into it, and random crop + flip are a single gather over the batch, never a Python
loop over images.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from normbench.data import Batch, DataInfo
from normbench.data.decoding import DECODABLE, decoder_messages, read_image
from normbench.data.sampling import ShuffledEpochs
from normbench.errors import UserError
from normbench.paths import path_error


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random `pad`-pixel translation (zero fill) and horizontal flip of a (B,C,H,W) batch.

    The same as torchvision's RandomCrop(H, padding=pad) + RandomHorizontalFlip per image,
    done as one indexed gather: row/column indices per sample pick the crop, and reversed
    column indices do the flip.
    """
    b, _, h, w = x.shape
    dev = x.device
    shift = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(dev, non_blocking=True)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev, non_blocking=True)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    rows = shift[0, :, None] + torch.arange(h, device=dev)  # (B, H)
    cols = shift[1, :, None] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_idx = torch.arange(b, device=dev)[:, None, None]
    out = xp[batch_idx, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


class ImageDataset:
    """Train/val images as uint8 (N,C,H,W) tensors and int64 labels."""

    def __init__(self, train_x, train_y, val_x, val_y, num_classes: int, *,
                 augment: bool = True, crop_pad: int = 4, name: str = "images"):
        if train_x.dtype != torch.uint8 or val_x.dtype != torch.uint8:
            raise TypeError("ImageDataset holds uint8 images")
        self.name = name
        self.train_x, self.train_y = train_x, train_y.long()
        self.val_x, self.val_y = val_x, val_y.long()
        self.augment = augment
        self.crop_pad = crop_pad
        # Per-channel standardization from the training split only.
        flat = train_x.transpose(0, 1).reshape(train_x.shape[1], -1).double() / 255
        self.mean = flat.mean(dim=1).float()
        self.std = flat.std(dim=1).float().clamp(min=1e-3)
        self.info = DataInfo(kind="image", num_classes=num_classes,
                             in_channels=train_x.shape[1], image_size=train_x.shape[-1])

    @property
    def n_train(self) -> int:
        return self.train_x.shape[0]

    @property
    def n_val(self) -> int:
        return self.val_x.shape[0]

    def to(self, device) -> ImageDataset:
        for attr in ("train_x", "train_y", "val_x", "val_y", "mean", "std"):
            setattr(self, attr, getattr(self, attr).to(device))
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def train_loader(self, batch_size: int, seed: int) -> ImageTrainLoader:
        return ImageTrainLoader(self, batch_size, seed)

    def val_batches(self, batch_size: int, shuffle_seed: int | None = None):
        """Validation batches; in fixed order unless a shuffle seed is given."""
        n = self.n_val
        order = None
        if shuffle_seed is not None:
            g = torch.Generator().manual_seed(shuffle_seed)
            order = torch.randperm(n, generator=g).to(self.val_x.device)
        for start in range(0, n, batch_size):
            idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            yield Batch(self.normalize(self.val_x[idx]), self.val_y[idx])


class ImageTrainLoader(ShuffledEpochs):
    """Endless stream of shuffled, augmented training batches; resumable via state_dict."""

    def __init__(self, ds: ImageDataset, batch_size: int, seed: int):
        super().__init__(ds.n_train, batch_size, seed, f"training images of {ds.name}")
        self.ds = ds

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        idx, _ = self.next_indices()
        idx = idx.to(self.ds.train_x.device)
        x = self.ds.train_x[idx]
        if self.ds.augment:
            x = random_crop_flip(x, self.ds.crop_pad, self.generator)
        return Batch(self.ds.normalize(x).contiguous(), self.ds.train_y[idx])


# ----------------------------------------------------------------------------- subsets


def stratified_subset(labels: torch.Tensor, n: int | None, seed: int, key: str,
                      what: str) -> torch.Tensor:
    """Indices (ascending) of `n` samples spread over the classes as evenly as possible.

    Samples are visited in a permutation drawn from `seed`, and taken round by round: the
    first sample of every class, then the second of every class, and so on; so each class
    gets n // K or one more (a class with too few samples leaves its share to the others).
    `n` None keeps every sample. `key` and `what` name the option and the samples in errors.
    """
    total = labels.numel()
    if n is None or n == total:
        return torch.arange(total)
    if n > total:
        raise UserError(f"{key}={n} is more than the {total} {what}",
                        f"use {key}={total} or fewer (null: all of them)")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    by_class = torch.argsort(labels[perm], stable=True)  # positions in perm, class by class
    sorted_labels = labels[perm][by_class]
    class_start = torch.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = torch.empty(total, dtype=torch.long)
    rank[by_class] = torch.arange(total) - class_start  # rank of each sample within its class
    # Round first, then the order in the permutation: ties between classes drawn at random.
    order = torch.argsort(rank * total + torch.arange(total))
    return perm[order[:n]].sort().values


def resize_images(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N,C,H,W) uint8 images resized to image_size x image_size, antialiased."""
    from torchvision.transforms.v2.functional import resize

    if x.shape[-2:] == (image_size, image_size):
        return x
    return resize(x, [image_size, image_size], antialias=True)


# ----------------------------------------------------------------------------- CIFAR


def cifar_dataset(name: str, root: str = "data_cache", download: bool = True,
                  augment: bool = True, n_train: int | None = None, n_val: int | None = None,
                  image_size: int = 32, seed: int = 0) -> ImageDataset:
    """CIFAR-10/100 through torchvision, downloaded into `root` on first use.

    n_train / n_val keep a class-stratified subset of each split, drawn from the data seed;
    image_size other than 32 resizes every image (antialiased).
    """
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = str(Path(root).expanduser())
    try:
        train = cls(root, train=True, download=download)
        val = cls(root, train=False, download=download)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a missing file a RuntimeError
        if isinstance(e, OSError) and e.filename:  # the folder, not the network
            raise path_error(e, "dataset.root", root, "set dataset.root to a folder that can "
                             "hold the download") from None
        archive = Path(root) / cls.filename
        raise UserError(
            f"{name} is not in {root} and could not be downloaded ({type(e).__name__}: "
            f"{str(e)[:120]})",
            f"connect to the network, or put {cls.filename} from {cls.url} at {archive} "
            f"(or set dataset.root to where it is)") from None

    def tensors(ds, n, key, what, split_seed):
        y = torch.tensor(ds.targets, dtype=torch.long)
        keep = stratified_subset(y, n, split_seed, key, f"{what} images of {name}")
        data = ds.data if len(keep) == len(y) else ds.data[keep.numpy()]  # no copy of all 50k
        x = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()  # (N,32,32,3) -> NCHW
        return resize_images(x, image_size), y[keep]

    tx, ty = tensors(train, n_train, "dataset.n_train", "training", 2 * seed)
    vx, vy = tensors(val, n_val, "dataset.n_val", "validation", 2 * seed + 1)
    return ImageDataset(tx, ty, vx, vy, len(train.classes), augment=augment, name=name)


# ----------------------------------------------------------------------------- image folders


def imagefolder_dataset(root: str | None = None, image_size: int = 32, augment: bool = True,
                        n_train: int | None = None, n_val: int | None = None, seed: int = 0,
                        stream: bool | None = None, memory_budget_gb: float = 4.0,
                        workers: int | None = None, prefetch: int = 4):
    """Any folder with train/ and val/ split into class subfolders.

    n_train / n_val keep a class-stratified subset of each split (only those files are read).
    The images are read into memory, each resized to a square, when they fit in
    `memory_budget_gb` as uint8; otherwise, or with stream=true, they stream from disk
    (`normbench.data.streaming`, with `workers` decoding processes, null: one per core up to 8).
    """
    if not root:
        raise UserError("dataset=imagefolder needs a folder",
                        "add dataset.root=/path/with/train_and_val")
    base = check_image_folder(root)  # before a long listing of train/
    train, classes = list_split(base, "train", n_train, 2 * seed)
    val, _ = list_split(base, "val", n_val, 2 * seed + 1, classes)
    name = f"imagefolder:{base}"
    in_memory_gb = (len(train) + len(val)) * 3 * image_size**2 / 2**30
    if stream is None:
        stream = in_memory_gb > memory_budget_gb
    if stream:
        from normbench.data.streaming import FileList, StreamedImages

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return StreamedImages(FileList(train), FileList(val), len(classes), image_size=image_size,
                              augment=augment, name=name, seed=seed, prefetch=prefetch,
                              workers=min(8, cores or 1) if workers is None else workers)
    tx, ty = read_images(train, image_size)
    vx, vy = read_images(val, image_size)
    return ImageDataset(tx, ty, vx, vy, len(classes), augment=augment, name=name)


FOLDER_LAYOUT = "point dataset.root at a folder holding train/ and val/, each with one subfolder per class"


def list_split(base: Path, split: str, n: int | None, split_seed: int,
               train_classes: dict[str, int] | None = None):
    """The (path, label) samples kept from `base/split` and its class -> label map; the
    validation split (`train_classes` given) must have the training split's classes."""
    import torchvision

    folder = check_folder(base, split)
    try:
        listed = torchvision.datasets.ImageFolder(
            str(folder), loader=lambda p: p, is_valid_file=lambda p: p.lower().endswith(DECODABLE))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or no images
        if isinstance(e, OSError) and e.filename:
            raise path_error(e, "dataset.root", base, FOLDER_LAYOUT) from None
        raise UserError(f"{folder}: {e}", "put images in one subfolder per class") from None
    except OSError as e:  # a folder it may not list
        raise path_error(e, "dataset.root", base, FOLDER_LAYOUT) from None
    if train_classes is not None:  # a class folder without images is not a class to ImageFolder
        check_same_classes(base, set(train_classes), set(listed.class_to_idx))
    labels = torch.tensor(listed.targets)
    key = "dataset.n_train" if split == "train" else "dataset.n_val"
    keep = stratified_subset(labels, n, split_seed, key, f"images in {folder}")
    return [listed.samples[i] for i in keep.tolist()], listed.class_to_idx


def check_image_folder(root: str) -> Path:
    """The folder's layout, in the pre-flight: train/ and val/ exist, hold class subfolders,
    and the same ones (only folder names are listed, not files). Returns the folder."""
    from torchvision.datasets.folder import find_classes

    base = Path(root).expanduser()
    classes = {}
    for split in ("train", "val"):
        folder = check_folder(base, split)
        try:
            classes[split], _ = find_classes(str(folder))
        except FileNotFoundError as e:  # no class subfolder
            if e.filename:
                raise path_error(e, "dataset.root", base, FOLDER_LAYOUT) from None
            raise UserError(f"{folder} has no class subfolders",
                            "put the images in one subfolder per class") from None
        except OSError as e:  # a folder it may not list
            raise path_error(e, "dataset.root", base, FOLDER_LAYOUT) from None
    check_same_classes(base, set(classes["train"]), set(classes["val"]))
    return base


def check_same_classes(base: Path, train: set[str], val: set[str]) -> None:
    if train == val:
        return
    said = "; ".join(part for part in (
        val - train and f"only val/ has {_names(sorted(val - train))}",
        train - val and f"only train/ has {_names(sorted(train - val))}") if part)
    raise UserError(f"the classes of {base / 'val'} differ from those of {base / 'train'} ({said})",
                    "give val/ the same class subfolders as train/")


def check_folder(base: Path, split: str) -> Path:
    folder = base / split
    try:
        if not base.is_dir():  # name the folder the user gave, not its missing train/
            what = "is not a folder" if base.exists() else "does not exist"
            raise UserError(f"dataset.root={base} {what}", FOLDER_LAYOUT)
        is_folder = folder.is_dir()
    except OSError as e:
        raise path_error(e, "dataset.root", base, FOLDER_LAYOUT) from None
    if not is_folder:
        raise UserError(f"{folder} is not a folder", FOLDER_LAYOUT)
    return folder


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def read_images(samples: list[tuple[str, int]], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample decoded and resized to a square: (N,3,S,S) uint8 images and labels."""
    images = torch.empty(len(samples), 3, image_size, image_size, dtype=torch.uint8)
    with decoder_messages() as said:
        for i, (path, _) in enumerate(samples):
            images[i] = resize_images(read_image(path, said)[None], image_size)[0]
    return images, torch.tensor([label for _, label in samples], dtype=torch.long)
