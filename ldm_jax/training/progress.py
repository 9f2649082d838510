"""The training loop's console: a progress bar in a terminal, plain lines in a log.

SLURM and pod logs are files, where a bar's carriage-return updates pile up into one
unreadable line; there each logged step is one line instead, with the step, loss,
images/s, MFU and input share where known, and the time left at the current pace.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """`update` at each logged step (shown where `show`), `write` for other lines (the
    lead process's lines are always written, as evaluations and preemptions)."""

    def __init__(self, total: int, initial: int, *, lead: bool, show: bool, stream=None):
        self.stream = sys.stderr if stream is None else stream  # where tqdm writes
        self.total, self.lead, self.show = total, lead, lead and show
        self._start, self._t0 = initial, time.perf_counter()
        self.bar = None
        if self.show and _is_terminal(self.stream):
            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream
            )

    def update(self, done: int, loss: float, throughput: dict) -> None:
        """Step `done` has finished (steps are dispatched asynchronously: only a logged
        step is known to be done)."""
        figures = _figures(loss, throughput)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(figures)
        elif self.show:
            shown = ", ".join(f"{k}={v}" for k, v in figures.items())
            left = _time_left(done - self._start, self.total - done, self._t0)
            print(f"step {done}/{self.total}: {shown}{left}", flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        elif self.lead:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _figures(loss: float, throughput: dict) -> dict:
    """loss, images/s, and MFU and input share where known, as short strings."""
    out = {"loss": f"{loss:.4g}", "img_s": f"{throughput.get('images_per_sec', 0.0):.1f}"}
    if "mfu" in throughput:
        out["mfu"] = f"{100 * throughput['mfu']:.1f}%"
    if "input_share" in throughput:
        out["input"] = f"{100 * throughput['input_share']:.0f}%"
    return out


def _time_left(steps_done: int, steps_left: int, t0: float) -> str:
    """', 1:02:03 left' at the pace since the loop started (compilation included, so the
    first lines overstate it), or nothing before any step is done."""
    if steps_done <= 0 or steps_left <= 0:
        return ""
    seconds = int((time.perf_counter() - t0) / steps_done * steps_left)
    h, rest = divmod(seconds, 3600)
    return f", {h}:{rest // 60:02d}:{rest % 60:02d} left"
