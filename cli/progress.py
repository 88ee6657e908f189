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
