"""The descriptor budget of the gRPC server (peerd/net/limits.py), in a child process so that
this process's own limit is left alone."""

from __future__ import annotations

import resource
import subprocess
import sys

import grpc
import pytest

from peerd.net.limits import (
    MAX_CONNECTIONS,
    RESERVED_DESCRIPTORS,
    PortInUse,
    bind,
    connection_cap,
    descriptors_needed,
    server_options,
)


def test_the_cap_leaves_the_reserve_and_never_exceeds_the_maximum() -> None:
    assert connection_cap(256) == 256 - RESERVED_DESCRIPTORS
    assert connection_cap(1024) == connection_cap(resource.RLIM_INFINITY) == MAX_CONNECTIONS
    assert connection_cap(64) == 1
    options = dict(server_options(100))
    assert options["grpc.max_allowed_incoming_connections"] == 100
    assert options["grpc.so_reuseport"] == 0


@pytest.mark.parametrize(("soft", "hard", "expected"), [
    (256, 4096, descriptors_needed()),  # raised to what the cap needs
    (256, 300, 300),  # as far as the hard limit allows
    (4096, 8192, 4096),  # never lowered
])
def test_the_soft_limit_is_raised_to_what_is_needed(soft: int, hard: int, expected: int) -> None:
    code = ("import resource; from peerd.net.limits import raise_descriptor_limit, "
            f"descriptors_needed; resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
            "print(raise_descriptor_limit(descriptors_needed()), "
            "resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split()
    assert shown == [str(expected), str(expected)]


async def test_a_served_port_is_not_shared() -> None:
    first = grpc.aio.server(options=server_options(8))
    port = bind(first.add_insecure_port, "127.0.0.1:0")
    await first.start()
    try:
        second = grpc.aio.server(options=server_options(8))
        with pytest.raises(PortInUse, match=f"cannot listen on 127.0.0.1:{port}: the port is in"):
            bind(second.add_insecure_port, f"127.0.0.1:{port}")
    finally:
        await first.stop(0)
