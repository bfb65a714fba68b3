"""PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): the population
statistics of every BatchNorm layer's input over many training batches, weights frozen,
and what the model does with them.

- `precise_bn_stats`: the populations, pooled exactly over uneven batches and padding.
- `population_statistics`: the model in eval mode with its BN buffers set to them.
- `precise_distances`: ``bn_gap/precise_dmu/<layer>`` and ``bn_gap/precise_dvar/<layer>``,
  ``||running - precise||_2 / d`` between the running and the population statistics.

"BN layers" are all the layers with running statistics (`normbench.norms.stats.is_batchnorm`);
a norm with statistics of its own kind (PowerNorm's psi^2) says how a population is stored
(`RunningStats.population`).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from normbench.engine.evaluation import batch_statistics, forward, preserved_state
from normbench.norms.stats import Population, RunningStats, batch_moments, stored_statistics
from normbench.probes.monitor import batchnorm_layers, token_mask


def population_as_stored(module: nn.Module, pop: Population) -> dict[str, torch.Tensor]:
    """PreciseBN's population in the form the layer's buffers hold (BatchNorm: the
    variance on running_var's unbiased scale)."""
    if isinstance(module, RunningStats):
        return module.population(pop)
    return {"mu": pop.mean, "var": pop.unbiased_var}


@torch.no_grad()
def precise_bn_stats(model: nn.Module, batches: Iterable) -> dict[str, Population]:
    """Population statistics of every BN layer's input over `batches`, weights frozen.

    Each batch b gives its biased mean m_b and variance v_b over n_b entries per channel;
    the population mean is sum n_b m_b / N and the variance sum n_b (v_b + m_b^2) / N minus
    the mean squared (fvcore's PreciseBN, weighted by batch size so that uneven batches
    count by their size): exactly the statistics of all the batches' entries pooled. Under
    ghost BN, m_b and v_b are the moments of the whole batch (between-group spread
    included), and padding never counts. The layers normalize with batch statistics
    meanwhile, as in training; the model's buffers are untouched afterwards. Accumulates in
    float64. A layer that saw fewer than 2 real entries in all (an LSTM step no sequence
    reaches) has no population variance and is left out: it keeps its running statistics.
    """
    sums: dict[str, list] = {}

    def hook_for(name):
        def hook(module, args, kwargs):
            x = args[0]
            mean, var, count = batch_moments(module, x.detach(), token_mask(x, args, kwargs))
            n = count.double()
            m = mean.double()
            s = sums.setdefault(name, [0.0, 0.0, 0.0])
            s[0] = s[0] + n * m
            s[1] = s[1] + n * (var.double() + m.square())
            s[2] = s[2] + n

        return hook

    with batch_statistics(model) as bns:
        handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True)
                   for name, m in bns.items()]
        try:
            for batch in batches:
                forward(model, batch)
        finally:
            for h in handles:
                h.remove()
    out = {}
    for name, (s1, s2, n) in sums.items():
        if float(n) < 2:  # evaluation only: one host read per layer is fine here
            continue
        mean = s1 / n
        var = (s2 / n - mean.square()).clamp(min=0)
        dtype = stored_statistics(bns[name])["var"].dtype
        out[name] = Population(mean.to(dtype), var.to(dtype), float(n))
    return out


@contextmanager
def population_statistics(model: nn.Module, stats: dict[str, Population]):
    """Eval mode with the BN buffers set to `stats`; the original buffers restored on exit."""
    with preserved_state(model) as bns, torch.no_grad():
        model.eval()
        for name, pop in stats.items():
            buffers = stored_statistics(bns[name])
            for key, value in population_as_stored(bns[name], pop).items():
                buffers[key].copy_(value)
        yield


def precise_distances(model: nn.Module, stats: dict[str, Population]) -> dict[str, float]:
    """||running - precise||_2 / d for means and (unbiased-scale) variances, per layer, as
    the buffers hold them (PowerNorm: psi^2 only, `precise_dvar`)."""
    bns = batchnorm_layers(model)
    parts = {}
    for name, pop in stats.items():
        running = stored_statistics(bns[name])
        for key, value in population_as_stored(bns[name], pop).items():
            gap = torch.linalg.vector_norm(running[key] - value) / value.numel()
            parts[f"bn_gap/precise_d{key}/{name}"] = gap
    if not parts:
        return {}
    tags = list(parts)
    values = torch.stack([parts[t].float() for t in tags]).cpu().tolist()
    return dict(zip(tags, values, strict=True))
