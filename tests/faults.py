"""Run the CLI with a fault injected at one training step; used by test_resume.py.

    NB_FAULT=kill|term|nan NB_FAULT_STEP=k python -m tests.faults train [overrides]

kill: SIGKILL at step k (nothing can be saved); term: SIGTERM at step k (delivered to the
process as from outside, while step k runs); nan: the loss of step k is NaN.
The fault hooks into the loss computation, which the loop calls once per training step
before the final evaluation (the tests run with eval_every=0).
"""

from __future__ import annotations

import os
import signal
import sys

import normbench.train as train
from normbench.cli import main

FAULT = os.environ["NB_FAULT"]
STEP = int(os.environ["NB_FAULT_STEP"])
_original = train.loss_and_counts
_calls = 0


def faulty_loss_and_counts(logits, batch):
    global _calls
    _calls += 1
    loss, correct, count = _original(logits, batch)
    if _calls == STEP:
        if FAULT == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif FAULT == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif FAULT == "nan":
            loss = loss * float("nan")
    return loss, correct, count


train.loss_and_counts = faulty_loss_and_counts
sys.exit(main(sys.argv[1:]))
