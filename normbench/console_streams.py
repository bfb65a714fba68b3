"""The terminal going away does not end a run.

`normbench train | head`, a closed `tee` or a dropped SSH session close the pipe that
stdout (or stderr) writes into. Python then raises BrokenPipeError at the next print, which
would kill the run between two steps and leave summary.json saying `running`. Instead, the
first failed write points the stream at /dev/null: the run carries on to its end, its
console output is dropped, and everything it keeps (TensorBoard events, checkpoints,
summary.json) is written as usual.
"""

from __future__ import annotations

import errno
import os
import sys


class _SurvivingStream:
    """A text stream that swaps its file descriptor for /dev/null when the reader is gone."""

    def __init__(self, stream):
        self._stream = stream
        self.lost = False

    def _reader_gone(self) -> None:
        self.lost = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # no descriptor (a test's StringIO): writes are dropped
            pass

    def _guard(self, call, *args):
        if self.lost:
            return None
        try:
            return call(*args)
        except OSError as e:
            if not isinstance(e, BrokenPipeError) and e.errno not in (errno.EPIPE, errno.EIO):
                raise
            self._reader_gone()
            return None

    def write(self, text: str) -> int:
        self._guard(self._stream.write, text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)


def keep_running_without_reader() -> None:
    """Wrap sys.stdout and sys.stderr (once) so that a closed pipe drops output, not the run."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _SurvivingStream):
            setattr(sys, name, _SurvivingStream(stream))
