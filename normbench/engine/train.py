"""The training loop: step, log, evaluate, save; returns a summary dict.

It takes a plain dict (the resolved config) and knows nothing of Hydra, nor of which norm
is in use: probes find BatchNorm-like layers by type. What a run is made of is built by
`normbench.engine.experiment.build`; how a model is evaluated lives in `normbench.engine.evaluation`.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from normbench.engine import checkpoint as ckpt
from normbench.engine import distributed
from normbench.engine.discrepancy import train_eval_discrepancy
from normbench.engine.evaluation import evaluate, forward, loss_and_counts, text_metrics
from normbench.engine.experiment import Experiment, build, checkpoint_state, start_writing
from normbench.engine.guard import StopSignals, grad_norm
from normbench.engine.tracking import mark_failed, read_summary, warn
from normbench.norms.sync import synchronized
from normbench.probes.why import FINAL as WHY_FINAL


def run_experiment(config: dict, run_dir: Path, console: Console | None = None,
                   live: bool = True, on_start: Callable[[], None] | None = None) -> dict:
    """Train and evaluate one configuration; write logs, checkpoints and summary.json into
    `run_dir` (resuming from its checkpoints when config["resume"] says so).

    Nothing is written until the run is set up: `on_start` is called (on every process)
    just before the first write, once nothing can refuse the run any more. A resumed run
    that had already completed all its steps is left as it is, and its summary returned."""
    start = time.time()
    exp = build(config, Path(run_dir), console or Console(), live)
    # Rank 0 reads the folder and decides for every process.
    previous = distributed.broadcast_object(
        (read_summary(run_dir) or {}) if distributed.is_main() and exp.step else {})
    if exp.step == exp.steps and previous.get("status") == "completed":
        exp.tracker.console.print(f"{run_dir} has completed its {exp.steps} steps: nothing to "
                                  "do (raise steps= or epochs= to train it further)",
                                  soft_wrap=True)
        return previous
    if on_start is not None:
        on_start()
    start_writing(exp)
    vote = distributed.StopVote()
    with exp.tracker.progress() as progress, StopSignals() as stop:
        task = progress.add_task(exp.summary["run_name"], total=exp.steps, status="",
                                 completed=exp.step)
        try:
            status = train_loop(exp, progress, task, stop, vote)
            vote.close()
        except Exception as e:
            if not distributed.is_peer_failure(e):
                raise
            line = lost_rank_line(exp, e)
            exp.summary["error"] = line
            finish(exp, "failed", time.time() - start)  # writes summary.json on rank 0 only
            if distributed.is_main():
                distributed.failure_recorded()
            else:
                record_for_lost_main(exp)
            raise distributed.PeerLost(line) from None
    finish(exp, status, time.time() - start)
    # No rank leaves before rank 0 has written everything: torchrun ends the others as soon
    # as one process exits with an error (an interrupted run's 130 or 143).
    distributed.barrier()
    if status == "interrupted":
        stop.forward()  # under submitit, SIGUSR2 now requeues the job
    return exp.summary


def train_loop(exp: Experiment, progress, task, stop: StopSignals,
               vote: distributed.StopVote) -> str:
    """The steps; returns the run's status. Under several processes every decision here
    (log, evaluate, save, stop, diverged) is the same on every rank, or they would wait
    for each other forever: the steps are counted alike, and the signals and the
    divergence are agreed on."""
    summary = exp.summary
    while exp.step < exp.steps:
        step = exp.step + 1
        log_now, save_now = exp.due("log_every", step), exp.due("checkpoint_every", step)
        batch_size, step_lr = train_step(exp, step, log_now)
        progress.advance(task)
        signal_number = vote(stop.received or 0)
        # The device-side divergence flag is read only where the loop syncs anyway.
        if (log_now or save_now or signal_number) and \
                (bad := distributed.earliest(exp.watch.first_bad_step())):
            summary["diverged_at_step"] = bad  # `finish` says so, with what to try
            return "diverged"
        if log_now:
            loss = log_step(exp, step, step_lr, batch_size)
            progress.update(task, status=f"loss {loss:.3f}")
        if exp.due("eval_every", step):
            line = evaluate_step(exp, step)
            if line:
                progress.console.print(line)
        if save_now or signal_number:
            path = save_step(exp, step, scheduled=save_now)
            if path is not None:  # rank 0 saves; elsewhere str(None) would name one "None"
                summary["checkpoint"] = str(path)
        if signal_number and step < exp.steps:
            summary["signal"] = signal.Signals(signal_number).name
            exp.tracker.console.print(f"[yellow]interrupted[/yellow] by {summary['signal']} at "
                                      f"step {step}; checkpoint {summary.get('checkpoint')}")
            return "interrupted"
    return "completed"


def divergence_hint(config: dict) -> str:
    """What to try after a divergence, from the run's own settings: half its lr, branches
    that start at 0 where the model has them and they did not, and the lr sweep."""
    tries = [f"a lower lr (lr={config['lr'] / 2:g})"]
    if config["model"].get("residual_init") == "default":
        tries.append("residual branches that start at 0 (model.residual_init=zero)")
    # The preset's grid is relative to the setup's lr, so the run's own setup= goes with it.
    tries.append(f"the lr grid 'normbench train -m experiment=lr_sweep norm="
                 f"{config['norm']['name']}' (plus this run's setup=, if any)")
    return "Try " + ", ".join(tries[:-1]) + " or " + tries[-1]


def lost_rank_line(exp: Experiment, error: BaseException) -> str:
    """One line for a run whose other processes are gone (or silent past the timeout)."""
    # gloo's message starts with its source location; the first sentence says what happened
    cause = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(error).split())).split(". ")[0][:160]
    saved = exp.summary.get("checkpoint")
    if saved is None and not distributed.is_main():  # rank 0 saves; the newest one it wrote
        newest = ckpt.list_checkpoints(exp.tracker.run_dir)
        saved = str(newest[0]) if newest else None
    where = f"the last checkpoint, {saved}" if saved else "its last checkpoint, if any"
    return (f"process {distributed.rank()} of {distributed.world()} lost the others after "
            f"step {exp.step} ({type(error).__name__}: {cause}). Fix: the first failing "
            f"process's output says why; rerun with resume=auto to continue from {where}")


def record_for_lost_main(exp: Experiment) -> None:
    """On a rank > 0 that lost the others: if rank 0 is the one gone, nobody else would
    mark summary.json failed, and it would say `running` for good. The first survivor to
    find that rank 0 has not recorded the failure within the grace period does it, and
    only while the file still says `running` (a rank 0 that failed on its own wrote it)."""
    if not distributed.records_failure_for_main():
        return
    newest = ckpt.list_checkpoints(exp.tracker.run_dir)
    update = {key: exp.summary[key] for key in ("status", "error", "steps", "elapsed_s")}
    if newest:
        update["checkpoint"] = str(newest[0])
    mark_failed(exp.tracker.run_dir, update)


def train_step(exp: Experiment, step: int, log_now: bool) -> tuple[int, float]:
    """One optimizer step; returns the batch size and the learning rate the step used."""
    batch = exp.prepare(next(exp.loader))
    probed = log_now and exp.probes.enabled
    why = exp.why.due(step) if log_now else frozenset()  # the why-probes due at this step
    exp.why.start(why)
    with exp.probes.watch_forward(probed), exp.why.watch_forward(why), exp.autocast(), \
            synchronized():
        logits = forward(exp.train_module(probed or bool(why)), batch)
    loss, correct, count = loss_and_counts(logits, batch)
    exp.optimizer.zero_grad(set_to_none=True)
    exp.scaler.scale(exp.objective(loss, count)).backward()  # DDP averages over the ranks
    exp.scaler.unscale_(exp.optimizer)  # the true gradients, for the norm and the probes
    # On logging steps the probes compute every parameter's gradient norm and the global
    # one from them: the guard watches that same tensor rather than a second computation.
    norm = exp.probes.record_grads() if log_now else None
    if norm is None:  # not a logging step, or no probes (off, or not this rank's job)
        norm = grad_norm(exp.params)
    if exp.scaler.is_enabled():  # fp16: an overflow is the scaler's to skip, not a divergence
        norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
    exp.watch.observe(step, loss, norm)
    step_lr = exp.optimizer.param_groups[0]["lr"]  # this step's rate, before the schedule moves on
    exp.why.before_step(why, batch, step, step_lr)
    with exp.probes.watch_step(log_now):
        exp.scaler.step(exp.optimizer)
    exp.why.after_step(why, batch)
    exp.scaler.update()
    exp.scheduler.step()
    exp.running.add(loss, correct, count)
    exp.step = step
    return batch.size * distributed.world(), step_lr


def log_step(exp: Experiment, step: int, step_lr: float, batch_size: int) -> float:
    """Write the running means, the probes and the throughput; returns the training loss."""
    distributed.sum_([exp.running.loss, exp.running.correct, exp.running.count])  # every rank's
    exp.probes.add("train/loss", exp.running.means()[0])
    exp.probes.add("train/acc", exp.running.means()[1])
    values = exp.probes.flush()  # the one host sync of this logging step
    exp.running.reset()
    values["train/lr"] = step_lr
    if exp.data.info.kind == "text":  # bits per character (token), from the same running mean
        values.update(text_metrics(values["train/loss"], exp.data.info.unit, "train"))
    values["perf/samples_per_sec"] = exp.throughput.rate(step, batch_size)
    why = exp.why.take()
    values.update(why)
    exp.summary["final"].update({tag.replace("/", "_"): why[tag] for tag in WHY_FINAL if tag in why})
    exp.tracker.scalars(values, step)
    exp.tracker.histograms(exp.probes.take_histograms(), step)
    exp.summary["final"]["train_loss"] = values["train/loss"]
    return values["train/loss"]


def evaluate_step(exp: Experiment, step: int) -> str:
    """Validation metrics (and, for BN models with probes, the train/eval discrepancy);
    returns the line the terminal shows. Under several processes the ranks' running
    statistics are averaged first, and rank 0 evaluates alone (the others return ""), except
    on a streamed folder's val/, which every rank reads a stride of."""
    agree_buffers(exp, step)
    sharded = distributed.active() and getattr(exp.data, "shards_itself", False)
    if not distributed.is_main() and not sharded:
        return ""
    config = exp.config
    exp.model.eval()
    start = time.perf_counter()
    with exp.autocast():
        exp.last_val = evaluate(exp.eval_model, exp.data, config["eval_batch_size"], shard=(
            distributed.rank(), distributed.world(), distributed.sum_) if sharded else None)
    exp.model.train()
    if not distributed.is_main():
        return ""
    exp.tracker.scalars({"perf/eval_seconds": time.perf_counter() - start}, step)
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


def save_step(exp: Experiment, step: int, scheduled: bool = True) -> Path | None:
    """A checkpoint of `step`, written by rank 0 (None on the other ranks).

    `scheduled=False`: a checkpoint no uninterrupted run writes (a stop signal's). Its model
    holds the averaged running statistics like any other, but the live ones stay as they
    are and each rank's own are saved beside them: averaging them here would change the
    rounding of every later update, and the resumed run's val_loss would differ from the
    uninterrupted run's in the 7th digit."""
    if scheduled or exp.buffers_agreed == step or not distributed.active():
        agree_buffers(exp, step)
        state = checkpoint_state(exp)
    else:
        own = {name: b.clone() for name, b in exp.model.named_buffers()}
        distributed.average_buffers(exp.model)
        try:
            state = checkpoint_state(exp, own_buffers=own)
        finally:
            live = dict(exp.model.named_buffers())
            with torch.no_grad():
                for name, value in own.items():
                    live[name].copy_(value)
    if state is None:
        return None
    path = ckpt.save_checkpoint(exp.tracker.run_dir, step, state, exp.config["keep_checkpoints"])
    exp.tracker.writer.flush()  # the event files match the checkpoint
    return path


def agree_buffers(exp: Experiment, step: int) -> None:
    """Average the ranks' running statistics, once per step that evaluates or saves on
    schedule. Every run does it at the same steps, so a resumed run matches an uninterrupted
    one (a stop signal's checkpoint leaves them as they are: `save_step`)."""
    if exp.buffers_agreed != step:
        distributed.average_buffers(exp.model)
        exp.buffers_agreed = step


def finish(exp: Experiment, status: str, elapsed: float) -> None:
    """The final summary.json, the terminal table and the end-of-run warnings."""
    exp.summary.update(status=status, steps=exp.step, elapsed_s=round(elapsed, 2))
    if hasattr(exp.data, "facts"):  # a streamed folder's unreadable files, as of now
        exp.summary.update(exp.data.facts())
    if hasattr(exp.loader, "skipped_draws"):  # and the training samples they cost
        exp.summary["skipped_draws"] = exp.loader.skipped_draws
    exp.summary["final"].update({k.replace("/", "_"): v for k, v in exp.last_val.items()})
    exp.tracker.write_summary(exp.summary)
    exp.tracker.close()
    exp.tracker.print_summary(exp.summary)
    layers = exp.probes.degenerate_layers()
    if layers:  # BN outputs beta there, in training and (so) in eval
        shown = ", ".join(layers[:6]) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
        warn(f"BatchNorm channels with no batch variance (normalized to their shift) in {shown}; "
             "bn_gap/degenerate/<layer> counts them")
    if status == "diverged" and exp.tracker.writes:  # the run's last line: what to try
        exp.tracker.console.print(f"[red]diverged[/red]: non-finite loss or gradient norm at "
                                  f"step {exp.summary['diverged_at_step']}. "
                                  f"{divergence_hint(exp.config)}", soft_wrap=True)
