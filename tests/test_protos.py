"""The generated protobuf code is current, and the Peer service has the shape peers rely on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from peerd.v1 import peer_pb2, peer_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
GENERATED = ("peer_pb2.py", "peer_pb2.pyi", "peer_pb2_grpc.py")


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "protos/peerd/v1/peer.proto",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"
    for name in GENERATED:
        fresh = (tmp_path / "peerd" / "v1" / name).read_bytes()
        checked_in = (REPO / "peerd" / "v1" / name).read_bytes()
        assert fresh == checked_in, f"peerd/v1/{name} is stale: run scripts/generate_protos.sh"


def test_peer_service_rpcs_and_streaming_kinds() -> None:
    service = peer_pb2.DESCRIPTOR.services_by_name["Peer"]
    methods = {
        method.name: (
            method.client_streaming,
            method.server_streaming,
            method.input_type.name,
            method.output_type.name,
        )
        for method in service.methods
    }
    assert methods == {
        "Handshake": (False, False, "Hello", "Hello"),
        "PushSlices": (True, False, "SliceFrame", "PushAck"),
        "Pull": (False, True, "PullRequest", "SliceFrame"),
        "Status": (False, False, "StatusRequest", "StatusReply"),
    }
    # The generated servicer, which the daemon subclasses, exposes the same four RPCs.
    for name in methods:
        assert callable(getattr(peer_pb2_grpc.PeerServicer, name))
    # The codec relies on a frame carrying exactly one of these bodies.
    body = peer_pb2.SliceFrame.DESCRIPTOR.oneofs_by_name["body"]
    assert [field.name for field in body.fields] == ["start", "tensor", "chunk"]
