"""The streamed image folder against the loop people write by hand, and its memory over time.

    python scripts/bench_stream.py                  # 3000 generated JPEGs (64-300 px) at 64 px
    python scripts/bench_stream.py --folder DIR --image-size 224 --workers 8 --device cuda
    python scripts/bench_stream.py --parts loader,memory --rounds 5

Parts (--parts), each alternating its loops round by round so that drifting machine load
hits them alike; every rate is the median over rounds:

- `decode`: one process, no workers: images/s of a sample's decode + training augmentation,
  normbench's (torchvision.io.decode_image, transforms.v2 RandomResizedCrop + flip on
  uint8) against the peer's (ImageFolder's PIL loader, then v2 ToImage, RandomResizedCrop,
  flip, ToDtype, Normalize: the usual ImageNet script).
- `loader`: the training batches alone with --workers worker processes: normbench's streamed
  loader (normalized on the device) against the peer's DataLoader(ImageFolder) with the
  same workers, batch size, transforms, persistent workers and prefetch.
- `step`: a whole training step (torchvision ResNet-18, SGD) fed by each: the streamed
  loader, the peer, and normbench's in-memory path on the same folder (which fits: every
  image resized once to a square, then pad-crop-flip).
- `memory`: peak proportional set size (PSS: pages shared by the workers counted once) of the
  process and its workers while the streamed loader runs 1x and 5x `--epochs` epochs of a
  folder streamed because it exceeds the in-memory budget (dataset.memory_budget_gb set
  below its size), in fresh processes. The target is < 1.2x.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peer_transform(image_size: int, mean, std):
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(image_size, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std)])


def streamed(folder: Path, args, **options):
    from normbench.data.images import imagefolder_dataset

    return imagefolder_dataset(str(folder), image_size=args.image_size, workers=args.workers,
                               prefetch=args.prefetch, **{"stream": True, **options}).to(args.device)


def peer_batches(folder: Path, args, ds):
    """torchvision's ImageFolder + DataLoader, endlessly (a new shuffle each epoch)."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    data = ImageFolder(str(folder / "train"), transform=peer_transform(
        args.image_size, ds.mean.tolist(), ds.std.tolist()))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        prefetch_factor=args.prefetch if args.workers else None,
                        pin_memory=args.device == "cuda")
    while True:
        for x, y in loader:
            yield x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)


def as_pairs(loader):
    for batch in loader:
        yield batch.x, batch.y


def rate(batches, steps: int, warmup: int, batch_size: int, step=None) -> float:
    """Images/s over `steps` batches after `warmup` untimed ones (`step(x, y)` on each)."""
    for x, y in itertools.islice(batches, warmup):
        if step:
            step(x, y)
    start = time.perf_counter()
    for x, y in itertools.islice(batches, steps):
        if step:
            step(x, y)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def decode_rates(folder: Path, args, ds) -> dict[str, float]:
    from PIL import Image

    from normbench.data.streaming import DecodedFiles

    files = ds.train_files
    n = min(args.decode_images, len(files))
    ours = DecodedFiles(files, ds.train_transform)
    theirs = peer_transform(args.image_size, ds.mean.tolist(), ds.std.tolist())

    def normbench_pass():
        for i in range(n):
            ours[(i, i)]

    def peer_pass():
        for i in range(n):
            with open(files.path(i), "rb") as f:
                theirs(Image.open(f).convert("RGB"))

    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's: DataLoader workers run one torch thread each
    for name, run in (("normbench", normbench_pass), ("peer", peer_pass)):
        start = time.perf_counter()
        run()
        out[name] = n / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return out


def training_step(args, num_classes: int):
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(folder: Path, args) -> None:
    from normbench.data.images import imagefolder_dataset

    ds = streamed(folder, args)
    b, parts = args.batch_size, args.parts.split(",")
    rows: dict[str, list[float]] = {}
    in_memory = None
    if "step" in parts:
        in_memory = imagefolder_dataset(str(folder), image_size=args.image_size,
                                        stream=False).to(args.device)
    for _ in range(args.rounds):
        if "decode" in parts:
            for name, value in decode_rates(folder, args, ds).items():
                rows.setdefault(f"decode + augment, 1 process: {name}", []).append(value)
        if "loader" in parts:
            loops = {"normbench (streamed)": as_pairs(ds.train_loader(b, seed=0)),
                     "peer (ImageFolder + DataLoader)": peer_batches(folder, args, ds)}
            for name, batches in loops.items():
                rows.setdefault(f"loader, {args.workers} workers: {name}", []).append(
                    rate(batches, args.steps, args.warmup, b))
        if "step" in parts:
            loops = {"normbench (streamed)": as_pairs(ds.train_loader(b, seed=1)),
                     "peer (ImageFolder + DataLoader)": peer_batches(folder, args, ds),
                     "normbench (in memory)": as_pairs(in_memory.train_loader(b, seed=1))}
            for name, batches in loops.items():
                step = training_step(args, ds.info.num_classes)
                rows.setdefault(f"training step, ResNet-18: {name}", []).append(
                    rate(batches, args.steps, args.warmup, b, step))
    print(f"{ds.n_train} training images, {args.image_size} px, batch {b}, {args.device}, "
          f"{torch.get_num_threads()} torch threads, median of {args.rounds} rounds")
    for name, values in rows.items():
        print(f"  {name:62s} {statistics.median(values):9.1f} images/s")
    for part in ("loader", "training step, ResNet-18"):
        ours = [v for k, v in rows.items() if k.startswith(part) and "streamed" in k]
        peer = [v for k, v in rows.items() if k.startswith(part) and "peer" in k]
        if ours and peer:
            print(f"  {part}: streamed / peer = "
                  f"{statistics.median(ours[0]) / statistics.median(peer[0]):.2f}x")


# ----------------------------------------------------------------------------- memory


def pss_mib(pid: int) -> float:
    """Proportional set size of `pid` and its descendants, MiB."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def memory_child(folder: str, image_size: int, workers: int, batch_size: int, steps: int) -> None:
    """In a fresh process: peak PSS while the streamed loader serves `steps` batches."""
    import os

    from normbench.data.images import imagefolder_dataset

    peak, done = [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], pss_mib(os.getpid()))
            time.sleep(0.2)

    ds = imagefolder_dataset(folder, image_size=image_size, workers=workers,
                             memory_budget_gb=1e-6)  # streamed: over the budget
    threading.Thread(target=watch, daemon=True).start()
    for _ in itertools.islice(ds.train_loader(batch_size, seed=0), steps):
        pass
    done.set()
    print(f"peak_pss_mib {peak[0]:.1f}")


def memory(folder: Path, args) -> None:
    from normbench.data.images import imagefolder_dataset

    ds = imagefolder_dataset(str(folder), image_size=args.image_size, workers=0, stream=True)
    per_epoch = ds.n_train // args.batch_size
    peaks = {}
    for factor in (1, 5):
        steps = factor * args.epochs * per_epoch
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from scripts.bench_stream import "
                "memory_child as m; m(sys.argv[2], *map(int, sys.argv[3:]))")
        out = subprocess.run([sys.executable, "-c", code, str(REPO), str(folder),
                              str(args.image_size), str(args.workers), str(args.batch_size),
                              str(steps)], capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("peak_pss_mib")]
        if not line:
            sys.exit(out.stderr[-2000:])
        peaks[factor] = float(line[0].split()[1])
        print(f"memory: {steps} steps ({factor * args.epochs} epochs): peak PSS {peaks[factor]:.0f} MiB "
              f"(process + {args.workers} workers)")
    print(f"memory: 5x / 1x = {peaks[5] / peaks[1]:.3f} (target < 1.2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=None,
                        help="an image folder (train/, val/); default: generate one")
    parser.add_argument("--images", type=int, default=3000, help="generated training images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed batches per loop and round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-images", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=1, help="memory: the shorter run's epochs")
    parser.add_argument("--parts", default="decode,loader,step,memory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            from normbench.data.synthetic import write_shapes_folder

            folder = Path(tmp) / "shapes"
            write_shapes_folder(folder, n_train=args.images, n_val=args.images // 5)
            print(f"generated {args.images} + {args.images // 5} JPEGs (64-300 px) in {folder}")
        parts = args.parts.split(",")
        if set(parts) - {"memory"}:
            measure(folder, args)
        if "memory" in parts:
            memory(folder, args)


if __name__ == "__main__":
    main()
