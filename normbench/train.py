"""The training loop: step, log, evaluate; returns a summary dict.

It takes a plain dict (the resolved config) and knows nothing of Hydra, nor of which norm
is in use: probes find BatchNorm-like layers by type.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from normbench.dashboards import hparams_of, write_dashboards
from normbench.data import Batch, build_dataset
from normbench.errors import UserError
from normbench.evaluation import train_eval_discrepancy
from normbench.models import build_model
from normbench.norms import make_spec
from normbench.optim import build_optimizer, build_scheduler
from normbench.probes import Probes
from normbench.tracking import Tracker

HPARAM_KEYS = ("batch_size", "lr", "seed", "steps")


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

    summary = {
        "run_name": config.get("run_name", Path(run_dir).name),
        "dataset": config["dataset"]["name"], "model": config["model"]["name"],
        "norm": norm.name, "batch_size": config["batch_size"], "lr": config["lr"],
        "seed": config["seed"], "steps": 0, "total_steps": steps, "device": str(device),
        "n_params": sum(p.numel() for p in model.parameters()), "status": "running",
        "final": {},
    }
    tracker = Tracker(run_dir, console=console, live=live)
    tracker.write_summary(summary)
    write_dashboards(tracker.writer, hparams_of(summary, config), has_bn=bool(probes.bn_layers),
                     has_norm=bool(probes.norm_layers), has_saturation=bool(probes.saturating))
    log_every = max(1, int(config.get("log_every", 20)))
    eval_every = int(config.get("eval_every", 0) or 0)
    eval_bs = int(config.get("eval_batch_size", 500))

    model.train()
    running_loss = torch.zeros((), device=device)
    running_correct = torch.zeros((), device=device)
    running_count = torch.zeros((), device=device)
    last_log_time, last_log_step = time.time(), 0
    last_val: dict[str, float] = {}
    status, step = "completed", 0
    with tracker.progress() as progress:
        task = progress.add_task(summary["run_name"], total=steps, status="")
        for step in range(1, steps + 1):
            log_now = step % log_every == 0 or step == steps
            batch = next(loader)
            with probes.watch_forward(log_now):
                logits = forward(model, batch)
            loss, correct, count = loss_and_counts(logits, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if log_now:
                probes.record_grads()
            with probes.watch_step(log_now):
                optimizer.step()
            scheduler.step()
            running_loss += loss.detach() * count
            running_correct += correct
            running_count += count
            progress.advance(task)

            if log_now:
                probes.add("train/loss", running_loss / running_count)
                probes.add("train/acc", running_correct / running_count)
                values = probes.flush()  # the one host sync of this logging step
                now = time.time()
                values["train/lr"] = optimizer.param_groups[0]["lr"]
                values["perf/samples_per_sec"] = (step - last_log_step) * batch.size / (now - last_log_time)
                last_log_time, last_log_step = now, step
                running_loss.zero_(), running_correct.zero_(), running_count.zero_()
                if not math.isfinite(values["train/loss"]):
                    status = "diverged"
                    summary["diverged_at_step"] = step
                    tracker.scalars({"train/loss": values["train/loss"]}, step)
                    console.print(f"[red]diverged[/red]: non-finite loss at step {step}")
                    break
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

    summary["status"] = status
    summary["steps"] = step
    summary["elapsed_s"] = round(time.time() - start, 2)
    summary["final"].update({k.replace("/", "_"): v for k, v in last_val.items()})
    tracker.write_summary(summary)
    tracker.close()
    tracker.print_summary(summary)
    return summary
