"""Everything one training run is made of, built from the resolved config: the data, the
model and its optimizer, the probes, the outputs, and (on resume) the checkpointed state.

`build` reads every key as `config[key]`: the config schema is the one place where
defaults live, so a missing key is a bug, not a reason to guess.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from torch import nn

from normbench.data import build_dataset
from normbench.engine import checkpoint as ckpt
from normbench.engine import distributed
from normbench.engine.dashboards import hparams_of, swept_names, write_dashboards
from normbench.engine.guard import DivergenceWatch
from normbench.engine.meters import RunningMeans, Throughput
from normbench.engine.optim import build_optimizer, build_scheduler, resolve_implementation
from normbench.engine.precision import autocast, grad_scaler, prepare_input, to_memory_format
from normbench.engine.tracking import Tracker, warn
from normbench.errors import UserError
from normbench.models import build_model
from normbench.norms import make_spec
from normbench.norms.counts import model_norm_counts
from normbench.probes.monitor import Probes
from normbench.probes.why import WhyProbes


def select_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here", "use device=auto or cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"device={name} but this machine has {torch.cuda.device_count()} GPU(s)",
                        f"use device=cuda or cuda:N with N below {torch.cuda.device_count()}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but Apple's MPS backend is not available here",
                        "use device=auto or cpu")
    if name == "cuda" and distributed.active():  # one GPU per process
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


@contextlib.contextmanager
def refused_when_too_large(what: str, device: torch.device, sizes: str, fix: str):
    """An allocation that fails (the in-memory images, a model's weights) becomes one line
    naming what did not fit and the options that size it, not an allocator's traceback."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "allocate" not in str(e):
            raise
        reason = " ".join(str(e).split())[:160]
        raise UserError(f"{what} does not fit in the memory of {device} ({sizes}: {reason})",
                        fix) from None


def load_data(dataset: dict, device: torch.device):
    """The dataset on the device (the in-memory datasets hold every image as one tensor)."""
    sizes = ", ".join(f"dataset.{k}={dataset[k]}" for k in ("n_train", "n_val", "image_size",
                                                           "seq_len") if dataset.get(k))
    with refused_when_too_large(f"dataset={dataset['name']}", device, sizes,
                                "lower dataset.n_train or dataset.image_size (the images are "
                                "held in memory as one tensor)"):
        return build_dataset(**dataset).to(device)


def build_model_within_memory(model: dict, norm, info, device: torch.device) -> nn.Module:
    """The model on the device."""
    # What sizes it: normbench's depth and width, or which model a builder makes and how.
    sizes = ", ".join(f"model.{k}={model[k]}" for k in ("depth", "width", "arch", "target",
                                                         "kwargs") if model.get(k))
    fix = ("use a smaller model.depth or model.width" if "depth" in model else
           "use a smaller model.arch, or model.kwargs that make it smaller" if "arch" in model
           else "make the model that model.target builds smaller (model.kwargs)")
    with refused_when_too_large(f"model={model['name']}", device, sizes, fix):
        return build_model(model, norm, info).to(device)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # cuDNN times the candidate convolution kernels once per input shape and keeps the
    # fastest: faster on GPUs, but the choice may differ from run to run.
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; read when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def total_steps(config: dict, steps_per_epoch: int) -> int:
    if config["epochs"]:
        return max(1, math.ceil(config["epochs"] * steps_per_epoch))
    return int(config["steps"])


@dataclass
class Experiment:
    """One run's objects and the loop's position in it (`step`: the last step done)."""

    config: dict
    device: torch.device
    data: object
    model: nn.Module
    loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    probes: Probes
    watch: DivergenceWatch
    running: RunningMeans
    tracker: Tracker
    summary: dict
    steps: int
    scaler: torch.amp.GradScaler
    runner: nn.Module  # what the training forward calls: the model, in DDP, compiled
    eager: nn.Module  # the runner before compilation (the same module without compile=true)
    step: int = 0
    last_val: dict[str, float] = field(default_factory=dict)
    buffers_agreed: int = -1  # the last step at which the ranks' running statistics were averaged
    throughput: Throughput = field(default_factory=lambda: Throughput(0))
    why: WhyProbes | None = None  # the why-probes (built once the Experiment can prepare batches)

    @functools.cached_property
    def params(self) -> list[nn.Parameter]:
        """The trained parameters (listed once: the loop reads them every step)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def parts(self) -> dict:
        """The objects whose state_dicts make up a checkpoint (see `normbench.engine.checkpoint`)."""
        parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "loader": self.loader, "divergence": self.watch, "running": self.running,
                 "probes": self.probes}
        if self.scaler.is_enabled():  # fp16: the loss scale the next steps start from
            parts["scaler"] = self.scaler
        return parts

    def objective(self, loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """What the backward pass differentiates: the loss, or under several processes this
        rank's share of the global batch's mean loss (`distributed.RankShard.loss_share`)."""
        share = getattr(self.loader, "loss_share", None)
        return loss if share is None else share(loss, count)

    def train_module(self, probed: bool) -> nn.Module:
        """What a training forward calls. On the steps the probes watch, a compiled model
        runs eagerly (same parameters and buffers): the probes' hooks exist for that one
        forward only, and a compiled graph does not run hooks added after it was traced."""
        return self.eager if probed else self.runner

    @property
    def eval_model(self) -> nn.Module:
        """What evaluations call: the compiled model in one process, the model itself under
        DDP (rank 0 evaluates alone, outside DDP)."""
        return self.model if distributed.active() else self.runner

    def autocast(self):
        """The precision the forward passes run in."""
        return autocast(self.device, self.config["precision"])

    def prepare(self, batch):
        """A batch in the model's memory format."""
        if not self.config["channels_last"] or batch.x.dim() != 4:
            return batch
        return type(batch)(prepare_input(batch.x, True), batch.y, batch.mask)

    def due(self, every_key: str, step: int) -> bool:
        """Whether `step` is one of the config's every-N steps (always the last one; N = 0:
        only the last)."""
        every = int(self.config[every_key])
        return (every > 0 and step % every == 0) or step == self.steps


def build(config: dict, run_dir: Path, console: Console, live: bool) -> Experiment:
    """Set up one run; on resume, continue from the newest readable checkpoint.

    Everything that can refuse the run (the device, the data, the model, a checkpoint that
    does not fit) happens before the first byte is written: a refused command leaves the run
    folder, and a finished run in it, exactly as they were. `Experiment.tracker.started`
    says whether the run began writing."""
    device = select_device(config["device"])
    if config["threads"]:
        torch.set_num_threads(int(config["threads"]))
    seed_everything(config["seed"], config["deterministic"])

    with distributed.main_first():  # a download or cache is written once, by rank 0
        data = load_data(config["dataset"], device)
    norm = make_spec(**config["norm"])
    model = to_memory_format(build_model_within_memory(config["model"], norm, data.info, device),
                             config["channels_last"])
    loader = distributed.train_loader(data, config["batch_size"], config["seed"],
                                      config["overfit_batches"])
    steps = total_steps(config, loader.steps_per_epoch)
    optimizer = build_optimizer(model, config["lr"], **config["optim"])
    resumed = ckpt.resume_point(run_dir, config["resume"], warn)
    tracker = Tracker(run_dir, console=console, live=live, writes=distributed.is_main())
    eager = distributed.wrap(model, device)
    exp = Experiment(
        config=config, device=device, data=data, model=model, loader=loader,
        optimizer=optimizer, scheduler=build_scheduler(optimizer, steps, **config["sched"]),
        # Probes read rank 0's layers: per-device statistics, as each device normalizes.
        probes=Probes(model, enabled=config["probes"] and distributed.is_main(),
                      hist_every=config["hist_every"]),
        watch=DivergenceWatch(device), running=RunningMeans(device), tracker=tracker,
        summary=initial_summary(config, run_dir, norm, model, data, steps, device), steps=steps,
        scaler=grad_scaler(device, config["precision"]),
        runner=torch.compile(eager) if config["compile"] else eager, eager=eager)
    # Rank 0's model alone, outside DDP: no other rank takes part in the extra passes.
    exp.why = WhyProbes(model, config, data, steps, exp.prepare, enabled=distributed.is_main())
    distributed.seed_rank(config["seed"])
    if resumed:
        resume(exp, *resumed)  # last: it sets the RNG states the next steps draw from
    return exp


def start_writing(exp: Experiment) -> None:
    """The run's first writes: its folder, event file, config.json, summary.json and the
    TensorBoard layout. On resume, TensorBoard drops the events logged after the checkpoint
    (one continuous curve), and summary.json keeps the previous final metrics."""
    resumed = "resumed_from_step" in exp.summary
    exp.tracker.start(purge_step=exp.step + 1 if resumed else None)
    exp.tracker.write_config(exp.config)
    exp.tracker.write_summary(exp.summary)
    write_dashboards(exp.tracker.writer, hparams_of(exp.summary, exp.config),
                     has_bn=bool(exp.probes.bn_layers), has_norm=bool(exp.probes.norm_layers),
                     has_saturation=bool(exp.probes.saturating), swept=swept_names(exp.config),
                     why=frozenset(p for p, every in exp.why.every.items() if every))


def initial_summary(config: dict, run_dir: Path, norm, model: nn.Module, data, steps: int,
                    device: torch.device) -> dict:
    world = distributed.world()
    return {
        "run_name": config["run_name"] or Path(run_dir).name,
        "dataset": config["dataset"]["name"], "model": config["model"]["name"],
        # Which model of a family built elsewhere (model.arch; a custom model's target).
        "arch": config["model"].get("arch") or config["model"].get("target"),
        # How the residual branches started (model.residual_init; None: a model without the
        # option: the LSTM, and models built elsewhere, whose builders start them their way).
        "residual_init": config["model"].get("residual_init"),
        "norm": norm.name, "batch_size": config["batch_size"], "lr": config["lr"],
        # Processes, and the batch the optimizer sees (batch_size is per device).
        "world_size": world, "global_batch": config["batch_size"] * world,
        # Samples whose statistics BatchNorm shares (None: the norm uses no batch statistics).
        "stats_batch": ((config["batch_size"] * world if norm.sync
                         else norm.stats_batch or config["batch_size"])
                        if "stats_batch" in config["norm"] else None),
        # GroupNorm's setting: whichever of the two was in effect (the other is None).
        "num_groups": config["norm"].get("num_groups"),
        "group_size": config["norm"].get("group_size"),
        "seed": config["seed"], "steps": 0, "total_steps": steps, "device": str(device),
        "precision": config["precision"], "channels_last": config["channels_last"],
        "compile": config["compile"],
        "optim_implementation": resolve_implementation(config["optim"]["implementation"], device),
        # The sizes actually used: images, or text rows (training windows for a text stream).
        "n_train": data.n_train, "n_val": data.n_val,
        # Text: the unit, what a row is, the vocabulary size (words: <unk>'s share).
        **(data.facts() if hasattr(data, "facts") else {}),
        "n_params": sum(p.numel() for p in model.parameters()),
        **model_norm_counts(model),  # learned and kept-for-inference numbers in norm layers
        "status": "running",
        "final": {},
    }


def resume(exp: Experiment, state: dict, path: Path) -> None:
    """Put `exp` where the checkpoint `state` (read from `path`) left the run."""
    saved_world = state.get("world_size", 1)
    if saved_world != distributed.world():
        raise UserError(f"the checkpoint {path} was written by {saved_world} process(es) and "
                        f"this run has {distributed.world()}: the data shards, batch and "
                        "per-process random states would not continue",
                        f"resume with {saved_world} process(es) (torchrun --nproc_per_node="
                        f"{saved_world}), batch_size per device unchanged")
    threads = adopt_thread_count(exp.config, state["threads"])
    changed = [key for key in ckpt.config_changes(state["config"], exp.config)
               if key != "threads" or not threads]
    try:
        ckpt.restore(state, exp.parts(), path)
    except UserError:
        if not changed:
            raise
        saved = ", ".join(_settings(state["config"], changed))
        now = ", ".join(_settings(exp.config, changed))
        raise UserError(f"the checkpoint {path} was saved with {saved} and does not fit this "
                        f"configuration ({now})", f"resume with {saved} (the run's .hydra/"
                        "overrides.yaml has its command), or start a new run in another "
                        "hydra.run.dir") from None
    if state["step"] > exp.steps:
        saved_step = state["step"]
        raise UserError(f"the checkpoint {path} is at step {saved_step}, past this run's "
                        f"{exp.steps} steps", f"resume with at least {saved_step} steps (the "
                        "steps= or epochs= of the run it continues), or start a new run")
    if changed:  # after the restore: a checkpoint that does not fit is one error line alone
        warn(f"resuming with a config that differs from the checkpoint's in "
             f"{', '.join(changed)}: the run will not match an uninterrupted one")
    if "ranks" in state:  # each rank continues its own random stream and running sums
        own = state["ranks"][distributed.rank()]
        exp.running.load_state_dict(own["running"])
        ckpt.set_rng_state(own["rng"])
        if "buffers" in own:  # a stop signal's checkpoint: this rank's running statistics
            buffers = dict(exp.model.named_buffers())
            with torch.no_grad():
                for name, value in own["buffers"].items():
                    buffers[name].copy_(value)
    exp.step = state["step"]
    exp.throughput = Throughput(exp.step)
    exp.last_val = state["last_val"]
    # Until this run has newer numbers, summary.json keeps the ones the checkpoint had.
    exp.summary["final"].update(state["final"])
    exp.summary["final"].update({k.replace("/", "_"): v for k, v in exp.last_val.items()})
    exp.summary["steps"] = exp.step
    exp.summary["resumed_from_step"] = exp.step
    exp.tracker.console.print(f"resuming from {path} (step {exp.step}/{exp.steps})")


def _settings(config: dict, keys: list[str]) -> list[str]:
    """`key=value` for the changed keys; where a group's option changed (norm=group for
    norm=batch), `group=option` for those groups alone: the likely misfit."""
    def lookup(dotted: str):
        value = config
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return "null" if value is None else value

    groups = sorted(key.rsplit(".", 1)[0] for key in keys if key.endswith(".name"))
    if groups:
        return [f"{group}={lookup(group + '.name')}" for group in groups]
    return [f"{key}={lookup(key)}" for key in keys if key != "run_name"]


def adopt_thread_count(config: dict, saved: int) -> bool:
    """With threads=null, continue with the CPU thread count the checkpointed run used (a
    sweep job runs with its share of the cores, resumed alone it would get them all): CPU
    reductions split their work by thread, so another count rounds differently and the
    resumed run would drift from the uninterrupted one. True if the count was adopted."""
    if config["threads"] is not None:
        return False
    if torch.get_num_threads() != saved:
        torch.set_num_threads(saved)
    return True


def checkpoint_state(exp: Experiment, own_buffers: dict | None = None) -> dict | None:
    """What `resume` needs besides the parts: the loop's own values, the config, and the
    CPU thread count the steps ran with. Under several processes, also what differs between
    them (random states, running loss sums and, given `own_buffers`, the rank's running
    statistics where they were not averaged), gathered on rank 0; None on the other ranks."""
    ranks = None
    if distributed.active():
        own = {"rng": ckpt.rng_state(), "running": exp.running.state_dict()}
        if own_buffers is not None:
            own["buffers"] = own_buffers
        ranks = distributed.gather_to_main(own)
        if not distributed.is_main():
            return None
    extra = {"ranks": ranks, "world_size": distributed.world()} if ranks else {}
    return ckpt.capture(exp.parts(), final=dict(exp.summary["final"]),
                        last_val=dict(exp.last_val), config=exp.config,
                        threads=torch.get_num_threads(), **extra)
