"""`normbench report`: grouping, statistics, marks, outputs, and a joblib sweep end to end."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import matplotlib.image
import pytest

from normbench.errors import UserError
from normbench.report.command import report_command
from normbench.report.grid import build_report
from normbench.report.runs import find_runs
from tests.helpers.common import read_scalars
from tests.helpers.runs import fake_run, write_scalars


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cells_are_mean_and_sample_std_over_seeds_of_completed_runs(tmp_path):
    accs = {("batch", 2): [0.5, 0.6, 0.7], ("batch", 8): [0.8, 0.9], ("group", 2): [0.75]}
    for (norm, bs), values in accs.items():
        for seed, acc in enumerate(values):
            fake_run(tmp_path, f"{norm}{bs}s{seed}", norm=norm, batch_size=bs, seed=seed,
                     val_acc=acc)
    fake_run(tmp_path, "group8s0", "diverged", None, norm="group", batch_size=8, seed=0)
    fake_run(tmp_path, "group8s1", norm="group", batch_size=8, seed=1, val_acc=0.7)
    fake_run(tmp_path, "group8s2", "failed", None, norm="group", batch_size=8, seed=2)

    report = build_report(find_runs([tmp_path]))
    assert report.x == "batch_size" and report.metric == "val_err"
    assert report.rows == [("batch",), ("group",)] and report.columns == [2, 8]
    errs = [100 * (1 - a) for a in accs[("batch", 2)]]
    cell = report.cells[(("batch",), 2)]
    assert cell.mean == pytest.approx(statistics.fmean(errs))
    assert cell.std == pytest.approx(statistics.stdev(errs))  # ddof=1: 10.0 here
    assert cell.std == pytest.approx(10.0)
    assert report.cells[(("group",), 2)].std is None  # one seed: no spread
    mixed = report.cells[(("group",), 8)]
    assert mixed.values == pytest.approx([30.0]) and mixed.statuses == {"diverged": 1, "failed": 1}
    assert mixed.text() == "30.00 (1), 1 diverged, 1 failed"
    assert report.best_lr == {}  # lr not swept


def test_all_diverged_cell_and_best_lr_when_lr_is_swept(tmp_path):
    for norm, lr, acc in [("batch", 0.1, 0.6), ("batch", 0.4, 0.8), ("batch", 1.6, None),
                          ("none", 0.1, 0.7), ("none", 0.4, 0.5), ("none", 1.6, None)]:
        for seed in (0, 1):
            fake_run(tmp_path, f"{norm}_{lr}_{seed}", "completed" if acc else "diverged", acc,
                     norm=norm, lr=lr, seed=seed)
    report = build_report(find_runs([tmp_path]))
    assert report.x == "lr"  # auto: the only key that varies
    assert report.best_lr == {("batch",): (0.4, pytest.approx(20.0)),
                              ("none",): (0.1, pytest.approx(30.0))}
    assert report.cells[(("none",), 1.6)].text() == "2 diverged"
    # With a metric where higher is better, the best lr is the argmax.
    by_acc = build_report(find_runs([tmp_path]), metric="val_acc")
    assert by_acc.best_lr[("none",)][0] == 0.1 and by_acc.higher_is_better


def test_every_accuracy_is_higher_is_better_and_a_gap_has_no_better_side(tmp_path):
    from normbench.report.grid import metric_direction

    for metric in ("val_acc", "train_acc", "val_precise_acc", "val_batchstats_acc"):
        assert metric_direction(metric) == "higher", metric
    for metric in ("val_err", "val_loss", "val_bpc", "train_loss", "val_precise_loss"):
        assert metric_direction(metric) == "lower", metric
    for metric in ("val_gap_acc", "val_gap_loss", "bn_gap/mean/tid_sigma",
                   "hessian_lambda_max", "landscape_loss_range", "ics_mean_l2",
                   "act_similarity_max"):  # the why-probes' values: no side is better
        assert metric_direction(metric) is None, metric
    # PreciseBN's accuracy: the best lr is the argmax, and report.md says higher is better.
    for lr, acc in [(0.1, 0.6), (0.4, 0.9), (1.6, 0.7)]:
        for seed in (0, 1):
            run = fake_run(tmp_path / "runs", f"{lr}_{seed}", lr=lr, seed=seed)
            summary = json.loads((run / "summary.json").read_text())
            summary["final"]["val_precise_acc"] = acc + 0.01 * seed
            (run / "summary.json").write_text(json.dumps(summary))
    report = build_report(find_runs([tmp_path / "runs"]), metric="val_precise_acc")
    assert report.best_lr[("batch",)][0] == 0.4
    assert report_command([str(tmp_path / "runs"), "--metric", "val_precise_acc", "--out",
                           str(tmp_path / "out"), "--no-plots"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "`val_precise_acc` (higher is better)" in text and "lower is better" not in text


def test_lr_crossed_with_batch_size_becomes_part_of_the_row(tmp_path):
    for bs in (2, 8):
        for lr in (0.1, 0.2):
            fake_run(tmp_path, f"b{bs}_{lr}", batch_size=bs, lr=lr, val_acc=lr + bs / 100)
    report = build_report(find_runs([tmp_path]), x="batch_size")
    assert report.row_keys == ["norm", "lr"]
    assert report.rows == [("batch", 0.1), ("batch", 0.2)]
    assert report.best_lr[("batch",)][0] == 0.2


def test_setups_that_differ_in_lr_are_rows_not_a_sweep(tmp_path):
    # stat_gap-like: each model has its own lr; nothing is swept within a model.
    fake_run(tmp_path, "a", model="resnet", lr=0.1)
    fake_run(tmp_path, "b", model="transformer", dataset="synthetic_text", lr=0.001)
    report = build_report(find_runs([tmp_path]))
    assert report.x == "batch_size" and report.row_keys == ["model", "dataset", "norm"]
    assert len(report.rows) == 2 and report.columns == [32]


def test_models_of_another_arch_or_builder_are_rows_of_their_own(tmp_path):
    # model=torchvision (or timm, custom) names the model it builds in model.arch (or
    # model.target): resnet18 and resnet50 runs are not seeds of one cell.
    models = {"r18": {"name": "torchvision", "arch": "resnet18"},
              "r50": {"name": "torchvision", "arch": "resnet50"},
              "mine": {"name": "custom", "target": "my_model.py:tiny"}}
    for name, model in models.items():
        for bs, acc in ((8, 0.5), (32, 0.6)):
            run = fake_run(tmp_path, f"{name}_{bs}", model=model["name"], batch_size=bs,
                           val_acc=acc)
            (run / "config.json").write_text(json.dumps({"model": model, "batch_size": bs}))
    report = build_report(find_runs([tmp_path]))
    assert report.row_keys == ["model", "arch", "target", "norm"]
    assert report.rows == [("custom", None, "my_model.py:tiny", "batch"),
                           ("torchvision", "resnet18", None, "batch"),
                           ("torchvision", "resnet50", None, "batch")]
    assert all(len(cell.values) == 1 for cell in report.cells.values())
    assert report.row_label(report.rows[1]) == "torchvision resnet18 n/a batch"
    # One arch: no arch column, as before for normbench's own models.
    one = build_report([r for r in find_runs([tmp_path]) if r.path.name.startswith("r18")])
    assert one.row_keys == ["norm"]


def test_x_from_the_config_json_and_unknown_keys(tmp_path):
    for sb in (4, 16):
        run = fake_run(tmp_path, f"sb{sb}", val_acc=0.5)
        config = {"lr": 0.1, "norm": {"name": "batch", "stats_batch": sb},
                  "model": {"name": "resnet", "depth": 8}}
        (run / "config.json").write_text(json.dumps(config))
    runs = find_runs([tmp_path])
    assert build_report(runs, x="stats_batch").columns == [4, 16]
    assert build_report(runs).x == "stats_batch"  # auto finds it in the config
    run4 = next(r for r in runs if r.path.name == "sb4")
    assert run4.get("norm.stats_batch") == 4 and run4.get("stats_batch") == 4
    assert run4.get("depth") == 8  # a bare key found in one of the config's sections
    with pytest.raises(UserError, match="did you mean --x batch_size"):
        build_report(runs, x="batch_sise")
    with pytest.raises(UserError, match="use --metric with one of: val_acc, val_err"):
        build_report(runs, metric="bleu")


def test_a_folder_without_config_json_reads_the_summary_fields(tmp_path):
    # A run folder from before config.json, or one whose config.json is damaged.
    fake_run(tmp_path, "old", stats_batch=8, batch_size=64)
    broken = fake_run(tmp_path, "broken", stats_batch=2, batch_size=64)
    (broken / "config.json").write_text("{not json")
    runs = {r.path.name: r for r in find_runs([tmp_path])}
    assert runs["old"].config == {} and runs["broken"].config == {}
    assert (runs["old"].get("stats_batch"), runs["old"].get("lr")) == (8, 0.1)
    assert build_report(list(runs.values())).x == "stats_batch"
    assert runs["old"].get("depth") is None


@pytest.mark.slow
def test_a_run_writes_its_resolved_config_and_the_report_reads_it(tmp_path, tiny_config):
    from normbench.engine.train import run_experiment

    config = tiny_config("norm=group", "norm.num_groups=4", "steps=2", "probes=false")
    run_experiment(config, tmp_path / "run", live=False)
    on_disk = json.loads((tmp_path / "run" / "config.json").read_text())
    assert on_disk == config  # resolved: no ${...} left, every key as the loop saw it
    (run,) = find_runs([tmp_path])
    assert (run.get("num_groups"), run.get("model.depth"), run.get("norm")) == (4, 8, "group")


def test_report_command_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no runs in"):
        report_command([str(tmp_path / "empty")])
    with pytest.raises(UserError, match="does not exist"):
        report_command([str(tmp_path / "nowhere")])


@pytest.mark.slow
def test_report_cli_on_a_folder_without_runs_is_one_line_exit_2(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("report", "empty")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("normbench: error: no runs in 'empty'")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_bad_argument_is_one_line_without_the_usage_block(cli, tmp_path):
    fake_run(tmp_path, "r")
    result = cli("report", ".", "--reference")
    assert result.returncode == 2
    assert result.stderr.strip() == ("normbench: error: normbench report: argument --reference: "
                                     "expected one argument. Fix: run 'normbench report --help'.")


def test_only_keeps_the_runs_with_a_value(tmp_path):
    for norm in ("batch", "group"):
        for bs in (2, 8):
            fake_run(tmp_path, f"{norm}{bs}", norm=norm, batch_size=bs)
    assert report_command([str(tmp_path), "--only", "norm=batch", "--no-plots"]) == 0
    assert {r["norm"] for r in read_csv(tmp_path / "report.csv")} == {"batch"}
    assert report_command([str(tmp_path), "--only", "norm=group", "--only", "batch_size=8",
                           "--no-plots", "--x", "batch_size"]) == 0
    assert [(r["norm"], r["batch_size"]) for r in read_csv(tmp_path / "report.csv")] == [
        ("group", "8")]
    with pytest.raises(UserError, match=r"no run has norm=layer.*the runs have norm = batch, "
                                         r"group"):
        report_command([str(tmp_path), "--only", "norm=layer"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        report_command([str(tmp_path), "--only", "norm"])


def test_several_dirs_and_out(tmp_path):
    fake_run(tmp_path / "one", "r", batch_size=2)
    fake_run(tmp_path / "two", "r", batch_size=4)
    out = tmp_path / "out"
    assert report_command([str(tmp_path / "one"), str(tmp_path / "two" / "r"), "--out",
                           str(out)]) == 0
    rows = read_csv(out / "report.csv")
    assert [r["batch_size"] for r in rows] == ["2", "4"]
    assert (out / "val_err_vs_batch_size.png").is_file() and (out / "report.md").is_file()


@pytest.mark.slow
def test_joblib_sweep_2x2_end_to_end_with_report(cli, tmp_path):
    result = cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 "norm=batch,group", "batch_size=8,16", "debug=tiny")
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "runs" / "sweeps").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == [
        "0_batch_size=8,norm=batch", "1_batch_size=16,norm=batch",
        "2_batch_size=8,norm=group", "3_batch_size=16,norm=group"]
    for job, (norm, bs) in zip(jobs, [("batch", 8), ("batch", 16), ("group", 8), ("group", 16)],
                               strict=True):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 6
        assert (summary["norm"], summary["batch_size"]) == (norm, bs)
        assert 0.0 <= summary["final"]["val_acc"] <= 1.0
        assert (job / ".hydra" / "config.yaml").is_file()
        assert ("bn_gap/dmu/stem.1" in read_scalars(job)) == (norm == "batch")

    result = cli("report", str(sweep.relative_to(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "norm \\ batch_size" in result.stdout
    rows = read_csv(sweep / "report.csv")
    assert [(r["norm"], r["batch_size"], r["n_completed"]) for r in rows] == [
        ("batch", "8", "1"), ("batch", "16", "1"), ("group", "8", "1"), ("group", "16", "1")]
    for r in rows:
        acc = json.loads(next(sweep.glob(f"*_batch_size={r['batch_size']},norm={r['norm']}/summary.json"))
                         .read_text())["final"]["val_acc"]
        assert float(r["mean"]) == pytest.approx(100 * (1 - acc), abs=1e-3)
    for png in ("val_err_vs_batch_size.png", "curves.png", "bn_gap.png"):
        image = matplotlib.image.imread(sweep / png)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        assert image.std() > 0.01  # not blank
    md = (sweep / "report.md").read_text()
    assert "| batch |" in md and "![curves](curves.png)" in md


def test_a_logged_tag_as_metric_is_its_mean_over_the_second_half_of_training(tmp_path):
    # steps 10: the values logged at steps > 5 count (6 and 10), the start-up ones do not.
    tag = "bn_gap/mean/tid_sigma"
    for seed, late in enumerate([(0.2, 0.4), (0.3, 0.5)]):
        run = fake_run(tmp_path, f"s{seed}", seed=seed, steps=10)
        write_scalars(run, tag, [(2, 9.0), (5, 9.0), (6, late[0]), (10, late[1])])
    write_scalars(fake_run(tmp_path, "nan", seed=2, steps=10), tag, [(6, float("nan")), (8, 1.0)])
    report = build_report(find_runs([tmp_path]), metric=tag)
    cell = report.cells[(("batch",), 32)]
    assert sorted(cell.values) == pytest.approx([0.3, 0.4, 1.0])  # a NaN point is skipped
    assert cell.text() == f"{statistics.fmean([0.3, 0.4, 1.0]):.3f} ± " \
                          f"{statistics.stdev([0.3, 0.4, 1.0]):.3f} (3)"
    assert not report.directed and report.direction_note == ""
    from normbench.report.grid import Report  # the train/eval discrepancy has no better side either

    assert not Report("batch_size", "val_gap_acc", [], [], [], {}, [], {}).directed
    assert Report("batch_size", "val_precise_acc", [], [], [], {}, [], {}).directed
    # No "best" lr for a metric without a better side.
    for seed, lr in enumerate((0.1, 0.2)):
        write_scalars(fake_run(tmp_path, f"lr{lr}", seed=seed, steps=10, lr=lr), tag, [(8, lr)])
    assert build_report(find_runs([tmp_path]), metric=tag, x="lr").best_lr == {}
    with pytest.raises(UserError, match=r"no completed run logged the scalar "
                                         r"'bn_gap/mean/tid_sigmaa'.*e\.g\. bn_gap/mean/tid_sigma"):
        build_report(find_runs([tmp_path]), metric="bn_gap/mean/tid_sigmaa")


def test_small_means_keep_three_significant_digits():
    from normbench.report.grid import Cell

    assert Cell(values=[0.0374, 0.0380]).text() == "0.0377 ± 0.0004 (2)"
    assert Cell(values=[12.3, 12.7]).text() == "12.50 ± 0.28 (2)"
    assert Cell(values=[0.0]).text() == "0.00 (1)"


def test_several_keys_as_x_give_one_column_per_combination(tmp_path):
    # Text runs under four conditions and an image run that has neither key (n/a).
    for unit in ("char", "word"):
        for sample in ("window", "line"):
            for seed in (0, 1):
                fake_run(tmp_path, f"{unit}{sample}{seed}", model="transformer", seed=seed,
                         unit=unit, sample=sample, val_acc=0.5 + 0.1 * (unit == "word"))
    fake_run(tmp_path, "resnet", model="resnet")
    report = build_report(find_runs([tmp_path]), x="unit,sample")
    assert report.columns == [("char", "line"), ("char", "window"), ("word", "line"),
                              ("word", "window"), None]
    assert report.rows == [("resnet", "batch"), ("transformer", "batch")]
    assert report.cells[(("transformer", "batch"), ("word", "line"))].mean == pytest.approx(40.0)
    assert report.cells[(("resnet", "batch"), None)].values == pytest.approx([50.0])
    assert report_command([str(tmp_path), "--x", "unit,sample"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| model / norm \\ unit,sample | char/line | char/window | word/line | " \
           "word/window | n/a |" in md
    assert (tmp_path / "val_err_vs_unit+sample.png").is_file()
    # Neighbours change one key at a time: never char/window -> word/line.
    from normbench.report.differences import along_x

    pairs = {(d.a[1], d.b[1]) for d in along_x(report)}
    assert pairs == {(("char", "line"), ("char", "window")), (("word", "line"), ("word", "window")),
                     (("char", "line"), ("word", "line")), (("char", "window"), ("word", "window"))}
