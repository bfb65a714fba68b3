"""Why normalization helps: the loss landscape, internal covariate shift, curvature and
cross-sample similarity, measured during training (the `why.*` options; docs/why.md).

Each probe is off (`every: 0`) or runs on every N-th logging step and on the last step:

- ``landscape/{loss_range,grad_change,beta_smoothness,loss,grad_norm}``: the training batch's
  loss and gradient along its gradient at step sizes lr * `lr_factors` (Santurkar et al.
  2018, App. A; `normbench.probes.landscape`), before the optimizer's step;
- ``ics/{l2,cos}/<weight>``, ``ics/mean/{l2,cos}``: internal covariate shift (Santurkar Def.
  2.1; `normbench.probes.ics`): the training batch's gradient of a weight before and after
  the earlier layers took the optimizer's actual step;
- ``hessian/{lambda_max,trace,trace_stderr}``: curvature on a fixed batch drawn once from
  the training set (PyHessian, Yao et al. 2020; `normbench.probes.hessian`), with BN in eval
  mode (running statistics, PyHessian's choice) or in train mode (the batch's own
  statistics: `bn_mode`); ``hessian/two_over_lr``: 2 / lr, the edge of stability under
  plain gradient descent (Cohen et al. 2021);
- ``act/similarity/<layer>``, ``act/similarity_{mean,max}``: the mean cosine similarity of
  different samples at each norm layer's output in the training forward (Lubana et al.
  2021; `normbench.probes.similarity`).

All run in fp32 (no autocast), on the model itself (not its DDP wrapper nor its compiled
graph), with attention on PyTorch's math kernel (the fused ones have no second derivative),
on rank 0 alone. They never change the training: the parameters get back their exact
values, the gradients are never accumulated into `.grad`, every buffer (BN's running
statistics and counters, PowerNorm's nu), every module's train/eval mode and the RNG states
are restored, so a run with them on ends bit for bit where it ends with them off. The
landscape and ICS forwards see the training forward's own state: the buffers and RNG as
they were just before it (the same dropout masks, Batch Renorm's same r and d).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from normbench.engine.evaluation import batch_statistics, forward, loss_and_counts
from normbench.errors import UserError
from normbench.probes.hessian import curvature
from normbench.probes.ics import internal_covariate_shift, parameter_order
from normbench.probes.landscape import landscape
from normbench.probes.similarity import SimilarityProbe

PROBES = ("landscape", "ics", "hessian", "similarity")
HESSIAN_SEED_OFFSET = 104729  # the fixed batch's own loader: the training stream is untouched
# summary.json's `final` keeps these (the last measured value); per-layer tags stay in TensorBoard.
FINAL = ("landscape/loss_range", "landscape/grad_change", "landscape/beta_smoothness",
         "landscape/loss", "landscape/grad_norm", "ics/mean/l2", "ics/mean/cos",
         "hessian/lambda_max", "hessian/trace", "hessian/trace_stderr",
         "act/similarity_mean", "act/similarity_max")


class ModelState:
    """A model's buffers (clones) and the RNG states, to put back later."""

    def __init__(self, model: nn.Module, devices: list[int]):
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.devices = devices
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in devices]

    def restore(self) -> None:
        with torch.no_grad():
            for live, saved in self.buffers:
                live.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        for d, state in zip(self.devices, self.cuda_rng, strict=True):
            torch.cuda.set_rng_state(state, d)


def cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})


@contextmanager
def isolated(model: nn.Module):
    """Whatever runs inside, the model's buffers, modes and the RNG states are as before."""
    state = ModelState(model, cuda_devices(model))
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield state
    finally:
        state.restore()
        for m, training in modes:
            m.training = training


def probe_kernels():
    """fp32 and PyTorch's math attention (twice differentiable) inside every probe."""
    return sdpa_kernel(SDPBackend.MATH)


def spread(items: list[str], count: int | None) -> list[str]:
    """`count` of `items` evenly spaced, the first and the last included (all if None)."""
    if count is None or count >= len(items):
        return list(items)
    if count == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


class WhyProbes:
    """The four probes of one run; the training step calls `start`, `watch_forward`,
    `before_step` and `after_step` on the logging steps a probe is due, `take` on logging."""

    def __init__(self, model: nn.Module, config: dict, data, steps: int, prepare,
                 enabled: bool = True):
        why = config["why"]
        self.model, self.data, self.prepare, self.steps = model, data, prepare, steps
        self.options = why
        self.every = {p: int(why[p]["every"]) if enabled else 0 for p in PROBES}
        self.log_every = int(config["log_every"])
        self.lr, self.seed = float(config["lr"]), int(config["seed"])
        self.similarity = SimilarityProbe(model)
        self._values: dict[str, float] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self._saved: ModelState | None = None
        self._before: dict[str, torch.Tensor] | None = None
        self._order: list[str] | None = None
        self.hessian_batch = None
        if self.every["hessian"]:
            self.hessian_batch = self._fixed_batch(config)
            self._check_second_derivatives(config)

    @property
    def enabled(self) -> bool:
        return any(self.every.values())

    def due(self, step: int) -> frozenset[str]:
        """The probes due at logging step `step`: every N-th logging step, and the last."""
        return frozenset(p for p, n in self.every.items()
                         if n and (step % (self.log_every * n) == 0 or step == self.steps))

    # -- the training step's hooks --------------------------------------------------------

    def start(self, due: frozenset[str]) -> None:
        """Just before the training forward: the state that forward starts from."""
        if due & {"landscape", "ics"}:
            self._saved = ModelState(self.model, cuda_devices(self.model))

    def watch_forward(self, due: frozenset[str]):
        return self.similarity.watch("similarity" in due)

    def before_step(self, due: frozenset[str], batch, step: int, step_lr: float) -> None:
        """After the backward pass, before the optimizer's step (the weights are theta)."""
        if "similarity" in due:
            self._values["perf/why_similarity_seconds"] = self.similarity.seconds
            self._tensors.update(self.similarity.take())
        if "landscape" in due:
            self._timed("landscape", lambda: self._landscape(batch))
        if "hessian" in due:
            self._timed("hessian", lambda: self._hessian(step, step_lr))
        if "ics" in due:
            with torch.no_grad():
                self._before = {n: p.detach().clone() for n, p in self._trained()}

    def after_step(self, due: frozenset[str], batch) -> None:
        """After the optimizer's step (the weights are theta')."""
        if "ics" in due:
            self._timed("ics", lambda: self._ics(batch))
        self._saved = self._before = None

    def take(self) -> dict[str, float]:
        """The values measured since the last call, as floats (one transfer for the tensors)."""
        values, self._values = self._values, {}
        if self._tensors:
            tags = list(self._tensors)
            host = torch.stack([self._tensors[t].float().reshape(()) for t in tags]).cpu().tolist()
            self._tensors = {}
            values.update(zip(tags, host, strict=True))
            layers = [v for t, v in values.items() if t.startswith("act/similarity/")]
            finite = [v for v in layers if math.isfinite(v)]
            values["act/similarity_mean"] = sum(finite) / len(finite) if finite else math.nan
            values["act/similarity_max"] = max(finite) if finite else math.nan
        return values

    # -- the probes -------------------------------------------------------------------------

    def _timed(self, probe: str, measure) -> None:
        start = time.perf_counter()
        with isolated(self.model), probe_kernels():
            self._values.update(measure())
        self._values[f"perf/why_{probe}_seconds"] = time.perf_counter() - start

    def _trained(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _loss_at(self, batch):
        """The training batch's loss at the model's current parameters, from the state the
        training forward started in (its buffers and RNG), in train mode and fp32."""
        saved = self._saved

        def loss_at() -> torch.Tensor:
            saved.restore()
            return loss_and_counts(forward(self.model, batch), batch)[0]

        return loss_at

    def _landscape(self, batch) -> dict[str, float]:
        etas = [self.lr * f for f in self.options["landscape"]["lr_factors"]]
        values = landscape(self._loss_at(batch), self._trained(), etas)
        return {f"landscape/{k}": v for k, v in values.items()}

    def _ics(self, batch) -> dict[str, float]:
        loss_at = self._loss_at(batch)
        if self._order is None:  # forward order of the parameters, found once
            self._order = parameter_order(self.model, loss_at)
        by_name = dict(self._trained())
        params = [(n, by_name[n]) for n in self._order if n in by_name]
        weights = [n for n, p in params if p.dim() >= 2]
        layers = spread(weights, self.options["ics"]["layers"])
        shifts = internal_covariate_shift(loss_at, params, self._before, layers)
        out = {}
        for layer, value in shifts.items():
            out[f"ics/l2/{layer}"], out[f"ics/cos/{layer}"] = value["l2"], value["cos"]
        for stat in ("l2", "cos"):
            finite = [v[stat] for v in shifts.values() if math.isfinite(v[stat])]
            out[f"ics/mean/{stat}"] = sum(finite) / len(finite) if finite else math.nan
        return out

    def _fixed_batch(self, config: dict):
        """The Hessian's batch: drawn once, from a loader of its own seeded from the run's
        seed (the same batch on resume), without moving any RNG of the training."""
        size = self.options["hessian"]["batch_size"] or config["batch_size"]
        with isolated(self.model):
            loader = self.data.train_loader(size, seed=self.seed + HESSIAN_SEED_OFFSET)
            return self.prepare(next(iter(loader)))

    def _check_second_derivatives(self, config: dict) -> None:
        """Refuse, before the run writes anything, a model with an operation PyTorch cannot
        differentiate twice (hardsigmoid, say): one Hessian-vector product on two samples."""
        batch = self.hessian_batch
        two = type(batch)(batch.x[:2], batch.y[:2], None if batch.mask is None else batch.mask[:2])
        params = [p for _, p in self._trained()]
        with isolated(self.model), probe_kernels():
            self.model.eval()
            loss = loss_and_counts(forward(self.model, two), two)[0]
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            used = [(g, p) for g, p in zip(grads, params, strict=True)
                    if g is not None and g.requires_grad]
            try:
                torch.autograd.grad([g for g, _ in used], [p for _, p in used],
                                    grad_outputs=[torch.ones_like(g) for g, _ in used],
                                    allow_unused=True)
            except RuntimeError as e:
                missing = str(e).split("\n")[0]
                model = config["model"]
                name = " ".join([f"model={model['name']}", *(
                    [f"model.arch={model['arch']}"] if model.get("arch") else [])])
                raise UserError(f"why.hessian needs second derivatives, which {name} does not "
                                f"have ({missing})", "turn it off with why.hessian.every=0 "
                                "(the other why-probes need first derivatives only)") from None

    def _hessian(self, step: int, step_lr: float) -> dict[str, float]:
        options = self.options["hessian"]
        if options["bn_mode"] == "eval":
            self.model.eval()
            mode = nullcontext()
        else:
            mode = batch_statistics(self.model)
        batch = self.hessian_batch
        with mode:
            loss = loss_and_counts(forward(self.model, batch), batch)[0]
            # the vectors depend on the run's seed and the step only: a resumed run draws the same
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            values = curvature(loss, [p for _, p in self._trained()], generator=generator,
                               trace_samples=options["trace_samples"],
                               max_hvps=options["max_hvps"], tol=options["tol"])
        out = {f"hessian/{k}": v for k, v in values.items() if k != "hvps"}
        out["hessian/hvps"] = float(values["hvps"])
        if step_lr > 0:
            out["hessian/two_over_lr"] = 2.0 / step_lr
        return out
