"""Measurements of what normalization does during training, taken only on logging steps.

Every probe reduces on the device and leaves a small tensor behind; `flush()` moves all of
them to the host in one transfer. On the steps in between no hook is attached and nothing
is computed. Tag families:

- ``bn_gap/{dmu,dvar,tid_mu,tid_sigma}/<layer>``: this batch's running-update target (its
  valid groups, by real counts: `norms.stats.update_target`) vs the running statistics of each
  BatchNorm layer, read before this step's update; ``bn_gap/{mean,max}/<stat>`` over layers.
  Any norm with running statistics counts as BatchNorm here (`norms.stats.RunningStats`:
  PowerNorm's psi^2, with no mean and so no ``dmu`` or ``tid_mu``).
- ``bn_gap/degenerate/<layer>``: channels whose training batch variance is negligible
  (<= 1e-4 eps: BN outputs beta there); `Probes.degenerate_layers()` names the layers.
- ``act/{in,out}_{mean,std}/<layer>``: input and output of every norm layer (the input's
  moments pooled over all real entries, between groups too under ghost BN);
  ``act/out_p{15,50,85}/<layer>``: percentiles of its output (Ioffe & Szegedy 2015, Fig. 1);
  ``act/saturation/<module>``: share of saturated tanh/sigmoid outputs.
- ``grad/norm/<param>``, ``grad/global_norm``; ``grad/kurtosis/<weight>`` (excess
  kurtosis of the gradient entries: 0 for a Gaussian, > 0 for heavier tails);
  histograms ``grad/hist/<weight>`` every `hist_every` logging steps.
- ``update/<weight>``: log10(std(ΔW) / std(W)), ΔW the optimizer's actual step.

A module that runs several times in one forward (a recurrent cell) reports the mean of its
per-call values over the calls that had something to measure: a BatchNorm call without a
valid group (a time step whose groups all have < 2 real rows) adds nothing to the gaps,
a call without real entries nothing to ``act/``; a layer with no such call in a logging
step gets no value at all.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from normbench.norms.registry import Norm
from normbench.norms.stats import batch_moments, bn_gap_values, is_batchnorm, pooled_stats

PERCENTILES = (15, 50, 85)
# Percentiles from ~2^14 entries of a layer's output: cheap to sort (the whole batch would cost
# more than the step's convolutions), and the 15th percentile's sampling error is ~0.3 points.
PERCENTILE_SAMPLE = 1 << 14
HIST_BINS = 50
TANH_SATURATED = 0.97
SIGMOID_BAND = (0.03, 0.97)
DEGENERATE = "bn_gap/degenerate/"
NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorm-like layers by their path in the model, found by type (norm-agnostic loop)."""
    return {name: m for name, m in model.named_modules() if is_batchnorm(m)}


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every normalization layer by path, found by type: a registered norm that says it is
    measured (not norm=none's identity, not a per-step container), or a torch norm layer."""
    return {name: m for name, m in model.named_modules()
            if (m.probed if isinstance(m, Norm) else isinstance(m, NORM_TYPES))}


def saturating_units(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Tanh, nn.Sigmoid))}


def token_mask(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The (N,T) padding mask a token layer was called with, if any."""
    mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
    if not isinstance(mask, torch.Tensor) or mask.shape != x.shape[:-1]:
        return None
    return mask


def activation_stats(x: torch.Tensor, mask: torch.Tensor | None = None,
                     percentiles: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """[mean, std, *percentiles] of the entries of `x` (biased std), padding excluded.

    Without padding, mean and std come from a sum and a sum of squares (two fast passes,
    no temporary; half the time of std_mean on CPU). Padding is set to NaN and skipped by
    nan-aware reductions rather than removed by boolean indexing, which would wait on the
    host for the number of real tokens. Percentiles are taken on a strided sample of
    about PERCENTILE_SAMPLE entries.
    """
    x = x.detach().float()
    if mask is None:
        n = x.numel()
        mean = x.sum() / n
        std = (torch.linalg.vector_norm(x).square() / n - mean.square()).clamp(min=0).sqrt()
    else:
        x = x.masked_fill(~mask.bool().unsqueeze(-1), float("nan"))
        mean = x.nanmean()
        std = (x - mean).square().nanmean().sqrt()
    out = [mean, std]
    if percentiles:
        flat = x.reshape(-1)
        # An odd stride is coprime with the power-of-two strides of channels and positions,
        # so the sample visits every channel rather than one.
        stride = max(1, flat.numel() // PERCENTILE_SAMPLE) | 1
        sample = flat[::stride].contiguous()
        q = torch.tensor([p / 100 for p in percentiles], device=x.device)
        quantile = torch.quantile if mask is None else torch.nanquantile
        out.extend(quantile(sample, q).unbind())
    return out


def excess_kurtosis(g: torch.Tensor) -> torch.Tensor:
    """E[(g - mean)^4] / Var(g)^2 - 3 over all entries: 0 for a Gaussian; NaN if constant.

    One temporary, squared in place twice: no flattening (a channels_last gradient would be
    copied) and no pow(4). On CPU each large temporary costs fresh pages: with three of them
    the probe took ~60 ms of each logging step for ResNet-18's 11M weights on one core,
    against ~18 ms now."""
    g = g.detach().float()
    d = g - g.mean()
    m2 = d.square_().mean()  # d holds the squared deviations from here on
    return d.square_().mean() / m2.square() - 3


def update_ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """log10(std(after - before) / std(before)): the size of a step relative to the weights."""
    return torch.log10(torch.std(after - before) / torch.std(before))


@dataclass
class Histogram:
    """What TensorBoard's add_histogram_raw needs, host-side."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


def _histogram_parts(g: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """[min, max, num, sum, sum_squares, counts...] as one device vector.

    histc needs its range as Python numbers, which would mean a host sync per tensor; the
    entries are mapped onto [0, 1] on the device instead, and the bucket limits rebuilt
    from min and max after the single transfer.
    """
    g = g.detach().float().reshape(-1)
    lo, hi = g.min(), g.max()
    u = (g - lo) / (hi - lo).clamp(min=torch.finfo(torch.float32).tiny)
    counts = torch.histc(u, bins=bins, min=0.0, max=1.0)
    head = torch.stack([lo, hi, torch.tensor(float(g.numel()), device=g.device), g.sum(),
                        g.square().sum()])
    return torch.cat([head, counts])


def _histogram_from(parts: list[float]) -> Histogram:
    lo, hi, num, total, squares, *counts = parts
    width = (hi - lo) / len(counts)
    limits = [lo + width * (i + 1) for i in range(len(counts))]
    limits[-1] = hi
    return Histogram(lo, hi, int(num), total, squares, limits, counts)


class Probes:
    """The training-step probes of one model.

    `enabled=False` turns every probe into a no-op (the loop still calls them), so that a
    run can measure what the probes cost. Histograms are taken on every `hist_every`-th
    logging step.
    """

    def __init__(self, model: nn.Module, enabled: bool = True, hist_every: int = 10):
        self.model = model
        self.enabled = enabled
        self.hist_every = max(1, int(hist_every))
        self.bn_layers = batchnorm_layers(model)
        self.norm_layers = norm_layers(model)
        self.saturating = saturating_units(model)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # Weight matrices and kernels: the "layers" for kurtosis, histograms and update
        # ratios (a norm's scale starts constant, so std(W) = 0 there).
        self.weights = {n: p for n, p in self.params.items() if p.dim() >= 2}
        self._pending: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] = {}
        self._degenerate: set[str] = set()
        self._hist_pending: dict[str, torch.Tensor] = {}
        self._histograms: dict[str, Histogram] = {}
        self._log_count = 0
        self._moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._before: list[torch.Tensor] | None = None

    # -- forward: BN statistics, activations, saturation ---------------------------------

    @contextmanager
    def watch_forward(self, active: bool):
        """Within this block, a training forward records BN gaps, TID, activation statistics
        and saturation. Hooks exist only inside the block, and only when `active`.

        BN pre-hooks run before the layer updates its running statistics, so the gaps
        compare this batch with the running statistics *before* it: the gap a layer
        would see in eval right now.
        """
        if not (active and self.enabled):
            yield
            return
        handles = [m.register_forward_pre_hook(self._bn_hook(name), with_kwargs=True)
                   for name, m in self.bn_layers.items()]
        handles += [m.register_forward_hook(self._norm_hook(name), with_kwargs=True)
                    for name, m in self.norm_layers.items()]
        handles += [m.register_forward_hook(self._saturation_hook(name, isinstance(m, nn.Tanh)))
                    for name, m in self.saturating.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _accumulate(self, tag: str, value: torch.Tensor,
                    weight: torch.Tensor | float = 1.0) -> None:
        """Add one call's value with a weight (0: the call had nothing to measure; its value
        may be NaN and is dropped on the device, without a host sync)."""
        if isinstance(weight, torch.Tensor):
            weight = weight.to(torch.float32)
        else:  # a fill on the device, not a host-to-device copy
            weight = torch.full((), float(weight), device=value.device)
        term = torch.where(weight > 0, value.float() * weight, torch.zeros_like(weight))
        if tag in self._sums:
            self._sums[tag] = self._sums[tag] + term
            self._weights[tag] = self._weights[tag] + weight
        else:
            self._sums[tag], self._weights[tag] = term, weight

    def _bn_hook(self, name: str):
        def hook(module, args, kwargs):
            if not module.training:
                return
            x = args[0].detach()
            mask = token_mask(x, args, kwargs)
            with torch.no_grad():
                self._moments[name] = batch_moments(module, x, mask)
                for stat, (value, weight) in bn_gap_values(module, x, mask).items():
                    self._accumulate(f"bn_gap/{stat}/{name}", value, weight)

        return hook

    def _norm_hook(self, name: str):
        def hook(module, args, kwargs, output):
            x = args[0]
            mask = token_mask(x, args, kwargs)
            moments = self._moments.pop(name, None)
            with torch.no_grad():
                in_mean, in_std = (pooled_stats(*moments[:2]) if moments is not None
                                   else activation_stats(x, mask))
                out = activation_stats(output, mask, PERCENTILES)
                real = 1.0 if mask is None else mask.any()
            values = {"in_mean": in_mean, "in_std": in_std, "out_mean": out[0], "out_std": out[1]}
            values.update({f"out_p{p}": v for p, v in zip(PERCENTILES, out[2:], strict=True)})
            for stat, value in values.items():
                self._accumulate(f"act/{stat}/{name}", value, real)

        return hook

    def _saturation_hook(self, name: str, tanh: bool):
        def hook(module, args, output):
            with torch.no_grad():
                y = output.detach()
                if tanh:
                    saturated = y.abs() > TANH_SATURATED
                else:
                    saturated = (y < SIGMOID_BAND[0]) | (y > SIGMOID_BAND[1])
                self._accumulate(f"act/saturation/{name}", saturated.float().mean())

        return hook

    # -- backward: gradients ----------------------------------------------------------------

    def record_grads(self) -> torch.Tensor | None:
        """Gradient norms per parameter and overall, kurtosis per weight, and (every
        `hist_every`-th logging step) histograms. Returns the global norm (0-d tensor)."""
        if not self.enabled:
            return None
        named = [(n, p.grad) for n, p in self.params.items() if p.grad is not None]
        if not named:
            return None
        norms = torch._foreach_norm([g for _, g in named])
        for (name, _), norm in zip(named, norms, strict=True):
            self._pending[f"grad/norm/{name}"] = norm
        total = torch.linalg.vector_norm(torch.stack(norms))
        self._pending["grad/global_norm"] = total
        with_hist = self._log_count % self.hist_every == 0
        for name, p in self.weights.items():
            if p.grad is None:
                continue
            self._pending[f"grad/kurtosis/{name}"] = excess_kurtosis(p.grad)
            if with_hist:
                self._hist_pending[f"grad/hist/{name}"] = _histogram_parts(p.grad)
        return total

    # -- optimizer step: update:data ratios ---------------------------------------------------

    @contextmanager
    def watch_step(self, active: bool):
        """Around `optimizer.step()`: on logging steps, record log10(std(ΔW)/std(W)) per
        weight from a snapshot taken just before the step (ΔW is what the optimizer did,
        momentum, weight decay and all)."""
        if not (active and self.enabled and self.weights):
            yield
            return
        names = list(self.weights)
        with torch.no_grad():
            before = [p.detach().clone() for p in self.weights.values()]
        yield
        with torch.no_grad():
            for name, old in zip(names, before, strict=True):
                self._pending[f"update/{name}"] = update_ratio(old, self.weights[name])

    # -- hand-off -----------------------------------------------------------------------------

    def add(self, tag: str, value: torch.Tensor) -> None:
        self._pending[tag] = value

    def flush(self) -> dict[str, float]:
        """All pending values as floats, with one device-to-host transfer.

        Histograms taken since the last flush travel in the same transfer; collect them
        with `take_histograms()`. Means and maxima over layers are added host-side.
        """
        self._log_count += 1
        averaged = list(self._sums)
        for tag in averaged:
            self._pending[tag] = self._sums[tag] / self._weights[tag].clamp(min=1e-30)
        weights = [self._weights[t] for t in averaged]
        self._sums.clear()
        self._weights.clear()
        if not self._pending and not self._hist_pending:
            return {}
        tags = list(self._pending)
        parts = [self._pending[t].detach().float().reshape(1) for t in tags]
        parts += [w.reshape(1) for w in weights]
        hist_tags = list(self._hist_pending)
        parts += [self._hist_pending[t].float() for t in hist_tags]
        host = torch.cat(parts).cpu().tolist()  # the one transfer
        self._pending.clear()
        self._hist_pending.clear()
        values = dict(zip(tags, host[:len(tags)], strict=True))
        offset = len(tags)
        for tag, weight in zip(averaged, host[offset:offset + len(averaged)], strict=True):
            if weight == 0:  # no call of this layer had anything to measure
                del values[tag]
        offset += len(averaged)
        for tag in hist_tags:
            self._histograms[tag] = _histogram_from(host[offset:offset + 5 + HIST_BINS])
            offset += 5 + HIST_BINS
        values.update(layer_summaries(values))
        self._degenerate.update(tag[len(DEGENERATE):] for tag, v in values.items()
                                if tag.startswith(DEGENERATE) and v > 0)
        return values

    def state_dict(self) -> dict:
        """What a resumed run needs to take histograms on the same steps and to report the
        same collapsed layers as an uninterrupted one."""
        return {"log_count": self._log_count, "degenerate": sorted(self._degenerate)}

    def load_state_dict(self, state: dict) -> None:
        self._log_count, self._degenerate = state["log_count"], set(state["degenerate"])

    def degenerate_layers(self) -> list[str]:
        """BatchNorm layers seen with collapsed channels on any logging step so far."""
        return sorted(self._degenerate)

    def take_histograms(self) -> dict[str, Histogram]:
        out, self._histograms = self._histograms, {}
        return out


def layer_summaries(values: dict[str, float], prefix: str = "bn_gap/") -> dict[str, float]:
    """``bn_gap/mean/<stat>`` and ``bn_gap/max/<stat>`` over the layers of each
    ``bn_gap/<stat>/<layer>`` family that have a value at this step (NaN-free layers only):
    a per-time-step LSTM layer that no two real rows reached this step is not in it."""
    families: dict[str, list[float]] = {}
    for tag, value in values.items():
        if not tag.startswith(prefix):
            continue
        parts = tag[len(prefix):].split("/", 1)
        if len(parts) == 2 and parts[0] not in ("mean", "max") and math.isfinite(value):
            families.setdefault(parts[0], []).append(value)
    out = {}
    for stat, vals in families.items():
        out[f"{prefix}mean/{stat}"] = sum(vals) / len(vals)
        out[f"{prefix}max/{stat}"] = max(vals)
    return out
