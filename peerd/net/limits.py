"""What a daemon's gRPC server may be made to hold by whoever reaches its port.

A board on a shared LAN must survive strangers: idle TCP connections that never speak, TLS
scans, floods of streams. Each accepted connection costs a file descriptor, and under the usual
service limit (soft 1024) about a thousand idle connections would leave none for the next
checkpoint write. So the server
- raises the soft descriptor limit towards what it needs (`raise_descriptor_limit`),
- accepts at most `connection_cap` connections, leaving RESERVED_DESCRIPTORS for files,
  outgoing channels and the metrics endpoint (connections beyond the cap are closed at once),
- closes a connection whose TLS or HTTP/2 handshake has not finished within HANDSHAKE_TIMEOUT_S,
- takes at most MAX_STREAMS_PER_CONNECTION concurrent streams on one connection,
- owns its port: no SO_REUSEPORT, so a second daemon on a served port fails to bind
  (`PortInUse`) instead of sharing the port with the first one at random.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable

log = logging.getLogger("peerd.limits")

# Incoming connections a daemon takes at most: a cluster on one LAN is tens of peers, each with
# one channel to it, plus operators' status calls.
MAX_CONNECTIONS = 512
# Descriptors kept out of the connection budget: checkpoint and log files, the data set, the
# outgoing channels to every peer, mDNS sockets, the metrics endpoint, the engine's threads.
RESERVED_DESCRIPTORS = 128
# A LAN handshake takes milliseconds; a stalled one (a port scanner, an idle socket) is closed
# after this instead of gRPC's default 120 s.
HANDSHAKE_TIMEOUT_S = 5.0
# A peer pushes one slice per round to each neighbour and pulls a few snapshots: a handful of
# streams at once on its connection is plenty.
MAX_STREAMS_PER_CONNECTION = 16


class PortInUse(ValueError):
    """Another process serves the port this daemon was told to use (exit status 2)."""


def descriptors_needed() -> int:
    return MAX_CONNECTIONS + RESERVED_DESCRIPTORS


def raise_descriptor_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to `needed` where the hard limit allows; returns the soft
    limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def connection_cap(soft_limit: int) -> int:
    """Incoming connections that fit under this descriptor limit, at most MAX_CONNECTIONS."""
    if soft_limit == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft_limit - RESERVED_DESCRIPTORS))


def server_options(max_connections: int) -> list[tuple[str, int]]:
    """gRPC server options enforcing the limits above."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT_S * 1000)),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ]


def prepare_server_limits() -> list[tuple[str, int]]:
    """Raise the descriptor limit and return the server options that fit under it; warns when
    the limit cannot be raised to what MAX_CONNECTIONS needs."""
    soft = raise_descriptor_limit(descriptors_needed())
    cap = connection_cap(soft)
    if cap < MAX_CONNECTIONS:
        log.warning("the file descriptor limit is %d (hard limit too low to raise it to %d): "
                    "serving at most %d connections at once; raise LimitNOFILE= to serve more",
                    soft, descriptors_needed(), cap)
    return server_options(cap)


def bind(add_port: Callable[[str], int], bind_address: str) -> int:
    """Call `add_port(bind_address)` (a server's add_insecure_port or add_secure_port), turning
    gRPC's failure to bind into PortInUse naming the address; returns the bound port."""
    try:
        port = add_port(bind_address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise PortInUse(f"cannot listen on {bind_address}: the port is in use (another peerd "
                        f"daemon?) or the address is not this machine's; choose another --port "
                        f"or stop the other daemon")
    return port
