"""Many devices: one process per device under torchrun (or as the tasks of a SLURM job),
joined in one process group. This module holds the group, this process's rank, and the
few collectives the training loop needs; with one process every function is a no-op.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; WORLD_SIZE > 1 is
what turns this on. The default group has gloo for CPU tensors and, where CUDA exists,
NCCL for CUDA tensors, so the same collective works on either device. Every collective
waits at most the group's timeout (`TIMEOUT_ENV`, seconds): a rank that is gone ends the
others with an error instead of a hang.

The data: every rank draws the *global* batch (`batch_size` x world) from the same loader,
in the same order, with the same augmentation, and keeps its own slice (`RankShard`). So the
ranks see disjoint shards of exactly the batches one process would see with the global
batch, and the loader's state is the same on every rank (resume is exact). A streamed image
folder reads only its rank's slice, with the same result (normbench/data/streaming.py).
"""

from __future__ import annotations

import gc
import os
import re
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from normbench.data.sampling import RepeatedBatches

TIMEOUT_ENV = "NORMBENCH_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600  # longer than any stretch one rank works alone (evaluation, a save)


def requested() -> bool:
    """Whether this process was started as one of several (torchrun, SLURM tasks)."""
    return world_from_env() > 1


def world_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0) if requested() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    return float(value) if value else DEFAULT_TIMEOUT_S


def init() -> None:
    """Join the process group of this job (once; nothing to do for a single process)."""
    if not requested() or (dist.is_available() and dist.is_initialized()):
        return
    # torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it
    # is imported, and DistributedDataParallel imports it (through torch._dynamo). Imported
    # after the group exists, ten functions hold the default group for good:
    # destroy_process_group cannot free it, and gloo's worker threads outlive it. One that
    # releases a finished collective's tensor while Python finalizes needs the GIL, Python
    # ends the thread, inside a noexcept destructor: std::terminate, SIGABRT, exit status 1
    # from torchrun after a completed run. Imported first, the defaults are None.
    import torch._dynamo  # noqa: F401
    import torch.distributed.nn.functional  # noqa: F401

    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())  # NCCL's device for this rank
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # Whatever still holds the group (a DDP model in a reference cycle) would keep its
        # threads alive into the interpreter's teardown (see init): collected first.
        gc.collect()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to tear down
            pass


def env_from_slurm() -> bool:
    """Inside a multi-task SLURM job (the submitit launcher with tasks_per_node > 1), set the
    variables torchrun would have set, from SLURM's; True if it did. The master is the first
    host of the job, the port derived from the job id (the same for every task)."""
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if tasks <= 1 or "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return False
    os.environ.update(
        RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=str(tasks),
        LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        MASTER_ADDR=first_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
        MASTER_PORT=str(20000 + int(os.environ.get("SLURM_JOB_ID", "0") or 0) % 20000))
    return True


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return nodelist
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


# ----------------------------------------------------------------------------- collectives


def broadcast_object(value):
    """Rank 0's `value` on every rank (the run folder's stamp, say)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value) -> list | None:
    """Every rank's `value`, in rank order, on rank 0 (None on the others)."""
    if not active():
        return [value]
    out = [None] * world() if is_main() else None
    dist.gather_object(value, out, dst=0)
    return out


def sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one collective for them all)."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].reshape(t.shape))
        offset += t.numel()


def earliest(step: int) -> int:
    """The smallest nonzero `step` over the ranks (0 where every rank has 0): the first
    divergence any rank saw."""
    if not active():
        return step
    never = torch.iinfo(torch.int64).max
    value = torch.tensor([step if step > 0 else never])
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return 0 if int(value.item()) == never else int(value.item())


@contextmanager
def main_first():
    """Rank 0 runs the block before the others do (a download or a cache it writes)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def barrier() -> None:
    """Wait for every rank: a CPU all_reduce, gloo whatever the device (no device to guess)."""
    if active():
        dist.all_reduce(torch.zeros(1))


class StopVote:
    """The ranks agree on stopping when a signal reached some of them: each step sends this
    rank's signal number (0: none) through an all_reduce(MAX) that is not waited for, and
    the next step reads the result, the same on every rank. One step late, and no step
    waits for it. With one process the rank's own signal is the answer at once."""

    def __init__(self):
        self._value: torch.Tensor | None = None
        self._work = None

    def __call__(self, signal_number: int) -> int:
        if not active():
            return signal_number
        agreed = self.close()
        self._value = torch.tensor([int(signal_number)])
        self._work = dist.all_reduce(self._value, op=dist.ReduceOp.MAX, async_op=True)
        return agreed

    def close(self) -> int:
        """Wait for the vote in flight; the signal any rank received (0: none)."""
        if self._work is None:
            return 0
        self._work.wait()
        self._work = None
        return int(self._value.item())


# When a rank is lost, rank 0 marks summary.json failed and says so in the job's store
# (torchrun's agent holds it; under SLURM rank 0 does, and it goes with rank 0). A survivor
# that hears nothing within the grace period takes rank 0 for the one lost, and writes it.
# The restart count keeps an earlier attempt's keys (torchrun --max-restarts) apart.
FAILURE_GRACE_S = 5.0


def _failure_key(what: str) -> str:
    return f"normbench/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/failure_{what}"


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no group, or a torch without it: no store to use
        return None


def failure_recorded() -> None:
    """On rank 0, once summary.json says failed: the survivors need not write it."""
    store = _store() if active() else None
    if store is None:
        return
    try:
        store.set(_failure_key("recorded"), "1")
    except Exception:  # noqa: BLE001 - the store is gone: the survivors then write it too
        pass


def records_failure_for_main(grace_s: float = FAILURE_GRACE_S) -> bool:
    """On a rank > 0 after a peer failure: whether this rank is to mark the run failed,
    that is rank 0 did not record the failure within `grace_s` seconds (it is the one
    gone, or hangs) and no other survivor took it on first."""
    store = _store()
    if store is None:
        return True
    try:
        store.wait([_failure_key("recorded")], timedelta(seconds=grace_s))
        return False
    except Exception:  # noqa: BLE001 - timed out, or the store went with rank 0
        pass
    try:
        return store.add(_failure_key("claims"), 1) == 1
    except Exception:  # noqa: BLE001 - no store left to agree through: write it
        return True


class PeerLost(RuntimeError):
    """Another process of the run is gone; the line says what to do."""


def is_peer_failure(error: BaseException) -> bool:
    """Whether an exception means another rank is gone (or never answered in time); never
    in a one-process run."""
    if not active():
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("Connection closed by peer", "Connection reset", "gloo",
                                  "NCCL", "Timed out", "timed out"))


# ----------------------------------------------------------------------------- model and data


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` (gradients averaged over the ranks); the model
    itself with one process. Buffers are not broadcast from rank 0 at each forward: every
    rank keeps the running statistics of its own batches (per-device BatchNorm), and
    `average_buffers` makes them agree before they are evaluated or saved."""
    if not active():
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else local_rank()] \
        if device.type == "cuda" else None
    # The buffers are the same on every rank at the start; newer torch names the switch
    # for the broadcast before each forward differently.
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    no_broadcast = ({"forward_sync_buffers": False} if "forward_sync_buffers" in names
                    else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **no_broadcast)


@torch.no_grad()
def average_buffers(model: torch.nn.Module) -> None:
    """Make every rank's buffers (running statistics) the same, as timm's distribute_bn:
    floating-point buffers averaged, counters (num_batches_tracked) their maximum, flags
    (a channel collapsed) true only where true on every rank. Layers that synchronize
    their statistics hold the same values everywhere already and are left as they are."""
    if not active():
        return
    buffers = [b for m in model.modules() if not getattr(m, "sync", False)
               for b in m.buffers(recurse=False)]
    floats = [b for b in buffers if b.is_floating_point()]
    if floats:
        sum_(floats)
        for b in floats:
            b.div_(world())
    for op, kind in ((dist.ReduceOp.MAX, "int"), (dist.ReduceOp.MIN, "bool")):
        chosen = [b for b in buffers if not b.is_floating_point() and
                  (b.dtype == torch.bool) == (kind == "bool")]
        if chosen:
            flat = torch.cat([b.reshape(-1).to(torch.int64) for b in chosen])
            dist.all_reduce(flat, op=op)
            offset = 0
            for b in chosen:
                b.copy_(flat[offset:offset + b.numel()].reshape(b.shape).to(b.dtype))
                offset += b.numel()


def seed_rank(seed: int) -> None:
    """Random draws in the forward pass (dropout and the like) differ between ranks: rank r
    > 0 reseeds torch, Python and NumPy from (seed, r) once the model is built; rank 0 keeps
    the seed's stream, so a one-process run is unchanged. The data order has its own
    generator and does not depend on the rank."""
    r = rank()
    if r == 0:
        return
    import random

    derived = int(np.random.SeedSequence([seed, r]).generate_state(1)[0])
    torch.manual_seed(derived)
    random.seed(derived)
    np.random.seed(derived)


class RankShard:
    """This rank's slice of every global batch of `loader` (which draws world x b samples):
    samples [rank*b, (rank+1)*b). A padded text batch keeps the global batch's length, so
    every rank runs the same number of time steps."""

    def __init__(self, loader, rank: int, world: int):
        self.loader, self.rank, self.world = loader, rank, world
        self.global_targets: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        b = batch.size // self.world
        part = slice(self.rank * b, (self.rank + 1) * b)
        # Real targets of the whole global batch, for the global token mean of the loss.
        self.global_targets = None if batch.mask is None else batch.mask.sum()
        return type(batch)(batch.x[part], batch.y[part],
                           None if batch.mask is None else batch.mask[part])

    def loss_share(self, loss: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """This rank's part of the global mean loss, scaled so that DDP's average of the
        ranks' gradients is the gradient of the mean over all real targets (padded text:
        the ranks hold different numbers of real tokens). Without padding every rank holds
        the same count and the rank's own mean is already its share."""
        if self.global_targets is None:
            return loss
        return loss * count * self.world / self.global_targets.clamp(min=1)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def train_loader(data, batch_size: int, seed: int, overfit_batches: int = 0):
    """The training stream of this rank: per-device batches of `batch_size`; with
    overfit_batches=k, the first k of them over and over."""
    own = getattr(data, "shards_itself", False)  # a streamed folder: this rank's samples only
    loader = (data.train_loader(batch_size, seed=seed, rank=rank(), world=world()) if own
              else data.train_loader(batch_size * world(), seed=seed))
    if overfit_batches:  # before sharding: each rank slices the same repeated global batch
        loader = RepeatedBatches(loader, overfit_batches)
    return RankShard(loader, rank(), world()) if active() and not own else loader
