"""Run the CLI recording which training samples this process reads: every index the
streamed folder's sampler hands to the DataLoader, by epoch, into NB_DRAWS/rank<r>.json.

    NB_DRAWS=DIR torchrun --nproc_per_node=2 -m tests.helpers.record_draws train [overrides]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from normbench.cli import main
from normbench.data import streaming

_original = streaming.ShardedEpochs.__iter__
_draws: dict[str, list[int]] = {}


def recording_iter(self):
    for batch in _original(self):
        _draws.setdefault(f"{self.seed}/{self.epoch}", []).extend(index for index, _ in batch)
        folder = Path(os.environ["NB_DRAWS"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(_draws))
        yield batch


streaming.ShardedEpochs.__iter__ = recording_iter

sys.exit(main(sys.argv[1:]))
