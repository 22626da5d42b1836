"""Reading a JSON-lines log of rounds (a daemon's rounds.jsonl, a cluster's metrics.jsonl)
while it is being written, in bounded memory.

The file is the one source of truth: a request for records after round N is answered from the
last KEPT records held here when they reach back that far, else by reading the file again. Only
the bytes appended since the last look are parsed; a file that shrank or was replaced (a daemon
rewinding its log on rejoin) is read afresh. Calls may come from several threads (the page
server reads files off its event loop).
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from pathlib import Path

KEPT = 256  # about 0.6 MB of parsed records (2.3 KB each, measured)
# One reply carries at most this many records (the newest): a page of several hours of rounds.
MAX_REPLY = 20_000


class RecordsFile:
    def __init__(self, path: Path, kept: int = KEPT) -> None:
        self.path = path
        self.recent: deque[dict] = deque(maxlen=kept)
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file read
        self._offset = 0  # bytes parsed so far
        self._complete = True  # `recent` holds every record of the file
        self._lock = threading.Lock()

    def _reset(self) -> None:
        self.recent.clear()
        self._identity = None
        self._offset = 0
        self._complete = True

    def refresh(self) -> None:
        """Parse what was appended since the last call."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._reset()
            return
        if (stat.st_dev, stat.st_ino) != self._identity or stat.st_size < self._offset:
            self._reset()
            self._identity = (stat.st_dev, stat.st_ino)
        if stat.st_size == self._offset:
            return
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            appended = handle.read(stat.st_size - self._offset)
        # A line still being written waits for the next call.
        whole = appended[:appended.rfind(b"\n") + 1]
        self._offset += len(whole)
        for line in whole.splitlines():
            record = _parse(line)
            if record is None:
                continue
            if self.recent and record["round"] <= self.recent[-1]["round"]:
                # Rounds run again in place: never two records of one round.
                while self.recent and self.recent[-1]["round"] >= record["round"]:
                    self.recent.pop()
            if len(self.recent) == self.recent.maxlen:
                self._complete = False
            self.recent.append(record)

    def after(self, since: int) -> list[dict]:
        """The records of rounds after `since`, oldest first (the newest MAX_REPLY)."""
        with self._lock:
            self._refresh()
            if self._complete or (self.recent and self.recent[0]["round"] <= since + 1):
                return [r for r in self.recent if r["round"] > since][-MAX_REPLY:]
        newest: deque[dict] = deque(maxlen=MAX_REPLY)
        with open(self.path, "rb") as handle:
            for line in handle:
                record = _parse(line)
                if record is None or record["round"] <= since:
                    continue
                while newest and newest[-1]["round"] >= record["round"]:
                    newest.pop()
                newest.append(record)
        return list(newest)

    def latest(self, count: int) -> list[dict]:
        """The newest `count` records (at most KEPT)."""
        with self._lock:
            self._refresh()
            return list(self.recent)[-count:]

    def last_round(self) -> int:
        with self._lock:
            self._refresh()
            return self.recent[-1]["round"] if self.recent else 0


def _parse(line: bytes) -> dict | None:
    """A record with an integer round; anything else (a line cut by a crash) is skipped."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("round"), int):
        return None
    return record
