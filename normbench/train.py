"""The training loop: step, log, evaluate, save; returns a summary dict.

It takes a plain dict (the resolved config) and knows nothing of Hydra, nor of which norm
is in use: probes find BatchNorm-like layers by type. What a run is made of is built by
`normbench.experiment.build`; how a model is evaluated lives in `normbench.evaluation`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console

from normbench import checkpoint as ckpt
from normbench.evaluation import (
    evaluate,
    forward,
    loss_and_counts,
    text_metrics,
    train_eval_discrepancy,
)
from normbench.experiment import Experiment, build, checkpoint_state
from normbench.guard import StopSignals, grad_norm
from normbench.tracking import warn


def run_experiment(config: dict, run_dir: Path, console: Console | None = None,
                   live: bool = True) -> dict:
    """Train and evaluate one configuration; write logs, checkpoints and summary.json into
    `run_dir` (resuming from its checkpoints when config["resume"] says so)."""
    start = time.time()
    exp = build(config, Path(run_dir), console or Console(), live)
    status, summary = "completed", exp.summary
    with exp.tracker.progress() as progress, StopSignals() as stop:
        task = progress.add_task(summary["run_name"], total=exp.steps, status="",
                                 completed=exp.step)
        while exp.step < exp.steps:
            step = exp.step + 1
            log_now, save_now = exp.due("log_every", step), exp.due("checkpoint_every", step)
            batch_size, step_lr = train_step(exp, step, log_now)
            progress.advance(task)
            # The device-side divergence flag is read only where the loop syncs anyway.
            if (log_now or save_now or stop.requested) and exp.watch.first_bad_step():
                status, summary["diverged_at_step"] = "diverged", exp.watch.first_bad_step()
                exp.tracker.console.print(f"[red]diverged[/red]: non-finite loss or gradient "
                                          f"norm at step {summary['diverged_at_step']}")
                break
            if log_now:
                loss = log_step(exp, step, step_lr, batch_size)
                progress.update(task, status=f"loss {loss:.3f}")
            if exp.due("eval_every", step):
                progress.console.print(evaluate_step(exp, step))
            if save_now or stop.requested:
                summary["checkpoint"] = str(save_step(exp, step))
            if stop.requested and step < exp.steps:
                status, summary["signal"] = "interrupted", stop.name
                exp.tracker.console.print(f"[yellow]interrupted[/yellow] by {stop.name} at step "
                                          f"{step}; checkpoint {summary['checkpoint']}")
                break
    finish(exp, status, time.time() - start)
    if status == "interrupted":
        stop.forward()  # under submitit, SIGUSR2 now requeues the job
    return summary


def train_step(exp: Experiment, step: int, log_now: bool) -> tuple[int, float]:
    """One optimizer step; returns the batch size and the learning rate the step used."""
    batch = next(exp.loader)
    with exp.probes.watch_forward(log_now), exp.autocast():
        logits = forward(exp.runner, exp.prepare(batch))
    loss, correct, count = loss_and_counts(logits, batch)
    exp.optimizer.zero_grad(set_to_none=True)
    exp.scaler.scale(loss).backward()
    exp.scaler.unscale_(exp.optimizer)  # the true gradients, for the norm and the probes
    norm = grad_norm(exp.params)
    if exp.scaler.is_enabled():  # fp16: an overflow is the scaler's to skip, not a divergence
        norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
    exp.watch.observe(step, loss, norm)
    if log_now:
        exp.probes.record_grads()
    with exp.probes.watch_step(log_now):
        exp.scaler.step(exp.optimizer)
    exp.scaler.update()
    step_lr = exp.optimizer.param_groups[0]["lr"]  # this step's rate, before the schedule moves on
    exp.scheduler.step()
    exp.running.add(loss, correct, count)
    exp.step = step
    return batch.size, step_lr


def log_step(exp: Experiment, step: int, step_lr: float, batch_size: int) -> float:
    """Write the running means, the probes and the throughput; returns the training loss."""
    exp.probes.add("train/loss", exp.running.means()[0])
    exp.probes.add("train/acc", exp.running.means()[1])
    values = exp.probes.flush()  # the one host sync of this logging step
    exp.running.reset()
    values["train/lr"] = step_lr
    if exp.data.info.kind == "text":  # bits per character (token), from the same running mean
        values.update(text_metrics(values["train/loss"], exp.data.info.unit, "train"))
    values["perf/samples_per_sec"] = exp.throughput.rate(step, batch_size)
    exp.tracker.scalars(values, step)
    exp.tracker.histograms(exp.probes.take_histograms(), step)
    exp.summary["final"]["train_loss"] = values["train/loss"]
    return values["train/loss"]


def evaluate_step(exp: Experiment, step: int) -> str:
    """Validation metrics (and, for BN models with probes, the train/eval discrepancy);
    returns the line the terminal shows."""
    config = exp.config
    exp.model.eval()
    start = time.perf_counter()
    with exp.autocast():
        exp.last_val = evaluate(exp.runner, exp.data, config["eval_batch_size"])
    exp.tracker.scalars({"perf/eval_seconds": time.perf_counter() - start}, step)
    exp.model.train()
    if exp.probes.enabled:  # BN models: val_batchstats/, val_precise/, val_gap/
        with exp.autocast():
            extra = train_eval_discrepancy(
                exp.model, exp.data, exp.last_val, batch_size=config["batch_size"],
                eval_batch_size=config["eval_batch_size"], seed=config["seed"],
                precise_batches=config["precise_bn_batches"])
        exp.tracker.scalars(extra, step)
        exp.last_val.update({k: v for k, v in extra.items() if k.startswith("val")})
    exp.tracker.scalars(exp.last_val, step)
    return f"step {step}/{exp.steps}  " + "  ".join(f"{k} {v:.4f}"
                                                      for k, v in exp.last_val.items())


def save_step(exp: Experiment, step: int) -> Path:
    path = ckpt.save_checkpoint(exp.tracker.run_dir, step, checkpoint_state(exp),
                                exp.config["keep_checkpoints"])
    exp.tracker.writer.flush()  # the event files match the checkpoint
    return path


def finish(exp: Experiment, status: str, elapsed: float) -> None:
    """The final summary.json, the terminal table and the end-of-run warnings."""
    exp.summary.update(status=status, steps=exp.step, elapsed_s=round(elapsed, 2))
    exp.summary["final"].update({k.replace("/", "_"): v for k, v in exp.last_val.items()})
    exp.tracker.write_summary(exp.summary)
    exp.tracker.close()
    exp.tracker.print_summary(exp.summary)
    layers = exp.probes.degenerate_layers()
    if layers:  # BN outputs beta there, in training and (so) in eval
        shown = ", ".join(layers[:6]) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
        warn(f"BatchNorm channels with no batch variance (normalized to their shift) in {shown}; "
             "bn_gap/degenerate/<layer> counts them")
