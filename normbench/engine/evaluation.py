"""How a model is evaluated: the forward pass, the loss, validation metrics, and for
BatchNorm models the train/eval discrepancy (the validation set evaluated three ways).

- ``val/``: eval mode, running statistics (`evaluate`).
- ``val_batchstats/``: BN layers normalize with each batch's own statistics, as in
  training; batches of the *training* batch size, drawn in random order (a validation set
  stored class by class would otherwise give one-class batches). "BN layers" are all the
  layers with running statistics (`normbench.norms.stats.is_batchnorm`: Batch Renorm
  without r and d, PowerNorm with its batch's psi_B^2).
- ``val_precise/``: BN layers use PreciseBN population statistics (Wu & Johnson 2021),
  recomputed over `precise_bn_batches` training batches with frozen weights.
- ``val_gap/<metric>``: ``val/<metric>`` minus ``val_batchstats/<metric>``.
- ``bn_gap/precise_dmu/<layer>``, ``bn_gap/precise_dvar/<layer>``: distance between the
  running and the PreciseBN statistics, ``||running - precise||_2 / d`` (plus mean and max
  over layers).

Whatever it evaluates, the model leaves with its buffers, train/eval modes and the global
RNG state exactly as they were, and the training stream is never touched (PreciseBN draws
from a loader of its own), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import UserError
from normbench.norms.stats import (
    BatchStatsSwitch,
)
from normbench.probes.monitor import batchnorm_layers


def forward(model: nn.Module, batch) -> torch.Tensor:
    return model(batch.x) if batch.mask is None else model(batch.x, mask=batch.mask)


def loss_and_counts(logits: torch.Tensor, batch):
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


def text_metrics(loss: float, unit: str, prefix: str) -> dict[str, float]:
    """The loss in bits per unit, named after the unit: `bpc` (bits per character) for
    characters, `bpt` (bits per token) and the perplexity `ppl` = e^loss, the word-level
    convention, for words. Word-level bits are never called bpc."""
    bits = loss / math.log(2)
    if unit == "char":
        return {f"{prefix}/bpc": bits}
    return {f"{prefix}/bpt": bits, f"{prefix}/ppl": math.inf if loss > 700 else math.exp(loss)}


def metrics_from(loss: float, acc: float, info, prefix: str) -> dict[str, float]:
    """Loss and accuracy, and for text (`info.kind`) the bits per unit of `info.unit`."""
    out = {f"{prefix}/loss": loss, f"{prefix}/acc": acc}
    if info.kind == "text":
        out.update(text_metrics(loss, info.unit, prefix))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int, prefix: str = "val",
             shuffle_seed: int | None = None, shard: tuple[int, int, object] | None = None
             ) -> dict[str, float]:
    """Loss and accuracy over the whole validation set, weighted by real targets.

    `shard` (rank, world, sum over ranks): a data set that shards itself (a streamed folder)
    gives this rank its stride of the set, and the totals are summed over the ranks."""
    total_loss = total_correct = total_count = 0.0
    where = {"rank": shard[0], "world": shard[1]} if shard else {}
    for batch in data.val_batches(batch_size, shuffle_seed=shuffle_seed, **where):
        loss, correct, count = loss_and_counts(forward(model, batch), batch)
        total_loss = total_loss + loss * count
        total_correct = total_correct + correct
        total_count = total_count + count
    # On the model's device: a rank with no validation sample sums with the others' tensors.
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                          for v in (total_loss, total_correct, total_count)])
    if shard:
        shard[2]([totals])
    values = totals.tolist()
    if values[2] == 0:
        raise UserError(f"no validation sample of {getattr(data, 'name', 'the dataset')} could "
                        "be read (see the warnings above)", "replace the unreadable files")
    return metrics_from(values[0] / values[2], values[1] / values[2], data.info, prefix)



@contextmanager
def preserved_state(model: nn.Module):
    """Restore every BN buffer, every module's train/eval mode and the RNG state on exit."""
    bns = batchnorm_layers(model)
    buffers = {name: {k: b.detach().clone() for k, b in m.named_buffers(recurse=False)}
               for name, m in bns.items()}
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({b.device.index or 0 for b in model.buffers() if b.is_cuda} |
                     {p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            yield bns
        finally:
            with torch.no_grad():
                for name, m in bns.items():
                    for k, b in m.named_buffers(recurse=False):
                        b.copy_(buffers[name][k])
            for m, training in modes:
                m.training = training


@contextmanager
def batch_statistics(model: nn.Module):
    """Eval mode except for the BN layers, which normalize with batch statistics.

    Dropout and the like stay off, so that only BN differs from plain evaluation; the
    running buffers the BN layers update meanwhile are restored on exit. A layer whose
    training forward is not plain batch normalization (Batch Renorm's r and d, PowerNorm's
    running psi^2) is switched to its batch's own statistics (`BatchStatsSwitch`).
    """
    with preserved_state(model) as bns:
        model.eval()
        switched = [m for m in bns.values() if isinstance(m, BatchStatsSwitch)]
        for m in bns.values():
            m.train()
        for m in switched:
            m.use_batch_stats = True
        try:
            yield bns
        finally:
            for m in switched:
                m.use_batch_stats = False


class _TailMerged:
    """A dataset view whose shuffled validation batches never end in a batch of one: BN
    cannot take training statistics from a single sample, so such a tail joins the batch
    before it (or is dropped if the two cannot be concatenated)."""

    def __init__(self, data):
        self.data = data
        self.info = data.info

    def val_batches(self, batch_size: int, shuffle_seed: int | None = None):
        previous = None
        for batch in self.data.val_batches(batch_size, shuffle_seed=shuffle_seed):
            if previous is not None:
                if batch.size == 1:
                    yield _concat(previous, batch) or previous
                    return
                yield previous
            previous = batch
        if previous is not None and previous.size > 1:
            yield previous


def _concat(a, b):
    if a.x.shape[1:] != b.x.shape[1:] or (a.mask is None) != (b.mask is None):
        return None
    mask = None if a.mask is None else torch.cat([a.mask, b.mask])
    return type(a)(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), mask)


def evaluate_batchstats(model: nn.Module, data, batch_size: int, seed: int,
                        prefix: str = "val_batchstats") -> dict[str, float]:
    """Validation metrics with BN in training mode (batch statistics), buffers restored."""
    with batch_statistics(model):
        return evaluate(model, _TailMerged(data), batch_size, prefix=prefix, shuffle_seed=seed)
