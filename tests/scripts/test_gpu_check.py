"""scripts/gpu_check.py --dry-run: every step of the GPU check runs on the CPU at tiny sizes,
so that a typo in one of its commands or overrides costs a test here, not a GPU lease."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.common import REPO


def step_names() -> list[str]:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return [step.name for step in module.STEPS]


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_what_a_lease_returns(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "scripts/gpu_check.py", str(out), "--dry-run"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    figures = json.loads((out / "figures.json").read_text())
    summary = (out / "summary.md").read_text()
    assert figures["mode"].startswith("dry-run") and figures["all_ok"]
    for name in step_names():
        assert figures["steps"][name]["status"] == "ok", name
        assert f"| {name} | ok |" in summary, name
    assert {row["loop"] for row in figures["steps"]["bench_resnet"]["figures"]["rows"]} == \
        {"normbench", "normbench, probes=false", "bare"}
    # a device lease returns at most 8 files of at most 16 MiB, none more than 2 folders down
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"summary.md", "figures.json", "log.txt", "runs.tar.gz"}
    assert all(p.parent == out and p.stat().st_size < 16 * 2**20 for p in files)
