"""The issue-20 figure, by hand (RELIABILITY.md, "Hardening against the LAN"): two daemons over
mutual TLS on loopback, the first one under a descriptor limit of 1024 (systemd's default soft
limit for a service without LimitNOFILE=; the daemon needs 640, so the hard limit does not
matter), and IDLE connections held against it for HOLD_S
seconds, each reopened as soon as the daemon closes it. Prints what the daemon closed, both
exit codes and the longest wait between two rounds of each daemon.

    PYTHONPATH=. .venv/bin/python scripts/idle_connection_flood.py OUT_DIR [IDLE] [HOLD_S]
"""

from __future__ import annotations

import itertools
import resource
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemons import ClusterCa, kill_all, start_loopback_daemons

from peerd.ops.ca import init_ca

ROUNDS = 60


def main() -> None:
    out = Path(sys.argv[1])
    idle = int(sys.argv[2]) if len(sys.argv) > 2 else 1100
    hold_s = float(sys.argv[3]) if len(sys.argv) > 3 else 40.0
    resource.setrlimit(resource.RLIMIT_NOFILE, (4 * idle, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    ca = ClusterCa(init_ca(out / "ca"))
    daemons = start_loopback_daemons(out, 2, ["--rounds", str(ROUNDS)], ca,
                                     descriptor_limit_by_position={0: 1024})
    first = daemons[0]
    try:
        first.wait_rounds(2, timeout_s=300)
        host, port = first.address.rsplit(":", 1)
        sockets: list[socket.socket | None] = [None] * idle
        opened = closed = 0
        started = time.monotonic()
        while time.monotonic() - started < hold_s:
            for index, connection in enumerate(sockets):
                if connection is not None:
                    try:
                        if connection.recv(1) == b"":
                            raise ConnectionResetError
                        continue
                    except BlockingIOError:
                        continue
                    except OSError:
                        connection.close()
                        closed += 1
                try:
                    connection = socket.create_connection((host, int(port)), timeout=2)
                    connection.setblocking(False)
                    sockets[index] = connection
                    opened += 1
                except OSError:
                    sockets[index] = None
            time.sleep(0.5)
        print(f"held {idle} idle connections for {hold_s:.0f} s: opened {opened}, "
              f"closed by the daemon {closed}")
        for connection in sockets:
            if connection is not None:
                connection.close()
        codes = [d.process.wait(timeout=600) for d in daemons]
        print(f"exit codes {codes}")
        for daemon in daemons:
            times = [r["wall_s"] for r in daemon.rounds()]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            print(f"{daemon.peer_id}: {len(times)} rounds, longest wait between rounds "
                  f"{max(gaps):.2f} s, median {sorted(gaps)[len(gaps) // 2]:.2f} s")
        log = first.output()
        print(f"failed checkpoints: {log.count('failed, retried after the next round')}; "
              f"'Too many open files' in the log: {'Too many open files' in log}")
    finally:
        kill_all(daemons)


if __name__ == "__main__":
    main()
