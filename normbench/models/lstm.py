"""A stacked LSTM whose cell applies the norm inside the recurrence.

Gates z = norm_x(W_x x_t) + norm_h(W_h h_{t-1}) + b, in the order [i, f, o, g];
c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g);  h_t = sigmoid(o) * tanh(norm_c(c_t)).

At t = 0, h_{-1} = 0 and W_h h_{-1} is identically zero: the cell skips norm_h there for
every norm (z = norm_x(W_x x_0) + b). Normalizing a zero vector only adds the norm's shift
(LN/GN) or, for BatchNorm, a channel with no batch variance whose running variance decays
to 0; there is nothing to normalize.

- layer: Ba et al. 2016. LayerNorm over the 4H gate pre-activations of W_x x and of W_h h
  separately, and over the H units of c_t.
- group: the same with GroupNorm: groups of hidden units per sample.
- batch: Cooijmans et al. 2016. Separate statistics for each time step t < T_max (the
  model's `t_max`); steps beyond reuse those of step T_max - 1. The scale gamma is shared
  across time and starts at 0.1 (a unit scale saturates the gates). With padding, the
  statistics of step t come only from the sequences that have a real token at t (a step
  with fewer than 2 real rows per group: see `normbench.batchnorm`). The shared gamma/beta
  are applied inside each step's layer call, so probes on that layer see its real output.
- none: the plain cell.

W_x and W_h carry no bias: the single gate bias b (forget part initialised to 1) follows
the norms. Gate nonlinearities are module instances (`gate_act`, `cand_act`, `cell_act`)
called on whole tensors, so hooks on nn.Sigmoid / nn.Tanh can measure saturation.

Text: tokens (N,T) -> embeddings -> LSTM stack -> next-token logits (N,T,V).
Images: (N,C,H,W) -> the H rows as a sequence of C*W features -> logits (N,K) from the
last hidden state (sequential CIFAR, row by row).
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.errors import UserError
from normbench.norms import NormSpec, TokenBatchNorm, norm_factory


class StepBatchNorm(TokenBatchNorm):
    """BatchNorm over the (N, D) rows of one time step; `mask` (N,) marks the real rows.

    `weight`/`bias`, when given, are the affine transform shared across time steps, applied
    after this step's normalization (the layer's own affine is off).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x, mask)
        return y if weight is None else y * weight + bias


class TimeBatchNorm(nn.Module):
    """Per-time-step BatchNorm statistics with one affine transform shared across time.

    Step t < T_max has its own BatchNorm child named `tNN` (zero-padded, so that names sort
    in time order); probes find them by type, and TensorBoard shows e.g.
    `bn_gap/dmu/layers.0.norm_h.t07`. Steps t >= T_max use the child of step T_max - 1.
    """

    def __init__(self, num_features: int, t_max: int, spec: NormSpec, init_scale: float = 0.1):
        super().__init__()
        width = len(str(t_max - 1))
        self.keys = [f"t{t:0{width}d}" for t in range(t_max)]
        for key in self.keys:
            self.add_module(key, StepBatchNorm(
                num_features, eps=spec.eps, momentum=spec.momentum, affine=False,
                track_running_stats=spec.track_running_stats, stats_batch=spec.stats_batch))
        self.weight = self.bias = None
        if spec.affine:
            self.weight = nn.Parameter(torch.full((num_features,), init_scale))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def step(self, t: int) -> StepBatchNorm:
        return getattr(self, self.keys[min(t, len(self.keys) - 1)])

    def forward(self, x: torch.Tensor, t: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.step(t)(x, mask=mask, weight=self.weight, bias=self.bias)


def apply_per_sample(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A (N, D)-layout norm applied to every row of (..., D)."""
    shape = x.shape
    return norm(x.reshape(-1, shape[-1])).reshape(shape)


class NormLSTMLayer(nn.Module):
    def __init__(self, input_size: int, hidden: int, make_norm):
        super().__init__()
        self.hidden = hidden
        self.w_x = nn.Linear(input_size, 4 * hidden, bias=False)
        self.w_h = nn.Linear(hidden, 4 * hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * hidden))
        with torch.no_grad():
            self.bias[hidden:2 * hidden].fill_(1.0)  # forget gate open at the start
        self.norm_x = make_norm(4 * hidden)
        self.norm_h = make_norm(4 * hidden)
        self.norm_c = make_norm(hidden)
        self.per_step = isinstance(self.norm_x, TimeBatchNorm)
        self.gate_act = nn.Sigmoid()
        self.cand_act = nn.Tanh()
        self.cell_act = nn.Tanh()

    def _norm(self, norm, x, t, mask_t):
        return norm(x, t, mask_t) if self.per_step else norm(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, steps, _ = x.shape  # (N, T, input) -> (N, T, H)
        hdim = self.hidden
        zx = self.w_x(x)  # (N, T, 4H): one matmul for all steps
        if not self.per_step:  # per-sample norms need no step index: all steps at once
            zx = apply_per_sample(self.norm_x, zx)
        h = x.new_zeros(n, hdim)
        c = x.new_zeros(n, hdim)
        outputs = []
        for t in range(steps):
            mask_t = None if mask is None else mask[:, t]
            zx_t = self._norm(self.norm_x, zx[:, t], t, mask_t) if self.per_step else zx[:, t]
            z = zx_t + self.bias  # (N, 4H)
            if t > 0:  # W_h h_{-1} = 0 at t = 0: nothing to normalize (module docstring)
                z = z + self._norm(self.norm_h, self.w_h(h), t, mask_t)
            gates = self.gate_act(z[:, :3 * hdim])
            i, f, o = gates.split(hdim, dim=1)
            c = f * c + i * self.cand_act(z[:, 3 * hdim:])
            h = o * self.cell_act(self._norm(self.norm_c, c, t, mask_t))
            outputs.append(h)
        return torch.stack(outputs, dim=1)


def cell_norm_factory(spec: NormSpec, t_max: int):
    """`make(num_features)` for the cell: per-step BatchNorm, or a (N, D) per-sample norm."""
    if spec.name == "batch":
        return lambda d: TimeBatchNorm(d, t_max, spec)
    return norm_factory(spec, "features")


class LSTM(nn.Module):
    """`task="text"`: (N,T) tokens -> (N,T,V) logits; `task="image"`: rows -> (N,K)."""

    def __init__(self, norm: NormSpec, *, task: str, num_classes: int, t_max: int = 0,
                 depth: int = 1, hidden: int = 64, embed: int = 64, in_channels: int = 3,
                 image_size: int = 32):
        super().__init__()
        if depth < 1:
            raise UserError(f"model.depth={depth} must be at least 1", "use model.depth=1 or more")
        if hidden < 1:
            raise UserError(f"model.hidden={hidden} must be at least 1",
                            "use e.g. model.hidden=128")
        self.task = task
        if task == "text":
            if t_max < 1:
                raise UserError("the LSTM needs a maximum length T_max",
                                "set dataset.seq_len (or model.t_max) to 1 or more")
            self.embed = nn.Embedding(num_classes, embed)
            size = embed
        else:
            t_max = t_max or image_size
            self.embed = None
            size = in_channels * image_size
        self.t_max = t_max
        make_norm = cell_norm_factory(norm, t_max)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(NormLSTMLayer(size, hidden, make_norm))
            size = hidden
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.task == "text":
            h = self.embed(x)  # (N, T, E)
        else:
            n, c, rows, w = x.shape
            h = x.permute(0, 2, 1, 3).reshape(n, rows, c * w)  # one row of pixels per step
        for layer in self.layers:
            h = layer(h, mask)
        if self.task == "image":
            return self.head(h[:, -1])  # (N, K) from the last step
        return self.head(h)  # (N, T, V)
