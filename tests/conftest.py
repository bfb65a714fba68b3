"""Shared fixtures: compose configs the way the CLI does, and run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from normbench.cli import conf_dir, register_resolvers

REPO = Path(__file__).resolve().parents[1]
# Settings that make any run take a second or two on a laptop CPU.
TINY = ["dataset.n_train=256", "dataset.n_val=128", "batch_size=32", "steps=6",
        "eval_every=0", "log_every=2", "model.depth=8"]

torch.set_num_threads(1)


def compose_config(overrides: list[str] = ()) -> dict:
    """The resolved config dict a job would receive, composed from conf/ with overrides."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


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
