"""Image files to tensors: torchvision's decoders, and a bad file said in one line."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

import torch

from normbench.errors import UserError


@contextlib.contextmanager
def decoder_messages():
    """While images decode, the process's stderr (file descriptor 2) goes to a temporary
    file: libpng prints its errors there itself, outside Python, before torchvision raises,
    and a bad file must cost one line. Yields a function returning what was written so far;
    it is passed on to stderr afterwards (libpng's warnings), unless an error ended the block.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to keep clean
        yield lambda: ""
        return
    sink = tempfile.TemporaryFile()
    os.dup2(sink.fileno(), 2)
    ok = False

    def written() -> str:
        return os.pread(sink.fileno(), os.fstat(sink.fileno()).st_size, 0).decode(errors="replace")

    try:
        yield written
        ok = True
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if ok and (text := written()):
            sys.stderr.write(text)
        sink.close()


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    """8 bits per channel: a 16-bit PNG decodes as uint16, and is scaled down, not wrapped."""
    if image.dtype == torch.uint8:
        return image
    from torchvision.transforms.v2.functional import to_dtype

    return to_dtype(image, torch.uint8, scale=True)


# The files torchvision.io decodes; ImageFolder's default list also has BMP, PPM, PGM and TIFF,
# which it cannot read. Other files in the class folders are not images to normbench.
DECODABLE = (".jpg", ".jpeg", ".png", ".webp")


def read_image(path: str, said=lambda: "") -> torch.Tensor:
    """One image file as a (3,H,W) uint8 tensor; a file that does not decode is a UserError
    naming it. `said`: what the decoders printed (see `decoder_messages`)."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return as_uint8(decode_image(path, mode=ImageReadMode.RGB))
    except RuntimeError as e:
        raise UserError(f"cannot read the image {path}: {decode_problem(e, said())}",
                        "replace or delete the file (every file with an image extension below "
                        "train/ and val/ is read)") from None


def decode_problem(error: RuntimeError, printed: str) -> str:
    """Why a file did not decode, in words: libpng's own message when it printed one, else
    torchvision's without its source location ('decode_png, .../decode_png.cpp:62, ...')."""
    said = [line.split("error:", 1)[1].strip() for line in printed.splitlines()
            if line.startswith("libpng error:")]
    if said:
        return f"not a valid PNG file (libpng: {said[-1]})"
    text = " ".join(str(error).split())
    text = re.sub(r"^[^,]+, \S+:\d+, ", "", text).rstrip(".")
    text = re.sub(r"^\[Errno \d+\] ([^:]+).*", r"\1", text)  # an OSError's strerror
    return {"Expected a non empty file": "the file is empty"}.get(text, text)
