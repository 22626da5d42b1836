"""`peerd bench wire`: a small real run over gRPC and TCP, the parameter shapes, the bit check."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest
import torch

from peerd.bench.processes import BenchError, Child
from peerd.bench.wire import (
    LOOPBACK,
    MIB,
    CountingRelay,
    _receiver,
    check_bit_equal,
    model_parameters,
    model_spec,
    spec_bytes,
)
from peerd.net.codec import DEFAULT_CHUNK_BYTES

KEYS = {"throughput_mib_s", "tcp_mib_s", "payload_bytes", "bytes_on_wire", "ratio_to_tcp",
        "wire_overhead", "chunk_bytes", "repeats", "bulk_mib_s", "bulk_ratio_to_tcp",
        "bulk_bytes_on_wire", "bulk_wire_overhead",
        *(f"{path}_cpu_ms_per_mib_{side}" for path in ("grpc", "bulk", "tcp")
          for side in ("sender", "receiver"))}


def test_small_run_reports_every_key_and_counts_the_wire() -> None:
    # A subprocess runs the `python -m` entry point exactly as documented in BENCHMARKS.md.
    result = subprocess.run(
        [sys.executable, "-m", "peerd.bench.wire", "--mib", "8", "--repeat", "1", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == KEYS
    assert report["payload_bytes"] == 8 * MIB
    assert report["repeats"] == 1
    assert report["chunk_bytes"] == DEFAULT_CHUNK_BYTES
    assert report["throughput_mib_s"] > 0 and report["tcp_mib_s"] > 0
    assert 8 * MIB <= report["bytes_on_wire"] <= 1.2 * 8 * MIB
    # The bulk path: its own framing costs a few hundred bytes per stream, no HTTP/2.
    assert report["bulk_mib_s"] > 0
    assert 8 * MIB < report["bulk_bytes_on_wire"] <= 8 * MIB + 64 * 1024


@pytest.mark.parametrize("mib", [1, 8, 48, 256])
def test_parameters_total_exactly_the_size_asked_for(mib: int) -> None:
    spec = model_spec(mib)
    assert spec_bytes(spec) == mib * MIB
    assert all(dtype == torch.float32 for dtype, _ in spec.values())


def test_parameters_are_reproducible_from_the_seed() -> None:
    spec = model_spec(1)
    check_bit_equal(model_parameters(spec, 3), model_parameters(spec, 3), "same seed")


def test_one_flipped_bit_fails_the_check() -> None:
    sent = model_parameters(model_spec(1), 0)
    received = {name: tensor.clone() for name, tensor in sent.items()}
    received["embed.weight"].view(torch.int32)[5, 7] ^= 1
    with pytest.raises(BenchError, match=r"'embed\.weight'"):
        check_bit_equal(sent, received, "gRPC")


def test_missing_tensor_fails_the_check() -> None:
    sent = model_parameters(model_spec(1), 0)
    received = dict(sent)
    del received["embed.weight"]
    with pytest.raises(BenchError, match="received tensors"):
        check_bit_equal(sent, received, "gRPC")


def test_relay_counts_both_directions() -> None:
    with socket.create_server((LOOPBACK, 0)) as upstream:
        def echo_upper() -> None:
            peer, _ = upstream.accept()
            with peer:
                peer.sendall(peer.recv(100).upper())

        server = threading.Thread(target=echo_upper)
        server.start()
        with CountingRelay(upstream.getsockname()[1]) as relay:
            host, port = relay.address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as client:
                client.sendall(b"hello")
                assert client.recv(100) == b"HELLO"
        server.join(5)
    assert (relay.bytes_up, relay.bytes_down) == (5, 5)


def test_a_failure_in_a_child_fails_the_run_with_its_traceback() -> None:
    # The same path a bit mismatch found by the receiver takes back to the conductor.
    receiver = Child("receiver", _receiver, (model_spec(1), 0, None, 30.0))
    try:
        receiver.reply(60.0)
        with pytest.raises(BenchError, match=r"(?s)receiver failed:.*unknown command"):
            receiver.call("bogus", timeout_s=30.0)
    finally:
        receiver.stop()
    assert receiver.process.exitcode == 1
