"""What a long run tells the person waiting: stages begin and end, sampling steps and loaded bytes
advance. The pipeline reports to a `Progress`; front ends (terminal, web page, benchmark) subclass it."""
from __future__ import annotations

import sys
from typing import Callable


class Progress:
    """Silent base: every event is optional to handle."""

    def stage(self, name: str, detail: str = "") -> None:
        """A stage begins."""

    def stage_done(self, name: str, seconds: float, detail: str = "") -> None:
        """A stage ended successfully after `seconds`."""

    def step(self, name: str, i: int, n: int) -> None:
        """Step i of n of a stage is done (1-based: the last call has i == n)."""

    def advance(self, name: str, amount: int, total: int, unit: str = "B") -> None:
        """`amount` more units of a `total` finished (e.g. bytes of weights loaded)."""

    def note(self, text: str) -> None:
        """A line for the person (what is happening, a warning)."""


class LineProgress(Progress):
    """Plain lines to a callable: for logs, pipes and tests (no terminal control characters)."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self._done: dict = {}

    def stage(self, name, detail=""):
        self.say(f"[{name}] {detail}".rstrip())

    def step(self, name, i, n):
        if i == n or i % max(1, n // 4) == 0:
            self.say(f"  {name}: step {i}/{n}")

    def advance(self, name, amount, total, unit="B"):
        done = self._done[name] = self._done.get(name, 0) + amount
        scale, suffix = (1e9, " GB") if unit == "B" else (1, "")
        self.say(f"  {name}: {done / scale:.2f}/{total / scale:.2f}{suffix}")

    def note(self, text):
        self.say(text)


class ConsoleProgress(LineProgress):
    """tqdm bars with counts and ETA on a terminal; plain lines when the stream is not a TTY."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        super().__init__(lambda msg: print(msg, file=self.stream, flush=True))
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bars: dict = {}

    def _bar(self, name, total, unit):
        from tqdm import tqdm

        bar = self._bars.get(name)
        if bar is None:
            scale = unit == "B"
            bar = self._bars[name] = tqdm(total=total, desc=f"  {name}", unit=unit, unit_scale=scale,
                                          unit_divisor=1024 if scale else 1000, file=self.stream, leave=True,
                                          dynamic_ncols=True)
        return bar

    def _close(self, name):
        bar = self._bars.pop(name, None)
        if bar is not None:
            bar.close()

    def step(self, name, i, n):
        if not self.tty:
            return super().step(name, i, n)
        bar = self._bar(name, n, "step")
        bar.update(i - bar.n)
        if i >= n:
            self._close(name)

    def advance(self, name, amount, total, unit="B"):
        if not self.tty:
            return super().advance(name, amount, total, unit)
        bar = self._bar(name, total, unit)
        bar.update(amount)
        if bar.n >= total:
            self._close(name)

    def stage_done(self, name, seconds, detail=""):
        for key in [k for k in self._bars if k == name or k.startswith(name)]:
            self._close(key)

    def note(self, text):
        if self._bars:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            super().note(text)


def as_progress(progress) -> Progress:
    """A Progress from what callers pass: None (silent), a Progress, or a callable taking one line."""
    if progress is None:
        return Progress()
    if isinstance(progress, Progress):
        return progress
    return LineProgress(progress)
