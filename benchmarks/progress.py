"""A progress bar on stderr for the benchmark suite.

On a terminal it redraws one line (bar, task, timings done, elapsed). Anywhere else (CI logs, pipes) it
writes one plain line when a task starts and one when it ends, so logs stay readable and never flicker.
"""
import sys
import time


class Progress:
    WIDTH = 24

    def __init__(self, total, stream=None, enabled=True):
        self.total = max(1, total)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.task = ""
        self.ticks = 0
        self.start = self.task_start = time.perf_counter()

    def _write(self, text):
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def _draw(self):
        filled = self.WIDTH * self.done // self.total
        bar = "#" * filled + "." * (self.WIDTH - filled)
        elapsed = time.perf_counter() - self.start
        self._write(f"\r\033[K[{bar}] {self.done}/{self.total} {self.task} ({self.ticks} timings, {elapsed:.0f} s)")

    def begin(self, task):
        self.task, self.ticks, self.task_start = task, 0, time.perf_counter()
        if self.tty:
            self._draw()
        else:
            self._write(f"[{self.done + 1}/{self.total}] {task} ...\n")

    def tick(self):
        """One timing finished inside the current task (redraws on a terminal only)."""
        self.ticks += 1
        if self.tty:
            self._draw()

    def end(self, status="done"):
        self.done += 1
        took = time.perf_counter() - self.task_start
        if self.tty:
            self._draw()
        else:
            self._write(f"[{self.done}/{self.total}] {self.task}: {status} in {took:.1f} s\n")

    def note(self, message):
        """A line that must stay visible (a skipped benchmark, say), printed above the bar."""
        self._write(("\r\033[K" if self.tty else "") + f"note: {message}\n")
        if self.tty:
            self._draw()

    def close(self):
        if self.tty:
            self._write("\n")

    def wrap(self, time_call):
        """`time_call` that ticks this bar after each measurement (handed to the op benchmark modules)."""

        def ticking(*args, **kwargs):
            stats = time_call(*args, **kwargs)
            self.tick()
            return stats

        return ticking
