"""How the model runs: numeric precision, memory format and compilation.

- `precision=bf16|fp16` runs the forward pass under `torch.autocast`: convolutions and
  matmuls in the low precision, while the loss is taken in fp32 and the parameters,
  gradients, optimizer state and every norm's running buffers stay fp32. Normalization
  statistics are computed in fp32 too: torch's BatchNorm/LayerNorm/GroupNorm accumulate in
  fp32 for bf16 inputs, normbench's own norms promote to at least fp32 before any sum
  (`norms.stats.stats_dtype`), and the probes read the statistics in fp32. fp16 also scales
  the loss (`torch.amp.GradScaler`) so that small gradients do not underflow; a step whose
  scaled gradients overflow is skipped by the scaler and is not a divergence.
- `channels_last=true` stores image activations NHWC (faster convolutions on recent CPUs
  and on tensor cores); it changes the memory layout only, not a single number's meaning.
- `compile=true` runs the model through `torch.compile`, except for the training forward
  of the steps the probes watch (every `log_every`-th): their hooks exist for that forward
  only, and a compiled graph does not run hooks added after it was traced, so those steps
  run the same module eagerly. Evaluations run compiled; PreciseBN and the train/eval discrepancy,
  which hook the BN layers, run eagerly.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The context the forward passes run in."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if channels_last else model


def prepare_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Image batches in the model's memory format; token batches unchanged."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
