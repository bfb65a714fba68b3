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


class RepeatedBatches:
    """The first `k` batches of a training stream, over and over (overfit_batches=k).

    A check of the training code rather than an experiment: a model that cannot drive the
    loss on a handful of fixed batches towards 0 has a bug in its data, loss or update. The
    batches are drawn once, augmentation included, so a repeated batch is the same tensors;
    an epoch is the k batches. The state is only the position in the cycle: the batches
    come again from the stream's seed when a run resumes."""

    def __init__(self, loader, k: int):
        self.batches = [next(loader) for _ in range(k)]
        self.served = 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batches[self.served % len(self.batches)]
        self.served += 1
        return batch

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = int(state["served"])
