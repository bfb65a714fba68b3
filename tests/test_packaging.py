"""pyproject.toml against the code: every third-party package normbench imports is declared,
and torch's lower bound is a version that has the APIs the code calls."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; 3.10 has no TOML reader built in

REPO = Path(__file__).resolve().parents[1]
# Import names that differ from the distribution that provides them.
DISTRIBUTION = {"hydra": "hydra-core", "PIL": "pillow", "yaml": "pyyaml"}
# APIs newer than torch's oldest releases: the version that added each.
TORCH_API_SINCE = {"nn.RMSNorm": (2, 4), "get_total_norm": (2, 6)}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements(extra: str | None = None) -> dict[str, str]:
    """Distribution name (lower case) -> its version specifier, from [project] dependencies
    (or from one extra of [project.optional-dependencies])."""
    out = {}
    lines = project()["optional-dependencies"][extra] if extra else project()["dependencies"]
    for line in lines:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line).groups()
        out[name.lower().replace("_", "-")] = spec
    return out


def imported_top_level_names() -> dict[str, Path]:
    """Every top-level module name normbench imports, at any level, with one file doing it."""
    found = {}
    for path in sorted((REPO / "normbench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path)
    return found


# Optional packages: imported only where a feature needs them, with a one-line install hint
# where they are missing; each is an extra of its own.
OPTIONAL = {"timm": "timm"}


def test_every_third_party_import_is_a_declared_dependency():
    declared = requirements()
    missing = []
    for name, path in imported_top_level_names().items():
        if name in sys.stdlib_module_names or name == "normbench":
            continue
        if name in OPTIONAL:
            assert name in requirements(OPTIONAL[name]), f"{name}: no [{OPTIONAL[name]}] extra"
            assert name in requirements("dev"), f"{name}: CI (the dev extra) must install it"
            continue
        dist = DISTRIBUTION.get(name, name).lower()
        if dist not in declared:
            missing.append(f"{name} ({dist}, imported by {path.relative_to(REPO)})")
    assert not missing, f"imported but not in [project] dependencies: {', '.join(missing)}"


def lower_bound(spec: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert match, f"no lower bound in {spec!r}"
    return tuple(int(p) for p in match.group(1).split(".") if p)


def test_torch_lower_bound_has_every_api_the_code_calls():
    source = "\n".join(p.read_text() for p in (REPO / "normbench").rglob("*.py"))
    declared = requirements()
    torch_floor = lower_bound(declared["torch"])
    for api, since in TORCH_API_SINCE.items():
        if api in source:
            assert torch_floor >= since, f"{api} needs torch>={'.'.join(map(str, since))}"
    # torchvision's release that goes with that torch (0.(minor + 15) since torch 2.0).
    assert lower_bound(declared["torchvision"]) >= (0, torch_floor[1] + 15)


def test_ci_builds_its_own_environment_lints_then_tests_and_leaves_dot_venv(tmp_path):
    """.ci/run with python3 replaced by a stub whose venv's pip, ruff and python log calls."""
    import os
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    (repo / ".venv").mkdir()
    (repo / ".venv" / "kept").write_text("the quick start's environment")
    log = tmp_path / "log"
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    tool = f'#!/bin/sh\necho "$(basename "$0") $*" >> {log}\n'
    python3 = stub_bin / "python3"  # `python3 -m venv DIR`: DIR/bin/{pip,ruff,python} stubs
    python3.write_text(
        "#!/bin/sh\n"
        f'echo "python3 $*" >> {log}\n'
        'mkdir -p "$3/bin"\n'
        f'for t in pip ruff python; do printf \'%s\' \'{tool}\' > "$3/bin/$t"; '
        'chmod +x "$3/bin/$t"; done\n')
    python3.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub_bin}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(repo / ".ci" / "run")], env=env, check=True, timeout=60)
    calls = log.read_text().splitlines()
    assert calls == ["python3 -m venv .ci/venv", "pip install -q -e .[dev]", "ruff check .",
                     "python -m pytest"]
    assert (repo / ".venv" / "kept").is_file()
    assert ".ci/venv/" in (REPO / ".gitignore").read_text().splitlines()


def test_no_deprecation_warning_is_hidden_everywhere():
    # A bare ignore would hide the project's own deprecated calls too: ignores name a module.
    filters = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
        "filterwarnings"]
    for entry in filters:
        action, _, category, module = (entry.split(":") + ["", "", ""])[:4]
        if action == "ignore" and "Deprecation" in category:
            assert module and not module.startswith("normbench"), entry
    assert "error::DeprecationWarning:normbench" in filters
