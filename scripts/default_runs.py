"""The plain `normbench train norm=X`, for every registered norm: status and val accuracy.

    python scripts/default_runs.py                      # every norm, ~5 min on 2 cores
    python scripts/default_runs.py --norms dyt,none -- seed=1
    python scripts/default_runs.py --out docs/data.md   # rewrite the table there

Each norm trains in a fresh process with the defaults of conf/train.yaml (anything after
`--` is added to every run), one after another, so that the wall times are comparable. The
table gives each run's status, final val accuracy and wall time (summary.json's
elapsed_s), with chance (1 / classes) for scale. `--out FILE` writes the table between
the markers `<!-- default-runs:begin -->` and `<!-- default-runs:end -->` of FILE, the one
place the figures are kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

BEGIN, END = "<!-- default-runs:begin -->", "<!-- default-runs:end -->"


def image_norms() -> list[str]:
    from normbench.models.external import NATIVE
    from normbench.norms import norm_names

    return [name for name in norm_names("images") if name != NATIVE]


def run(norm: str, extra: list[str], folder: Path) -> dict:
    """One plain run in its own process; its summary.json (or the failure's last line)."""
    command = [sys.executable, "-m", "normbench", "train", f"norm={norm}", *extra,
               f"hydra.run.dir={folder}"]
    done = subprocess.run(command, capture_output=True, text=True)
    summary = folder / "summary.json"
    if not summary.exists():
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"norm": norm, "status": f"exit {done.returncode}",
                "reason": lines[-1] if lines else ""}
    data = json.loads(summary.read_text())
    final = data.get("final") or {}
    return {"norm": norm, "status": data["status"], "val_acc": final.get("val_acc"),
            "elapsed_s": data.get("elapsed_s"), "steps": data.get("steps"),
            "lr": data.get("lr"), "batch_size": data.get("batch_size")}


def markdown(rows: list[dict], chance: float, extra: list[str]) -> str:
    machine = f"{platform.machine()}, torch {__import__('torch').__version__}"
    given = f" with `{' '.join(extra)}`" if extra else ""
    lines = [f"Measured by `python scripts/default_runs.py`{given} on {time.strftime('%Y-%m-%d')} "
             f"({machine}; chance is {chance:.2f}):", "",
             "| norm | status | val acc | wall time |", "|---|---|---|---|"]
    for r in rows:
        acc = f"{r['val_acc']:.3f}" if isinstance(r.get("val_acc"), float) else "–"
        wall = f"{r['elapsed_s']:.0f} s" if r.get("elapsed_s") else "–"
        lines.append(f"| {r['norm']} | {r['status']} | {acc} | {wall} |")
    return "\n".join(lines)


def write_into(path: Path, block: str) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers to write between")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", default=None, help="comma-separated (default: every one)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file with markers")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("overrides", nargs="*", help="after --: added to every run")
    args = parser.parse_args(argv)
    norms = args.norms.split(",") if args.norms else image_norms()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        task = progress.add_task("plain runs", total=len(norms))
        for norm in norms:
            progress.update(task, description=f"norm={norm}")
            rows.append(run(norm, args.overrides, Path(tmp) / norm))
            progress.advance(task)
    from normbench.config.compose import compose_config

    classes = 10 if compose_config(args.overrides)["dataset"]["name"] == "shapes" else None
    chance = 1 / classes if classes else float("nan")
    table = Table("norm", "status", "val acc", "wall time", title="normbench train norm=X")
    for r in rows:
        acc = r.get("val_acc")
        table.add_row(r["norm"], r["status"] + (f": {r['reason']}" if r.get("reason") else ""),
                      f"{acc:.3f}" if isinstance(acc, float) else "–",
                      f"{r['elapsed_s']:.0f} s" if r.get("elapsed_s") else "–")
    Console().print(table)
    print(f"chance: {chance:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.out:
        write_into(args.out, markdown(rows, chance, args.overrides))
        print(f"wrote the table into {args.out}")
    failed = [r["norm"] for r in rows if r["status"] != "completed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
