"""What tests share besides fixtures: the repository's paths, the tiny config as overrides,
the CLI run in a subprocess, and a run folder's scalars."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from normbench.config.compose import compose_config

__all__ = ["FIXTURES", "REPO", "TINY", "compose_config", "load_script", "read_scalars", "run_cli",
           "run_with_fault"]

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"  # small files the tests read (a real text, expected outputs)


def _overrides_of(path: Path, prefix: str = "") -> list[str]:
    """A flat `key=value` override for every leaf of a YAML file (comments dropped)."""
    from omegaconf import OmegaConf

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={'null' if value is None else value}"

    return list(walk(OmegaConf.to_container(OmegaConf.load(path)), prefix))


# debug=tiny with the default model and dataset (a run in a second or two), as single
# overrides, so that a test can leave out the keys that do not apply to it (e.g. image
# sizes on a text dataset).
TINY = [*_overrides_of(REPO / "conf" / "debug" / "tiny.yaml"),
        *_overrides_of(REPO / "conf" / "debug" / "dataset" / "tiny_shapes.yaml"),
        *_overrides_of(REPO / "conf" / "debug" / "model" / "tiny_resnet.yaml")]


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300):
    """Run `python -m normbench ARGS` in `cwd`; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("NORMBENCH_STAMP", None)
    return subprocess.run([sys.executable, "-m", "normbench", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a run folder's event files: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_with_fault(fault: str, step: int, *args: str, cwd: Path):
    """`normbench` with fault `fault` injected at `step` (tests/helpers/faults.py)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "NB_FAULT": fault, "NB_FAULT_STEP": str(step)}
    env.pop("NORMBENCH_STAMP", None)
    return subprocess.run([sys.executable, "-m", "tests.helpers.faults", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def load_script(name: str):
    """scripts/<name>.py imported as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
