"""The training loop: step, log, evaluate; returns a summary dict.

It takes a plain dict (the resolved config) and knows nothing of Hydra, nor of which norm
is in use: probes find BatchNorm-like layers by type.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from normbench import checkpoint as ckpt
from normbench.dashboards import hparams_of, swept_names, write_dashboards
from normbench.data import Batch, build_dataset
from normbench.errors import UserError
from normbench.evaluation import train_eval_discrepancy
from normbench.guard import DivergenceWatch, StopSignals, grad_norm
from normbench.models import build_model
from normbench.norms import make_spec
from normbench.optim import build_optimizer, build_scheduler
from normbench.probes import Probes
from normbench.tracking import Tracker


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here", "use device=auto or cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; read when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch.x) if batch.mask is None else model(batch.x, mask=batch.mask)


def loss_and_counts(logits: torch.Tensor, batch: Batch):
    """Mean cross-entropy over real targets, number of correct predictions, number of targets.

    Works for classification (logits (N,K), y (N,)) and for sequences (logits (N,T,V),
    y (N,T), mask (N,T)): padding positions carry no loss and no count.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    y = batch.y.reshape(-1)
    losses = F.cross_entropy(flat_logits.float(), y, reduction="none")
    correct = flat_logits.argmax(-1) == y
    if batch.mask is None:
        return losses.mean(), correct.sum(), torch.tensor(y.numel(), device=y.device)
    m = batch.mask.reshape(-1).to(losses.dtype)
    count = m.sum()
    return (losses * m).sum() / count.clamp(min=1), (correct * m).sum(), count


def metrics_from(loss: float, acc: float, kind: str, prefix: str) -> dict[str, float]:
    out = {f"{prefix}/loss": loss, f"{prefix}/acc": acc}
    if kind == "text":
        out[f"{prefix}/bpc"] = loss / math.log(2)  # bits per character
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int, prefix: str = "val",
             shuffle_seed: int | None = None) -> dict[str, float]:
    """Loss and accuracy over the whole validation set, weighted by real targets."""
    total_loss = total_correct = total_count = 0.0
    for batch in data.val_batches(batch_size, shuffle_seed=shuffle_seed):
        loss, correct, count = loss_and_counts(forward(model, batch), batch)
        total_loss = total_loss + loss * count
        total_correct = total_correct + correct
        total_count = total_count + count
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64)
                          for v in (total_loss, total_correct, total_count)]).tolist()
    return metrics_from(values[0] / values[2], values[1] / values[2], data.info.kind, prefix)


def total_steps(config: dict, steps_per_epoch: int) -> int:
    if config.get("epochs"):
        return max(1, math.ceil(config["epochs"] * steps_per_epoch))
    return int(config["steps"])


def run_experiment(config: dict, run_dir: Path, console: Console | None = None,
                   live: bool = True) -> dict:
    """Train and evaluate one configuration; write logs and summary.json into `run_dir`."""
    start = time.time()
    console = console or Console()
    device = select_device(config.get("device", "auto"))
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    seed_everything(config["seed"], config.get("deterministic", False))

    data = build_dataset(**config["dataset"]).to(device)
    norm = make_spec(**config["norm"])
    model = build_model(config["model"], norm, data.info).to(device)
    loader = data.train_loader(config["batch_size"], seed=config["seed"])
    steps = total_steps(config, loader.steps_per_epoch)
    optimizer = build_optimizer(model, config["lr"], **config["optim"])
    scheduler = build_scheduler(optimizer, steps, **config["sched"])
    probes = Probes(model, enabled=config.get("probes", True),
                    hist_every=config.get("hist_every", 10))
    resumed = ckpt.resume_point(run_dir, config.get("resume", False), warn)
    checkpoint_every = int(config.get("checkpoint_every", 0) or 0)
    keep_checkpoints = int(config.get("keep_checkpoints", 2))
    watch = DivergenceWatch(device)
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loader": loader,
             "divergence": watch}
    params = [p for p in model.parameters() if p.requires_grad]

    summary = {
        "run_name": config.get("run_name", Path(run_dir).name),
        "dataset": config["dataset"]["name"], "model": config["model"]["name"],
        "norm": norm.name, "batch_size": config["batch_size"], "lr": config["lr"],
        # Samples whose statistics BatchNorm shares (None: the norm uses no batch statistics).
        "stats_batch": (norm.stats_batch or config["batch_size"]) if norm.name == "batch" else None,
        "seed": config["seed"], "steps": 0, "total_steps": steps, "device": str(device),
        # The sizes actually used: images, or text rows (training windows for a text stream).
        "n_train": data.n_train, "n_val": data.n_val,
        "n_params": sum(p.numel() for p in model.parameters()), "status": "running",
        "final": {},
    }
    start_step = resumed[0]["step"] if resumed else 0
    # On resume, TensorBoard drops events logged after the checkpoint: one continuous curve.
    tracker = Tracker(run_dir, console=console, live=live,
                      purge_step=start_step + 1 if resumed else None)
    tracker.write_summary(summary)
    write_dashboards(tracker.writer, hparams_of(summary, config), has_bn=bool(probes.bn_layers),
                     has_norm=bool(probes.norm_layers), has_saturation=bool(probes.saturating),
                     swept=swept_names(config))
    log_every = max(1, int(config.get("log_every", 20)))
    eval_every = int(config.get("eval_every", 0) or 0)
    eval_bs = int(config.get("eval_batch_size", 500))

    model.train()
    running_loss = torch.zeros((), device=device)
    running_correct = torch.zeros((), device=device)
    running_count = torch.zeros((), device=device)
    last_log_time, last_log_step = time.time(), 0
    last_val: dict[str, float] = {}
    status, step = "completed", start_step
    if resumed:
        state, path = resumed
        changed = ckpt.config_changes(state.get("config", {}), config)
        if changed:
            warn(f"resuming with a config that differs from the checkpoint's in "
                 f"{', '.join(changed)}: the run will not match an uninterrupted one")
        ckpt.restore(state, parts, path)  # last: it sets the RNG states the next steps draw from
        for total, saved in zip((running_loss, running_correct, running_count), state["running"],
                                strict=True):
            total.copy_(saved)
        summary["final"].update(state["final"])
        last_val = state["last_val"]
        summary["resumed_from_step"] = start_step
        console.print(f"resuming from {path} (step {start_step}/{steps})")
    with tracker.progress() as progress, StopSignals() as stop:
        task = progress.add_task(summary["run_name"], total=steps, status="", completed=start_step)
        for step in range(start_step + 1, steps + 1):
            log_now = step % log_every == 0 or step == steps
            batch = next(loader)
            with probes.watch_forward(log_now):
                logits = forward(model, batch)
            loss, correct, count = loss_and_counts(logits, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            watch.observe(step, loss, grad_norm(params))
            if log_now:
                probes.record_grads()
            with probes.watch_step(log_now):
                optimizer.step()
            step_lr = optimizer.param_groups[0]["lr"]  # this step's rate, before the schedule moves on
            scheduler.step()
            running_loss += loss.detach() * count
            running_correct += correct
            running_count += count
            progress.advance(task)
            save_now = (checkpoint_every and step % checkpoint_every == 0) or step == steps
            if (log_now or save_now or stop.requested) and watch.first_bad_step():
                status = "diverged"
                summary["diverged_at_step"] = watch.first_bad_step()
                console.print(f"[red]diverged[/red]: non-finite loss or gradient norm at step "
                              f"{summary['diverged_at_step']}")
                break

            if log_now:
                probes.add("train/loss", running_loss / running_count)
                probes.add("train/acc", running_correct / running_count)
                values = probes.flush()  # the one host sync of this logging step
                now = time.time()
                values["train/lr"] = step_lr
                if data.info.kind == "text":  # bits per character, from the same running mean
                    values["train/bpc"] = values["train/loss"] / math.log(2)
                values["perf/samples_per_sec"] = (step - last_log_step) * batch.size / (now - last_log_time)
                last_log_time, last_log_step = now, step
                running_loss.zero_(), running_correct.zero_(), running_count.zero_()
                tracker.scalars(values, step)
                tracker.histograms(probes.take_histograms(), step)
                summary["final"]["train_loss"] = values["train/loss"]
                progress.update(task, status=f"loss {values['train/loss']:.3f}")

            if (eval_every and step % eval_every == 0) or step == steps:
                model.eval()
                last_val = evaluate(model, data, eval_bs)
                model.train()
                if probes.enabled:  # BN models: val_batchstats/, val_precise/, val_gap/
                    extra = train_eval_discrepancy(
                        model, data, last_val, batch_size=config["batch_size"],
                        eval_batch_size=eval_bs, seed=config["seed"],
                        precise_batches=int(config.get("precise_bn_batches", 20)))
                    tracker.scalars(extra, step)
                    last_val.update({k: v for k, v in extra.items() if k.startswith("val")})
                tracker.scalars(last_val, step)
                shown = "  ".join(f"{k} {v:.4f}" for k, v in last_val.items())
                progress.console.print(f"step {step}/{steps}  {shown}")

            if save_now or stop.requested:
                state = ckpt.capture(parts, running=torch.stack(
                    [running_loss, running_correct, running_count]).cpu(),
                    final=dict(summary["final"]), last_val=dict(last_val), config=config)
                summary["checkpoint"] = str(ckpt.save_checkpoint(run_dir, step, state,
                                                                 keep_checkpoints))
                tracker.writer.flush()  # the event files match the checkpoint
            if stop.requested and step < steps:
                status = "interrupted"
                summary["signal"] = stop.name
                console.print(f"[yellow]interrupted[/yellow] by {stop.name} at step {step}; "
                              f"checkpoint {summary['checkpoint']}")
                break

    summary["status"] = status
    summary["steps"] = step
    summary["elapsed_s"] = round(time.time() - start, 2)
    summary["final"].update({k.replace("/", "_"): v for k, v in last_val.items()})
    tracker.write_summary(summary)
    tracker.close()
    tracker.print_summary(summary)
    if probes.degenerate_layers():  # BN outputs beta there, in training and (so) in eval
        warn("BatchNorm channels with no batch variance (normalized to their shift) in "
             + ", ".join(probes.degenerate_layers()))
    if status == "interrupted":
        stop.forward()  # under submitit, SIGUSR2 now requeues the job
    return summary


def warn(message: str) -> None:
    print(f"normbench: warning: {message}", file=sys.stderr, flush=True)
