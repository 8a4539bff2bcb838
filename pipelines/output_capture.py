"""Everything this process writes to its stdout and stderr, line by line, into a callback.

The capture works on the file descriptors, so it sees what Python prints, what Ray's log monitor relays from the
workers (`(RayTrainWorker pid=…) …`), what loggers created before it write, and what native code (Ray's core
worker) writes to fd 2. Processes started inside the capture inherit its pipes; their lines arrive the same way.
"""

from __future__ import annotations

import os
import selectors
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

LineHandler = Callable[[str, str], None]  # (stream name "out" | "err", one line without its newline)
DRAIN_S = 0.3  # after the capture ends: the reader stops at the first quiet DRAIN_S, or after MAX_DRAIN_S
MAX_DRAIN_S = 2.0


class _Reader(threading.Thread):
    """Reads both pipes until told to stop, splitting on newlines and carriage returns (progress bars)."""

    def __init__(self, pipes: dict[int, str], handle: LineHandler):
        super().__init__(name="raydiff-output-capture", daemon=True)
        self.handle, self.names = handle, pipes
        self.pending = {fd: b"" for fd in pipes}
        self.selector = selectors.DefaultSelector()
        for fd in pipes:
            self.selector.register(fd, selectors.EVENT_READ)
        self.stopping = threading.Event()
        self.stopped_at = 0.0

    def stop(self) -> None:
        self.stopped_at = time.monotonic()
        self.stopping.set()

    def run(self) -> None:
        while self.selector.get_map():
            events = self.selector.select(timeout=DRAIN_S if self.stopping.is_set() else 0.2)
            if self.stopping.is_set() and (not events or time.monotonic() > self.stopped_at + MAX_DRAIN_S):
                break
            for key, _ in events:
                self._read(key.fd)
        for fd, rest in self.pending.items():
            if rest:
                self._emit(fd, rest)

    def _read(self, fd: int) -> None:
        chunk = os.read(fd, 65536)
        if not chunk:
            self.selector.unregister(fd)
            return
        *lines, self.pending[fd] = (self.pending[fd] + chunk).replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            self._emit(fd, line)

    def _emit(self, fd: int, raw: bytes) -> None:
        try:
            self.handle(self.names[fd], raw.decode("utf-8", errors="replace"))
        except Exception as error:  # noqa: BLE001 — a display bug must not stop the capture
            os.write(2, f"raydiff: output capture: {error!r}\n".encode())


@contextmanager
def captured_output(handle: LineHandler) -> Iterator[tuple[TextIO, TextIO]]:
    """Redirect fds 1 and 2 into pipes read by a thread that calls `handle(stream, line)`; yield text files on the
    original stdout and stderr (the terminal, a pipe or a file) to write the console's own output to."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {1: os.dup(1), 2: os.dup(2)}
    pipes = {1: os.pipe(), 2: os.pipe()}
    python_streams = sys.stdout, sys.stderr
    for fd, (_, write_end) in pipes.items():
        os.dup2(write_end, fd)
        os.close(write_end)
    reader = _Reader({pipes[1][0]: "out", pipes[2][0]: "err"}, handle)
    reader.start()
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    out = open(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    err = open(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        yield out, err
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = python_streams
        for fd, original in saved.items():
            os.dup2(original, fd)  # the pipes now have no writer in this process
            os.close(original)
        reader.stop()
        reader.join(timeout=MAX_DRAIN_S + 1.0)
        for read_end, _ in pipes.values():
            os.close(read_end)
        out.close()
        err.close()
