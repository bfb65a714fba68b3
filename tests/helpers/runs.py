"""Run folders made by hand for report tests: a summary.json, and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path


def fake_run(root: Path, name: str, status: str = "completed", val_acc: float | None = 0.5,
             **keys) -> Path:
    run = root / name
    run.mkdir(parents=True)
    summary = {"status": status, "dataset": "shapes", "model": "resnet", "norm": "batch",
               "batch_size": 32, "lr": 0.1, "seed": 0, "steps": 10, "final": {}, **keys}
    if val_acc is not None:
        summary["final"]["val_acc"] = val_acc
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def write_scalars(run: Path, tag: str, points: list[tuple[int, float]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run)) as writer:
        for step, value in points:
            writer.add_scalar(tag, value, step)
