"""The scripts that make docs/results.md and the budget table: their commands stay valid
presets, and their Markdown reaches the report's plots."""

from __future__ import annotations

import pytest

from normbench.cli import preflight
from tests.helpers.common import load_script

results = load_script("results")


@pytest.mark.slow
@pytest.mark.parametrize("folder, overrides", [
    (folder, overrides) for study in results.STUDIES for sweep in study.sweeps
    for folder, overrides in [(sweep.folder, sweep.overrides), *sweep.extra]])
def test_every_results_sweep_passes_the_preflight(folder, overrides, tmp_path, monkeypatch):
    # tiny-shakespeare is only looked for when a job reads it: a placeholder file will do.
    (tmp_path / "data_cache").mkdir()
    (tmp_path / "data_cache" / "tinyshakespeare.txt").write_text("First Citizen:\nSpeak.\n" * 50)
    monkeypatch.chdir(tmp_path)
    sweep_dir, _ = preflight([*overrides, f"hydra.sweep.dir={tmp_path / folder}"], True)
    assert sweep_dir == tmp_path / folder


def test_every_report_reads_sweeps_of_its_study():
    for study in results.STUDIES:
        folders = {sweep.folder for sweep in study.sweeps}
        for report in study.reports:
            assert set(report.sweeps) <= folders, (study.key, report.sweeps)


def test_embedded_report_headings_move_down_and_images_into_docs(tmp_path):
    md = tmp_path / "report.md"
    md.write_text("# normbench report: val_err vs lr\n\ntext\n\n## Plots\n\n![curves](curves.png)\n"
                  "![bn_gap](bn_gap.png)\n")
    (tmp_path / "curves.png").write_bytes(b"")  # bn_gap.png was left out: so is its line
    assert results.embed(md, "results/lr") == ["", "text", "", "#### Plots", "",
                                               "![curves](results/lr/curves.png)"]
    assert results.anchor("Batch size, and BatchNorm's train/eval gap") == \
        "batch-size-and-batchnorms-traineval-gap"
