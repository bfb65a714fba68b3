"""Shared fixtures: configs composed as the CLI composes them (normbench.config.compose), and
the CLI run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normbench.config.compose import compose_config

__all__ = ["REPO", "TINY", "compose_config", "read_scalars", "run_cli"]

REPO = Path(__file__).resolve().parents[1]


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
# overrides, so that a test can leave out the keys that do not apply to it (e.g. image sizes
# on a text dataset) or keep ResNet-8's depth on another model.
TINY = [*_overrides_of(REPO / "conf" / "debug" / "tiny.yaml"),
        *_overrides_of(REPO / "conf" / "debug" / "dataset" / "tiny_shapes.yaml"),
        *_overrides_of(REPO / "conf" / "debug" / "model" / "tiny_resnet.yaml")]

torch.set_num_threads(1)


@pytest.fixture
def tiny_config():
    def make(*overrides: str) -> dict:
        return compose_config([*TINY, *overrides])

    return make


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300):
    """Run `python -m normbench ARGS` in `cwd`; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                "HYDRA_FULL_ERROR": "0", **(env or {})}
    full_env.pop("NORMBENCH_STAMP", None)
    return subprocess.run([sys.executable, "-m", "normbench", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path):
    def call(*args: str, **kwargs):
        return run_cli(*args, cwd=kwargs.pop("cwd", tmp_path), **kwargs)

    return call


@pytest.fixture
def http_server():
    """Serve a local folder over HTTP on the loopback interface (for download code paths)."""
    import functools
    import http.server
    import threading

    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in a run folder's event files: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
