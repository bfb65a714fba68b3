"""Measurements of what normalization does, taken only on logging steps.

Every probe reduces on the device and leaves its result as a 0-d tensor; `flush()` moves
all of them to the host in one transfer. On the steps in between no hook is attached.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from normbench.norms import batch_moments, bn_stat_gaps, is_batchnorm


def batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorm-like layers by their path in the model, found by type (norm-agnostic loop)."""
    return {name: m for name, m in model.named_modules() if is_batchnorm(m)}


class Probes:
    def __init__(self, model: nn.Module):
        self.model = model
        self.bn_layers = batchnorm_layers(model)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._pending: dict[str, torch.Tensor] = {}

    # -- BatchNorm statistics gaps --------------------------------------------------------

    @contextmanager
    def watch_forward(self, active: bool):
        """Within this block, a training forward records each BN layer's batch-vs-running gap.

        Pre-hooks run before the layer updates its running statistics, so the gap compares
        this batch with what the running statistics were *before* it (DESIGN.md §4).
        """
        if not active or not self.bn_layers:
            yield
            return
        handles = [m.register_forward_pre_hook(self._gap_hook(name), with_kwargs=True)
                   for name, m in self.bn_layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _gap_hook(self, name: str):
        def hook(module, args, kwargs):
            if not module.training:
                return
            x = args[0]
            mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
            with torch.no_grad():
                mean, var, count = batch_moments(module, x.detach(), mask)
                dmu, dvar = bn_stat_gaps(module, mean, var, count)
            self._pending[f"bn_gap/dmu/{name}"] = dmu
            self._pending[f"bn_gap/dvar/{name}"] = dvar

        return hook

    # -- gradients ------------------------------------------------------------------------

    def record_grads(self) -> torch.Tensor:
        """Per-parameter and global gradient norms; returns the global norm (a 0-d tensor)."""
        named = [(n, p.grad) for n, p in self.params.items() if p.grad is not None]
        if not named:
            return torch.zeros(())
        norms = torch._foreach_norm([g for _, g in named])
        for (name, _), norm in zip(named, norms, strict=True):
            self._pending[f"grad/{name}"] = norm
        total = torch.linalg.vector_norm(torch.stack(norms))
        self._pending["grad/global_norm"] = total
        return total

    # -- hand-off -------------------------------------------------------------------------

    def add(self, tag: str, value: torch.Tensor) -> None:
        self._pending[tag] = value

    def flush(self) -> dict[str, float]:
        """All pending values as floats, with one device-to-host transfer."""
        if not self._pending:
            return {}
        tags = list(self._pending)
        values = torch.stack([self._pending[t].detach().float().reshape(()) for t in tags])
        self._pending.clear()
        return dict(zip(tags, values.cpu().tolist(), strict=True))
