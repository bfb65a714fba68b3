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
  model's `t_max`); steps beyond reuse those of step T_max - 1; gamma shared across time,
  starting at 0.1. With padding, the statistics of step t come only from the sequences
  that have a real token at t (`normbench.norms.batch`).
- none: the plain cell.

The norms come from a factory for the `steps` layout. The cell calls them without knowing
which norm it holds: `norm(z, mask)` on the whole (N, T, 4H) sequence of W_x x (computed
for all steps at once), and `norm.at(t)(v, mask_t)` on the (N, D) rows of step t inside
the recurrence; a norm with per-step state (BatchNorm) keeps it itself.

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
from normbench.norms import NormFactory


class NormLSTMLayer(nn.Module):
    def __init__(self, input_size: int, hidden: int, make_norm: NormFactory):
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
        self.gate_act = nn.Sigmoid()
        self.cand_act = nn.Tanh()
        self.cell_act = nn.Tanh()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, steps, _ = x.shape  # (N, T, input) -> (N, T, H)
        hdim = self.hidden
        # W_x x does not depend on the recurrence: one matmul and one norm call for all steps.
        zx = self.norm_x(self.w_x(x), mask)  # (N, T, 4H)
        h = x.new_zeros(n, hdim)
        c = x.new_zeros(n, hdim)
        outputs = []
        for t in range(steps):
            mask_t = None if mask is None else mask[:, t]
            z = zx[:, t] + self.bias  # (N, 4H)
            if t > 0:  # W_h h_{-1} = 0 at t = 0: nothing to normalize (module docstring)
                z = z + self.norm_h.at(t)(self.w_h(h), mask_t)
            gates = self.gate_act(z[:, :3 * hdim])
            i, f, o = gates.split(hdim, dim=1)
            c = f * c + i * self.cand_act(z[:, 3 * hdim:])
            h = o * self.cell_act(self.norm_c.at(t)(c, mask_t))
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class LSTM(nn.Module):
    """`task="text"`: (N,T) tokens -> (N,T,V) logits; `task="image"`: rows -> (N,K).

    `make_norm` builds the cell's norms (steps layout, for sequences up to `t_max`)."""

    def __init__(self, make_norm: NormFactory, *, task: str, num_classes: int, t_max: int,
                 depth: int, hidden: int, embed: int, in_channels: int, image_size: int):
        super().__init__()
        if depth < 1:
            raise UserError(f"model.depth={depth} must be at least 1", "use model.depth=1 or more")
        if hidden < 1:
            raise UserError(f"model.hidden={hidden} must be at least 1",
                            "use e.g. model.hidden=128")
        if t_max < 1:
            raise UserError("the LSTM needs a maximum length T_max",
                            "set dataset.seq_len (or model.t_max) to 1 or more")
        self.task = task
        if task == "text":
            self.embed = nn.Embedding(num_classes, embed)
            size = embed
        else:
            self.embed = None
            size = in_channels * image_size
        self.t_max = t_max
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
