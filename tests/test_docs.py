"""The README stays a front page, every relative link in it and in docs/ leads somewhere, and
the sweep budgets are kept in one generated file, docs/budgets.md (no training here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.common import REPO

README = REPO / "README.md"
DOCS = sorted([README, *(REPO / "docs").rglob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
# A budget figure as the hand-kept tables wrote them: "~20 h", "~26 min", "7.5 min", "14 min".
BUDGET = re.compile(r"~?\b\d+(\.\d+)? ?(min|h)\b")
# Presets priced in docs/budgets.md: every preset that had a budget in its header.
BUDGETED_PRESETS = ("batch_size_sweep", "stats_batch_sweep", "stats_batch_references", "lr_sweep")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks, inline code removed."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, re.sub(r"`[^`]*`", "", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, markup and punctuation dropped (but '-' and
    '_'), spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for _, line in prose_lines_keep_code(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return found


def prose_lines_keep_code(path: Path) -> list[tuple[int, str]]:
    """Lines outside fenced blocks, inline code kept (headings may contain it)."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((number, line))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    return [(number, target) for number, line in prose_lines(path)
            for target in LINK.findall(line)]


def test_slugs_follow_githubs_rules():
    assert slug("Statistics off the beaten path: padding, ghost groups, constant inputs") == \
        "statistics-off-the-beaten-path-padding-ghost-groups-constant-inputs"
    assert slug("The statistics-gap study: `gap_setup=`") == "the-statistics-gap-study-gap_setup"
    assert slug("BatchNorm's statistics batch (GroupNorm paper, Fig. 1)") == \
        "batchnorms-statistics-batch-groupnorm-paper-fig-1"


def test_the_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move reference material to docs/"


def test_the_readme_links_every_page_of_the_docs():
    linked = {(README.parent / target.split("#")[0]).resolve()
              for _, target in links(README) if not re.match(r"[a-z]+:", target)}
    pages = {p.resolve() for p in (REPO / "docs").glob("*.md")}
    assert not pages - linked, f"docs pages the README does not link: {sorted(pages - linked)}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    broken = []
    for number, target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{path.name}:{number}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{path.name}:{number}: {target} (no heading makes #{anchor})")
    assert not broken, "\n".join(broken)


def header(path: Path) -> list[str]:
    """A YAML file's leading comment block."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


@pytest.mark.parametrize("path", sorted([*(REPO / "conf" / "setup").glob("*.yaml"),
                                         *(REPO / "conf" / "experiment").glob("*.yaml")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_yaml_header_keeps_budget_figures(path):
    figures = [line for line in header(path) if BUDGET.search(line)]
    assert not figures, f"budget figures belong in docs/budgets.md: {figures}"


def test_the_readme_keeps_no_budget_figures():
    figures = [f"{n}: {line}" for n, line in prose_lines(README) if BUDGET.search(line)]
    assert not figures, f"budget figures belong in docs/budgets.md: {figures}"


def table_rows(text: str, section: str) -> list[list[str]]:
    """The cells of the Markdown table under heading `section`."""
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in body.splitlines() if line.startswith("|")]


def test_budgets_are_generated_with_a_row_per_setup_and_a_column_per_preset():
    text = (REPO / "docs" / "budgets.md").read_text(encoding="utf-8")
    assert re.search(r"generated by scripts/budget\.py on \d{4}-\d\d-\d\d; do not edit",
                     text.splitlines()[0])
    rows = table_rows(text, "On CPU")
    # A setup no CPU runs (setup=imagenet) has its budget as an estimate for one 8-GPU node.
    node = table_rows(text, "On one 8-GPU node (estimates)")
    named = {name for row in rows[2:] + node[2:] for name in re.findall(r"`([^`]+)`", row[0])}
    setups = {p.stem for p in (REPO / "conf" / "setup").glob("*.yaml")}
    assert setups <= named, f"setups without a budget: {sorted(setups - named)}"
    for preset in BUDGETED_PRESETS:
        assert (REPO / "conf" / "experiment" / f"{preset}.yaml").exists()
        assert any(f"`{preset}`" in cell for cell in rows[0]), preset
        assert any(f"`{preset}`" in cell for cell in node[0]), preset
    assert all(cell not in ("", "–") for row in rows[2:] + node[2:] for cell in row[1:])
    checked = {re.sub(r"`", "", row[0]) for row in table_rows(text, "Against whole sweeps")[2:]}
    assert set(BUDGETED_PRESETS) <= checked
