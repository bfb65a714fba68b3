"""docs/results.md: the literature's normalization questions, answered by normbench's presets.

    python scripts/results.py --run         # run every study (~70 min on 2 CPU cores), then write
    python scripts/results.py               # write from the sweep folders already in --runs
    python scripts/results.py --run --only stats_batch,lr
    python scripts/results.py --run --only landscape --section landscape   # one study's section

Each study is one or more `normbench train -m` sweeps (each into RUNS/<sweep>) and one or
more `normbench report` calls on them. docs/results.md gets, per study, the question, the
commands, each report's tables, significance tests and findings (its report.md, as
`normbench report` wrote it) and its plots (copied to docs/results/<report>/), then the
machine, the date and the wall time each sweep took (from its folder: the first job's start
to the last summary written). Nothing in the tables is typed by hand.

tiny-shakespeare is read from data_cache/ (downloaded there on first use, or copied there
by hand on a machine without network).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Sweep:
    folder: str  # below --runs
    overrides: list[str]
    # Further folders holding jobs of the same sweep (run again by narrower commands).
    extra: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass
class Report:
    name: str  # docs/results/<name>/
    sweeps: list[str]  # Sweep.folder names (their existing extra folders come along)
    args: list[str]
    caption: str
    curves: bool = True  # False: only the metric-vs-x plot (another report has the curves)


@dataclass
class Study:
    key: str
    title: str
    question: str
    sweeps: list[Sweep]
    reports: list[Report]
    # What the tables show, in words (written after reading them; printed after the commands).
    outcome: str = ""


# experiment=landscape's reports: a final value (the end of training) or a logged tag (its
# mean over the second half of training, as `normbench report --metric TAG` takes it).
LANDSCAPE_METRICS = [
    ("hessian_lambda_max", "Hessian λ_max on the fixed batch at the end of training (BN in "
                           "eval mode), against the ResNet's depth."),
    ("hessian_trace", "Hessian trace (Hutchinson, 20 vectors) at the end of training."),
    ("landscape/loss_range", "Loss range along the gradient (η = ½ to 4 × lr), mean over the "
                             "second half of training."),
    ("landscape/grad_change", "Gradient change along the gradient, max over η of ‖∇L(θ) − "
                              "∇L(θ − ηg)‖, mean over the second half of training."),
    ("landscape/beta_smoothness", "Effective β-smoothness along the gradient, mean over the "
                                  "second half of training."),
    ("ics/mean/l2", "Internal covariate shift ‖G − G′‖ (mean over 8 weights), mean over the "
                    "second half of training."),
    ("act_similarity_max", "Cross-sample cosine similarity at the most collapsed norm layer, at "
                           "the end of training."),
    ("val_err", "Validation error (%)."),
]

STUDIES = [
    Study(
        "stats_batch", "BatchNorm's statistics batch (GroupNorm paper, Fig. 1)",
        "Wu & He (2018): BatchNorm's error grows as the number of samples its statistics "
        "come from shrinks, while GroupNorm and LayerNorm, which use none, stay flat. Here "
        "the optimizer always sees 32 images; BN normalizes groups of k of them (ghost BN), "
        "so only BN's statistics change along x.",
        [Sweep("stats_bn", ["experiment=stats_batch_sweep"]),
         Sweep("stats_ref", ["experiment=stats_batch_references"])],
        [Report("stats_batch", ["stats_bn", "stats_ref"], ["--x", "stats_batch"],
                "Validation error (%) against BN's statistics batch k; GN and LN as flat "
                "references.")]),
    Study(
        "batch_size", "Batch size, and BatchNorm's train/eval discrepancy",
        "The same question with the batch itself (the optimizer's and BN's), the learning "
        "rate scaled linearly with it, equal epochs. Then, for BatchNorm alone, the gap "
        "between evaluating with the running statistics (inference) and with each batch's "
        "own statistics (as in training): val_gap_acc = val_acc (running) − val_acc (batch "
        "statistics), a fraction; and the accuracy with PreciseBN's population statistics.",
        [Sweep("batch_size", ["experiment=batch_size_sweep"])],
        [Report("batch_size", ["batch_size"], [],
                "Validation error (%) against the batch size, per norm."),
         Report("train_eval_gap", ["batch_size"],
                ["--metric", "val_gap_acc", "--only", "norm=batch"],
                "BatchNorm: accuracy with running statistics minus accuracy with batch "
                "statistics, against the batch size.", curves=False),
         Report("precise_bn", ["batch_size"],
                ["--metric", "val_precise_acc", "--only", "norm=batch"],
                "BatchNorm: validation accuracy with PreciseBN statistics (compare "
                "val_acc in the batch-size table).", curves=False)]),
    Study(
        "lr", "Learning-rate tolerance per norm",
        "BatchNorm is said to let a network train at higher learning rates. Each norm over "
        "a grid of 1/8 to 8 times the setup's learning rate: SGD on the shapes, AdamW on "
        "tiny-shakespeare (one epoch there, to fit the machine; the setup's recipe is 5).",
        [Sweep("lr_shapes", ["experiment=lr_sweep"]),
         Sweep("lr_text", ["experiment=lr_sweep", "setup=tinyshakespeare",
                           "norm=batch,layer,none", "seed=0,1", "epochs=1"])],
        [Report("lr_shapes", ["lr_shapes"], [],
                "ResNet-8 on the 16-px shapes: validation error (%) against the lr."),
         Report("lr_text", ["lr_text"], ["--metric", "val_bpc"],
                "Transformer on tiny-shakespeare: validation bits per character against "
                "the lr.")]),
    Study(
        "stat_gap", "BatchNorm's batch-vs-running gap: images vs text (PowerNorm, Fig. 2)",
        "Shen et al. (2020) found BatchNorm's batch statistics fluctuating far more around "
        "its running statistics in Transformers on text than in CNNs on images. The gap "
        "here is tid_sigma = mean over channels of |σ_running / σ_batch − 1| (their "
        "training-inference discrepancy of the scale), averaged over the BN layers and over "
        "the second half of training, for text as characters or words, read as contiguous "
        "windows or as padded lines (64 units per row), against the ResNet-8 on the embedded "
        "16-px shapes (n/a). "
        "The gap of statistics from n samples of one distribution is not 0: its noise floor "
        "falls with n (about 0.1 at 32 samples, 0.01 at 2048), so a layer normalizing more "
        "real entries per batch shows less gap for the same data. The LSTM keeps statistics "
        "per time step (Cooijmans et al.): each sees 32 rows at most, and on padded lines the "
        "late time steps see only the 2 or 3 lines that reach them, entering the mean only "
        "at the steps where they exist; its cells mix the gap with that small-sample noise.",
        [Sweep("stat_gap_text", ["experiment=stat_gap",
                                 "gap_setup=transformer_shakespeare,lstm_shakespeare",
                                 "dataset.unit=char,word", "dataset.sample=window,line",
                                 "seed=0,1,2", "threads=1"],
               extra=[("stat_gap_lstm_word",
                       ["experiment=stat_gap", "gap_setup=lstm_shakespeare",
                        "dataset.unit=word", "dataset.sample=window,line", "seed=0,1,2",
                        "threads=1"]),
                      ("stat_gap_lstm_char",
                       ["experiment=stat_gap", "gap_setup=lstm_shakespeare",
                        "dataset.unit=char", "dataset.sample=window,line", "seed=1,2",
                        "threads=1"])]),
         Sweep("stat_gap_resnet", ["experiment=stat_gap", "gap_setup=resnet_images",
                                   "seed=0,1,2"])],
        [Report("stat_gap", ["stat_gap_text", "stat_gap_resnet"],
                ["--metric", "bn_gap/mean/tid_sigma", "--x", "dataset.unit,dataset.sample",
                 "--reference", "resnet"],
                "tid_sigma per model and text condition (unit, sample); the ResNet on "
                "images has no text condition (n/a).")]),

    Study(
        "landscape", "Why normalization helps: landscape, covariate shift, curvature, collapse",
        "Santurkar et al. (2018): BN does not reduce internal covariate shift but makes the "
        "loss landscape smoother along the gradient. Yao et al. (2020, PyHessian): BN lowers "
        "the Hessian's top eigenvalue and trace for deep ResNets but not necessarily for "
        "shallow ones. Lubana et al. (2021): without normalization activations collapse "
        "towards one direction. Here BN, GN, LN and no norm (and no norm with SkipInit, De & "
        "Smith 2020) train ResNet-8 and ResNet-32 on the 16-px shapes with one learning-rate "
        "schedule (the setup's lr 0.2 at batch 32, cosine down to a tenth), 2 seeds, with "
        "every why-probe on (docs/why.md). The Hessian is taken at the end of training; the "
        "landscape and ICS are each run's mean over the second half of training.",
        [Sweep("landscape", ["experiment=landscape"]),
         Sweep("landscape_skipinit", ["experiment=landscape", "norm=none",
                                      "model.residual_init=zero"])],
        [Report(f"landscape_{metric.replace('/', '_')}", ["landscape", "landscape_skipinit"],
                ["--x", "model.depth", "--metric", metric], caption, curves=False)
         for metric, caption in LANDSCAPE_METRICS],
        outcome="Santurkar's direction holds for the landscape (of the networks that trained, "
        "BN's loss range, gradient change and β-smoothness are the lowest at both depths) "
        "but not for internal covariate shift "
        "(BN's is lower than without a norm, where Santurkar found it no lower); PyHessian's "
        "does not (BN's λ_max is not lower on the deep network: higher than no norm with "
        "SkipInit's). The deep LayerNorm network did not train at this lr and its activations "
        "collapsed (similarity 0.98). Two seeds: only large differences pass a test."),
]


def train_command(sweep_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "normbench", "train", "-m", *overrides,
            "hydra/launcher=joblib", f"hydra.sweep.dir={sweep_dir}"]


def shown(command: list[str], runs: Path) -> str:
    """A command as a user types it (normbench, paths relative to the repository)."""
    words = ["normbench", *command[3:]]
    return " ".join(w.replace(str(runs), relative(runs)) for w in words)


def relative(path: Path) -> str:
    for candidate in (path.absolute(), path.resolve()):  # runs/results may be a link elsewhere
        try:
            return str(candidate.relative_to(REPO))
        except ValueError:
            continue
    return str(path)


def folders(runs: Path, sweep: Sweep) -> list[Path]:
    """The sweep's folder and those of its extra commands that were run."""
    if not (runs / sweep.folder).is_dir():
        sys.exit(f"results: no sweep folder {runs / sweep.folder}: run with --run first")
    return [runs / f for f in [sweep.folder, *(f for f, _ in sweep.extra)] if (runs / f).is_dir()]


def wall_seconds(folder: Path) -> float | None:
    """From the sweep's start (multirun.yaml) to its last summary.json."""
    start = folder / "multirun.yaml"
    ends = [p.stat().st_mtime for p in folder.glob("*/summary.json")]
    if not start.is_file() or not ends:
        return None
    return max(ends) - start.stat().st_mtime


def job_count(folder: Path) -> tuple[int, int]:
    summaries = [json.loads(p.read_text()) for p in folder.glob("*/summary.json")]
    return len(summaries), sum(s.get("status") == "completed" for s in summaries)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return (f"{os.cpu_count()} CPU cores ({cpu}), no GPU; Python {platform.python_version()}, "
            f"torch {torch.__version__}; this file written at commit {commit}")


def embed(report_md: Path, image_dir: str) -> list[str]:
    """report.md below a study's heading: its title dropped, its headings two levels down,
    its images pointing into docs/results/<report>/."""
    lines = report_md.read_text().splitlines()[1:]
    out = []
    for line in lines:
        if line.startswith("#"):
            line = "##" + line
        if line.startswith("![") and "](" in line:
            label, target = line[2:].split("](", 1)
            if not (report_md.parent / target.rstrip(")")).is_file():
                continue  # a plot left out (Report.curves)
            line = f"![{label}]({image_dir}/{target}"
        out.append(line)
    return out


def run_report(report: Report, sweeps: dict[str, Sweep], runs: Path,
               docs: Path) -> tuple[list[str], Path]:
    out = docs / "results" / report.name
    if out.exists():
        shutil.rmtree(out)
    dirs = [str(d) for name in report.sweeps for d in folders(runs, sweeps[name])]
    command = [sys.executable, "-m", "normbench", "report", *dirs, *report.args, "--out", str(out)]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    (out / "report.csv").unlink(missing_ok=True)  # the tables are in results.md
    if not report.curves:
        dropped = ("curves.png", "bn_gap.png")
        for name in dropped:
            (out / name).unlink(missing_ok=True)
        # report.md stays beside its plots: no image line for the ones left out.
        md = out / "report.md"
        md.write_text("".join(line for line in md.read_text().splitlines(keepends=True)
                              if not any(line.strip().endswith(f"({name})") for name in dropped)))
    typed = " ".join(["normbench report", *(relative(Path(d)) for d in dirs), *report.args])
    return [typed], out


def write(studies: list[Study], runs: Path, docs: Path) -> Path:
    today = datetime.date.today().isoformat()
    lines = ["# Results", "",
             f"Generated by `python scripts/results.py` on {today}: every table, test, finding "
             "and plot below is `normbench report`'s output on the sweeps whose commands are "
             "listed, run with the presets' defaults on this machine:", "",
             f"- {machine()}", "- sweeps: `hydra/launcher=joblib`, two jobs at a time with one "
             "torch thread each", "",
             "Cells are mean ± standard deviation over seeds (number of seeds). Differences "
             "are Welch's t-tests over seeds, two-sided, not corrected for the number of "
             "comparisons. Small studies: these are the presets at the scale of the embedded "
             "data (`setup=shapes_small`) and of tiny-shakespeare, not CIFAR-scale results.",
             ""]
    lines += ["## Contents", ""] + [f"- [{s.title}](#{anchor(s.title)})" for s in studies] + [""]
    for study in studies:
        lines += study_lines(study, runs, docs)
    path = docs / "results.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def study_lines(study: Study, runs: Path, docs: Path) -> list[str]:
    """One study's section of results.md: question, commands, wall time, reports."""
    lines: list[str] = []
    lines += [f"## {study.title}", "", study.question, "", "Commands:", "", "```bash"]
    sweeps = {s.folder: s for s in study.sweeps}
    ran = {s.folder: [(f, o) for f, o in [(s.folder, s.overrides), *s.extra]
                      if (runs / f).is_dir()] for s in study.sweeps}
    for sweep in study.sweeps:
        for folder, overrides in ran[sweep.folder]:
            lines.append(shown(train_command(runs / folder, overrides), runs))
    report_lines = []
    for report in study.reports:
        typed, out = run_report(report, sweeps, runs, docs)
        lines += typed
        report_lines += [f"### {report.caption}", ""]
        report_lines += embed(out / "report.md", f"results/{report.name}") + [""]
    lines += ["```", ""]
    extras = [f for s in study.sweeps for f, _ in ran[s.folder][1:]]
    if extras:
        lines += [f"The jobs of {', '.join(f'`{f}`' for f in extras)} are the same jobs as "
                  "the first sweep's (same settings and seeds), run again by narrower "
                  "commands after that sweep was stopped partway; the report reads all "
                  "the folders.", ""]
    if study.outcome:
        lines += [f"What this run shows: {study.outcome}", ""]
    lines += ["Wall time on this machine:", ""]
    for sweep in study.sweeps:
        for folder, _ in ran[sweep.folder]:
            path = runs / folder
            seconds = wall_seconds(path)
            total, done = job_count(path)
            took = f"{seconds / 60:.1f} min" if seconds is not None else "unknown"
            lines.append(f"- `{folder}`: {total} jobs ({done} completed), {took}")
    lines += [""] + report_lines
    return lines


def write_section(study: Study, runs: Path, docs: Path) -> Path:
    """Replace (or add) one study's section of an existing results.md, leaving the others as
    they are: a study run on its own, without the other studies' sweep folders."""
    path = docs / "results.md"
    old = path.read_text().rstrip("\n").split("\n")
    heading = f"## {study.title}"
    new = study_lines(study, runs, docs)
    # the file's header names the machine of a full run; this section's may differ
    new[4:4] = [f"This section alone was written on {datetime.date.today().isoformat()} "
                f"(`scripts/results.py --section {study.key}`) on {machine()}.", ""]
    if heading in old:
        start = old.index(heading)
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        old[start:end] = new
    else:
        old += [""] + new
        contents = old.index("## Contents")
        last = max(i for i in range(contents, len(old)) if old[i].startswith("- ["))
        old.insert(last + 1, f"- [{study.title}](#{anchor(study.title)})")
    path.write_text("\n".join(old).rstrip() + "\n")
    return path


def anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return keep.replace(" ", "-")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run the sweeps first")
    parser.add_argument("--only", default="", help="with --run: run only these studies "
                        "(comma-separated keys: " + ", ".join(s.key for s in STUDIES) + "); "
                        "results.md always covers every study")
    parser.add_argument("--runs", default=str(REPO / "runs" / "results"),
                        help="where the sweep folders are (default runs/results)")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="where results.md goes")
    parser.add_argument("--section", default="", help="write only this study's section into "
                        "the existing results.md (its sweeps alone need to be in --runs)")
    opts = parser.parse_args()
    keys = [k for k in opts.only.split(",") if k]
    unknown = (set(keys) | ({opts.section} if opts.section else set())) - {s.key for s in STUDIES}
    if unknown:
        parser.error(f"unknown study {', '.join(sorted(unknown))}")
    runs, docs = Path(opts.runs), Path(opts.docs)
    if opts.run:
        for study in [s for s in STUDIES if not keys or s.key in keys]:
            for sweep in study.sweeps:  # the canonical command only
                start, command = time.time(), train_command(runs / sweep.folder, sweep.overrides)
                print(f"results: {study.key}: {shown(command, runs)}", flush=True)
                subprocess.run(command, cwd=REPO)
                print(f"results: {time.time() - start:.0f} s", flush=True)
    if opts.section:
        (study,) = [s for s in STUDIES if s.key == opts.section]
        print(f"results: wrote the {study.key} section of {write_section(study, runs, docs)}")
        return 0
    print(f"results: wrote {write(STUDIES, runs, docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
