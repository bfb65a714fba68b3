"""Checkpoints of a training run: written atomically, the newest K kept, loaded safely.

A checkpoint is one `torch.save` file, `<run_dir>/checkpoints/step_<step>.pt`, holding
only tensors and plain Python values, so that it loads with `weights_only=True` (no
arbitrary code runs when a checkpoint is read). Random-number states that Python and
NumPy hand out as other types are converted to tensors here and back on restore.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from normbench.errors import UserError

CHECKPOINT_DIR = "checkpoints"
FORMAT = 2  # bumped when the layout of the saved dict changes (2: running means, probes)
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, newest (highest step) first; temporary files excluded."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` as the checkpoint of `step`, then delete all but the newest `keep`.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file
    is renamed into place: a reader (or a run killed mid-write) sees either the previous
    set of checkpoints or the new one, never a half-written file under a checkpoint's name.
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    for old in list_checkpoints(run_dir)[max(1, keep):]:
        old.unlink(missing_ok=True)
    for stale in folder.glob(".step_*.tmp"):  # left by a run killed while saving
        stale.unlink(missing_ok=True)
    return path


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, hence best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict:
    """Read one checkpoint onto the CPU, with weights_only=True; ValueError if it is not one."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise ValueError("not a normbench checkpoint of this version")
    return state


def load_newest(run_dir: Path, warn: Callable[[str], None]) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads, and its path; None if the run has none at all.

    An unreadable checkpoint (truncated, corrupt, another format) is reported through
    `warn` in one line and the one before it is tried. If every checkpoint is unreadable
    that is a UserError: resuming from scratch silently would lose the run.
    """
    paths = list_checkpoints(run_dir)
    if not paths:
        return None
    skipped = []  # said only once an older checkpoint loads: a refusal is one line
    for path in paths:
        try:
            state = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            skipped.append((path, reason[:157] + "..." if len(reason) > 160 else reason))
            continue
        for bad, reason in skipped:
            warn(f"checkpoint {bad} is unreadable ({reason}); trying {path.name}")
        return state, path
    newest, reason = skipped[0]
    raise UserError(f"none of the {len(paths)} checkpoint(s) in {checkpoint_dir(run_dir)} "
                    f"can be read (the newest, {newest.name}: {reason})",
                    "start the run afresh in another hydra.run.dir; this folder's results stay "
                    "as they are")


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA) generator states, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- the loop's state


def capture(parts: dict, **extra) -> dict:
    """Everything that decides the later steps: each part's state_dict (model, optimizer,
    scheduler, data loader, ...), the RNG states, and the loop's own values in `extra`."""
    return {**{name: part.state_dict() for name, part in parts.items()}, "rng": rng_state(),
            **extra}


def restore(state: dict, parts: dict, path: Path) -> None:
    """The inverse of `capture`; call it last, after anything that draws random numbers."""
    try:
        for name, part in parts.items():
            part.load_state_dict(state[name])
    except (RuntimeError, KeyError, ValueError) as e:
        reason = " ".join(str(e).split())[:160]
        raise UserError(f"the checkpoint {path} does not fit this configuration ({reason})",
                        "resume with the same overrides as the run it continues") from None
    set_rng_state(state["rng"])


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (resume= itself excluded)."""
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "resume" and not prefix:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def resume_point(run_dir: Path, resume, warn: Callable[[str], None]) -> tuple[dict, Path] | None:
    """The checkpoint to continue from (None: start afresh), following `resume`."""
    if check_resume(run_dir, resume) == "false":
        return None
    return load_newest(run_dir, warn)


def check_resume(run_dir: Path, resume) -> str:
    """Check `resume` (false | true | auto) against the run folder; return the mode.

    false: start afresh, which a folder holding another run's checkpoints refuses (its
    files would be mixed with this run's). true: continue, and it is an error if there is
    nothing to continue. auto: continue if there is something, else start afresh (for jobs
    a cluster may requeue). A requeued SLURM job treats false as auto.
    """
    mode = normalize_resume(resume)
    if mode == "false" and requeued():
        mode = "auto"
    found = bool(list_checkpoints(run_dir))
    if mode == "false" and found:
        raise UserError(f"{run_dir} already holds the checkpoints of a run",
                        "add resume=true to continue it, or choose another hydra.run.dir")
    if mode == "true" and not found:
        raise UserError(f"resume=true but {checkpoint_dir(run_dir)} holds no checkpoint",
                        "point hydra.run.dir at the folder of the run to continue, or drop "
                        "resume=true to start afresh")
    if not found and (status := _finished_status(run_dir)):
        # Its checkpoints are gone, its results are not: starting afresh would overwrite them.
        raise UserError(f"{run_dir} holds a {status} run (summary.json) and no checkpoint to "
                        "continue it from", "choose another hydra.run.dir (or hydra.sweep.dir)")
    return mode


def _finished_status(run_dir: Path) -> str | None:
    import json

    try:
        status = json.loads((Path(run_dir) / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    # A diverged run without checkpoints may start again (a sweep's resume=auto reruns it,
    # deterministically diverging again); an interrupted one always has its checkpoint.
    return status if status == "completed" else None


def requeued() -> bool:
    """A SLURM job started again after preemption or a time limit (submitit requeues with the
    same config, so resume= is what it was the first time)."""
    return os.environ.get("SLURM_RESTART_COUNT", "0").strip() not in ("", "0")


def normalize_resume(resume) -> str:
    """'false' | 'true' | 'auto' from the config value (YAML gives booleans for the first two)."""
    value = str(resume).lower() if resume is not None else "false"
    if value not in ("false", "true", "auto"):
        raise UserError(f"resume={resume} is not a resume mode", "use resume=false, true or auto")
    return value
