"""Progress of a study on stderr: log lines and tqdm bars (tqdm comes with transformers). ``quiet`` silences both
(tests); on a stream that is not a terminal the bars redraw at most every 10 s, so a log file stays readable."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional


class Progress:
    """``log(message)`` prints a line with the elapsed time; ``bar(iterable, total=, desc=)`` wraps an iterable in
    a tqdm bar (or returns it unchanged when quiet)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed():7.1f} s] {message}", file=self.stream, flush=True)

    def bar(self, iterable: Iterable, total: Optional[int] = None, desc: str = ""):
        if self.quiet:
            return iterable
        from tqdm.auto import tqdm

        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        return tqdm(iterable, total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True,
                    mininterval=0.5 if tty else 10.0)

    def counter(self, total: int, desc: str = ""):
        """A bar advanced by hand (``.update(n)``, ``.close()``), for loops the study does not own (generate)."""
        return self.bar(None, total=total, desc=desc) if not self.quiet else _NoCounter()


class _NoCounter:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


QUIET = Progress(quiet=True)
