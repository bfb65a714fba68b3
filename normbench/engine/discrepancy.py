"""The train/eval discrepancy of a BatchNorm model: the validation set evaluated three ways
(running statistics, each batch's own, PreciseBN populations) and the gaps between them.

- ``val_batchstats/``: BN layers normalize with each batch's own statistics, as in
  training (`normbench.engine.evaluation.evaluate_batchstats`).
- ``val_precise/``: BN layers use PreciseBN population statistics, recomputed over
  `precise_bn_batches` training batches with frozen weights (`normbench.engine.precise_bn`).
- ``val_gap/<metric>``: ``val/<metric>`` minus ``val_batchstats/<metric>``.
- ``bn_gap/precise_dmu|dvar/<layer>``: running vs PreciseBN statistics, plus their mean
  and max over layers.
"""

from __future__ import annotations

import itertools
import time

from torch import nn

from normbench.engine.evaluation import evaluate, evaluate_batchstats, preserved_state
from normbench.engine.precise_bn import population_statistics, precise_bn_stats, precise_distances
from normbench.probes.monitor import batchnorm_layers, layer_summaries

# PreciseBN's loader is seeded from the training seed plus this, so it neither shares nor
# disturbs the training stream's order.
PRECISE_SEED_OFFSET = 7919


def train_eval_discrepancy(model: nn.Module, data, val_metrics: dict[str, float], *,
                           batch_size: int, eval_batch_size: int, precise_batches: int,
                           seed: int) -> dict[str, float]:
    """``val_batchstats/``, ``val_precise/``, ``val_gap/`` and the running-vs-precise
    distances for a model with BN layers; {} for a model without."""
    if not batchnorm_layers(model):
        return {}
    start = time.perf_counter()
    out = evaluate_batchstats(model, data, batch_size, seed)
    out["perf/val_batchstats_seconds"] = time.perf_counter() - start
    for key, value in val_metrics.items():
        if key.startswith("val/"):
            stat = key[len("val/"):]
            if f"val_batchstats/{stat}" in out:
                out[f"val_gap/{stat}"] = value - out[f"val_batchstats/{stat}"]
    if precise_batches > 0:
        start = time.perf_counter()
        loader = data.train_loader(batch_size, seed=seed + PRECISE_SEED_OFFSET)
        with preserved_state(model):  # the loader's augmentation must not move any RNG
            stats = precise_bn_stats(model, itertools.islice(loader, precise_batches))
        distances = precise_distances(model, stats)
        out.update(distances)
        out.update(layer_summaries(distances))
        with population_statistics(model, stats):
            out.update(evaluate(model, data, eval_batch_size, prefix="val_precise"))
        out["perf/precise_bn_seconds"] = time.perf_counter() - start  # statistics + evaluation
    return out
