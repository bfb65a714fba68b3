"""The order in which training samples are drawn: shuffled epochs, resumable exactly."""

from __future__ import annotations

import torch

from normbench.errors import UserError


class ShuffledEpochs:
    """Endless batches of sample indices: a fresh permutation each epoch, the incomplete last
    batch dropped (every step sees exactly `batch_size` samples, so BatchNorm statistics
    never come from a tiny tail). `state_dict` holds everything needed to continue the same
    stream after a restart."""

    def __init__(self, n: int, batch_size: int, seed: int, what: str):
        if batch_size > n:
            raise UserError(f"batch_size={batch_size} is larger than the {n} {what}",
                            "use a smaller batch_size")
        self.n = n
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.pos = 0
        self.perm: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def next_indices(self) -> tuple[torch.Tensor, bool]:
        """The next batch's indices (CPU) and whether they start a new epoch."""
        new_epoch = self.perm is None or self.pos + self.batch_size > self.perm.numel()
        if new_epoch:
            if self.perm is not None:
                self.epoch += 1
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx, new_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "perm": self.perm,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.perm = state["epoch"], state["pos"], state["perm"]
        self.generator.set_state(state["generator"])
