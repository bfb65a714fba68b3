"""Image folders streamed from disk: decoded and augmented in DataLoader worker processes.

For folders larger than memory (ImageNet: ~190 GB as uint8 at 224 px). Nothing is held but
the file list (as NumPy arrays: worker processes that touch a list of Python strings copy
its pages one by one, and the memory of a long run grows with every epoch).

- Training: ImageNet's augmentation, torchvision `transforms.v2` on uint8 tensors:
  RandomResizedCrop(image_size) and a horizontal flip.
- Validation: the shorter side resized to image_size * 8/7, then the center crop.
- Each sample is decoded by `torchvision.io.decode_image` in a worker. The uint8 batch
  crosses to the device (pinned memory on CUDA) and is normalized there.

The batches have the in-memory path's semantics: shuffled epochs, `batch_size` samples per
step with the incomplete last global batch dropped, per-channel standardization from the
training split (estimated here from `STATS_IMAGES` of its images), validation in fixed
order. Only the augmentation differs (the in-memory path resizes every image to a square
once and then pads, crops and flips, CIFAR's convention).

Determinism. The epoch's permutation and one seed per position are drawn from (seed,
epoch); a sample's augmentation is drawn from its position's seed in whichever worker
decodes it. So the batches depend on the step alone, never on the number of workers or
their timing, and a checkpoint's (epoch, step) resumes the stream exactly.

Several processes (torchrun, SLURM): every rank draws the same permutation and reads only
its slice of each global batch (`DistributedSampler`'s semantics: disjoint, together the
epoch). Each sample is augmented as the same position would be with one process, so the
ranks together see exactly the batches one process would see at the global batch size.
Validation is read in strides (rank r: samples r, r + world, ...).

Unreadable files. A file that does not decode is skipped, never the end of a run: its batch
is one sample smaller, one warning line names the file (once per file and process), and
summary.json counts the training draws lost (`skipped_draws`) and lists the files
(`unreadable_images`, with why).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image

from normbench.data import Batch, DataInfo
from normbench.data.decoding import as_uint8, decode_problem
from normbench.errors import UserError

STATS_IMAGES = 256  # training images the per-channel mean and std are estimated from
VAL_RESIZE = 8 / 7  # validation: shorter side to image_size * 8/7 (256 for 224), then crop


@dataclass(frozen=True)
class Unreadable:
    """A sample whose file did not decode, in place of (image, label)."""

    path: str
    problem: str


class FileList:
    """(path, label) pairs held as NumPy arrays (no Python object per file)."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.paths = np.array([os.fsencode(p) for p, _ in samples], dtype=np.bytes_)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        return os.fsdecode(self.paths[index])


class DecodedFiles(Dataset):
    """Sample (index, seed) of a file list: the decoded, transformed uint8 image and its
    label, or `Unreadable`. The transform draws from `seed` alone."""

    def __init__(self, files: FileList, transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        path = self.files.path(index)
        try:
            image = as_uint8(decode_image(path, mode=ImageReadMode.RGB))
        except RuntimeError as e:  # a truncated, corrupt or unreadable file
            return Unreadable(path, decode_problem(e, ""))
        label = int(self.files.labels[index])
        if torch.utils.data.get_worker_info() is not None:  # a worker's RNG is its own
            torch.default_generator.manual_seed(seed)  # what transforms.v2 draws from
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):  # in the main process: restored after
            torch.default_generator.manual_seed(seed)
            return self.transform(image), label


def collate(items: list) -> tuple[torch.Tensor | None, torch.Tensor, list[Unreadable]]:
    """Stack the decoded samples; the unreadable ones come apart (x None if all were)."""
    good = [item for item in items if not isinstance(item, Unreadable)]
    x = torch.stack([image for image, _ in good]) if good else None
    y = torch.tensor([label for _, label in good], dtype=torch.long)
    return x, y, [item for item in items if isinstance(item, Unreadable)]


def quiet_worker(_worker_id: int) -> None:
    """libpng prints its own errors on file descriptor 2 before the decoder raises; in a
    worker they would interleave with the run's output, and the skipped file is reported
    by path anyway. Python's errors in a worker reach the main process as exceptions."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def transforms(image_size: int, augment: bool):
    """(training, validation) transforms on uint8 (3,H,W) tensors."""
    from torchvision.transforms import v2

    val = v2.Compose([v2.Resize(round(image_size * VAL_RESIZE), antialias=True),
                      v2.CenterCrop(image_size)])
    if not augment:
        return val, val
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True),
                       v2.RandomHorizontalFlip()]), val


def position_seeds(seed: int, epoch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Epoch `epoch`'s permutation of n samples and a seed for each position in it."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)
    g = torch.Generator().manual_seed(int(state[0]) >> 1)
    perm = torch.randperm(n, generator=g)
    seeds = torch.randint(0, 2**62, (n,), generator=g.manual_seed(int(state[1]) >> 1))
    return perm, seeds


class ShardedEpochs(torch.utils.data.Sampler):
    """Batches of (index, seed) keys for one rank: the steps from `start` to the end of
    `epoch` (both set before each pass). Step s's global batch is positions
    [s*B, (s+1)*B) of the epoch's permutation (B = batch_size x world); rank r reads its
    [r*b, (r+1)*b)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.b, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = self.start = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // (self.b * self.world)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self):
        perm, seeds = position_seeds(self.seed, self.epoch, self.n)
        for step in range(self.start, self.steps_per_epoch):
            lo = (step * self.world + self.rank) * self.b
            yield list(zip(perm[lo:lo + self.b].tolist(), seeds[lo:lo + self.b].tolist(), strict=True))


class Batches:
    """A batch sampler whose batches are set before each pass (validation: one loader, and
    its workers, for every evaluation, whatever its batch size and order)."""

    def __init__(self):
        self.batches: list[list] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class StreamedImages:
    """An image folder read from disk as it trains; the interface of `ImageDataset`."""

    def __init__(self, train: FileList, val: FileList, num_classes: int, *, image_size: int,
                 augment: bool, name: str, seed: int, workers: int, prefetch: int):
        self.name, self.image_size = name, image_size
        self.train_files, self.val_files = train, val
        self.workers, self.prefetch = workers, prefetch
        self.train_transform, self.val_transform = transforms(image_size, augment)
        self.device = torch.device("cpu")
        self.val_plan, self.val_loader = Batches(), None
        self.unreadable: dict[str, str] = {}  # path -> why, every file met so far
        self.info = DataInfo(kind="image", num_classes=num_classes, in_channels=3,
                             image_size=image_size)
        self.mean, self.std = self.channel_stats(seed)

    shards_itself = True  # reads only this rank's samples: see `train_loader`

    @property
    def n_train(self) -> int:
        return len(self.train_files)

    @property
    def n_val(self) -> int:
        return len(self.val_files)

    def to(self, device) -> StreamedImages:
        self.device = torch.device(device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    def loader(self, files: FileList, transform, batches) -> DataLoader:
        workers = self.workers
        # generator=: the loader's own seed draw (unused: every sample is seeded by its
        # position) must not move the global RNG, which a resumed run restores exactly.
        return DataLoader(DecodedFiles(files, transform), batch_sampler=batches,
                          num_workers=workers, collate_fn=collate, generator=torch.Generator(),
                          pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0,
                          prefetch_factor=self.prefetch if workers else None,
                          worker_init_fn=quiet_worker if workers else None)

    def channel_stats(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of up to `STATS_IMAGES` training images (drawn from the
        data seed, at the validation crop), over every pixel, in float64."""
        n = min(STATS_IMAGES, self.n_train)
        pick = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(seed))[:n]
        keys = [(int(i), 0) for i in pick]
        batches = [keys[i:i + 32] for i in range(0, n, 32)]
        total = torch.zeros(3, dtype=torch.float64)
        squares = torch.zeros(3, dtype=torch.float64)
        count = 0
        for x, _, bad in self.loader(self.train_files, self.val_transform, batches):
            self.met(bad)
            if x is None:
                continue
            pixels = x.transpose(0, 1).reshape(3, -1).double() / 255
            total += pixels.sum(1)
            squares += pixels.square().sum(1)
            count += pixels.shape[1]
        if count < 2:
            raise UserError(f"none of the training images of {self.name} could be read",
                            "check the files below train/ (see the warnings above)")
        mean = total / count
        var = (squares - count * mean.square()) / (count - 1)
        return mean.float(), var.clamp(min=0).sqrt().float().clamp(min=1e-3)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def met(self, unreadable: list[Unreadable]) -> None:
        """Record unreadable files; one warning line for each new one."""
        for item in unreadable:
            if item.path not in self.unreadable:
                self.unreadable[item.path] = item.problem
                rank = os.environ.get("RANK")
                where = f" (rank {rank})" if rank not in (None, "0") else ""
                print(f"normbench: warning: skipped the unreadable image {item.path}"
                      f"{where}: {item.problem}; summary.json counts the samples skipped",
                      file=sys.stderr, flush=True)

    def facts(self) -> dict:
        """What summary.json records about the files read (the training stream adds the
        samples it lost, `StreamTrainLoader.skipped_draws`)."""
        return {"unreadable_images": dict(sorted(self.unreadable.items()))}

    def train_loader(self, batch_size: int, seed: int, rank: int = 0,
                     world: int = 1) -> StreamTrainLoader:
        return StreamTrainLoader(self, batch_size, seed, rank, world)

    def val_batches(self, batch_size: int, shuffle_seed: int | None = None, rank: int = 0,
                    world: int = 1):
        """Validation batches, in file order unless a shuffle seed is given; with several
        processes, rank `rank`'s stride of them."""
        order = torch.arange(self.n_val)
        if shuffle_seed is not None:
            order = torch.randperm(self.n_val, generator=torch.Generator().manual_seed(shuffle_seed))
        keys = [(i, 0) for i in order[rank::world].tolist()]  # no draw: the seed is unused
        self.val_plan.batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
        if self.val_loader is None:
            self.val_loader = self.loader(self.val_files, self.val_transform, self.val_plan)
        for x, y, bad in self.val_loader:
            self.met(bad)
            if x is not None:
                yield Batch(self.normalize(x), y.to(self.device, non_blocking=True))


class StreamTrainLoader:
    """Endless training batches of one rank; `state_dict` is the (epoch, step) reached."""

    def __init__(self, ds: StreamedImages, batch_size: int, seed: int, rank: int, world: int):
        self.ds = ds
        self.batches = ShardedEpochs(ds.n_train, batch_size, seed, rank, world)
        if self.batches.steps_per_epoch == 0:
            ranks = f" x {world} processes" if world > 1 else ""
            raise UserError(f"batch_size={batch_size}{ranks} is larger than the {ds.n_train} "
                            f"training images of {ds.name}", "use a smaller batch_size")
        self.loader = ds.loader(ds.train_files, ds.train_transform, self.batches)
        self.world = world
        self.epoch = self.step = 0
        self.skipped_draws = 0  # samples of this stream lost to unreadable files
        self.iterator = None
        self.last: Batch | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        while True:
            if self.step == self.steps_per_epoch:
                self.epoch, self.step, self.iterator = self.epoch + 1, 0, None
            if self.iterator is None:  # the sampler is read when the pass starts
                self.batches.epoch, self.batches.start = self.epoch, self.step
                self.iterator = iter(self.loader)
            x, y, bad = next(self.iterator)
            self.step += 1
            self.ds.met(bad)
            self.skipped_draws += len(bad)
            if x is not None:
                self.last = Batch(self.ds.normalize(x), y.to(self.ds.device, non_blocking=True))
                return self.last
            # Every sample of this rank's slice was unreadable. One process takes the next
            # batch; with several, every rank must take one batch per step, so this rank
            # repeats its previous one (the run's first batch has none: it takes the next).
            if self.world > 1 and self.last is not None:
                return self.last

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "skipped_draws": self.skipped_draws,
                **self.ds.facts()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.iterator = state["epoch"], state["step"], None
        self.skipped_draws = state["skipped_draws"]
        self.ds.unreadable.update(state["unreadable_images"])
