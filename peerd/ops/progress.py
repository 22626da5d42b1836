"""What a command is doing, from its first second.

On a terminal: one live line (tqdm) that names the current phase, counts its steps with a bar
when it has any, and shows the seconds since the command started, redrawn at least every
second so a long phase never looks like a hang; lasting lines (a finished round) print above
it. Elsewhere (systemd, CI, a pipe): one plain, time-stamped line per change of phase, and
within a long phase one every few seconds, nothing redrawn.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

DEFAULT_COLUMNS = 100
# tqdm hides bars below a terminal's last row, and takes a terminal that reports no size (a
# bare pseudo-terminal) to have -1 rows: one bar needs only one row of any terminal.
TERMINAL_ROWS = 24
REDRAW_S = 1.0  # a live line's clock moves at least this often
STEP_REDRAW_S = 0.1  # and a step bar at most this often
# Off a terminal a phase that stays the same is repeated this often, so a log shows the
# command is alive (the tests' bound on silence is 10 s).
REPEAT_S = 8.0
STATUS_FORMAT = "{desc}"
STEPS_FORMAT = "{desc} {bar:20} {n_fmt}/{total_fmt} steps"


class Console:
    """A command's progress: `say` lasting lines, `status` the current phase, `steps` a bar.

    Safe to call from several threads (the daemon trains on a worker thread).
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool = True,
                 live: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = self.stream.isatty() if live is None else live
        self.started = time.monotonic()
        self._lock = threading.RLock()
        self._phase = ""
        self._total: int | None = None
        self._shown_at = 0.0  # off a terminal: when a line was last printed
        self._drawn_at = 0.0  # on a terminal: when the live line was last drawn
        self._bar: tqdm | None = None
        self._stop = threading.Event()
        self._clock: threading.Thread | None = None
        if self.enabled and self.live:
            self._bar = tqdm(total=None, file=self.stream, bar_format=STATUS_FORMAT,
                             ncols=self._columns(), nrows=TERMINAL_ROWS, leave=False,
                             mininterval=0)
            self._clock = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._clock.start()

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"

    def say(self, text: str) -> None:
        """A line that stays (a round's figures, an address to use)."""
        if not self.enabled:
            return
        with self._lock:
            if self._bar is not None:
                self._bar.write(text, file=self.stream)
            else:
                self._print(text)

    def status(self, text: str) -> None:
        """The current phase, e.g. 'waiting for peers: 1 of 3 found'; ends a step bar."""
        if not self.enabled:
            return
        with self._lock:
            changed = text != self._phase or self._total is not None
            self._phase, self._total = text, None
            if self._bar is not None:
                self._bar.bar_format = STATUS_FORMAT
                self._bar.reset(total=None)
                self._draw()
            elif changed or time.monotonic() - self._shown_at >= REPEAT_S:
                self._print(f"[{self.elapsed()}] {text}")

    def steps(self, phase: str, total: int) -> Callable[[int], None]:
        """A bar of `total` steps for `phase`; call the returned function with steps done."""
        if not self.enabled:
            return lambda done: None
        with self._lock:
            self._phase, self._total = phase, total
            if self._bar is not None:
                self._bar.bar_format = STEPS_FORMAT
                self._bar.reset(total=total)
                self._draw()
            else:
                self._print(f"[{self.elapsed()}] {phase}: {total} steps")

        def advance(done: int) -> None:
            with self._lock:
                if self._phase != phase or self._total != total:
                    return
                if self._bar is not None:
                    self._bar.n = done
                    # Thousands of steps a second would flood a slow terminal.
                    if done == total or time.monotonic() - self._drawn_at >= STEP_REDRAW_S:
                        self._draw()
                    return
                if time.monotonic() - self._shown_at >= REPEAT_S:
                    self._print(f"[{self.elapsed()}] {phase}: {done}/{total} steps")

        return advance

    def close(self) -> None:
        self._stop.set()
        if self._clock is not None:
            self._clock.join()
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _draw(self) -> None:
        assert self._bar is not None
        # The line is cut to fit: a line that wraps cannot be redrawn in place.
        self._bar.ncols = self._columns()
        self._bar.set_description_str(f"[{self.elapsed()}] {self._phase}", refresh=False)
        self._bar.refresh()
        self._drawn_at = time.monotonic()

    def _columns(self) -> int:
        """The terminal's width, re-read at each redraw (it may be resized); a terminal that
        reports none (a bare pseudo-terminal) gets 100."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        return columns - 1 if columns > 1 else DEFAULT_COLUMNS

    def _tick(self) -> None:
        while not self._stop.wait(REDRAW_S):
            with self._lock:
                if self._bar is not None:
                    self._draw()

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self._shown_at = time.monotonic()


def step_display(console: Console, phase: Callable[[], str]) -> Callable[[int, int], None]:
    """An Engine.on_step callback: a new bar named `phase()` at each round's first step."""
    advance: list[Callable[[int], None]] = []

    def on_step(done: int, total: int) -> None:
        if done == 1 or not advance:
            advance[:] = [console.steps(phase(), total)]
        advance[0](done)

    return on_step


def _size(count: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


def round_line(record: dict) -> str:
    """One daemon's finished round (a rounds.jsonl record), every number named."""
    speed = record["samples"] / record["round_s"] if record["round_s"] > 0 else 0.0
    return (f"round {record['round']} done: train loss {record['train_loss']:.4f}, "
            f"local accuracy {record['local_acc']:.3f}, {record['members']} members, "
            f"round took {record['round_s']:.1f} s ({speed:.0f} samples/s), "
            f"sent {_size(record['bytes_sent_cum'])} so far, "
            f"{record['wall_s']:.0f} s since the first round")


def global_round_line(record: dict, rounds: int) -> str:
    """One round of `peerd sim` or `peerd cluster` (a metrics.jsonl record), every number
    named."""
    parts = [f"round {record['round']}/{rounds}:"]
    if record.get("global_acc") is not None:
        parts.append(f"global accuracy {record['global_acc']:.3f},")
    if record.get("global_ppl") is not None:
        parts.append(f"global perplexity {record['global_ppl']:.2f},")
    parts.append(f"train loss {record['train_loss_mean']:.3f}, "
                 f"weights trained so far {100 * record['coverage']:.1f}%, "
                 f"sent {_size(record['bytes_sent_peer_mean'])} per peer this round, "
                 f"{record['wall_s']:.1f} s since the first round")
    return " ".join(parts)
