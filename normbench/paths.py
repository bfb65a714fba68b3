"""Paths the user gives (data files and folders, output folders): an OSError on one of them
becomes one line naming the path and the system's reason, not a traceback."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from normbench.errors import UserError

# What the user can do about an OS error on a path they gave, by errno.
_ADVICE = {
    errno.ENAMETOOLONG: "shorten it (most file systems allow 255 bytes per file or folder name)",
    errno.EACCES: "check the permissions of it and of the folders above it",
    errno.EPERM: "check the permissions of it and of the folders above it",
    errno.ENOTDIR: "a part of it that should be a folder is a file",
    errno.EISDIR: "it is a folder; give a file",
    errno.ELOOP: "a symbolic link in it points back on itself",
    errno.EROFS: "the file system is read-only; choose another place",
}


def path_error(error: OSError, what: str, path, fix: str) -> UserError:
    """An OSError on a path the user gave (`what`, e.g. 'dataset.root'), as one line that
    names the path and the system's reason, e.g. 'File name too long'."""
    reason = error.strerror or " ".join(str(error).split())
    # The call may have failed on a path below the one given (dataset.root's train/ folder).
    failing = str(error.filename) if error.filename else str(path)
    shown = failing if failing.startswith(str(path)) else f"{path} ({failing})"
    advice = _ADVICE.get(error.errno)
    return UserError(f"cannot use {what} {shown}: {reason}",
                     f"{advice}, or {fix}" if advice else fix)


def nearest_existing(folder: Path) -> Path:
    """The nearest existing ancestor of `folder` (or itself). OSError if looking fails, or
    if creating `folder` there would fail for the length of a name or of the whole path:
    the system reports ENAMETOOLONG only for a path whose parents exist (below a missing
    one it says ENOENT), i.e. only once mkdir has made them."""
    existing = Path(folder)
    while not existing.exists():
        existing = existing.parent

    def limit(name: str, default: int) -> int:
        try:
            return os.pathconf(existing, name)
        except (OSError, ValueError, AttributeError):  # not known here: the usual limits
            return default

    name_max = limit("PC_NAME_MAX", 255)
    parts = Path(folder).relative_to(existing).parts
    if any(len(os.fsencode(part)) > name_max for part in parts) or \
            len(os.fsencode(str(folder))) >= limit("PC_PATH_MAX", 4096):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(folder))
    return existing


def check_output_dir(folder: Path) -> None:
    """The output folder can be created and written: its nearest existing ancestor is a
    writable folder that takes a new folder (checked without leaving anything behind)."""
    folder = Path(folder).absolute()
    fix = "set hydra.run.dir (or hydra.sweep.dir with -m) to a writable place"
    try:
        existing = nearest_existing(folder)
    except OSError as e:  # a name too long, a folder it may not look into
        raise path_error(e, "the output folder", folder, fix) from None
    if not existing.is_dir():
        raise UserError(f"cannot create the output folder {folder}: {existing} is a file", fix)
    if not os.access(existing, os.W_OK | os.X_OK):  # EROFS included
        raise UserError(f"cannot write the output folder {folder}: {existing} is not writable", fix)
    if existing != folder:
        # Some filesystems refuse folders that the permissions allow (/proc, /sys, a full
        # disk): make the first missing one and remove it again, so that nothing remains.
        probe = existing / folder.relative_to(existing).parts[0]
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            raise path_error(e, "the output folder", folder, fix) from None
