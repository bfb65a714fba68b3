"""The test tree mirrors the package: every subpackage normbench/<name>/ has a test package
tests/<name>/ with at least one test file."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def subpackages() -> list[str]:
    return sorted(p.parent.name for p in (REPO / "normbench").glob("*/__init__.py"))


def test_the_package_has_subpackages_to_mirror():
    assert {"config", "data", "engine", "models", "norms", "probes", "report"} <= set(subpackages())


def test_every_subpackage_has_a_test_folder_with_a_test_file():
    missing = [name for name in subpackages()
               if not (REPO / "tests" / name / "__init__.py").is_file()
               or not list((REPO / "tests" / name).glob("test_*.py"))]
    assert not missing, f"no tests/<name>/ (a package with a test_*.py file) for: {missing}"
