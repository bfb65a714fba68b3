"""Write the embedded shapes as an image folder of JPEGs of mixed sizes, to try or benchmark
the streamed image folder offline.

    python scripts/make_image_folder.py DIR                       # 3000 + 600 JPEGs, 64-300 px
    python scripts/make_image_folder.py DIR --images 20000 --min-size 128 --max-size 500
    normbench train dataset=imagefolder dataset.root=DIR dataset.stream=true dataset.image_size=64

DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg, ten classes in turn, each file its own
height and width between --min-size and --max-size; deterministic in --seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normbench.data.synthetic import write_shapes_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=3000, help="training images")
    parser.add_argument("--val-images", type=int, default=None, help="default: a fifth of --images")
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_val = args.images // 5 if args.val_images is None else args.val_images
    if args.folder.exists() and any(args.folder.iterdir()):
        sys.exit(f"make_image_folder: error: {args.folder} is not empty. Fix: give a new folder")
    with Progress() as progress:
        task = progress.add_task("writing JPEGs", total=args.images + n_val)
        write_shapes_folder(args.folder, args.images, n_val, args.min_size, args.max_size,
                            args.seed, progress=lambda k: progress.advance(task, k))
    print(f"{args.images} training and {n_val} validation images in {args.folder}")


if __name__ == "__main__":
    main()
