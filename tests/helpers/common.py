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
# sizes on a text dataset). With SGD at its default lr 0.1, which the tests of training,
# resuming and several processes were written for (the plain run's optimizer is AdamW).
TINY = ["optim=sgd", *_overrides_of(REPO / "conf" / "debug" / "tiny.yaml"),
        *_overrides_of(REPO / "conf" / "debug" / "dataset" / "tiny_shapes.yaml"),
        *_overrides_of(REPO / "conf" / "debug" / "model" / "tiny_resnet.yaml")]


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300,
            fresh: bool = False):
    """`normbench ARGS` run in `cwd` as its own process; returns a CompletedProcess.

    The process is a fork of this one, which has torch, Hydra and normbench imported already
    (a new interpreter spends seconds importing them: most of a refused command's time). The
    child has its own state, exit status and output, as `python -m normbench` would;
    `fresh=True` starts a new interpreter instead (what a test of the import itself needs)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("NORMBENCH_STAMP", None)
    if fresh:
        return subprocess.run([sys.executable, "-m", "normbench", *args], cwd=cwd,
                              env=full_env, capture_output=True, text=True, timeout=timeout)
    return _forked(["normbench", *args], cwd, full_env, timeout)


def _forked(argv: list[str], cwd: Path, env: dict, timeout: float):
    """Run normbench's main(argv[1:]) in a forked child: its stdout and stderr go to files,
    its exit status is main's (or the signal that ended it)."""
    import signal
    import tempfile
    import time

    outputs = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            for fd, file in zip((1, 2), outputs, strict=True):
                os.dup2(file.fileno(), fd)
            sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            import torch

            torch.set_num_threads(1)  # OMP_NUM_THREADS=1, as the environment says
            sys.argv = argv
            from hydra.core.global_hydra import GlobalHydra

            GlobalHydra.instance().clear()  # an in-process compose of the parent's may hold it
            from normbench.cli import main

            code = main(argv[1:])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - what an uncaught error prints, then status 1
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(argv, timeout)
        time.sleep(0.02)
    texts = []
    for file in outputs:
        file.seek(0)
        texts.append(file.read().decode(errors="replace"))
        file.close()
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), *texts)


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
