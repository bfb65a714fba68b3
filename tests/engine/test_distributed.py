"""Several processes (gloo, CPU) against one: per-device BatchNorm *is* ghost BN, and
synchronized BN *is* whole-batch BN.

Two spawned ranks train each real model (ResNet, Transformer on padded tokens, LSTM)
for a few DDP steps on their shards of the same global batches (tests/helpers/ddp_worker.py); one
process here trains the same model on the whole global batches, with
`norm.stats_batch` = the per-rank batch (ghost BN) or with plain BN. The forward outputs,
the averaged gradients, the parameters after the last step and (where the claim holds) the
averaged running statistics must agree to float64 rounding. One spawn serves every test.
"""

from __future__ import annotations

import functools
import socket

import pytest
import torch
import torch.multiprocessing as mp

from normbench.data import Batch
from normbench.engine import distributed
from tests.helpers import ddp_worker
from tests.helpers.common import TINY, compose_config

WORLD = 2
TOL = dict(rtol=1e-9, atol=1e-10)


def _cases() -> dict:
    text = [*TINY, "dataset=synthetic_text"]
    norm = compose_config([*TINY, "norm=batch"])["norm"]
    return {
        "resnet": {"kind": "image", "data_seed": 1, "norm": norm,
                   "model": compose_config([*TINY, "model=resnet"])["model"]},
        # Different real-token counts on the two ranks: the loss must be the global mean.
        "transformer": {"kind": "text", "data_seed": 2, "norm": norm, "seq_len": 6,
                        "lengths": [6, 3, 5, 2, 6, 6, 4, 6],
                        "model": compose_config([*text, "model=transformer",
                                                 "model.depth=2"])["model"]},
        # Every rank keeps >= 2 real rows at every step (no degenerate group, see docs/norms.md).
        "lstm": {"kind": "text", "data_seed": 3, "norm": norm, "seq_len": 5,
                 "lengths": [5, 5, 3, 2, 5, 4, 5, 1],
                 "model": compose_config([*text, "model=lstm", "model.depth=1"])["model"]},
    }


CASES = _cases()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(ddp_worker.work, args=(WORLD, free_port(), str(out), CASES),
                       nprocs=WORLD, start_method="spawn")

    def load(name: str, mode: str) -> list[dict]:
        return [torch.load(out / f"{name}_{mode}_{r}.pt", weights_only=True) for r in range(WORLD)]

    load.folder = out
    return load


@functools.cache
def reference(name: str, mode: str) -> dict:
    """One process, the whole global batch: ghost BN with stats_batch = the per-rank batch
    (what per-device BN claims to be), or plain BN over the whole batch (sync)."""
    case = CASES[name]
    norm = dict(case["norm"])
    if mode == "per_rank":
        norm["stats_batch"] = ddp_worker.PER_RANK
    model = ddp_worker.build(case, norm)
    record = ddp_worker.train(model, model, ddp_worker.global_batches(case, WORLD))
    record["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
    return record


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per_rank", "sync"])
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients_equal_one_process(ranks, name, mode):
    got, want = ranks(name, mode), reference(name, mode)
    b = ddp_worker.PER_RANK
    for r, rank in enumerate(got):
        torch.testing.assert_close(rank["outputs"], want["outputs"][r * b:(r + 1) * b], **TOL)
        assert rank["grads"].keys() == want["grads"].keys()
        for key, grad in want["grads"].items():
            torch.testing.assert_close(rank["grads"][key], grad, **TOL, msg=f"{key} rank {r}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per_rank", "sync"])
@pytest.mark.parametrize("name", list(CASES))
def test_parameters_are_identical_on_the_ranks_and_equal_one_process(ranks, name, mode):
    (a, b), want = ranks(name, mode), reference(name, mode)
    for key, value in want["params"].items():
        assert torch.equal(a["params"][key], b["params"][key]), key
        torch.testing.assert_close(a["params"][key], value, rtol=1e-8, atol=1e-9, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", [("resnet", "per_rank"), *((n, "sync") for n in CASES)])
def test_averaged_running_statistics_equal_one_process(ranks, name, mode):
    """Per-device BN averaged over the ranks moves as ghost BN's running statistics where
    the ranks hold equal counts (images); synchronized BN's are whole-batch BN's everywhere."""
    (a, b), want = ranks(name, mode), reference(name, mode)
    assert a["buffers"].keys() == want["buffers"].keys()
    for key, value in want["buffers"].items():
        assert torch.equal(a["buffers"][key], b["buffers"][key]), key
        if value.is_floating_point():
            torch.testing.assert_close(a["buffers"][key], value, **TOL, msg=key)
        else:
            assert torch.equal(a["buffers"][key], value), key


@pytest.mark.slow
def test_no_thread_of_the_process_group_outlives_shutdown(ranks):
    """gloo's threads left running at exit met the C++ teardown: about one torchrun in ten
    ended with SIGABRT after a completed run. DDP imports torch.distributed.nn.functional,
    whose default arguments would keep the group alive once it exists."""
    for r in range(WORLD):
        names = (ranks.folder / f"threads_{r}.txt").read_text().split()
        assert not [n for n in names if "gloo" in n], names


# ----------------------------------------------------------------------------- one process


def test_rank_shard_slices_the_global_batch_and_scales_the_loss_to_the_global_token_mean():
    x = torch.arange(8)[:, None].repeat(1, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0],
                         [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    global_batch = Batch(x, x, mask)
    shares = []
    for rank in range(2):
        shard = distributed.RankShard(iter([global_batch]), rank, 2)
        part = next(shard)
        assert torch.equal(part.x, x[rank * 4:(rank + 1) * 4])
        assert torch.equal(part.mask, mask[rank * 4:(rank + 1) * 4])
        count = part.mask.sum()
        # a rank whose mean loss is 1: its share of the global mean is count / total
        shares.append(shard.loss_share(torch.tensor(1.0), count) / 2)  # DDP's average
    assert torch.isclose(shares[0], torch.tensor(7 / 18)) and torch.isclose(sum(shares),
                                                                           torch.tensor(1.0))


def test_a_slurm_task_gets_the_variables_torchrun_would_set(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # recorded, so that teardown removes what is set below
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    assert distributed.env_from_slurm()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"],
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("3", "4", "1", "gpu07",
                                                                       "23456")
    assert distributed.first_host("node12") == "node12"


def test_sync_with_ghost_groups_or_without_batch_statistics_is_refused(tiny_config):
    from normbench.config.checks import check_config
    from normbench.errors import UserError

    with pytest.raises(UserError, match=r"norm.sync=true with norm.stats_batch=8.*Fix: keep one"):
        check_config(tiny_config("norm.sync=true", "norm.stats_batch=8"))
    with pytest.raises(UserError, match="norm.sync"):  # a key group norm would not read
        tiny_config("norm=group", "norm.sync=true")
    check_config(tiny_config("norm=batch_renorm", "norm.sync=true"))  # one process: plain BN


def test_under_torchrun_a_fixed_gpu_and_a_global_batch_too_large_are_refused(tiny_config,
                                                                             monkeypatch):
    from normbench.config.checks import check_config
    from normbench.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="device=cuda:1 with 2 processes.*device=cuda"):
        check_config(tiny_config("device=cuda:1"))
    with pytest.raises(UserError, match=r"batch_size=160 x 2 processes is larger than "
                                        r"dataset.n_train=256.*batch_size=128 or less"):
        check_config(tiny_config("batch_size=160"))
