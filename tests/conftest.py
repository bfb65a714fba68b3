"""Shared fixtures: configs composed as the CLI composes them (normbench.config.compose), and
the CLI run in a subprocess. The functions behind them live in tests/helpers/common.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.common import TINY, compose_config, run_cli

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def trainings_are_marked_slow(request, monkeypatch):
    """Keep `pytest -m "not slow"` a quick loop: a test that trains in-process without the
    `slow` mark fails here, naming the fix (CLI runs are subprocesses: mark those by hand)."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import normbench.engine.train as train

    def refuse(*args, **kwargs):
        raise AssertionError("this test trains a model: mark it @pytest.mark.slow")

    monkeypatch.setattr(train, "build", refuse)


@pytest.fixture
def tiny_config():
    def make(*overrides: str) -> dict:
        return compose_config([*TINY, *overrides])

    return make


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
