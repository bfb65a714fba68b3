"""Run the CLI with a fault injected at one training step; used by engine/test_resume.py
and cli/test_torchrun.py.

    NB_FAULT=kill|term|nan NB_FAULT_STEP=k python -m tests.helpers.faults train [overrides]

kill: SIGKILL at step k (nothing can be saved); term: SIGTERM at step k (delivered to the
process as from outside, while step k runs); nan: the loss of step k is NaN. Under torchrun
NB_FAULT_RANK=r limits the fault to rank r, and NB_FAULT_MARK=FILE records the time of the
fault there (how long the others take to end is measured from it).
The fault hooks into the loss computation, which the loop calls once per training step
before the final evaluation (the tests run with eval_every=0).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import normbench.engine.train as train
from normbench.cli import main

FAULT = os.environ["NB_FAULT"]
if os.environ.get("NB_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
    FAULT = "none"
STEP = int(os.environ["NB_FAULT_STEP"])
_original = train.loss_and_counts
_calls = 0


def faulty_loss_and_counts(logits, batch):
    global _calls
    _calls += 1
    loss, correct, count = _original(logits, batch)
    if _calls == STEP:
        if os.environ.get("NB_FAULT_MARK") and FAULT != "none":
            with open(os.environ["NB_FAULT_MARK"], "w") as f:
                f.write(repr(time.time()))
        if FAULT == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif FAULT == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif FAULT == "nan":
            loss = loss * float("nan")
    return loss, correct, count


train.loss_and_counts = faulty_loss_and_counts
sys.exit(main(sys.argv[1:]))
