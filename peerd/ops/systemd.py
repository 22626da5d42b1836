"""The service manager's notify protocol (sd_notify(3)), spoken directly: no libsystemd.

Under a `Type=notify` unit systemd passes NOTIFY_SOCKET (an AF_UNIX datagram socket: a path,
or an abstract name written with a leading '@'); the daemon sends newline-separated
`KEY=value` lines to it: READY=1 once it serves, WATCHDOG=1 to prove its event loop is alive,
STATUS= for `systemctl status`, STOPPING=1 when it shuts down. Without NOTIFY_SOCKET every
call is a no-op, so the daemon runs the same from a shell.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("peerd.ops.systemd")


class Notifier:
    """Sends notifications to one socket; a send that fails is logged, never raised."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._warned = False
        self._stopping_sent = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for, or a no-op one when NOTIFY_SOCKET is unset."""
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            # Newer managers also offer vsock: and friends; peerd runs on the board itself.
            log.warning("NOTIFY_SOCKET=%s is not a path or an abstract socket; not notifying",
                        address)
            address = None
        return cls(address, _watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        """STOPPING=1, once: shutdown may begin on a signal and pass through `finally` again."""
        if not self._stopping_sent:
            self._stopping_sent = True
            self._send("STOPPING=1")

    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half the manager's timeout), or None when no watchdog
        is asked of this process."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, message: str) -> None:
        if self.address is None:
            return
        # Abstract socket names start with a NUL byte, which the environment cannot carry.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never block the event loop on a full manager queue: drop the datagram.
                self._socket.setblocking(False)
            self._socket.sendto(message.encode(), target)
        except OSError as error:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "cannot notify the service manager at %s: %s", self.address, error)


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID, if set, is our pid)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        pid = int(environ.get("WATCHDOG_PID", os.getpid()))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec


async def watchdog_loop(notifier: Notifier, interval: float) -> None:
    """WATCHDOG=1 every `interval` seconds from the event loop itself: when the loop blocks,
    the pings stop and the manager restarts the daemon."""
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
