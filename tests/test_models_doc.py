"""docs/models.md's example of a custom model is code that works: extracted from the page,
written to a file and built through `model=custom model.target=<file>:build`, as a user
would (no training here)."""

from __future__ import annotations

import re

import torch

from normbench.config.checks import placeholder_info
from normbench.models import build_model
from normbench.norms import make_spec
from tests.helpers.common import REPO, compose_config

PAGE = REPO / "docs" / "models.md"
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def example_code() -> str:
    """The page's Python block that defines `build`."""
    blocks = [b for b in CODE_BLOCK.findall(PAGE.read_text(encoding="utf-8"))
              if "def build(" in b]
    assert len(blocks) == 1, "docs/models.md should hold one Python example defining build()"
    return blocks[0]


def build(tmp_path, *overrides: str):
    path = tmp_path / "small_cnn.py"
    path.write_text(example_code(), encoding="utf-8")
    config = compose_config(["model=custom", f"model.target={path}:build", *overrides])
    return build_model(config["model"], make_spec(**config["norm"]),
                       placeholder_info(config["dataset"]))


def test_the_example_is_about_twenty_lines():
    assert len(example_code().strip().splitlines()) <= 20


def test_the_example_builds_with_a_normbench_norm_in_each_place(tmp_path):
    model = build(tmp_path, "norm=group", "+model.kwargs.width=32")
    norms = [type(m).__name__ for m in model.modules()
             if type(m).__name__ in ("ImageGroupNorm", "BatchNorm2d")]
    assert norms == ["ImageGroupNorm"] * 4
    assert [m.num_channels for m in model.modules() if type(m).__name__ == "ImageGroupNorm"] \
        == [32, 32, 64, 128]
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_the_example_builds_with_its_own_norm_under_native(tmp_path):
    model = build(tmp_path, "norm=native")
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4
