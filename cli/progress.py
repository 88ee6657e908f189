"""Progress on the terminal for long client calls."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def progress(label: str) -> Iterator[None]:
    """An elapsed-time ticker on a TTY stderr (every 0.5 s); else a start and an end line."""
    stream, start = sys.stderr, time.perf_counter()
    tty = stream.isatty()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            stream.write(f"\r{label}: {time.perf_counter() - start:.1f} s")
            stream.flush()

    if tty:
        stream.write(f"\r{label}: 0.0 s")
        stream.flush()
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    else:
        print(f"{label} ...", file=stream, flush=True)
    outcome = "failed"
    try:
        yield
        outcome = "done"
    finally:
        stop.set()
        if tty:
            ticker.join()
        elapsed = time.perf_counter() - start
        end = "\r\x1b[K" if tty else ""  # a TTY: overwrite the ticker's line
        print(f"{end}{label}: {outcome} in {elapsed:.1f} s", file=stream, flush=True)


class ProgressBar:
    """A bar on a TTY stderr (rewritten in place), a line per round otherwise: fed by
    ``DriffusionClient.stream``'s ``on_progress``."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width = label, width
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()

    def update(self, p) -> None:
        """``p``: a ``driffusion.client.Progress``."""
        filled = round(self.width * p.round / max(p.rounds, 1))
        bar = "#" * filled + "." * (self.width - filled)
        text = (
            f"{self.label} [{bar}] round {p.round}/{p.rounds}, step {p.steps_done}, "
            f"{time.perf_counter() - self.start:.1f} s"
        )
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}")
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def done(self) -> None:
        elapsed = time.perf_counter() - self.start
        end = "\r\x1b[K" if self.tty else ""
        print(f"{end}{self.label}: done in {elapsed:.1f} s", file=self.stream, flush=True)
