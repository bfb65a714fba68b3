"""Cross-sample similarity at each norm layer (Lubana et al. 2021, "Beyond BatchNorm"):
without normalization, a deep network's activations collapse towards rank one, and the
cosine similarity between different samples' activations goes to 1.

``act/similarity/<layer>``: the mean cosine similarity between the activations of different
samples at a norm layer's output, over all pairs of distinct real samples:

- images (N, C, H, W) and feature vectors (N, C): each sample's whole activation;
- tokens (N, T, C): pairs of samples at the same position t, their C features (padding
  never enters), pooled over the positions. The LSTM's per-step norms, called on the (N, C)
  rows of one step, count the same pairs, so every norm of a model is measured alike.

A row of zeros (a dead ReLU map) has no direction and is left out. With unit rows u_i the
sum over ordered pairs needs no n x n matrix: sum_{i != j} <u_i, u_j> = ||sum_i u_i||^2 - n.
A module called several times in one forward (a recurrent cell's norms) reports the mean
over the pairs of all its calls; a call with fewer than two real rows adds nothing.
The places are the norm layers themselves, norm=none's identities included (it is where
the collapse is expected), each module measured on its output in the training forward.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn

from normbench.norms.registry import Norm
from normbench.probes.monitor import NORM_TYPES, token_mask


def similarity_places(model: nn.Module) -> dict[str, nn.Module]:
    """Every place a norm is, by path: registered norms that are called on activations
    (norm=none's identity too, but not a per-step container, whose children are called)
    and torch's norm layers."""
    return {name: m for name, m in model.named_modules()
            if (isinstance(m, Norm) and (m.probed or not any(True for _ in m.children())))
            or (not isinstance(m, Norm) and isinstance(m, NORM_TYPES))}


def pair_similarity(x: torch.Tensor, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cos(x_i, x_j) over ordered pairs i != j of real non-zero samples at the same
    position, number of such pairs): 0-d float64 tensors on x's device, no host sync."""
    x = x.detach().float()
    if x.dim() == 3:  # tokens (N, T, C): positions along T
        rows = x
        real = None if mask is None else mask.bool()
    else:  # one position: the whole sample, or one step's (N, C) rows with an (N,) mask
        rows = x.reshape(x.shape[0], 1, -1)
        real = None if mask is None else mask.reshape(-1, 1).bool()
    norms = row_norms(rows)  # (N, T), float64
    keep = norms > 0
    if real is not None:
        keep = keep & real
    # sum_i u_i per position as one contraction: no normalized copy of the activation
    scale = (keep / norms.clamp(min=torch.finfo(torch.float64).tiny)).float()
    totals = torch.einsum("ntc,nt->tc", rows, scale).double()  # (T, C)
    n = keep.sum(0).double()  # (T,)
    # in float64: each position's pair sum is a difference of two numbers of size up to n^2
    return (totals.square().sum() - n.sum()), (n * (n - 1)).sum()


def row_norms(rows: torch.Tensor, chunk_entries: int = 1 << 22) -> torch.Tensor:
    """The float64 norm of each (n, t) row of an (N, T, C) tensor. In float32 a squared norm
    overflows past 3.4e38 (a diverging network's activations, whose loss is still finite)
    or underflows for tiny ones; a float64 copy is made a few samples at a time, not of the
    whole activation."""
    per_sample = max(1, rows[0].numel()) if rows.shape[0] else 1
    step = max(1, chunk_entries // per_sample)
    return torch.cat([torch.linalg.vector_norm(rows[i:i + step].double(), dim=-1)
                      for i in range(0, rows.shape[0], step)] or [rows.new_zeros(rows.shape[:2],
                                                                               dtype=torch.float64)])


def mean_cosine_similarity(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean cosine similarity of distinct samples (module docstring); NaN with no pair."""
    total, pairs = pair_similarity(x, mask)
    return torch.where(pairs > 0, total / pairs.clamp(min=1), torch.full_like(total, float("nan")))


class SimilarityProbe:
    """Forward hooks on the norm places for one training forward, summing each module's
    pairs over its calls (a recurrent cell calls its norms once per step)."""

    def __init__(self, model: nn.Module):
        self.places = similarity_places(model)
        self._sums: dict[str, torch.Tensor] = {}
        self._pairs: dict[str, torch.Tensor] = {}
        self.seconds = 0.0  # in the hooks since the last take (host time: on CUDA, launches)

    @contextmanager
    def watch(self, active: bool):
        if not active or not self.places:
            yield
            return
        handles = [m.register_forward_hook(self._hook(name), with_kwargs=True)
                   for name, m in self.places.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                return
            x = args[0] if args else output
            # (N, T) for tokens, (N,) for the LSTM's per-step rows
            mask = token_mask(x, args, kwargs) if isinstance(x, torch.Tensor) else None
            start = time.perf_counter()
            with torch.no_grad():
                total, pairs = pair_similarity(output, mask)
            self.seconds += time.perf_counter() - start
            self._sums[name] = self._sums.get(name, 0) + total
            self._pairs[name] = self._pairs.get(name, 0) + pairs

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        """``act/similarity/<layer>`` as device tensors (NaN for a layer no pair reached)."""
        out = {}
        for name, total in self._sums.items():
            pairs = self._pairs[name]
            # a cosine is within [-1, 1]; float32 rounding of identical samples is not
            value = (total / pairs.clamp(min=1)).clamp(-1, 1)
            out[f"act/similarity/{name}"] = torch.where(
                pairs > 0, value, torch.full_like(total, float("nan"))).float()
        self._sums.clear()
        self._pairs.clear()
        self.seconds = 0.0
        return out
